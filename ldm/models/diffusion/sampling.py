"""Samplers behind one interface, for all three tasks: ``sample(model, sampler, ...)``.

Two families of small pure functions sit behind it:

- on the model's own discrete timesteps, over ``eps(x, t) -> noise prediction`` (guidance
  already applied, see ``guided_eps``): DDIM, PLMS (CompVis' own) and DDPM, here;
- on noise levels sigma, over ``denoise(x, sigma) -> x0`` (Karras et al. 2022's form, see
  ``Denoiser``): Euler, Euler a, Heun, DPM2, DPM2 a, DPM++ 2S a, 2M, SDE, 2M SDE, LMS and
  UniPC, in ``ldm.models.diffusion.solvers``, with the model's discrete sigmas or Karras'
  or an exponential schedule (``sigma_schedule``).

``ldm.samplers`` names them (our ids, A1111's names, ``resolve_sampler``); ``STEPS`` maps
each id to its function here. Fresh noise, when a
sampler needs it, comes from the caller's ``noise(shape)`` so that every image's randomness
is its own (``ldm.pipeline`` draws it from per-image generators).

Image-to-image and inpainting use the same samplers: they run the last steps of the full
schedule (``run_steps``, see ``strength_steps``) from the init latents noised to the first
of them, and inpainting with latent blending puts the known latents back after every step
(``mask`` and ``known``). A dedicated inpainting model gets its mask and masked-image
latents through ``concat``.
"""
import math
from dataclasses import dataclass, replace
from functools import partial

import torch

from ldm.models.diffusion import solvers
from ldm.samplers import (SAMPLERS, SCHEDULES, check_flow_sampler, resolve_eta,  # noqa: F401
                          resolve_sampler, sampler_label, sampler_spacing)
from ldm.modules.diffusionmodules.util import TIMESTEP_SPACINGS
from ldm.progress import progress


@dataclass(frozen=True)
class SkipLayers:
    """Skip-layer guidance (Stability's SD 3.5 reference ``SkipLayerCFGDenoiser``,
    diffusers' ``skip_guidance_layers``): at the network calls between ``start`` and
    ``stop`` of ``steps`` (fractions, exclusive), the guided output also moves away from
    the conditional output of the network with ``layers`` left out, by ``scale``."""
    scale: float
    layers: tuple = (7, 8, 9)
    start: float = 0.01
    stop: float = 0.2
    steps: int = 0

    def active(self, call):
        return self.steps * self.start < call < self.steps * self.stop


