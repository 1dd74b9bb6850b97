"""Every sampler against diffusers' scheduler for it, on the same tiny model and noise.

Our samplers are pure functions of the denoiser (ldm.models.diffusion.solvers); diffusers'
are stateful schedulers. Both are run on the tiny SD-v1-shaped model (converted to a
diffusers UNet by diffusers' own converter), from the same start, with the same noise fed
to the stochastic ones, over the same noise levels (diffusers' own, read off the
scheduler), and the final latents must agree to float tolerance. The schedules themselves
(discrete, Karras, exponential) are checked against diffusers' separately, with the one
difference by design: our Karras and exponential schedules span the model's whole sigma
range, as k-diffusion and A1111, diffusers' the range of its spaced timesteps.
"""
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from ldm.models.diffusion import sampling, solvers  # noqa: E402
from conftest import rel_err

BASE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
            beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading")
STEPS = 10
SCALE = 5.0



@pytest.fixture(scope="module")
def unet(tiny_model, tiny_config):
    from ldm.compare import to_diffusers
    return to_diffusers(tiny_model, tiny_config)[0]


@pytest.fixture(scope="module")
def start():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx, uncond = torch.randn(2, 1, 77, 32, generator=g)
    noises = [torch.randn(1, 4, 8, 8, generator=g) for _ in range(64)]
    return x, ctx, uncond, noises


class Feed:
    """The same list of noise tensors, handed out in order, for both sides."""

    def __init__(self, noises):
        self.noises, self.k = noises, 0

    def __call__(self, *args, **kwargs):
        n = self.noises[self.k]
        self.k += 1
        return n.clone()


def diffusers_run(unet, scheduler, x, ctx, uncond, noises, monkeypatch, levels=None):
    """diffusers' denoising loop (as StableDiffusionPipeline runs it), with every noise
    draw of the scheduler taken from ``noises``; ``levels``: sigmas put in place of the
    scheduler's own (a schedule it has no option for)."""
    module = __import__(type(scheduler).__module__, fromlist=["_"])
    if hasattr(module, "randn_tensor"):
        monkeypatch.setattr(module, "randn_tensor", Feed(noises))
    scheduler.set_timesteps(STEPS)
    if levels is not None:
        scheduler.sigmas, scheduler.timesteps = levels
    if hasattr(scheduler, "noise_sampler"):   # DPMSolverSDE's Brownian tree
        scheduler.noise_sampler = Feed(noises)
    x = x * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(torch.cat([x, x]), t)
            out = unet(x_in, t, encoder_hidden_states=torch.cat([uncond, ctx])).sample
            o_u, o_c = out.chunk(2)
            x = scheduler.step(o_u + SCALE * (o_c - o_u), t, x).prev_sample
    return x


def distinct_levels(scheduler):
    """The noise levels a scheduler visits, each once (Heun, DPM2 and DPM++ SDE list the
    second-order evaluations' levels twice)."""
    return torch.unique_consecutive(scheduler.sigmas.double()).tolist()


CASES = {  # our sampler: (diffusers scheduler, its settings)
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpmpp_sde": ("DPMSolverSDEScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {"solver_type": "bh2"}),
}


ROUNDS_KARRAS_TIMESTEPS = {"dpmpp_2m", "dpmpp_2m_sde", "unipc"}


def make_scheduler(name, prediction="epsilon", karras=False):
    cls, options = CASES[name]
    extra = {"use_karras_sigmas": True} if karras and name != "euler_a" else {}
    return getattr(diffusers, cls)(prediction_type=prediction, **BASE, **options, **extra)


def karras_levels():
    """diffusers' Karras levels and their timesteps for STEPS steps (EulerDiscrete's), for
    EulerAncestral, which has no Karras option."""
    euler = diffusers.EulerDiscreteScheduler(**BASE, use_karras_sigmas=True)
    euler.set_timesteps(STEPS)
    return euler.sigmas, euler.timesteps


@pytest.fixture
def as_v_model(tiny_model):
    tiny_model.parameterization = "v"
    yield tiny_model
    tiny_model.parameterization = "eps"


