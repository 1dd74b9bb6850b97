"""Small building blocks shared by the UNet and the diffusion schedule."""
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def make_beta_schedule(schedule, n_timestep, linear_start=1e-4, linear_end=2e-2):
    """Betas of the forward process (a float64 CPU tensor). SD v1 uses "linear" (CompVis' name for *scaled* linear:
    linear in sqrt(beta), from 0.00085 to 0.012 over 1000 steps)."""
    if schedule == "linear":
        betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, n_timestep,
                               dtype=torch.float64, device="cpu") ** 2
    elif schedule == "cosine":  # Nichol & Dhariwal 2021, eq. 17
        s = 8e-3
        t = torch.arange(n_timestep + 1, dtype=torch.float64, device="cpu") / n_timestep + s
        alphas = torch.cos(t / (1 + s) * math.pi / 2).pow(2)
        alphas = alphas / alphas[0]
        betas = (1 - alphas[1:] / alphas[:-1]).clamp(max=0.999)
    elif schedule == "sqrt_linear":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64,
                               device="cpu")
    elif schedule == "sqrt":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64,
                               device="cpu") ** 0.5
    else:
        raise ValueError(f"unknown beta schedule {schedule!r}")
    return betas


# The last alpha_bar of a zero-terminal-SNR schedule. Exactly 0 would make the noise
# prediction of a v-model at t = T carry no information about x0 (eps = x_T there), so every
# eps-based sampler would lose the model's first step; 2^-24 (diffusers' Euler scheduler
# makes the same choice) leaves a signal of 2.4e-4 in x_T, against 0.068 in SD's schedule.
ZERO_SNR_ALPHA_BAR = 2.0 ** -24


def rescale_zero_terminal_snr(betas):
    """Betas whose last step leaves (almost) no signal: sqrt(alpha_bar) shifted so that its
    last value is 0 and scaled so that its first is unchanged (Lin et al. 2023, "Common
    diffusion noise schedules and sample steps are flawed", Algorithm 1), then the last
    alpha_bar set to ``ZERO_SNR_ALPHA_BAR``. SD's schedule leaves 0.068 of the image in the
    noise at t = 999: a layout the model learns to read in training and never gets when
    sampling starts from pure noise. Needs v-prediction (eps says nothing about x0 at SNR 0)."""
    s = torch.cumprod(1.0 - betas, dim=0).sqrt()
    s = (s - s[-1]) * s[0] / (s[0] - s[-1])
    alphas_cumprod = (s ** 2).clamp(min=ZERO_SNR_ALPHA_BAR)
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1.0 - alphas


def timestep_embedding(timesteps, dim, max_period=10000):
    """Sinusoidal embedding of (possibly fractional) timesteps [N] -> [N, dim], cos first
    (the order of the CompVis/OpenAI UNet, so trained weights line up)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) *
                      torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def guidance_embedding(scale, dim):
    """A latent consistency model's guidance embedding (Luo et al. 2023; VDM's Fourier
    features, as diffusers' ``get_guidance_scale_embedding``): w = (scale - 1) * 1000
    [N] -> [N, dim], sin first, frequencies 10000^(-k / (dim/2 - 1))."""
    w = (torch.as_tensor(scale, dtype=torch.float32).reshape(-1) - 1) * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    args = w[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def zero_module(module):
    """Zero a module's parameters (output layers of residual branches start as identity)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


class PackedWeight:
    """A layer's weight reordered once into oneDNN's blocked layout, for CPU inference.

    oneDNN reorders a plain weight into its blocked layout on every call; for the SD UNet's
    wide, low-resolution layers in bfloat16 (AMX) that reorder costs more than the
    arithmetic (a 1280-channel 3x3 convolution at 8x8 runs 2.2x faster on a reordered
    weight). The reordered copy is kept with the tensor it came from and made again when
    the weight changes (a new tensor, as a LoRA merge makes, or an in-place write)."""

    __slots__ = ("source", "version", "packed")

    def __init__(self, weight, pack):
        self.source, self.version = weight, weight._version
        self.packed = pack(weight)

    def fresh(self, weight):
        # the source is held, so no other tensor can have its address while this lives
        return weight.data_ptr() == self.source.data_ptr() and weight._version == self.version


class _Packable:
    """What ``Conv2d`` and ``Linear`` share: the ``packed`` switch (``set_weight_packing``)
    and the cache of the reordered weight, which copies and pickles of a model leave out."""

    packed = False  # run on a reordered oneDNN weight in CPU inference (``set_weight_packing``)

    def _packed_weight(self, pack):
        cache = self.__dict__.get("_packed")
        weight = self.weight.detach()
        if cache is None or not cache.fresh(weight):
            cache = self.__dict__["_packed"] = PackedWeight(weight, pack)
        return cache.packed

    def _use_packed(self, x):
        return self.packed and x.device.type == "cpu" and not torch.is_grad_enabled()

    def __getstate__(self):
        state = super().__getstate__()
        state = dict(state)
        state.pop("_packed", None)
        return state