def guided(model, cond, uncond=None, scale=1.0, rescale=0.0, skip=None):
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6), written once, on the model's
    raw output (eps or v; guidance is the same on either, the conversion being affine):
    out = out(x, uncond) + scale * (out(x, cond) - out(x, uncond)), both halves in one
    batched UNet call. ``cond``/``uncond``: conditioning dicts (``crossattn``, ``concat``,
    ...: ``LatentDiffusion.conditioning``), batched key by key. ``scale == 1`` or no
    ``uncond`` -> the conditional output alone. ``t`` may be fractional (sigma samplers
    between the training timesteps). CompVis' form (the text states as tensors) is taken
    too. ``rescale`` (Lin et al. 2023, eq. 15-16, diffusers' ``guidance_rescale``): the
    guided output rescaled to the conditional output's standard deviation per image, mixed
    in at that weight; it keeps high guidance from over-exposing zero-terminal-SNR
    models. ``skip``: skip-layer guidance (``SkipLayers``; an MMDiT's), counted in network
    calls, as Stability's reference counts them."""
    cond, uncond = conditioning_dict(cond), conditioning_dict(uncond)
    use_guidance = uncond is not None and scale != 1.0
    if use_guidance:
        both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
    calls = [0]

    def output(x, t):
        t = float(t)
        dtype = torch.long if t.is_integer() else torch.float32
        ts = torch.full((x.shape[0],), t, device=x.device, dtype=dtype)
        if not use_guidance:
            return model.apply_model(x, ts, cond)
        out_uncond, out_cond = model.apply_model(
            torch.cat([x, x]), torch.cat([ts, ts]), both).chunk(2)
        out = out_uncond + scale * (out_cond - out_uncond)
        if skip is not None:
            if skip.active(calls[0]):
                skipped = model.apply_model(x, ts, cond, skip_layers=skip.layers)
                out = out + skip.scale * (out_cond - skipped)
            calls[0] += 1
        return out if not rescale else rescaled(out, out_cond, rescale)

    return output


def rescaled(out, out_cond, weight):
    """``out`` with the per-image standard deviation of ``out_cond``, mixed in at
    ``weight`` (Lin et al. 2023, eq. 15-16)."""
    dims = list(range(1, out.dim()))
    ratio = out_cond.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True)
    return weight * (out * ratio) + (1 - weight) * out


def conditioning_dict(cond, concat=None):
    """A conditioning dict from CompVis' form (the text states as a tensor, an inpainting
    model's ``concat`` apart), or the dict itself with ``concat`` added; None stays None."""
    if cond is None:
        return None
    cond = dict(cond) if isinstance(cond, dict) else {"crossattn": cond}
    return cond if concat is None else {**cond, "concat": concat}


def guided_eps(model, cond, uncond=None, scale=1.0, rescale=0.0):
    """The guided output as a noise prediction at integer timestep t (``eps(x, t)``)."""
    output = guided(model, cond, uncond, scale, rescale)

    def eps(x, t):
        ts = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        return model.eps_from_output(x, ts, output(x, int(t)))

    return eps


class Denoiser:
    """The model as a denoiser on its noise schedule (``model.schedule``): ``D(x, sigma)
    -> x0``. For a DDPM model (``DiscreteSchedule``) x is the DDPM chain's latent times
    ``sqrt(1 + sigma^2)`` (Karras et al. 2022, eq. 7: x = x0 + sigma eps) and the network
    gets ``x / sqrt(1 + sigma^2)`` at the (possibly fractional) timestep of that sigma; for
    a rectified-flow model (``FlowSchedule``) x is x_s itself, given as it is at timestep
    1000 s. The output is read by the model's noise model (``model.prediction``: eps, v or
    flow). ``output(x, t)`` is the guided raw output (``guided``)."""

    def __init__(self, model, output):
        self.schedule = model.schedule
        self.prediction = model.prediction
        self.output = output

    def __call__(self, x, sigma):
        c_in = self.schedule.c_in(sigma)
        return self.prediction.x0(x, sigma, c_in, self.output(x * c_in, self.schedule.t(sigma)))


def karras_sigmas(n, sigma_min, sigma_max, rho=7.0):
    """Karras et al. 2022, eq. 5: n levels from sigma_max to sigma_min, evenly spaced in
    sigma^(1/rho)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(n, sigma_min, sigma_max):
    """n levels from sigma_max to sigma_min, evenly spaced in log sigma."""
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), n,
                          dtype=torch.float64).exp()


def sigma_schedule(space, schedule, steps, spacing="uniform"):
    """The descending noise levels a sigma sampler visits, ending in 0, on the model's
    schedule ``space`` (``DiscreteSchedule``, ``FlowSchedule``): "discrete", the
    levels of the model's own sampling timesteps (those DDIM runs, ``sampling_timesteps``;
    rectified flow: diffusers' and Stability's); "karras" and "exponential" between the
    model's smallest and largest sigma (its whole training range, as k-diffusion and A1111
    use; diffusers takes the range of the spaced timesteps instead)."""
    if schedule == "discrete":
        levels = space.discrete(steps, spacing)
    elif schedule == "karras":
        levels = karras_sigmas(steps, space.sigma_min, space.sigma_max)
    elif schedule == "exponential":
        levels = exponential_sigmas(steps, space.sigma_min, space.sigma_max)
    elif schedule == "sgm_uniform":
        levels = torch.tensor([space.sigma(t) for t in sgm_uniform_timesteps(
            steps, len(space.sigmas))], dtype=torch.float64)
    else:
        raise ValueError(f"unknown schedule {schedule!r}; choose from {list(SCHEDULES)}")
    return torch.cat([levels, levels.new_zeros(1)])


def sgm_uniform_timesteps(steps, num_timesteps=1000):
    """The (fractional) timesteps of Stability's "sgm_uniform" schedule (ComfyUI's
    ``sgm_uniform``, the few-step distillates' choice): ``steps`` evenly spaced from the
    last training timestep down to 0, that last point left out."""
    return torch.linspace(num_timesteps - 1, 0, steps + 1, dtype=torch.float64)[:-1].tolist()


def ddim_schedule(alphas_cumprod, timesteps, eta=0.0, final_alpha=None):
    """(abar_t, abar_prev, sigma_t) per sampling step, as CompVis: the step after the last
    uses abar at t=0 (or ``final_alpha``: 1 for DDPM, which ends on x0), and sigma follows
    Song et al. 2021, eq. 16."""
    a = alphas_cumprod[timesteps].double()
    last = alphas_cumprod[:1].double() if final_alpha is None else a.new_full((1,), final_alpha)
    a_prev = torch.cat([last, a[:-1]])
    sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
    return a, a_prev, sigma


def ddim_step(x, e, a, a_prev, sigma=0.0, noise=None):
    """One DDIM update (Song et al. 2021, eq. 12): predicted x0, direction to x_t, noise."""
    a, a_prev, sigma = float(a), float(a_prev), float(sigma)
    pred_x0 = (x - (1 - a) ** 0.5 * e) / a ** 0.5
    x_prev = a_prev ** 0.5 * pred_x0 + (1 - a_prev - sigma ** 2) ** 0.5 * e
    if sigma > 0:
        x_prev = x_prev + sigma * noise
    return x_prev, pred_x0


def sample_ddim(eps, x, timesteps, alphas_cumprod, eta=0.0, noise=None, callback=None,
                disable=False, blend=None, final_alpha=None, name="DDIM"):
    """DDIM (Song et al. 2021); ``eta=0`` is deterministic, ``eta=1`` DDPM-like."""
    if eta > 0 and noise is None:
        raise ValueError("DDIM with eta > 0 needs a noise source")
    a, a_prev, sigma = ddim_schedule(alphas_cumprod.cpu(), torch.as_tensor(timesteps), eta,
                                     final_alpha)
    with progress(len(timesteps), name, disable=disable) as bar:
        for i in reversed(range(len(timesteps))):
            e = eps(x, timesteps[i])
            x, pred_x0 = ddim_step(x, e, a[i], a_prev[i], sigma[i],
                                   noise(x.shape) if sigma[i] > 0 else None)
            if blend:
                x = blend(x, timesteps[i - 1] if i > 0 else None)
            bar.update()
            if callback:
                callback(len(timesteps) - 1 - i, x, pred_x0)
    return x


def sample_ddpm(eps, x, timesteps, alphas_cumprod, noise=None, callback=None, disable=False,
                blend=None):
    """DDPM's ancestral sampling (Ho et al. 2020, alg. 2) on the spaced timesteps: each step
    draws from the posterior q(x_prev | x_t, x0 estimate) with its own variance, which is
    DDIM at eta = 1; the last step ends on the x0 estimate (abar = 1), as diffusers'
    DDPMScheduler does."""
    return sample_ddim(eps, x, timesteps, alphas_cumprod, eta=1.0, noise=noise,
                       callback=callback, disable=disable, blend=blend, final_alpha=1.0,
                       name="DDPM")


def plms_combine(e, old):
    """Linear multistep combination of eps (Liu et al. 2022, PNDM eq. 12; Adams-Bashforth)."""
    if len(old) == 1:
        return (3 * e - old[-1]) / 2
    if len(old) == 2:
        return (23 * e - 16 * old[-1] + 5 * old[-2]) / 12
    return (55 * e - 59 * old[-1] + 37 * old[-2] - 9 * old[-3]) / 24


def sample_plms(eps, x, timesteps, alphas_cumprod, callback=None, disable=False, blend=None):
    """PLMS (Liu et al. 2022) as CompVis runs it: the first step is a pseudo improved-Euler
    step (two eps evaluations), then 2nd-4th order multistep on the stored eps."""
    a, a_prev, _ = ddim_schedule(alphas_cumprod.cpu(), torch.as_tensor(timesteps))
    order = list(reversed(range(len(timesteps))))
    old = []
    with progress(len(order), "PLMS", disable=disable) as bar:
        for n, i in enumerate(order):
            e = eps(x, timesteps[i])
            if not old:
                x_next, _ = ddim_step(x, e, a[i], a_prev[i])
                e_next = eps(x_next, timesteps[order[min(n + 1, len(order) - 1)]])
                e_prime = (e + e_next) / 2
            else:
                e_prime = plms_combine(e, old)
            x, pred_x0 = ddim_step(x, e_prime, a[i], a_prev[i])
            if blend:
                x = blend(x, timesteps[i - 1] if i > 0 else None)
            old = (old + [e])[-3:]
            bar.update()
            if callback:
                callback(n, x, pred_x0)
    return x


def consistency_scalings(t, timestep_scaling=10.0, sigma_data=0.5):
    """(c_skip, c_out) of a latent consistency model's boundary condition at timestep t
    (Luo et al. 2023, eq. 4, with diffusers' ``timestep_scaling``): nearly (0, 1) at every
    timestep sampling visits, exactly (1, 0) at t = 0."""
    s = t * timestep_scaling
    return sigma_data ** 2 / (s ** 2 + sigma_data ** 2), s / (s ** 2 + sigma_data ** 2) ** 0.5


def sample_lcm(eps, x, timesteps, alphas_cumprod, noise=None, callback=None, disable=False,
               blend=None):
    """Latent consistency models' multistep sampling (Luo et al. 2023, alg. 1; diffusers'
    ``LCMScheduler``): at each timestep the model's clean-image estimate (through the
    boundary condition, ``consistency_scalings``) is noised afresh to the next timestep;
    the last step ends on the estimate."""
    if noise is None:
        raise ValueError("LCM needs a noise source")
    a = alphas_cumprod.cpu().double()
    with progress(len(timesteps), "LCM", disable=disable) as bar:
        for n, i in enumerate(reversed(range(len(timesteps)))):
            t = int(timesteps[i])
            a_t = float(a[t])
            x0 = (x - (1 - a_t) ** 0.5 * eps(x, t)) / a_t ** 0.5
            c_skip, c_out = consistency_scalings(t)
            denoised = c_out * x0 + c_skip * x
            if i > 0:
                a_next = float(a[int(timesteps[i - 1])])
                x = a_next ** 0.5 * denoised + (1 - a_next) ** 0.5 * noise(x.shape)
            else:
                x = denoised
            if blend:
                x = blend(x, timesteps[i - 1] if i > 0 else None)
            bar.update()
            if callback:
                callback(n, x, denoised)
    return x


def sample_tcd(eps, x, timesteps, alphas_cumprod, eta=0.3, noise=None, callback=None,
               disable=False, blend=None):
    """Trajectory consistency distillation's sampler (Zheng et al. 2024, alg. 4; diffusers'
    ``TCDScheduler``): from timestep t the estimate goes back along the trajectory to
    s = floor((1 - gamma) t_next), and is noised forward from s to t_next. ``eta`` is
    gamma: 0 is deterministic (DDIM-like jumps), 1 is LCM's full re-noising. The last step
    ends at timestep 0's level, not on the clean estimate, as diffusers does."""
    if eta > 0 and noise is None:
        raise ValueError("TCD with eta > 0 needs a noise source")
    a = alphas_cumprod.cpu().double()
    with progress(len(timesteps), "TCD", disable=disable) as bar:
        for n, i in enumerate(reversed(range(len(timesteps)))):
            t = int(timesteps[i])
            t_next = int(timesteps[i - 1]) if i > 0 else 0
            s = int(math.floor((1 - eta) * t_next))
            a_t, a_next, a_s = float(a[t]), float(a[t_next]), float(a[s])
            e = eps(x, t)
            x0 = (x - (1 - a_t) ** 0.5 * e) / a_t ** 0.5
            x = a_s ** 0.5 * x0 + (1 - a_s) ** 0.5 * e
            if eta > 0 and i > 0:
                x = (a_next / a_s) ** 0.5 * x + (1 - a_next / a_s) ** 0.5 * noise(x.shape)
            if blend:
                x = blend(x, timesteps[i - 1] if i > 0 else None)
            bar.update()
            if callback:
                callback(n, x, x0)
    return x


