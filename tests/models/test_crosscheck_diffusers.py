"""Our modules against diffusers/transformers on identical weights.

The referee for the key layout is diffusers' own converter of the original (CompVis)
checkpoint layout: our state_dict goes through it and must load strictly, then outputs must
agree to float tolerance.
"""
import pytest
import torch
from omegaconf import OmegaConf

su = pytest.importorskip("diffusers.loaders.single_file_utils")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def converted(tiny_model, tiny_config):
    sd = tiny_model.state_dict()
    original = OmegaConf.to_container(tiny_config)
    ucfg = su.create_unet_diffusers_config_from_ldm(original, sd)
    unet = diffusers.UNet2DConditionModel(**ucfg)
    unet.load_state_dict(su.convert_ldm_unet_checkpoint(sd, ucfg), strict=True)
    vcfg = su.create_vae_diffusers_config_from_ldm(original, sd)
    vae = diffusers.AutoencoderKL(**vcfg)
    vae.load_state_dict(su.convert_ldm_vae_checkpoint(sd, vcfg), strict=True)
    text = tiny_model.cond_stage_model.transformer.config
    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=text.vocab_size, hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size, num_hidden_layers=text.num_hidden_layers,
        num_attention_heads=text.num_attention_heads,
        max_position_embeddings=text.max_position_embeddings, hidden_act="quick_gelu",
        attn_implementation="eager"))
    clip_sd = su.convert_ldm_clip_checkpoint(sd)
    if not any(k.startswith("text_model.") for k in clip.state_dict()):  # transformers >= 5
        clip_sd = {k.removeprefix("text_model."): v for k, v in clip_sd.items()}
    missing, unexpected = clip.load_state_dict(clip_sd, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    return unet.eval(), vae.eval(), clip.eval()


@torch.no_grad()
def test_unet_noise_prediction_matches_diffusers(tiny_model, converted):
    unet = converted[0]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([981, 1])
    ctx = torch.randn(2, 77, 32, generator=g)
    ours = tiny_model.apply_model(x, t, ctx)
    theirs = unet(x, t, encoder_hidden_states=ctx).sample
    assert ours.abs().max() > 0.1  # a real, non-trivial prediction
    assert rel_err(ours, theirs) < 1e-4


@torch.no_grad()
def test_vae_decode_and_encode_match_diffusers(tiny_model, converted):
    vae = converted[1]
    g = torch.Generator().manual_seed(2)
    z = torch.randn(1, 4, 8, 8, generator=g)
    ours = tiny_model.first_stage_model.decode(z)
    theirs = vae.decode(z).sample
    assert ours.shape == (1, 3, 32, 32)
    assert rel_err(ours, theirs) < 1e-4
    x = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    ours = tiny_model.first_stage_model.encode(x)
    theirs = vae.encode(x).latent_dist
    assert rel_err(ours.mean, theirs.mean) < 1e-4
    assert rel_err(ours.std, theirs.std) < 1e-4


@torch.no_grad()
def test_clip_hidden_states_match_transformers(tiny_model, converted):
    clip = converted[2]
    ids = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(3))
    ours = tiny_model.cond_stage_model.encode_ids(ids)
    theirs = clip(input_ids=ids).last_hidden_state
    assert rel_err(ours, theirs) < 1e-4


def _diffusers_run(unet, scheduler, x, ctx, uncond, scale, steps):
    scheduler.set_timesteps(steps)
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, ctx])).sample
        e_u, e_c = out.chunk(2)
        x = scheduler.step(e_u + scale * (e_c - e_u), t, x).prev_sample
    return x


SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                beta_schedule="scaled_linear", set_alpha_to_one=False, steps_offset=1,
                timestep_spacing="leading")


@pytest.mark.parametrize("sampler", ["ddim", "plms"])
@torch.no_grad()
def test_whole_sampler_runs_match_diffusers(tiny_model, converted, sampler):
    """A 10-step guided run from the same start: DDIM vs diffusers' DDIMScheduler, PLMS vs
    PNDMScheduler(skip_prk_steps=True), which diffusers documents as CompVis' PLMS."""
    from ldm.models.diffusion.sampling import sample
    unet = converted[0]
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx, uncond = torch.randn(2, 1, 77, 32, generator=g)
    ours = sample(tiny_model, sampler, x, 10, ctx, uncond, scale=5.0, disable=True)
    if sampler == "ddim":
        scheduler = diffusers.DDIMScheduler(clip_sample=False, **SCHEDULE)
    else:
        scheduler = diffusers.PNDMScheduler(skip_prk_steps=True, **SCHEDULE)
    theirs = _diffusers_run(unet, scheduler, x, ctx, uncond, 5.0, 10)
    assert rel_err(ours, theirs) < 1e-4
