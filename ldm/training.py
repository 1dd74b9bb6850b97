"""The training ideas the diffusion recipes are made of, one small named place each.

``ldm.lightning.DiffusionTrainer`` composes them from a config's ``training:`` section; each
is a plain object over tensors (no Lightning), tested on its own:

- ``ramp``: how an option follows the run (a number, ``[start, end]``, or phases);
- ``lr_factor`` and ``param_groups``: the learning-rate schedule, and per-module rates;
- ``Timesteps``: which t a batch is trained at (``high_noise_fraction``);
- ``LossWeight``: how much each sample's loss counts (``max_loss_weight``);
- ``Replay``: a batch transform, more samples than images encoded (``replay``);
- ``Decoys``: a batch transform on the noised input (``decoy_fraction``);
- ``Anchor``: a target, a frozen copy's prediction in place of the noise (``anchor_start``);
- ``MaskWeight``: inpainting, the loss inside the mask weighted apart (``mask_loss_weight``).

Which recipe uses which, and why, is told in ``models/ldm/shapes/HISTORY.md``.
"""
import copy
import math

import numpy as np
import torch


def ramp(value, progress):
    """A training option that is a number; a ``[start, end]`` pair followed linearly over the
    run (``progress`` from 0 to 1); or a list of ``[progress, value]`` points, followed
    piecewise linearly and held before the first and after the last (phases: e.g.
    ``[[0, 0], [0.4, 0], [0.45, 0.5], [1, 0.1]]``)."""
    if isinstance(value, (int, float)):
        return float(value)
    if all(isinstance(v, (int, float)) for v in value):
        value = [[0, value[0]], [1, value[1]]]
    points, values = zip(*sorted((float(p), float(v)) for p, v in value))
    return float(np.interp(progress, points, values))


def checked_ramp(name, value):
    """``value`` if ``ramp`` can follow it; else a ValueError naming ``training.<name>``, so
    that a malformed option fails when the trainer is built, not mid-run."""
    try:
        ramp(value, 0.0)
    except (TypeError, ValueError):
        raise ValueError(f"training.{name} must be a number, a [start, end] pair or a list "
                         f"of [progress, value] points, not {value!r}") from None
    return value


def lr_factor(warmup_steps, total_steps=None, final_ratio=1.0, phases=None):
    """Learning-rate factor of a step: linear warm-up to 1, then constant, or, given
    ``total_steps``, a cosine from 1 down to ``final_ratio`` at ``total_steps``, or, given
    ``phases`` (and ``total_steps``), the factor ``ramp(phases, step / total_steps)`` after
    the warm-up."""
    def factor(step):
        warm = min(1.0, (step + 1) / max(1, warmup_steps))
        if phases is not None:
            return warm * ramp(phases, step / max(1, total_steps))
        if step < warmup_steps or total_steps is None:
            return warm
        done = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * done))
    return factor


def param_groups(named_parameters, learning_rate, multipliers=None):
    """Optimiser parameter groups: parameters whose name (a checkpoint key, e.g.
    ``model.diffusion_model.input_blocks.0.0.``) starts with a key of ``multipliers`` learn
    at that multiple of ``learning_rate``; the rest at the rate itself, in the first group
    (the one logged). A key that names no parameter is an error."""
    try:
        multipliers = {str(k): float(v) for k, v in (multipliers or {}).items()}
    except (AttributeError, TypeError, ValueError):
        raise ValueError(f"training.lr_multipliers is a mapping of parameter-name prefixes "
                         f"to factors, not {multipliers!r}") from None
    groups, used = {1.0: []}, set()
    for name, p in named_parameters:
        prefix = next((k for k in multipliers if name.startswith(k)), None)
        if prefix is not None:
            used.add(prefix)
        groups.setdefault(multipliers.get(prefix, 1.0), []).append(p)
    unused = sorted(set(multipliers) - used)
    if unused:
        raise ValueError(f"training.lr_multipliers: no trained parameter starts with "
                         f"{unused[0]!r} (keys look like model.diffusion_model.input_blocks.0.0.)")
    return [{"params": ps, "lr": learning_rate * f} for f, ps in groups.items() if ps]


