"""Execution backends: what runs the networks (UNet, autoencoder, text encoder blocks) once
the model is loaded. "torch" is the model's own modules; "openvino" runs the same modules
converted to OpenVINO (``ldm.backends.openvino``), on the CPU. Torch-free: the scripts'
flags and the request read the names from here.

``auto`` picks OpenVINO when it pays: on a CPU, with ``openvino`` installed, for a UNet
of at least ``AUTO_MIN_PARAMS`` parameters (a real SD model: one conversion of about a
minute per image size, cached on disk, then each step about 1.6x faster), no option
that needs the torch modules (``torch.compile``, DeepCache, attention slicing, offload),
and memory for OpenVINO's float32 copy of the networks beside the torch weights.
Everything else (the built-in model, the tiny test models, GPUs) stays on torch.
"""
import importlib.util

BACKENDS = ("auto", "torch", "openvino")
DEFAULT_BACKEND = "auto"
AUTO_MIN_PARAMS = 100_000_000
INSTALL_HINT = 'pip install -e ".[openvino]"'


def openvino_installed():
    return importlib.util.find_spec("openvino") is not None


def choose(name, device_type, unet_params, torch_only=(), extra_bytes=0, available=None):
    """The backend to use ("torch" or "openvino") for ``name`` (one of BACKENDS) on a
    device of ``device_type``, a UNet of ``unet_params`` parameters, with ``torch_only``
    naming the options in use that need the torch modules ("--compile", ...). ValueError
    (one line, saying what to do) when "openvino" is asked for and cannot be.
    ``extra_bytes``: the memory OpenVINO's copy of the networks takes beside the torch
    weights (float32), ``available``: the memory free (None: unknown); "auto" keeps torch
    unless the copy fits with a fifth to spare (SDXL in float32 on 24 GiB does not)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    if name == "torch":
        return "torch"
    if name == "auto":
        fits = available is None or extra_bytes <= 0.8 * available
        pays = (device_type == "cpu" and openvino_installed()
                and unet_params >= AUTO_MIN_PARAMS and not torch_only and fits)
        return "openvino" if pays else "torch"
    if device_type != "cpu":
        raise ValueError(f"--backend openvino runs on the CPU, not on {device_type}: drop "
                         "--backend or use --device cpu")
    if not openvino_installed():
        raise ValueError(f"--backend openvino needs OpenVINO: {INSTALL_HINT}")
    if torch_only:
        raise ValueError(f"{', '.join(torch_only)} works on the torch modules, not with "
                         "--backend openvino: drop one of them")
    return "openvino"
