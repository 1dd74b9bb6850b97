"""The SD v1 key layout, checked without weights (models built on the meta device)."""
import pytest
import torch
from omegaconf import OmegaConf

from ldm.pipeline import build_model
from conftest import ROOT, V1_CONFIG

MANIFEST = ROOT / "tests" / "manifests" / "sd-v1.txt"


def test_v1_model_matches_committed_manifest():
    model = build_model(V1_CONFIG, meta=True)
    got = [f"{k} {list(v.shape)}" for k, v in model.state_dict().items()]
    want = MANIFEST.read_text().splitlines()
    assert got == want
    # Figures of the official v1 model: UNet 859.52M, VAE 83.65M, CLIP text 123.06M.
    counts = {p: sum(v.numel() for k, v in model.state_dict().items() if k.startswith(p))
              for p in ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")}
    assert counts == {"model.diffusion_model.": 859_520_964, "first_stage_model.": 83_653_863,
                      "cond_stage_model.": 123_060_480}


def test_full_size_v1_layout_is_what_diffusers_converters_expect():
    """diffusers' converters of the original layout (the referee) accept our full-size v1
    state_dict and produce exactly the keys of diffusers' own models."""
    su = pytest.importorskip("diffusers.loaders.single_file_utils")
    diffusers = pytest.importorskip("diffusers")
    model = build_model(V1_CONFIG, meta=True)
    sd = model.state_dict()
    original = OmegaConf.to_container(OmegaConf.load(V1_CONFIG))
    ucfg = su.create_unet_diffusers_config_from_ldm(original, sd)
    vcfg = su.create_vae_diffusers_config_from_ldm(original, sd)
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**ucfg)
        vae = diffusers.AutoencoderKL(**vcfg)
    converted = su.convert_ldm_unet_checkpoint(sd, ucfg)
    assert set(converted) == set(unet.state_dict())
    assert all(converted[k].shape == v.shape for k, v in unet.state_dict().items())
    converted = su.convert_ldm_vae_checkpoint(sd, vcfg)
    assert set(converted) == set(vae.state_dict())
    clip = su.convert_ldm_clip_checkpoint(sd)
    assert len(clip) == sum(k.startswith("cond_stage_model.transformer.") for k in sd)