@pytest.mark.parametrize("karras", [False, True], ids=["discrete", "karras"])
@pytest.mark.parametrize("name", list(CASES))
def test_sampler_matches_diffusers(tiny_model, unet, start, monkeypatch, name, karras):
    """10 guided steps, same start, same noise, same levels: the same final latents."""
    x, ctx, uncond, noises = start
    scheduler = make_scheduler(name, karras=karras)
    theirs = diffusers_run(unet, scheduler, x, ctx, uncond, noises, monkeypatch,
                           karras_levels() if karras and name == "euler_a" else None)
    levels = distinct_levels(scheduler)
    if karras and name in ROUNDS_KARRAS_TIMESTEPS:
        # these diffusers schedulers round their Karras levels' timesteps to integers
        # before the UNet sees them (the levels themselves stay exact); we interpolate.
        # With the rounding imitated, the trajectories agree to float precision; without,
        # they differ by more (about 1e-4 here).
        with torch.no_grad():
            unrounded = sampling.sample(tiny_model, name, x, STEPS, ctx, uncond, SCALE,
                                        noise=Feed(noises), disable=True, sigmas=levels)
        assert rel_err(unrounded, theirs) > 1e-5
        from ldm.models.diffusion.noise_model import DiscreteSchedule
        exact = DiscreteSchedule.t
        monkeypatch.setattr(DiscreteSchedule, "t", lambda self, s: (
            round(exact(self, s)) if any(abs(s - v) < 1e-6 * v for v in levels[:-1])
            else exact(self, s)))
    with torch.no_grad():
        ours = sampling.sample(tiny_model, name, x, STEPS, ctx, uncond, SCALE,
                               noise=Feed(noises), disable=True, sigmas=levels)
    assert torch.isfinite(ours).all() and ours.abs().max() > 0.1
    assert rel_err(ours, theirs) < 1e-5


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m", "unipc"])
def test_v_prediction_matches_diffusers(as_v_model, unet, start, monkeypatch, name):
    """The same for a v-predicting model (x0 from v at the level's own sigma)."""
    x, ctx, uncond, noises = start
    scheduler = make_scheduler(name, prediction="v_prediction")
    theirs = diffusers_run(unet, scheduler, x, ctx, uncond, noises, monkeypatch)
    with torch.no_grad():
        ours = sampling.sample(as_v_model, name, x, STEPS, ctx, uncond, SCALE, disable=True,
                               sigmas=distinct_levels(scheduler))
    assert rel_err(ours, theirs) < 2e-4


def test_ddpm_matches_diffusers(tiny_model, unet, start, monkeypatch):
    """DDPM on the spaced timesteps (DDIM at eta 1, ending on x0) against DDPMScheduler."""
    x, ctx, uncond, noises = start
    scheduler = diffusers.DDPMScheduler(clip_sample=False, **BASE)
    theirs = diffusers_run(unet, scheduler, x, ctx, uncond, noises, monkeypatch)
    with torch.no_grad():
        ours = sampling.sample(tiny_model, "ddpm", x, STEPS, ctx, uncond, SCALE,
                               noise=Feed(noises), disable=True)
    assert rel_err(ours, theirs) < 2e-4


