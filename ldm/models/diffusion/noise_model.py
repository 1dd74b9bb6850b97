"""The noise model: how a network's output reads as a noise prediction or a clean image,
and the noise levels of its discrete schedule. Samplers ask these, never which model they
drive (ComfyUI's ``model_sampling`` has the same shape).

- ``EPS`` (DDPM, SD 1.x, SD 2.x 512-base): the network predicts the noise.
- ``V`` (Salimans & Ho 2022; SD 2.x 768-v): it predicts v = alpha eps - sigma_t x0.
- ``FLOW`` (rectified flow, Liu et al. 2022, Esser et al. 2024; SD 3): it predicts the
  velocity v = eps - x0 of x_s = (1 - s) x0 + s eps.

A schedule says where the samplers work and how the network is called there:
``DiscreteSchedule`` is a DDPM forward process of T training timesteps seen as noise levels
sigma (Karras et al. 2022's variance-exploding form, x = x0 + sigma eps): the table of the
timesteps' sigmas and the fractional timestep of any sigma, as k-diffusion and diffusers
interpolate it. ``FlowSchedule`` is rectified flow's: the samplers work on x_s itself with
sigma = s, where the probability-flow ODE dx/ds = (x - x0(x)) / s has the variance-exploding
ODE's very form, so the deterministic samplers written for the one solve the other
unchanged (ComfyUI's and Stability's reference code run them so).
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


class FLOW:
    """The network predicts the velocity v = eps - x0 of x_s = (1 - s) x0 + s eps
    (rectified flow; Esser et al. 2024, eq. 2-3)."""
    name = "flow"

    def x0(self, x, sigma, c_in, output):
        """The clean image from the velocity at x_s (``c_in`` = 1: the network sees x_s)."""
        return x - sigma * output

    def target(self, x0, noise, alpha, sigma_t):
        return noise - x0


PREDICTIONS = {"eps": EPS(), "v": V(), "flow": FLOW()}


class Levels:
    """A schedule's table of noise levels ``sigmas``, ascending (float64, on the CPU)."""

    @property
    def sigma_min(self):
        return float(self.sigmas[0])

    @property
    def sigma_max(self):
        return float(self.sigmas[-1])


class DiscreteSchedule(Levels):
    """The noise levels of a discrete DDPM schedule: sigma_t^2 = (1 - abar_t) / abar_t,
    ascending with t (float64, on the CPU)."""

    def __init__(self, alphas_cumprod):
        a = alphas_cumprod.detach().double().cpu()
        self.sigmas = ((1 - a) / a).sqrt()
        self.log_sigmas = self.sigmas.log()

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

    def c_in(self, sigma):
        """The network's input is the DDPM latent: x / sqrt(1 + sigma^2)."""
        return (sigma ** 2 + 1) ** -0.5

    def noised(self, x0, noise, sigma):
        """x0 at noise level ``sigma`` in the samplers' space: x0 + sigma noise."""
        return x0 + sigma * noise

    def from_latents(self, x, sigma):
        """DDPM latents at ``sigma`` -> the samplers' space (x sqrt(1 + sigma^2))."""
        return x * (1 + sigma ** 2) ** 0.5

    def to_latents(self, x, sigma):
        return x / (1 + sigma ** 2) ** 0.5

    def ancestral(self, sigma, sigma_next, eta=1.0):
        """(sigma_down, 1, sigma_up): an ancestral step to ``sigma_next`` is a deterministic
        one to sigma_down, then x * 1 + sigma_up z (``solvers.ancestral``)."""
        from ldm.models.diffusion.solvers import ancestral
        down, up = ancestral(sigma, sigma_next, eta)
        return down, 1.0, up

    def alpha(self, sigma):
        """The signal's scale at ``sigma`` in the samplers' space: 1 (x = x0 + sigma eps)."""
        return 1.0

    def lam(self, sigma):
        """Half the log signal-to-noise ratio, log(alpha / sigma): -log sigma here."""
        return math.inf if sigma == 0 else -math.log(sigma)

    def discrete(self, steps, spacing="uniform"):
        """The descending levels of the model's own sampling timesteps (those DDIM runs)."""
        from ldm.models.diffusion.sampling import sampling_timesteps
        t = torch.as_tensor(sampling_timesteps(steps, len(self.sigmas), spacing))
        return self.sigmas[t.flip(0)]

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