class Conv2d(_Packable, nn.Conv2d):
    """``nn.Conv2d`` (the same parameters and checkpoint keys) that, when ``packed``, runs
    CPU inference on a weight reordered once for oneDNN (``PackedWeight``) and computes in
    the weight's dtype (as autocast would)."""

    def forward(self, x):
        if not (self._use_packed(x) and self.padding_mode == "zeros"
                and not isinstance(self.padding, str)):
            return super().forward(x)
        pad, stride, dilation = list(self.padding), list(self.stride), list(self.dilation)
        weight = self._packed_weight(lambda w: torch.ops.mkldnn._reorder_convolution_weight(
            w, pad, stride, dilation, self.groups))
        return torch.ops.mkldnn._convolution_pointwise(
            x.to(self.weight.dtype), weight, self.bias, pad, stride, dilation, self.groups,
            "none", [], "")


class Linear(_Packable, nn.Linear):
    """``nn.Linear`` (the same parameters and checkpoint keys) for fast CPU inference on
    many rows. When ``packed``: oneDNN's matmul on a weight reordered once
    (``PackedWeight``; the bfloat16 fast path, AMX on recent Intel CPUs). Otherwise a 1x1
    convolution over a channels-last view of its input: oneDNN's convolution is 1.2-1.8x
    faster than the BLAS matmul behind ``F.linear`` in float32 on AMD Zen 4 (level with it
    on an AMX Xeon), and up to 1.2x in bfloat16 (shapes of the SD UNet's attention and
    feed-forward layers; see the README's speed section). The values are the same up to
    float rounding. Training, other devices, few rows and tracing (an export, e.g. to
    OpenVINO, wants the plain matmul, for any number of rows) take ``F.linear``."""

    MIN_ROWS = 256

    def forward(self, x):
        if (x.device.type != "cpu" or torch.is_grad_enabled() or torch.jit.is_tracing()
                or x.numel() < self.MIN_ROWS * self.in_features):
            return super().forward(x)
        if self._use_packed(x):
            weight = self._packed_weight(torch.ops.mkldnn._reorder_linear_weight)
            return torch.ops.mkldnn._linear_pointwise(x.to(self.weight.dtype), weight,
                                                      self.bias, "none", [], "")
        rows = x.numel() // self.in_features
        # [rows, in] row-major is [1, in, rows, 1] channels-last: no copy on the way in
        pixels = x.reshape(1, rows, 1, self.in_features).permute(0, 3, 1, 2)
        out = F.conv2d(pixels, self.weight[:, :, None, None], self.bias)
        return out.permute(0, 2, 3, 1).reshape(*x.shape[:-1], self.out_features)


def set_weight_packing(model, on):
    """Turn ``packed`` on or off for every ``Conv2d`` and ``Linear`` in ``model`` (off drops
    the reordered copies). Worth it for bfloat16 on a CPU with AMX or AVX512-BF16; it keeps
    a second, reordered copy of each weight (see the README's speed section)."""
    for module in model.modules():
        if isinstance(module, _Packable):
            module.packed = bool(on)
            if not on:
                module.__dict__.pop("_packed", None)
    return model


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype, as CompVis does."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def normalization(channels):
    return GroupNorm32(32, channels)


def uniform_timesteps(num_steps, num_train_timesteps=1000):
    """CompVis' "uniform" DDIM discretisation: 1, 1 + c, 1 + 2c, ... with c = T // S."""
    if not 0 < num_steps <= num_train_timesteps:
        raise ValueError(f"sampling steps must be in 1..{num_train_timesteps}, got {num_steps}")
    c = num_train_timesteps // num_steps
    steps = np.arange(0, num_train_timesteps, c) + 1
    return steps[steps < num_train_timesteps]  # CompVis would index past the end when c == 1


def trailing_timesteps(num_steps, num_train_timesteps=1000):
    """The "trailing" discretisation (Lin et al. 2023, Table 2; diffusers'
    ``timestep_spacing="trailing"``): counted down from T - 1, so that sampling starts at the
    last training timestep, where a zero-terminal-SNR model sees pure noise as in training."""
    if not 0 < num_steps <= num_train_timesteps:
        raise ValueError(f"sampling steps must be in 1..{num_train_timesteps}, got {num_steps}")
    steps = np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / num_steps)) - 1
    return steps.astype(np.int64)[::-1].copy()


def lcm_timesteps(num_steps, num_train_timesteps=1000, original_steps=50):
    """Latent consistency models' discretisation (Luo et al. 2023; diffusers'
    ``LCMScheduler`` and ``TCDScheduler``): the distillation's schedule of
    ``original_steps`` timesteps (k, 2k, ... T with k = T // original_steps, minus one) read
    from the top at evenly spaced indices, so 4 steps visit 999, 759, 499, 259."""
    if not 0 < num_steps <= original_steps:
        raise ValueError(f"sampling steps must be in 1..{original_steps} for a consistency "
                         f"model's schedule, got {num_steps}")
    k = num_train_timesteps // original_steps
    origin = (np.arange(1, original_steps + 1) * k - 1)[::-1]
    picked = origin[np.floor(np.linspace(0, original_steps, num_steps, endpoint=False))
                    .astype(np.int64)]
    return picked[::-1].astype(np.int64).copy()


TIMESTEP_SPACINGS = {"uniform": uniform_timesteps, "trailing": trailing_timesteps,
                     "lcm": lcm_timesteps}