def test_dpmpp_2s_step_matches_diffusers_singlestep(tiny_model, unet, start, monkeypatch):
    """DPM-Solver++(2S). diffusers' DPMSolverSinglestep takes its intermediate evaluation
    at the schedule's next level (orders 1, 2, 1, 2, ...: a pair of levels per 2S step);
    k-diffusion and A1111 (our dpmpp_2s_a) at the lambda midpoint of one step. Our 2S step
    run on diffusers' pairs gives diffusers' trajectory."""
    x, ctx, uncond, _ = start
    schedule = {k: v for k, v in BASE.items() if k not in ("steps_offset", "timestep_spacing")}
    scheduler = diffusers.DPMSolverSinglestepScheduler(solver_order=2, **schedule,
                                                       lower_order_final=True)
    theirs = diffusers_run(unet, scheduler, x, ctx, uncond, [], monkeypatch)
    levels = scheduler.sigmas.double().tolist()
    orders = scheduler.order_list
    assert orders[:2] == [1, 2]
    output = sampling.guided(tiny_model, ctx, uncond, SCALE)
    denoise = sampling.Denoiser(tiny_model, output)
    z = x * (1 + levels[0] ** 2) ** 0.5
    i = 0
    with torch.no_grad():
        while i < len(orders):
            s = levels[i]
            d = denoise(z, s)
            if orders[i] == 2 or (i + 1 < len(orders) and orders[i + 1] == 2):
                z = solvers.dpmpp_2s_step(denoise, z, d, s, levels[i + 1], levels[i + 2])
                i += 2
            else:
                z = solvers._first_order(z, d, s, levels[i + 1])
                i += 1
    assert rel_err(z, theirs) < 2e-4


@pytest.mark.parametrize("steps", [5, 10, 20, 50])
def test_discrete_schedule_is_diffusers_leading(tiny_model, steps):
    """"discrete": the sigmas of the timesteps DDIM visits, SD's "leading" spacing with
    offset 1, then 0: diffusers' EulerDiscreteScheduler with SD's scheduler config."""
    denoiser = sampling.Denoiser(tiny_model, None).schedule
    ours = sampling.sigma_schedule(denoiser, "discrete", steps)
    theirs = diffusers.EulerDiscreteScheduler(**BASE)
    theirs.set_timesteps(steps)
    assert torch.allclose(ours.float(), theirs.sigmas, rtol=1e-5)


@pytest.mark.parametrize("kind", ["karras", "exponential"])
def test_karras_and_exponential_schedules(tiny_model, kind):
    """Ours span the model's whole sigma range (sigma(0) .. sigma(999), as k-diffusion);
    diffusers with the same range configured gives the same levels. Left to itself,
    diffusers starts at the top spaced timestep's sigma (951 for 20 steps): the documented
    difference."""
    denoiser = sampling.Denoiser(tiny_model, None).schedule
    ours = sampling.sigma_schedule(denoiser, kind, 20)
    flag = {"karras": "use_karras_sigmas", "exponential": "use_exponential_sigmas"}[kind]
    same_range = diffusers.EulerDiscreteScheduler(
        **BASE, **{flag: True}, sigma_min=denoiser.sigma_min, sigma_max=denoiser.sigma_max)
    same_range.set_timesteps(20)
    assert torch.allclose(ours.float(), same_range.sigmas, rtol=1e-5)
    assert ours[0] == pytest.approx(14.6146, rel=1e-4) and ours[-2] == pytest.approx(0.0292, rel=1e-2)
    own = diffusers.EulerDiscreteScheduler(**BASE, **{flag: True})
    own.set_timesteps(20)
    assert float(own.sigmas[0]) == pytest.approx(denoiser.sigma(951), rel=1e-5)
    assert float(own.sigmas[0]) < float(ours[0])


def test_denoiser_timestep_interpolates_log_sigma(tiny_model):
    denoiser = sampling.Denoiser(tiny_model, None).schedule
    for t in (0, 1, 500, 998, 999):
        assert denoiser.t(denoiser.sigma(t)) == pytest.approx(t, abs=1e-6)
    mid = math.exp((math.log(denoiser.sigma(400)) + math.log(denoiser.sigma(401))) / 2)
    assert denoiser.t(mid) == pytest.approx(400.5, abs=1e-9)
    assert denoiser.t(1e3) == 999 and denoiser.t(1e-4) == 0   # clamped to the table