class Timesteps:
    """Which timesteps a batch trains: uniform over [0, T), except that a
    ``high_noise_fraction`` (a ramp) of the batch is drawn from [``high_noise_start``, T).
    Where things go in the image is settled at high noise, where the noise-prediction loss
    carries little signal; more of those steps teach a prompt's spatial words sooner."""

    def __init__(self, num_timesteps, high_noise_fraction=0.0, high_noise_start=600):
        self.num_timesteps = int(num_timesteps)
        self.fraction = checked_ramp("high_noise_fraction", high_noise_fraction)
        self.start = int(high_noise_start)

    def __call__(self, n, device, progress=0.0):
        T = self.num_timesteps
        t = torch.randint(0, T, (n,), device=device)
        k = int(round(ramp(self.fraction, progress) * n))
        if k:
            t[:k] = torch.randint(self.start, T, (k,), device=device)
        return t


class LossWeight:
    """Per-sample weight of the noise-prediction loss: 1 (Ho et al.), or, with
    ``max_loss_weight`` (a ramp) > 1, the weight that makes it the v-prediction loss,
    (1 + SNR) / SNR = 1 / alpha_bar, capped there: high-noise steps, where the layout is
    decided, count up to that many times more (cf. Min-SNR weighting, Hang et al. 2023).
    A v-prediction model's loss is left as it is (it is its own weighting)."""

    def __init__(self, max_loss_weight=1.0):
        self.cap = checked_ramp("max_loss_weight", max_loss_weight)

    def __call__(self, t, alphas_cumprod, parameterization="eps", progress=0.0):
        cap = ramp(self.cap, progress)
        if cap <= 1 or parameterization != "eps":
            return torch.ones_like(t, dtype=torch.float32)
        alpha = alphas_cumprod.to(t.device)[t].float()
        return torch.minimum(1 / alpha, torch.tensor(cap, dtype=alpha.dtype)).clamp(min=1)


class MaskWeight:
    """Inpainting: the per-pixel loss inside the mask counts ``mask_loss_weight`` times as
    much as outside it (1: the plain mean). Outside the mask the masked image's latents give
    the answer away once the model reads them; inside is what inpainting is for."""

    def __init__(self, mask_loss_weight=1.0):
        self.weight = checked_ramp("mask_loss_weight", mask_loss_weight)

    def __call__(self, error, mask, progress=0.0):
        """``error`` [B, C, h, w] per element -> [B] per sample; ``mask`` [B, 1, h, w] in
        {0, 1} at latent size (1 = repaint), or None for a text-to-image model."""
        w = ramp(self.weight, progress)
        if mask is None or w == 1:
            return error.mean((1, 2, 3))
        pixel = 1 + (w - 1) * mask
        return (error * pixel).mean((1, 2, 3)) / pixel.mean((1, 2, 3))


class Replay:
    """A batch transform: the fresh latents and captions (and an inpainting model's extra
    input) plus (``factor`` - 1) times as many drawn from a pool of the last ``pool`` ones.

    On a CPU, rendering and encoding the images costs about a third of a step; with replay r
    each latent is used about r times while the pool turns over every ``pool / n`` steps. The
    pool is not checkpointed: after ``--resume`` it refills from fresh batches."""

    def __init__(self, factor=1, pool=16384):
        self.factor, self.capacity = int(factor), int(pool)
        self.pool = None

    def __call__(self, z, captions, concat=None):
        if self.factor <= 1:
            return z, captions, concat
        n, capacity = z.shape[0], self.capacity
        if self.pool is None:  # a ring buffer
            self.pool = {"z": z.new_empty((capacity, *z.shape[1:])),
                         "captions": [""] * capacity, "pushed": 0, "size": 0}
            if concat is not None:
                self.pool["concat"] = concat.new_empty((capacity, *concat.shape[1:]))
        pool = self.pool
        slots = [(pool["pushed"] + i) % capacity for i in range(n)]
        pool["z"][slots] = z
        if concat is not None:
            pool["concat"][slots] = concat
        for slot, caption in zip(slots, captions):
            pool["captions"][slot] = caption
        pool["pushed"] += n
        pool["size"] = min(pool["pushed"], capacity)
        idx = torch.randint(0, pool["size"], ((self.factor - 1) * n,))
        return (torch.cat([z, pool["z"][idx]]),
                captions + [pool["captions"][i] for i in idx.tolist()],
                None if concat is None else torch.cat([concat, pool["concat"][idx]]))