class FlowSchedule(Levels):
    """Rectified flow's noise levels s in (0, 1] (x_s = (1 - s) x0 + s eps), with the
    timestep shift of SD 3 (Esser et al. 2024, sec. 5.3.2): the uniform training time
    u = t / T becomes s = shift u / (1 + (shift - 1) u), spending more of the schedule at
    high noise (shift 3.0 for SD 3 and 3.5). The network's timestep is 1000 s. The table
    holds the levels of t = 1 ... T, as Stability's ``ModelSamplingDiscreteFlow``."""

    def __init__(self, shift=3.0, timesteps=1000):
        self.shift, self.timesteps = float(shift), int(timesteps)
        u = torch.arange(1, self.timesteps + 1, dtype=torch.float64, device="cpu")
        self.sigmas = self.shifted(u / self.timesteps)

    def shifted(self, u):
        return self.shift * u / (1 + (self.shift - 1) * u)

    def sigma(self, t):
        """The level of table index ``t`` (0 ... T - 1; fractional ones between)."""
        t = min(max(float(t), 0.0), self.timesteps - 1.0)
        return float(self.shifted(torch.tensor((t + 1) / self.timesteps, dtype=torch.float64)))

    def t(self, sigma):
        """The network's timestep at level ``sigma``: 1000 s (the shifted level, as
        Stability's ``timestep`` and diffusers' ``sigmas * num_train_timesteps``)."""
        return float(sigma) * self.timesteps

    def c_in(self, sigma):
        return 1.0

    def noised(self, x0, noise, sigma):
        return (1 - sigma) * x0 + sigma * noise

    def from_latents(self, x, sigma):
        return x

    def to_latents(self, x, sigma):
        return x

    def ancestral(self, s, s_next, eta=1.0):
        """(s_down, scale, up): an ancestral step from ``s`` to ``s_next`` in rectified
        flow's form. It is the variance-exploding step of x / (1 - s) at sigma = s / (1 - s)
        (Karras et al.'s split of sigma_next into sigma_down and sigma_up), mapped back:
        deterministic to s_down, then x * (1 - s_next) / (1 - s_down) + up z, so the
        marginal at s_next is (1 - s_next) x0 + s_next eps again. Finite at s = 1 (pure
        noise, sigma = infinity)."""
        if s_next == 0 or eta == 0:
            return s_next, 1.0, 0.0
        ve, ve_next = (math.inf if s >= 1 else s / (1 - s)), s_next / (1 - s_next)
        up = min(ve_next, eta * ve_next * math.sqrt(max(0.0, 1 - (ve_next / ve) ** 2)))
        down = math.sqrt(max(0.0, ve_next ** 2 - up ** 2))
        s_down = down / (1 + down)
        return s_down, (1 - s_next) / (1 - s_down), (1 - s_next) * up

    def alpha(self, s):
        return 1.0 - s

    def lam(self, s):
        """log((1 - s) / s): -infinity at s = 1, +infinity at 0."""
        if s == 0:
            return math.inf
        return -math.inf if s >= 1 else math.log(1 - s) - math.log(s)

    def discrete(self, steps, spacing="uniform"):
        """diffusers' ``FlowMatchEulerDiscreteScheduler`` and Stability's ``get_sigmas``:
        ``steps`` timesteps evenly spaced from the largest level's to the smallest's, each
        shifted (the smallest is shifted twice, as both do)."""
        if spacing != "uniform":
            raise ValueError(f"a rectified-flow schedule has no {spacing!r} spacing")
        ends = self.sigma_max, self.sigma_min
        return self.shifted(torch.linspace(ends[0], ends[1], steps, dtype=torch.float64))


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
