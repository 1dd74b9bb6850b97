"""Devices and number formats: which device to run on, the dtype the networks compute in,
and the CPU-specific layouts that pay (weights cast once, oneDNN weight packing,
channels-last autoencoder). ``ldm.pipeline.Pipeline`` applies them; nothing here knows a
model family."""
import shutil
from contextlib import nullcontext

import torch

from ldm.errors import ResourceError, UsageError

PRECISIONS = ("autocast", "full", "bf16")
NORMS = (torch.nn.GroupNorm, torch.nn.LayerNorm)


def pick_device(name="auto"):
    """"auto": CUDA, then MPS, then CPU; otherwise the named device."""
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UsageError(f"unknown --device {name!r} (use auto, cpu, cuda, cuda:1 or mps)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ResourceError("--device cuda: no CUDA GPU is available here (use --device cpu)")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise ResourceError(f"--device {name}: this machine has "
                                f"{torch.cuda.device_count()} CUDA device(s)")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ResourceError("--device mps: MPS is not available here (use --device cpu)")
        if device.type not in ("cpu", "cuda", "mps"):
            raise UsageError(f"--device {name}: use auto, cpu, cuda, cuda:N or mps")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def compute_dtype(device, precision):
    """The dtype the networks compute in: bfloat16 for "bf16", float16 for "autocast" on
    CUDA (CompVis' default), float32 otherwise (CPU "autocast" stays float32: fp16 on CPU
    is slow and lossy)."""
    if precision not in PRECISIONS:
        raise UsageError(f"--precision must be one of {PRECISIONS}")
    if precision == "bf16":
        return torch.bfloat16
    if precision == "autocast" and device.type == "cuda":
        return torch.float16
    return torch.float32


def autocast_for(device, dtype):
    """The autocast context of a ``compute_dtype`` (a null context for float32). With the
    weights already in that dtype (``cast_weights``) its casts of weights are no-ops; it
    still casts the float32 inputs (latents, timestep embedding) on the way in."""
    return nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


def cast_weights(model, dtype):
    """Cast ``model``'s weights to ``dtype`` once, in place, except the normalisation
    layers', which stay float32 (their statistics are computed in float32 either way, and
    their scales are kept exact); buffers (the noise schedule) are left alone. Autocast
    alone recasts every float32 weight on every call: on a CPU with native bf16, a SD UNet
    step is about 1.3x slower that way than with the weights cast once."""
    if dtype == torch.float32:
        return model
    for module in model.modules():
        if isinstance(module, NORMS):
            continue
        for name, param in module.named_parameters(recurse=False):
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
    return model


def bf16_is_native(device):
    """Whether ``device`` computes bfloat16 natively (a CPU with AVX512-BF16 or AMX, as
    oneDNN reports it; CUDA from Ampere on). Elsewhere bf16 is emulated and slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return True


def packing_pays(device, dtype):
    """Whether to run on weights reordered once for oneDNN (``set_weight_packing``): in
    bfloat16 on a CPU with AMX, where the per-call reorder of plain weights is a large part
    of a UNet step (a SD UNet step at 512x512 about 0.8x the time on an AMX Xeon; see the
    README's speed section). Not on AVX512-BF16 without AMX (AMD Zen 4): there oneDNN's
    prepacked convolutions took twice the time of its plain ones (a 512x512 step 3.1 s
    against 2.1 s). In float32 it did not pay (measured slower on the AMX CPU) and would
    double the weights' memory."""
    return (device.type == "cpu" and dtype == torch.bfloat16 and bf16_is_native(device)
            and has_amx())


def has_amx():
    """Whether this CPU has AMX tiles (Intel Sapphire Rapids and later)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if probe is not None:
        try:
            return bool(probe())
        except RuntimeError:
            pass
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_tile" in f.read()
    except OSError:
        return False


def channels_last_pays(device, dtype):
    """Whether to hold the autoencoder's weights channels-last, so that its convolutions run
    on oneDNN's NHWC kernels: in float32 on a CPU, where a 512x512 decode took about 0.8x
    the time on an AMX Xeon (the same values up to float rounding). With packed bf16 weights
    (``packing_pays``) it made no difference, and the UNet in float32 gained nothing."""
    return device.type == "cpu" and dtype == torch.float32


def check_compiler(device):
    """What ``torch.compile`` (inductor) needs on ``device``: a C++ compiler on the CPU,
    Triton on CUDA. Without it, a one-line ResourceError before anything is loaded rather
    than a traceback at the first step."""
    import importlib.util
    if device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        raise ResourceError("--compile needs a C++ compiler on the CPU (torch's inductor "
                            "writes C++): install g++ or clang++, or drop --compile")
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise ResourceError("--compile needs Triton on CUDA (pip install triton), or drop "
                            "--compile")