class Decoys:
    """A batch transform on the noised input: for a ``fraction`` (a ramp) of the samples at
    t >= ``start``, another sample's latent is noised in place of its own, while the target
    stays what takes the sample's own latent to that input.

    SD's schedule leaves sqrt(alpha_bar) = 0.068 of the image in x_t at t = 999, enough for
    a model to read where things are from its input rather than from the prompt (a probe on
    the shapes model: at t = 999 its x0 error is half with the image in the noise than with
    pure noise). Sampling starts from pure noise, where that layout is random, so such a
    model puts things wherever the noise suggests. Decoys teach it that at the top of the
    schedule the input's layout is unreliable and the words are not."""

    def __init__(self, fraction=0.0, start=900):
        self.fraction = checked_ramp("decoy_fraction", fraction)
        self.start = int(start)

    def active(self):
        return ramp(self.fraction, 0.0) > 0 or ramp(self.fraction, 1.0) > 0

    def __call__(self, z, t, progress=0.0):
        """The latents to noise: ``z`` itself, or a copy with decoys in it."""
        p = ramp(self.fraction, progress)
        if p <= 0:
            return z
        chosen = (t >= self.start) & (torch.rand(t.shape, device=t.device) < p)
        if not chosen.any():
            return z
        other = torch.roll(z, 1, 0)   # the previous sample of the batch
        return torch.where(chosen.view(-1, 1, 1, 1), other, z)

    @staticmethod
    def noise_target(model, z, source, t, noise):
        """What takes ``z`` to ``q_sample(source, t, noise)``: the noise itself, plus, with a
        decoy, the decoy's difference seen as noise."""
        if source is z:
            return noise
        return noise + (model._at(model.sqrt_alphas_cumprod, t, z)
                        / model._at(model.sqrt_one_minus_alphas_cumprod, t, z)) * (source - z)


class Anchor(torch.nn.Module):
    """A target: once the run reaches ``start`` (a progress from 0 to 1), a frozen copy of
    the EMA UNet and text encoder; from then on the samples with t in [``low``, T) are
    trained towards that copy's prediction instead of the noise.

    Two skills live at different ends of the schedule: where the prompt puts things is
    decided at the top, what they look like below it. Training one at a learning rate that
    teaches it quickly undoes the other, unless that other's loss is weighted so heavily
    that it crowds the first out: its data loss is mostly the unpredictable detail of an
    image seen through noise. The anchor's prediction is that loss's target with the noise
    averaged out: matching it costs little gradient once matched, and holds what the anchor
    knew on its part of the schedule while the rest learns.

    Its weights are in the training checkpoint (``anchor.unet.*``, ``anchor.text.*``,
    ``anchor.set``), never in an exported model."""

    def __init__(self, start, low, unet, text):
        super().__init__()
        if not 0 <= float(start) <= 1:
            raise ValueError(f"training.anchor_start is a progress from 0 to 1, not {start!r}")
        self.start, self.low = float(start), int(low)
        self.unet, self.text = copy.deepcopy(unet), copy.deepcopy(text)
        self.requires_grad_(False).eval()
        self.register_buffer("set", torch.tensor(False))

    def train(self, mode=True):
        return super().train(False)   # frozen: always in eval mode

    @torch.no_grad()
    def forward(self, target, x_t, t, captions, progress, copy_ema):
        """``target`` with the anchor's prediction for the samples at t >= ``low``, once set;
        ``copy_ema(unet, text)`` fills the anchor from the EMA weights when it is set."""
        if not self.set:
            if progress < self.start:
                return target
            copy_ema(self.unet, self.text)   # (it says so in the log)
            self.set.fill_(True)
        chosen = (t >= self.low).nonzero().flatten()
        if len(chosen) == 0:
            return target
        cond = self.text.encode([captions[i] for i in chosen.tolist()])
        target = target.clone()
        target[chosen] = self.unet(x_t[chosen], t[chosen], {"crossattn": cond})
        return target

    @staticmethod
    def fill_missing(module, state_dict):
        """A checkpoint from before the anchor existed (or a run without one) resumes with
        the anchor unset: its keys are filled from ``module`` so loading stays strict. An
        older checkpoint's ``anchor_set`` is read as ``anchor.set``."""
        if "anchor_set" in state_dict:
            state_dict["anchor.set"] = state_dict.pop("anchor_set")
        own = module.state_dict()
        for key in own:
            if key.startswith("anchor.") and key not in state_dict:
                state_dict[key] = own[key] if key != "anchor.set" else torch.tensor(False)