def sampling_timesteps(steps, num_timesteps=1000, spacing="uniform"):
    """The discrete timesteps ``steps`` sampling steps visit (ascending). "uniform" with
    ``steps`` above half of ``num_timesteps`` visits every timestep but the first (CompVis'
    spacing ``1 + k * (T // steps)``), so the count can differ from ``steps``."""
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; "
                         f"choose from {sorted(TIMESTEP_SPACINGS)}")
    return TIMESTEP_SPACINGS[spacing](steps, num_timesteps)


def strength_steps(n, strength):
    """How many of a schedule's ``n`` steps image-to-image runs at ``strength`` in [0, 1]:
    k = min(int(n * strength), n), as diffusers (the last k steps; the init latent is noised
    to the first of them), but at least 1 for a strength above 0, as A1111: a small
    strength makes the smallest change there is, where diffusers refuses it and CompVis
    returns the input. Strength 0 runs none (the autoencoder's round trip). CompVis noises
    to one step above where it starts denoising; we do not."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    k = min(int(n * strength), n)
    return max(k, 1) if strength > 0 and n > 0 else k


def latent_blend(mask, x0, noise, alphas_cumprod):
    """Inpainting with a text-to-image model (diffusers' path): after each step, where
    ``mask`` is 0 (keep) the latents become ``x0`` noised with ``noise`` to the next
    timestep, or ``x0`` itself after the last step. ``mask`` is 1 where to repaint."""
    a = alphas_cumprod.to(x0.device)

    def blend(x, t_next):
        if t_next is None:
            known = x0
        else:
            known = a[t_next] ** 0.5 * x0 + (1 - a[t_next]) ** 0.5 * noise
        return (1 - mask) * known + mask * x
    return blend




def sigma_blend(mask, x0, noise, space):
    """``latent_blend`` for the sigma samplers: the known latents at noise level sigma are
    ``space.noised(x0, noise, sigma)`` (x0 + sigma noise; rectified flow's
    (1 - sigma) x0 + sigma noise; x0 itself at sigma = 0)."""
    def blend(x, sigma_next):
        return (1 - mask) * space.noised(x0, noise, sigma_next) + mask * x
    return blend


# -- the step functions by sampler id (the names: ``ldm.samplers``) ---------------------
STEPS = {"ddim": sample_ddim, "plms": sample_plms, "ddpm": sample_ddpm,
         "euler": solvers.euler, "euler_a": solvers.euler_ancestral, "heun": solvers.heun,
         "dpm_2": solvers.dpm2, "dpm_2_a": solvers.dpm2_ancestral,
         "dpmpp_2s_a": solvers.dpmpp_2s_ancestral, "dpmpp_2m": solvers.dpmpp_2m,
         "dpmpp_sde": solvers.dpmpp_sde, "dpmpp_2m_sde": solvers.dpmpp_2m_sde,
         "lms": solvers.lms, "unipc": solvers.unipc, "lcm": sample_lcm, "tcd": sample_tcd}
assert set(STEPS) == set(SAMPLERS), "every named sampler has its step function"


def sample(model, sampler, x, steps, cond, uncond=None, scale=1.0, eta=None, noise=None,
           callback=None, disable=False, spacing="uniform", run_steps=None, blend=None,
           concat=None, schedule="discrete", init=None, mask=None, known=None, sigmas=None,
           rescale=0.0, skip=None):
    """Run ``sampler`` (an id of ``SAMPLERS``) for ``steps`` steps and return the final
    latents.

    ``x``: the starting noise, as DDPM latents at the top of the schedule (standard normal
    for text-to-image). ``init``: clean latents to start from instead, noised with ``x`` to
    the first step run (image-to-image). ``run_steps``: only the last that many steps of
    the schedule (``strength_steps``). ``mask`` (1 = repaint) and ``known``: after every
    step the latents outside the mask are ``known`` noised with ``x`` to that level
    (latent blending). ``noise(shape)``: fresh noise for DDIM with eta > 0 and the ancestral
    and SDE samplers. ``concat``: a 9-channel inpainting model's extra input.

    Timestep samplers (ddim, plms, ddpm) visit ``sampling_timesteps(steps, T, spacing)``
    ("uniform": CompVis' 1, 1 + c, ...; "trailing": counted down from T - 1, for
    zero-terminal-SNR models) and accept ``blend(x, t_next)`` (CompVis' own blending, for
    ``DDIMSampler``). Sigma samplers visit ``sigma_schedule(schedule, ...)``, or ``sigmas``
    given explicitly (descending, ending in 0). ``skip``: skip-layer guidance
    (``SkipLayers``, sigma samplers on an MMDiT)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {sorted(SAMPLERS)}")
    info = SAMPLERS[sampler]
    if model.prediction.name == "flow":
        check_flow_sampler(sampler)
    cond, uncond = conditioning_dict(cond, concat), conditioning_dict(uncond, concat)
    eta = resolve_eta(sampler, eta)
    if eta > 0 and noise is None:
        raise ValueError(f"{info.label} with eta > 0 needs a noise source")
    if info.timesteps:
        if skip is not None:
            raise ValueError("skip-layer guidance needs a sigma sampler on an MMDiT")
        return _sample_timesteps(model, info, x, steps, cond, uncond, scale, rescale, eta,
                                 noise, callback, disable, spacing, run_steps, blend, concat,
                                 init, mask, known)
    if blend is not None:
        raise ValueError("blend(x, t_next) is for the timestep samplers; give mask and known")
    space = model.schedule
    levels = (sigma_schedule(space, schedule, steps, spacing) if sigmas is None
              else torch.as_tensor(sigmas, dtype=torch.float64))
    if run_steps is not None:
        levels = levels[len(levels) - 1 - run_steps:]
    if skip is not None:
        skip = replace(skip, steps=len(levels) - 1)
    denoiser = Denoiser(model, guided(model, cond, uncond, scale, rescale, skip))
    if len(levels) < 2:
        return x if init is None else init
    top = float(levels[0])
    start = space.from_latents(x, top) if init is None else space.noised(init, x, top)
    ve_blend = None if mask is None else sigma_blend(mask, known, x, space)
    fn = STEPS[info.id]
    step = fn if eta == 1.0 or not info.stochastic else partial(fn, eta=eta)

    def report(i, z, denoised):  # the callback sees the model's latents, as for DDIM
        callback(i, space.to_latents(z, float(levels[i + 1])), denoised)

    out = solvers.run(step, denoiser, start, levels, noise, report if callback else None,
                      ve_blend, disable, info.label)
    last = float(levels[-1])
    return out if last == 0 else space.to_latents(out, last)


def _sample_timesteps(model, info, x, steps, cond, uncond, scale, rescale, eta, noise,
                      callback, disable, spacing, run_steps, blend, concat, init, mask, known):
    timesteps = sampling_timesteps(steps, model.num_timesteps,
                                   sampler_spacing(info.id, spacing))
    if run_steps is not None:
        timesteps = timesteps[:run_steps]
    if len(timesteps) == 0:
        return x if init is None else init
    start = x
    if init is not None:
        t = torch.full((x.shape[0],), int(timesteps[-1]), device=x.device)
        start = model.q_sample(init, t, x)
    if mask is not None:
        if blend is not None:
            raise ValueError("give either blend or mask and known")
        blend = latent_blend(mask, known, x, model.alphas_cumprod)
    eps = guided_eps(model, cond, uncond, scale, rescale)
    kwargs = ({"eta": eta, "noise": noise} if info.id in ("ddim", "tcd") else
              {"noise": noise} if info.id in ("ddpm", "lcm") else {})
    return STEPS[info.id](eps, start, timesteps, model.alphas_cumprod, callback=callback,
                   disable=disable, blend=blend, **kwargs)