def test_lms_coefficients_integrate_the_lagrange_basis():
    """Exact polynomial integration: the coefficients reproduce the integral of any
    polynomial of degree < order over the step (here t^2 with 3 nodes)."""
    sig = torch.tensor([5.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    coeffs = [solvers.lms_coefficient(sig, 2, j, 3) for j in range(3)]
    values = [float(sig[2 - j]) ** 2 for j in range(3)]
    exact = (1.0 ** 3 - 2.0 ** 3) / 3
    assert sum(c * v for c, v in zip(coeffs, values)) == pytest.approx(exact, rel=1e-12)


def test_euler_on_discrete_levels_is_ddim(tiny_model, start):
    """DDIM (eta 0) is Euler's method in sigma (Karras et al. 2022, sec. 4), up to DDIM's
    last step ending at sigma(0) rather than 0: a check of the sigma plumbing against an
    independent, already cross-checked path."""
    x, ctx, uncond, _ = start
    with torch.no_grad():
        ddim = sampling.sample(tiny_model, "ddim", x, STEPS, ctx, uncond, SCALE, disable=True)
        denoiser = sampling.Denoiser(tiny_model, None).schedule
        levels = sampling.sigma_schedule(denoiser, "discrete", STEPS)
        levels[-1] = denoiser.sigma_min
        euler = sampling.sample(tiny_model, "euler", x, STEPS, ctx, uncond, SCALE,
                                disable=True, sigmas=levels)
    assert rel_err(euler, ddim) < 1e-4


def test_euler_ancestral_on_discrete_levels_is_ddpm(tiny_model, start):
    """Euler a's split of each step into sigma_down and sigma_up is the DDPM posterior's
    (its variance is DDIM's at eta 1): on the discrete levels, with the same noise, the two
    samplers give the same image, though one works on eps and timesteps and the other on
    x0 estimates and sigmas."""
    x, ctx, uncond, noises = start
    with torch.no_grad():
        ddpm = sampling.sample(tiny_model, "ddpm", x, STEPS, ctx, uncond, SCALE,
                               noise=Feed(noises), disable=True)
        euler_a = sampling.sample(tiny_model, "euler_a", x, STEPS, ctx, uncond, SCALE,
                                  noise=Feed(noises), disable=True)
    assert rel_err(euler_a, ddpm) < 1e-4


@pytest.mark.parametrize("name,expected", [
    ("DPM++ 2M Karras", ("dpmpp_2m", "karras")), ("Euler a", ("euler_a", "discrete")),
    ("dpmpp_2m", ("dpmpp_2m", "discrete")), ("sample_dpmpp_2m_sde", ("dpmpp_2m_sde", "discrete")),
    ("k_euler_a", ("euler_a", "discrete")), ("DPM2 a Karras", ("dpm_2_a", "karras")),
    ("euler_ancestral", ("euler_a", "discrete")), ("PLMS", ("plms", "discrete")),
    ("DPM++ 2M SDE Exponential", ("dpmpp_2m_sde", "exponential")), ("UniPC", ("unipc", "discrete")),
])
def test_sampler_names(name, expected):
    assert sampling.resolve_sampler(name) == expected
    assert sampling.resolve_sampler(*expected) == expected


def test_sampler_name_errors():
    with pytest.raises(ValueError, match="unknown sampler 'dpm fast'"):
        sampling.resolve_sampler("dpm fast")
    with pytest.raises(ValueError, match="says schedule 'karras'"):
        sampling.resolve_sampler("DPM++ 2M Karras", "exponential")
    with pytest.raises(ValueError, match="own timesteps"):
        sampling.resolve_sampler("ddim", "karras")
    with pytest.raises(ValueError, match="deterministic"):
        sampling.resolve_eta("dpmpp_2m", 0.5)
    assert sampling.sampler_label("dpmpp_2m", "karras") == "DPM++ 2M Karras"
    assert sampling.resolve_eta("euler_a") == 1.0 and sampling.resolve_eta("ddim") == 0.0


def _consistency_run(unet, scheduler, x, ctx, uncond, noises, monkeypatch, steps, scale,
                     **step_kwargs):
    """diffusers' loop for LCM/TCD schedulers, as the pipelines run them (``step`` with
    ``eta`` for TCD), every noise draw taken from ``noises``."""
    module = __import__(type(scheduler).__module__, fromlist=["_"])
    monkeypatch.setattr(module, "randn_tensor", Feed(noises))
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, ctx])).sample
            o_u, o_c = out.chunk(2)
            x = scheduler.step(o_u + scale * (o_c - o_u), t, x, **step_kwargs).prev_sample
    return x, scheduler.timesteps