class ConsistencyDistillation:
    """Latent consistency distillation (Luo et al. 2023, alg. 1; the recipe of
    LCM_Dreamshaper and LCM-LoRA): a student f(x, t, w) learns to map any point of the
    teacher's guided probability-flow trajectory to the same end, so that 2-8 steps of the
    LCM sampler (``sample_lcm``) make an image.

    Each sample: t = t_{n+1} from the ``original_steps``-step grid (19, 39, ... 999 for 50),
    a guidance scale w drawn from ``guidance`` ([low, high]; the student takes it as an
    embedding, ``time_cond_proj_dim``), x_t noised from the data; the teacher's guided
    noise prediction takes one DDIM step to s = t_n; the target network (an EMA of the
    student, ``target_decay``) gives f(x_s, s, w), and the student's f(x_t, t, w) is pulled
    to it by a pseudo-Huber loss (``huber_c``). f = c_skip(t) x + c_out(t) x0(x, t), the
    boundary condition of ``consistency_scalings`` (the sampler's own)."""

    def __init__(self, alphas_cumprod, guidance=(2.0, 8.0), original_steps=50, huber_c=0.001,
                 target_decay=0.95):
        from ldm.modules.diffusionmodules.util import lcm_timesteps
        self.a = alphas_cumprod.detach().float().cpu()
        T = len(self.a)
        self.grid = torch.as_tensor(lcm_timesteps(original_steps, T, original_steps))
        self.low, self.high = (float(g) for g in guidance)
        if not 1.0 <= self.low <= self.high:
            raise ValueError(f"training.guidance must be [low, high] with 1 <= low <= high, "
                             f"got {list(guidance)}")
        self.huber_c, self.target_decay = huber_c, target_decay

    def draw(self, n, device):
        """(t, s, scale): n timesteps t_{n+1} of the grid, the grid point below each, and
        n guidance scales."""
        k = torch.randint(1, len(self.grid), (n,))
        t, s = self.grid[k], self.grid[k - 1]
        scale = self.low + (self.high - self.low) * torch.rand(n)
        return t.to(device), s.to(device), scale.to(device)

    def _ab(self, t, like):
        a = self.a.to(like.device)[t].view(-1, *([1] * (like.dim() - 1)))
        return a.sqrt(), (1 - a).sqrt()

    def f(self, x, t, eps):
        """The consistency function from a noise prediction at x_t: c_skip x + c_out x0."""
        from ldm.models.diffusion.sampling import consistency_scalings
        alpha, sigma = self._ab(t, x)
        x0 = (x - sigma * eps) / alpha
        c_skip, c_out = consistency_scalings(t.float())
        shape = (-1,) + (1,) * (x.dim() - 1)
        return c_skip.view(shape) * x + c_out.view(shape) * x0

    def ddim_step(self, x_t, t, s, eps):
        """The teacher's solver: one DDIM step from t to s with noise prediction ``eps``."""
        a_t, s_t = self._ab(t, x_t)
        a_s, s_s = self._ab(s, x_t)
        x0 = (x_t - s_t * eps) / a_t
        return a_s * x0 + s_s * eps

    def loss(self, f_student, f_target):
        c = self.huber_c
        return (((f_student.float() - f_target.float()) ** 2 + c * c).sqrt() - c).mean()

    @torch.no_grad()
    def update_target(self, target, student):
        """The target network moves towards the student: target = d target + (1 - d) student."""
        for p_t, p in zip(target.parameters(), student.parameters()):
            p_t.lerp_(p.detach().to(p_t.dtype), 1 - self.target_decay)
