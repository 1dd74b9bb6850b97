"""The noise model: how a network's output reads as a noise prediction or a clean image,
and the noise levels of its discrete schedule. Samplers ask these, never which model they
drive (ComfyUI's ``model_sampling`` has the same shape).

- ``EPS`` (DDPM, SD 1.x, SD 2.x 512-base): the network predicts the noise.
- ``V`` (Salimans & Ho 2022; SD 2.x 768-v): it predicts v = alpha eps - sigma_t x0.
Flow matching (SD 3) will join them as a third prediction with its own schedule.

``DiscreteSchedule`` is a DDPM forward process of T training timesteps seen as noise levels
sigma (Karras et al. 2022's variance-exploding form, x = x0 + sigma eps): the table of the
timesteps' sigmas and the fractional timestep of any sigma, as k-diffusion and diffusers
interpolate it.
"""
import math

import torch


class EPS:
    """The network predicts the noise eps of x_t = alpha x0 + sigma_t eps."""
    name = "eps"

    def eps(self, x_t, alpha, sigma_t, output):
        """The noise prediction at x_t (``alpha`` = sqrt(abar_t), ``sigma_t`` =
        sqrt(1 - abar_t), broadcastable)."""
        return output

    def x0(self, x, sigma, c_in, output):
        """The clean image from the output at x = x0 + sigma eps (the network was given
        x * c_in, c_in = 1 / sqrt(1 + sigma^2))."""
        return x - sigma * output

    def target(self, x0, noise, alpha, sigma_t):
        """What the network is trained to output (``ldm.lightning``)."""
        return noise


class V:
    """The network predicts v = alpha eps - sigma_t x0 (Salimans & Ho 2022, sec. 4)."""
    name = "v"

    def eps(self, x_t, alpha, sigma_t, output):
        return alpha * output + sigma_t * x_t

    def x0(self, x, sigma, c_in, output):
        # x0 = alpha x_t - sigma_t v, with x_t = x c_in, alpha = c_in, sigma_t = sigma c_in
        return x * c_in ** 2 - output * (sigma * c_in)

    def target(self, x0, noise, alpha, sigma_t):
        return alpha * noise - sigma_t * x0


PREDICTIONS = {"eps": EPS(), "v": V()}


class DiscreteSchedule:
    """The noise levels of a discrete DDPM schedule: sigma_t^2 = (1 - abar_t) / abar_t,
    ascending with t (float64, on the CPU)."""

    def __init__(self, alphas_cumprod):
        a = alphas_cumprod.detach().double().cpu()
        self.sigmas = ((1 - a) / a).sqrt()
        self.log_sigmas = self.sigmas.log()

    @property
    def sigma_min(self):
        return float(self.sigmas[0])

    @property
    def sigma_max(self):
        return float(self.sigmas[-1])

    def sigma(self, t):
        """The noise level of timestep ``t``; between two training timesteps, linear in log
        sigma (the inverse of ``t``; ComfyUI's ``ModelSamplingDiscrete.sigma``)."""
        t = min(max(float(t), 0.0), len(self.sigmas) - 1.0)
        low = int(math.floor(t))
        if low == t:
            return float(self.sigmas[low])
        w = t - low
        return math.exp((1 - w) * float(self.log_sigmas[low])
                        + w * float(self.log_sigmas[low + 1]))

    def t(self, sigma):
        """The timestep of noise level ``sigma``: linear in log sigma between the two
        training timesteps around it (clamped to the table)."""
        log_sigma = math.log(max(sigma, 1e-10))
        table = self.log_sigmas
        low = int(torch.searchsorted(table, torch.tensor(log_sigma, dtype=table.dtype),
                                     right=True)) - 1
        low = min(max(low, 0), len(table) - 2)
        w = (float(table[low]) - log_sigma) / (float(table[low]) - float(table[low + 1]))
        return low + min(max(w, 0.0), 1.0)


def fitting_prediction(model, threshold=0.5):
    """Which prediction ("eps" or "v") a trained model makes, from one UNet call: at the
    last training timestep x_t is nearly pure noise (alpha ~ 0.07 for SD's schedule), so a
    noise prediction is nearly x_t itself (cosine ~ 1), while v = (alpha x_t - x0) / sigma_t
    is dominated by the clean-image estimate, nearly uncorrelated with the noise drawn
    (measured: 0.2-0.4 on tiny SD-2-shaped models trained either way, 0.93-0.95 for
    eps; ``tests/test_sd2.py``). The input is four seeded noise draws at half the native
    latent size, the conditioning the empty prompt's. A1111 asks the same question with a constant input
    and a threshold on the mean; diffusers guesses from the checkpoint's ``global_step``.
    Meaningless for untrained (random) weights."""
    gen = torch.Generator().manual_seed(0)
    side = max(model.image_size // 2, 8)
    x = torch.randn(4, model.channels, side, side, generator=gen).to(model.device)
    t = torch.full((4,), model.num_timesteps - 1, dtype=torch.long, device=model.device)
    with torch.no_grad():
        cond = {k: v.expand(4, *v.shape[1:]) for k, v in model.conditioning([""]).items()}
        out = model.apply_model(x, t, cond)
    cosine = torch.nn.functional.cosine_similarity(out.flatten().double(),
                                                   x.flatten().double(), dim=0)
    return "eps" if float(cosine) > threshold else "v"
