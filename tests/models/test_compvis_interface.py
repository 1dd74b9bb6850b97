"""CompVis' sampler interface (ldm/models/diffusion/ddim.py, plms.py): the calls CompVis'
txt2img.py, img2img.py and RunwayML's inpainting script make, with CompVis' semantics,
checked against our pipeline and against diffusers' UNet and DDIMScheduler."""
import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT, randomize, rel_err
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.pipeline import Pipeline



def conditioning(model):
    with torch.no_grad(), model.ema_scope():
        return (model.get_learned_conditioning(["a red circle", "a blue square"]),
                model.get_learned_conditioning(["", ""]))


@pytest.mark.parametrize("cls,name", [(DDIMSampler, "ddim"), (PLMSSampler, "plms")])
def test_compvis_txt2img_calls_give_the_pipelines_latents(tiny_model, cls, name):
    c, uc = conditioning(tiny_model)
    pipe = Pipeline(tiny_model, torch.device("cpu"), "full")
    start, _ = pipe.initial_noise([7, 8], 32, 32)
    samples, inter = cls(tiny_model).sample(S=8, conditioning=c, batch_size=2, shape=[4, 8, 8],
                                             verbose=False, unconditional_guidance_scale=7.5,
                                             unconditional_conditioning=uc, eta=0.0,
                                             x_T=start.clone())
    ours = pipe.latents(["a red circle", "a blue square"], [7, 8], sampler=name, steps=8, scale=7.5,
                        height=32, width=32, progress=False)
    assert torch.allclose(samples, ours, atol=1e-6) and len(inter["x_inter"]) >= 2


def test_compvis_img2img_calls_against_diffusers(tmp_path, tiny_model, tiny_config):
    """make_schedule, stochastic_encode to DDIM step t_enc, decode from step t_enc - 1 (the
    CompVis off-by-one), against diffusers' UNet and DDIMScheduler stepping the same way."""
    diffusers = pytest.importorskip("diffusers")
    from ldm.compare import diffusers_components
    c, uc = conditioning(tiny_model)
    sampler = DDIMSampler(tiny_model)
    sampler.make_schedule(ddim_num_steps=10, ddim_eta=0.0, verbose=False)
    assert list(sampler.ddim_timesteps) == [1, 101, 201, 301, 401, 501, 601, 701, 801, 901]
    g = torch.Generator().manual_seed(3)
    init = torch.randn(2, 4, 8, 8, generator=g)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    t_enc = int(0.6 * 10)
    z_enc = sampler.stochastic_encode(init, torch.tensor([t_enc] * 2), noise=noise)
    ab = tiny_model.alphas_cumprod[601]
    assert torch.allclose(z_enc, ab.sqrt() * init + (1 - ab).sqrt() * noise, atol=1e-6)
    ours = sampler.decode(z_enc, c, t_enc, unconditional_guidance_scale=7.5,
                          unconditional_conditioning=uc)
    parts = diffusers_components(tiny_model, tiny_config, tmp_path)
    unet, scheduler = parts["unet"], parts["scheduler"]
    scheduler.set_timesteps(10)
    z = z_enc.clone()
    with torch.no_grad():
        for t in scheduler.timesteps[10 - t_enc:]:  # 501 ... 1
            out = unet(torch.cat([z, z]), t, encoder_hidden_states=torch.cat([uc, c])).sample
            e_u, e_c = out.chunk(2)
            z = scheduler.step(e_u + 7.5 * (e_c - e_u), t, z).prev_sample
    assert rel_err(ours, z) < 1e-5


def test_unknown_keywords_and_unsupported_options_are_errors(tiny_model):
    c, _ = conditioning(tiny_model)
    sampler = DDIMSampler(tiny_model)
    with pytest.raises(TypeError):
        sampler.sample(S=2, conditioning=c, batch_size=2, shape=[4, 8, 8], verbose=False,
                       bogus=1)
    with pytest.raises(ValueError, match="not supported"):
        sampler.sample(S=2, conditioning=c, batch_size=2, shape=[4, 8, 8], verbose=False,
                       temperature=0.5)
    with pytest.raises(ValueError, match="make_schedule"):
        sampler.decode(torch.zeros(2, 4, 8, 8), c, 3)


def test_mask_and_x0_keep_what_the_mask_marks(tiny_model):
    """CompVis' mask: 1 keeps x0 (noised to each step's timestep, blended in before it)."""
    c, uc = conditioning(tiny_model)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    kw = dict(S=6, conditioning=c, batch_size=2, shape=[4, 8, 8], verbose=False,
              unconditional_guidance_scale=5.0, unconditional_conditioning=uc)
    free, _ = DDIMSampler(tiny_model).sample(x_T=x_T.clone(), **kw)
    none, _ = DDIMSampler(tiny_model).sample(x_T=x_T.clone(), mask=torch.zeros(2, 1, 8, 8),
                                             x0=x0, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.allclose(free, none, atol=1e-6)
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., :4] = 1
    kept, _ = DDIMSampler(tiny_model).sample(x_T=x_T.clone(), mask=mask, x0=x0,
                                             generator=torch.Generator().manual_seed(0), **kw)
    left = (kept - x0)[..., :4].abs().mean() / (free - x0)[..., :4].abs().mean()
    assert left < 0.5, left
    with pytest.raises(ValueError, match="go together"):
        DDIMSampler(tiny_model).sample(x_T=x_T.clone(), mask=mask, **kw)


def test_runway_style_hybrid_conditioning_matches_the_pipeline():
    """RunwayML's inpainting script: conditioning {"c_concat": [mask + masked latents],
    "c_crossattn": [text]}, the same c_concat for the unconditional half."""
    from ldm.util import instantiate_from_config
    config = OmegaConf.load(ROOT / "configs" / "tiny" / "tiny-inpainting-inference.yaml")
    model = randomize(instantiate_from_config(config.model), 3).eval()
    pipe = Pipeline(model, torch.device("cpu"), "full")
    c, uc = conditioning(model)
    g = torch.Generator().manual_seed(4)
    mask = (torch.rand(1, 1, 8, 8, generator=g) > 0.5).float()
    masked = torch.randn(1, 4, 8, 8, generator=g)
    cat = model.inpainting_concat(mask, masked).expand(2, -1, -1, -1)
    start, _ = pipe.initial_noise([7, 8], 32, 32)
    samples, _ = DDIMSampler(model).sample(
        S=6, conditioning={"c_concat": [cat], "c_crossattn": [c]}, batch_size=2,
        shape=[4, 8, 8], verbose=False, unconditional_guidance_scale=7.5,
        unconditional_conditioning={"c_concat": [cat], "c_crossattn": [uc]}, x_T=start.clone())
    ours = pipe.latents(["a red circle", "a blue square"], [7, 8], sampler="ddim", steps=6, scale=7.5,
                        height=32, width=32, progress=False, mask=mask, masked=masked)
    assert torch.allclose(samples, ours, atol=1e-6)
