"""Stable Diffusion XL through the family seam: Stability's generative-models configs build
our modules in the official key layout (committed manifests, diffusers' converters as the
referee at full size), both text encoders equal transformers' CLIPTextModel and
CLIPTextModelWithProjection, the UNet with its size conditioning equals diffusers', and
text-to-image equals diffusers' StableDiffusionXLPipeline on identical tiny weights."""
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT, randomize, rel_err
from ldm.pipeline import build_model

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

XL = ROOT / "configs" / "stable-diffusion"
TINY_XL = ROOT / "configs" / "tiny" / "tiny-sdxl-inference.yaml"
MANIFESTS = ROOT / "tests" / "manifests"


@pytest.mark.parametrize("name,manifest", [("sd_xl_base", "sdxl-base"),
                                           ("sd_xl_inpainting", "sdxl-base"),
                                           ("sd_xl_refiner", "sdxl-refiner")])
def test_sdxl_configs_build_the_committed_key_manifest(name, manifest):
    """The inpainting model's keys are the base's, its first convolution 9 channels wide."""
    model = build_model(XL / f"{name}.yaml", meta=True)
    got = [f"{k} {list(v.shape)}" for k, v in model.state_dict().items()]
    want = (MANIFESTS / f"{manifest}.txt").read_text().splitlines()
    if name == "sd_xl_inpainting":
        want = [line.replace("input_blocks.0.0.weight [320, 4, 3, 3]",
                             "input_blocks.0.0.weight [320, 9, 3, 3]") for line in want]
    assert got == want
    assert model.scale_factor == 0.13025 and model.parameterization == "eps"
    assert model.image_size * model.latent_downsampling_factor == 1024


@pytest.mark.parametrize("name", ["sd_xl_base", "sd_xl_refiner"])
def test_full_size_sdxl_layout_is_what_diffusers_converters_expect(name):
    """diffusers' converters of the single-file layout take our full-size state dict into
    its own SDXL models, strictly (on the meta device): the UNet with its text_time
    embedding, the VAE, CLIP ViT-L and OpenCLIP ViT-bigG with its projection; the
    parameter counts are SDXL's."""
    from ldm.compare import to_diffusers_xl
    model = build_model(XL / f"{name}.yaml", meta=True)
    with torch.device("meta"):
        parts = to_diffusers_xl(model, OmegaConf.load(XL / f"{name}.yaml"))
    counts = {k: sum(p.numel() for p in v.parameters()) for k, v in parts.items()}
    unet = parts["unet"].config
    assert counts["text_encoder_2"] == 694_659_840 and counts["vae"] == 83_653_863
    if name == "sd_xl_base":
        assert counts["unet"] == 2_567_463_684 and counts["text_encoder"] == 123_060_480
        assert list(unet.transformer_layers_per_block) == [1, 2, 10]
        assert unet.projection_class_embeddings_input_dim == 2816
    else:
        assert counts["unet"] == 2_259_526_660 and "text_encoder" not in parts
        assert unet.projection_class_embeddings_input_dim == 2560


@pytest.fixture(scope="module")
def tiny_xl():
    config = OmegaConf.load(TINY_XL)
    from ldm.util import instantiate_from_config
    return randomize(instantiate_from_config(config.model), 3).eval(), config


@pytest.fixture(scope="module")
def twin(tiny_xl, tmp_path_factory):
    """diffusers' StableDiffusionXLPipeline holding the tiny model's weights."""
    from ldm.compare import diffusers_components
    model, config = tiny_xl
    pipe = diffusers.StableDiffusionXLPipeline(
        **diffusers_components(model, config, tmp_path_factory.mktemp("tok")))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def test_both_text_encoders_match_transformers(tiny_xl, twin):
    """CLIP ViT-L's hidden state after layer ``layer_idx`` without the final norm, and
    OpenCLIP bigG's penultimate without ln_final plus the pooled projection: diffusers'
    hidden_states[-2] and text_embeds; clip skip 2 one layer earlier on both
    (hidden_states[-3], diffusers' clip_skip=1), the pooled embedding unchanged."""
    model, _ = tiny_xl
    clip_l, big_g = model.conditioner.text_embedders
    texts = ["a red circle", "two blue squares &amp; a tree"]
    ids_l, ids_g = clip_l.tokenize(texts, 77), big_g.tokenize(texts, 77)
    assert (ids_g == 0).any() and not (ids_l == 0).any()   # OpenCLIP pads with 0
    out_l = twin.text_encoder(ids_l, output_hidden_states=True)
    out_g = twin.text_encoder_2(ids_g, output_hidden_states=True)
    try:
        for skip in (1, 2):
            model.conditioner.clip_skip = skip
            z_l = clip_l.encode_ids(ids_l)
            z_g, pooled = big_g.encode_ids_pooled(ids_g)
            assert rel_err(z_l, out_l.hidden_states[-1 - skip]) < 1e-5
            assert rel_err(z_g, out_g.hidden_states[-1 - skip]) < 1e-5
            assert rel_err(pooled, out_g.text_embeds) < 1e-5
    finally:
        model.conditioner.clip_skip = 1
    assert model.conditioner.layers == 2   # 3 layers, the config's layer one from the end


