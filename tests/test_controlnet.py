"""ControlNet (``ldm.modules.diffusionmodules.controlnet``) in lllyasviel's ``control_model.*``
layout against diffusers' ``ControlNetModel`` on identical random weights, converted by
diffusers' own converter of that layout; and the UNet taking its residuals against diffusers'
UNet given them."""
import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT, TINY_CONFIG, randomize, rel_err

diffusers = pytest.importorskip("diffusers")


def tiny_controlnet(seed=3):
    """A ControlNet for the tiny SD-1-shaped model: its UNet's parameters and a 3-channel
    hint, random weights (the zero convolutions too, or the check would be vacuous)."""
    from ldm.modules.diffusionmodules.controlnet import ControlNet
    config = OmegaConf.load(TINY_CONFIG)
    params = OmegaConf.to_container(config.model.params.unet_config.params)
    config.model.params.control_stage_config = {
        "target": "cldm.cldm.ControlNet", "params": {**params, "hint_channels": 3}}
    return randomize(ControlNet(hint_channels=3, **params), seed).eval(), config


def their_config(ours, config):
    """diffusers' ControlNetModel config for ours, as diffusers'
    ``create_controlnet_diffusers_config_from_ldm`` makes it (which cannot run in this
    diffusers version: it calls the UNet config maker without the checkpoint it now
    needs), and ours as the ``control_model.*`` checkpoint its converter reads."""
    from diffusers.loaders import single_file_utils as su
    checkpoint = {"control_model." + k: v for k, v in ours.state_dict().items()}
    original = OmegaConf.to_container(config)
    unet_keys = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}
    u = su.create_unet_diffusers_config_from_ldm(original, unet_keys)
    cfg = {"conditioning_channels": 3, **{k: u[k] for k in (
        "in_channels", "down_block_types", "block_out_channels", "layers_per_block",
        "cross_attention_dim", "attention_head_dim", "use_linear_projection",
        "class_embed_type", "addition_embed_type", "addition_time_embed_dim",
        "projection_class_embeddings_input_dim", "transformer_layers_per_block")}}
    return cfg, checkpoint, su.convert_controlnet_checkpoint(checkpoint, cfg)


def their_controlnet(ours, config):
    """diffusers' ControlNetModel holding our weights, through diffusers' converter."""
    cfg, _, converted = their_config(ours, config)
    theirs = diffusers.ControlNetModel(**cfg)
    theirs.load_state_dict(converted, strict=True)
    return theirs.eval()


@pytest.mark.parametrize("name,heads", [("cldm_v15.yaml", [8] * 4), ("cldm_v21.yaml", None)])
def test_the_published_cldm_configs_build_the_keys_diffusers_reads(name, heads):
    """configs/controlnet/cldm_v15.yaml and cldm_v21.yaml (lllyasviel's) build, on the meta
    device, a ControlNet whose every ``control_model.*`` key diffusers' converter reads
    into a ControlNetModel of SD 1.5's (2.1's) shapes, none left over or missing."""
    from ldm.util import instantiate_from_config
    config = OmegaConf.load(ROOT / "configs" / "controlnet" / name)
    with torch.device("meta"):
        ours = instantiate_from_config(config.model.params.control_stage_config)
    assert len(ours.zero_convs) == 12 and ours.input_hint_block[0].in_channels == 3
    cfg, checkpoint, converted = their_config(ours, config)
    assert cfg["cross_attention_dim"] == (768 if heads else 1024)
    with torch.device("meta"):
        theirs = diffusers.ControlNetModel(**cfg)
    want = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == want
    assert len(checkpoint) == len(want)


@torch.no_grad()
def test_controlnet_and_the_controlled_unet_equal_diffusers():
    """Every residual (one per input block and the middle block's) equals diffusers'
    ControlNetModel's down and mid residuals, and the UNet adding them equals diffusers'
    UNet given them as down_block_additional_residuals / mid_block_additional_residual; the
    residuals change the UNet's output."""
    from conftest import build_tiny
    from ldm.compare import to_diffusers
    ours, config = tiny_controlnet()
    theirs = their_controlnet(ours, config)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    hint = torch.rand(2, 3, 64, 64, generator=g)
    t = torch.tensor([901, 21])
    context = torch.randn(2, 77, 32, generator=g)
    res = ours(x, hint, t, context)
    down, mid = theirs(x, t, encoder_hidden_states=context, controlnet_cond=hint,
                       return_dict=False)
    assert len(res) == len(down) + 1
    for a, b in zip(res, [*down, mid]):
        assert a.abs().max() > 1e-3 and rel_err(a, b) < 1e-5
    model = build_tiny(5)
    unet = model.model.diffusion_model
    their_unet, _, _ = to_diffusers(model, OmegaConf.load(TINY_CONFIG))
    plain = unet(x, t, context=context)
    controlled = unet(x, t, context=context, control=res)
    want = their_unet(x, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                      mid_block_additional_residual=mid).sample
    assert rel_err(controlled, want) < 1e-5 and rel_err(controlled, plain) > 1e-2
    with unet.caching(2), pytest.raises(ValueError, match="DeepCache"):
        unet(x, t, context=context, control=res)
