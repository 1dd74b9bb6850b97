"""Samplers as small pure functions over one denoiser contract, for all three tasks.

A sampler sees only ``eps(x, t) -> noise prediction`` (guidance already applied, see
``guided_eps``), the starting latents, the discrete timesteps and ``alphas_cumprod``. Fresh
noise, when a sampler needs it, comes from the caller's ``noise(shape)`` so that every image's
randomness is its own (``ldm.pipeline`` draws it from per-image generators).

Image-to-image and inpainting use the same samplers: they start part-way down the schedule
(the timesteps passed in are the last ones of the full schedule, see ``strength_steps``),
and inpainting with a text-to-image model blends the known latents back after every step
(``blend(x, t_next) -> x``, built by ``latent_blend``). A dedicated inpainting model gets its
mask and masked-image latents through ``guided_eps``'s ``concat``.
"""
import torch

from ldm.modules.diffusionmodules.util import TIMESTEP_SPACINGS
from ldm.progress import progress


def guided_eps(model, cond, uncond=None, scale=1.0, concat=None):
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6), written once:
    eps = eps(x, uncond) + scale * (eps(x, cond) - eps(x, uncond)), both halves in one
    batched UNet call. ``scale == 1`` or no ``uncond`` -> the conditional prediction alone.
    ``concat`` (a 9-channel inpainting model's mask and masked-image latents) goes to both
    halves alike."""
    guided = uncond is not None and scale != 1.0
    extra = () if concat is None else (concat,)  # a text-to-image model's apply_model takes 3

    def eps(x, t):
        ts = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        if not guided:
            return model.eps_from_output(x, ts, model.apply_model(x, ts, cond, *extra))
        x_in, t_in = torch.cat([x, x]), torch.cat([ts, ts])
        out = model.apply_model(x_in, t_in, torch.cat([uncond, cond]),
                                *(torch.cat([c, c]) for c in extra))
        e_uncond, e_cond = model.eps_from_output(x_in, t_in, out).chunk(2)
        return e_uncond + scale * (e_cond - e_uncond)

    return eps


def ddim_schedule(alphas_cumprod, timesteps, eta=0.0):
    """(abar_t, abar_prev, sigma_t) per sampling step, as CompVis: the step after the last
    uses abar at t=0 (not 1), and sigma follows Song et al. 2021, eq. 16."""
    a = alphas_cumprod[timesteps].double()
    a_prev = torch.cat([alphas_cumprod[:1].double(), a[:-1]])
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
                disable=False, blend=None):
    """DDIM (Song et al. 2021); ``eta=0`` is deterministic, ``eta=1`` DDPM-like."""
    if eta > 0 and noise is None:
        raise ValueError("DDIM with eta > 0 needs a noise source")
    a, a_prev, sigma = ddim_schedule(alphas_cumprod.cpu(), torch.as_tensor(timesteps), eta)
    with progress(len(timesteps), "DDIM", disable=disable) as bar:
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


SAMPLERS = {"ddim": sample_ddim, "plms": sample_plms}


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
    to the first of them). CompVis noises to one step above where it starts denoising; we
    do not."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    return min(int(n * strength), n)


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


def sample(model, sampler, x, steps, cond, uncond=None, scale=1.0, eta=0.0, noise=None,
           callback=None, disable=False, spacing="uniform", run_steps=None, blend=None,
           concat=None):
    """Run ``sampler`` ("ddim" or "plms") from latents ``x`` over ``steps`` timesteps spaced
    as CompVis does ("uniform": 1, 1 + c, ...) or counted down from T - 1 ("trailing", for
    zero-terminal-SNR models). ``run_steps``: only the last that many of them (x is then
    noised to the first of those: image-to-image); ``blend``: applied after every step
    (``latent_blend``); ``concat``: a 9-channel inpainting model's extra input."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {sorted(SAMPLERS)}")
    if sampler == "plms" and eta != 0:
        raise ValueError("PLMS is deterministic: eta must be 0")
    timesteps = sampling_timesteps(steps, model.num_timesteps, spacing)
    if run_steps is not None:
        timesteps = timesteps[:run_steps]
    if len(timesteps) == 0:
        return x
    eps = guided_eps(model, cond, uncond, scale, concat)
    kwargs = {"eta": eta, "noise": noise} if sampler == "ddim" else {}
    return SAMPLERS[sampler](eps, x, timesteps, model.alphas_cumprod, callback=callback,
                             disable=disable, blend=blend, **kwargs)