@pytest.mark.parametrize("name,eta,steps", [
    ("lcm", None, 4), ("lcm", None, 8), ("tcd", None, 4), ("tcd", 0.0, 4), ("tcd", 1.0, 6),
    ("tcd", 0.7, 2)])
def test_consistency_samplers_match_diffusers(tiny_model, unet, start, monkeypatch, name, eta,
                                              steps):
    """LCM and TCD against diffusers' LCMScheduler and TCDScheduler: their own timesteps
    (picked from the 50-step distillation schedule), the same noise re-injected, whole
    trajectories (guided, scale 1.5, as LCM-LoRA people use it)."""
    x, ctx, uncond, noises = start
    cls = {"lcm": diffusers.LCMScheduler, "tcd": diffusers.TCDScheduler}[name]
    scheduler = cls(**{k: v for k, v in BASE.items() if k != "steps_offset"})
    kwargs = {} if eta is None or name == "lcm" else {"eta": eta}
    theirs, timesteps = _consistency_run(unet, scheduler, x, ctx, uncond, noises, monkeypatch,
                                         steps, 1.5, **kwargs)
    assert sampling.sampling_timesteps(steps, 1000, "lcm").tolist() == timesteps.tolist()[::-1]
    with torch.no_grad():
        ours = sampling.sample(tiny_model, name, x, steps, ctx, uncond, 1.5, eta=eta,
                               noise=Feed(noises), disable=True)
    assert torch.isfinite(ours).all() and ours.abs().max() > 0.1
    assert rel_err(ours, theirs) < 1e-5


def test_lcm_timesteps_are_the_papers():
    assert sampling.sampling_timesteps(4, 1000, "lcm").tolist() == [259, 499, 759, 999]
    assert sampling.sampling_timesteps(1, 1000, "lcm").tolist() == [999]
    with pytest.raises(ValueError, match="1..50"):
        sampling.sampling_timesteps(51, 1000, "lcm")


@pytest.mark.parametrize("steps", [2, 4, 8])
def test_sgm_uniform_schedule_and_euler_on_it_match_diffusers(tiny_model, unet, start,
                                                              monkeypatch, steps):
    """"sgm_uniform": the sigmas at ``steps`` timesteps evenly spaced from 999 down to 0
    (the last left out), interpolated in log sigma, then 0 (ComfyUI's definition,
    computed here with numpy); Euler on it equals diffusers' EulerDiscreteScheduler given
    those sigmas."""
    import numpy as np
    x, ctx, uncond, noises = start
    euler = diffusers.EulerDiscreteScheduler(**BASE)
    log_sigmas = np.log(((1 - euler.alphas_cumprod) / euler.alphas_cumprod).numpy() ** 0.5)
    t = np.linspace(999, 0, steps + 1)[:-1]
    want = np.append(np.exp(np.interp(t, np.arange(1000), log_sigmas)), 0.0)
    denoiser = sampling.Denoiser(tiny_model, None).schedule
    ours = sampling.sigma_schedule(denoiser, "sgm_uniform", steps)
    assert np.allclose(ours.numpy(), want, rtol=1e-5)
    euler.set_timesteps(sigmas=want.tolist())   # diffusers takes the final 0 too
    assert torch.allclose(euler.sigmas.double(), ours.to(torch.float32).double(), rtol=1e-5)
    levels = (euler.sigmas, euler.timesteps)
    theirs = diffusers_run(unet, euler, x, ctx, uncond, noises, monkeypatch, levels)
    with torch.no_grad():
        got = sampling.sample(tiny_model, "euler", x, steps, ctx, uncond, SCALE,
                              schedule="sgm_uniform", disable=True)
    assert rel_err(got, theirs) < 1e-5
    assert sampling.resolve_sampler("Euler SGM Uniform") == ("euler", "sgm_uniform")