@torch.no_grad()
def test_the_unet_with_size_conditioning_matches_diffusers(tiny_xl, twin):
    """Our vector (pooled embedding, then the Fourier features of the original size, crop
    and target size, cos first) through label_emb equals diffusers' text_time addition
    embedding of text_embeds and time_ids."""
    model, _ = tiny_xl
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 12, generator=g), torch.tensor([901, 11])
    values = model.size_values(32, 48, original=(128, 100), crop=(3, 5))
    cond = model.conditioning(["a red circle", "b"], values)
    assert cond["crossattn"].shape == (2, 77, 80) and cond["vector"].shape == (2, 96)
    ours = model.apply_model(x, t, cond)
    time_ids = torch.tensor([[128.0, 100.0, 3.0, 5.0, 32.0, 48.0]] * 2)
    theirs = twin.unet(x, t, encoder_hidden_states=cond["crossattn"], added_cond_kwargs={
        "text_embeds": cond["vector"][:, :48], "time_ids": time_ids}).sample
    assert ours.abs().max() > 0.01 and rel_err(ours, theirs) < 1e-5
    with pytest.raises(ValueError, match="96-wide vector"):
        model.apply_model(x, t, {"crossattn": cond["crossattn"]})


@pytest.mark.parametrize("negative", [None, "green"], ids=["zeroed-negative", "negative"])
def test_tiny_sdxl_txt2img_matches_diffusers_pipeline(tiny_xl, twin, negative):
    """The same latents as StableDiffusionXLPipeline from the same noise: DDIM 10 steps,
    guidance 5, a non-square size (its original and target size), with no negative
    prompt (the base conditions on zeros, diffusers' force_zeros_for_empty_prompt) and
    with one."""
    from ldm.pipeline import Pipeline
    model, _ = tiny_xl
    ours = Pipeline(model, torch.device("cpu"), "full", watermark=False)
    prompts, seeds = ["a red circle", "two blue squares"], [7, 8]
    x, _ = ours.initial_noise(seeds, 32, 48)
    z_ours = ours.latents(prompts, seeds, sampler="ddim", steps=10, scale=5.0, height=32,
                          width=48, negative_prompts=negative, progress=False)
    z_theirs = twin(prompts, num_inference_steps=10, guidance_scale=5.0, height=32, width=48,
                    latents=x.clone(), output_type="latent",
                    negative_prompt=None if negative is None else [negative] * 2).images
    assert z_ours.abs().max() > 0.1 and rel_err(z_ours, z_theirs) < 1e-5


def test_sdxl_checkpoints_are_detected_by_their_keys():
    from ldm.families import detect, shapes_of
    for name, variant in (("sd_xl_base", "txt2img"), ("sd_xl_refiner", "refiner"),
                          ("sd_xl_inpainting", "inpainting")):
        found = detect(shapes_of(build_model(XL / f"{name}.yaml", meta=True).state_dict()))
        assert (found.family.name, found.variant) == ("sdxl", variant)
        assert Path(found.config).name == f"{name}.yaml"


TINY_REFINER = ROOT / "configs" / "tiny" / "tiny-sdxl-refiner.yaml"


def tiny(config_path, seed):
    from ldm.util import instantiate_from_config
    config = OmegaConf.load(config_path)
    return randomize(instantiate_from_config(config.model), seed).eval(), config


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_tiny_refiner_img2img_matches_diffusers_step_by_step(tmp_path, sampler):
    """The refiner (OpenCLIP bigG alone, aesthetic score 6 and 2.5 for the negative) as
    StableDiffusionXLImg2ImgPipeline runs it on the same tiny weights: every step and
    the result (strength 0.6); an empty negative prompt is encoded, not zeros."""
    import sys
    sys.path.insert(0, str(ROOT / "tests" / "models"))
    from test_crosscheck_diffusers import _both, _image_and_mask
    from ldm.pipeline import Pipeline
    model, config = tiny(TINY_REFINER, 5)
    assert not model.force_zeros_for_empty_prompt
    ours = Pipeline(model, torch.device("cpu"), "full")
    image, _ = _image_and_mask()
    init = ours.encode([image])
    z_ours, z_theirs, a, b = _both(ours, diffusers.StableDiffusionXLImg2ImgPipeline, model,
                                   config, tmp_path, {"init": init}, 0.6, sampler,
                                   image=init.expand(2, -1, -1, -1).clone())
    assert max((rel_err(x, y) for x, y in zip(a, b)), default=0) < 1e-5
    assert z_ours.abs().max() > 0.1 and rel_err(z_ours, z_theirs) < 1e-5


@pytest.mark.parametrize("name,cls,variant", [
    ("tiny-sdxl-inference", "StableDiffusionXLPipeline", "txt2img"),
    ("tiny-sdxl-refiner", "StableDiffusionXLImg2ImgPipeline", "refiner")])
def test_an_sdxl_diffusers_folder_loads_to_the_same_model(tmp_path, name, cls, variant):
    """A folder diffusers' save_pretrained wrote from tiny SDXL weights (two text encoders,
    or the refiner's second alone; bigG as CLIPTextModelWithProjection, all its blocks)
    is found by its JSON files and loads, given as --ckpt, to exactly those weights (the
    unused logit_scale as zero)."""
    from ldm.compare import diffusers_components
    from ldm.config import choose_model
    from ldm.families import detect_folder
    from ldm.pipeline import load_model
    from ldm.source import folder_configs
    model, config = tiny(ROOT / "configs" / "tiny" / f"{name}.yaml", 9)
    folder = tmp_path / "pipe"
    getattr(diffusers, cls)(**diffusers_components(model, config, tmp_path / "tok")
                            ).save_pretrained(folder)
    found = detect_folder(*folder_configs(folder))
    assert (found.family.name, found.variant) == ("sdxl", variant)
    choice = choose_model(folder, ROOT / "configs" / "tiny" / f"{name}.yaml")
    got = load_model(choice.ckpt, choice.config).state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(got[k], torch.zeros_like(v) if k.endswith("logit_scale") else v), k
