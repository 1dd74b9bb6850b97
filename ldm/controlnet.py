"""ControlNets as users have them, read for a loaded model: lllyasviel's single files
(``control_model.*`` keys; ControlNet 1.0's whole-model files hold the base model too, which
is ignored) and diffusers' ``ControlNetModel`` (a folder with ``config.json``, or its weights
file). The network is built as a copy of the model's own UNet encoder
(``ldm.modules.diffusionmodules.controlnet.ControlNet`` from the UNet's parameters), so a
ControlNet made for another model is a one-line error, not a shape mismatch deep in a
step. Untrusted files go through the restricted unpickler (``ldm.checkpoint``)."""
import logging
from dataclasses import dataclass
from pathlib import Path

from ldm.errors import CheckpointError

log = logging.getLogger(__name__)
_said = set()   # (control image, size) pairs whose resizing was said

PREFIX = "control_model."
CONTROL_MODES = ("balanced", "prompt", "control")


def build_controlnet(model, hint_channels=3):
    """An empty (random) ControlNet shaped for ``model``'s UNet: its encoder's parameters,
    the latent channels as input (an inpainting UNet's ControlNet sees the latents alone,
    as diffusers' inpainting ControlNet pipeline gives it), no guidance embedding."""
    from ldm.modules.diffusionmodules.controlnet import ControlNet
    params = dict(model.model.diffusion_model.params)
    params.update(in_channels=model.channels, time_cond_proj_dim=None)
    return ControlNet(hint_channels=hint_channels, **params)


def read_controlnet(path):
    """{key: tensor} of a ControlNet file or diffusers folder, and its layout: "cldm"
    (``control_model.*`` stripped) or "diffusers"."""
    from ldm.checkpoint import load_state_dict_file
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("diffusion_pytorch_model*.safetensors")) or sorted(
            path.glob("diffusion_pytorch_model*.bin"))
        if not files:
            raise CheckpointError(f"{path}: no diffusion_pytorch_model.safetensors in this "
                                  "folder (a diffusers ControlNet folder has one)")
        sd = {}
        for f in files:
            sd.update(load_state_dict_file(f))
    else:
        sd = load_state_dict_file(path)
    kind = _unsupported_kind(sd)
    if kind:
        raise CheckpointError(f"{path.name} is {kind}, which is not run here yet: use a "
                              "full ControlNet (lllyasviel's control_v11*, or a diffusers "
                              "ControlNetModel)")
    if any(k.startswith(PREFIX) for k in sd):
        return {k[len(PREFIX):]: v for k, v in sd.items() if k.startswith(PREFIX)}, "cldm"
    if any(k.startswith("controlnet_cond_embedding.") for k in sd):
        return sd, "diffusers"
    if any(k.startswith("input_hint_block.") for k in sd):
        return sd, "cldm"
    raise CheckpointError(f"{path} is not a ControlNet (no control_model.*, "
                          "input_hint_block.* or controlnet_cond_embedding.* weights)")


def load_controlnet(path, model):
    """The ControlNet in ``path`` for ``model``, in eval mode, on the model's device and in
    its UNet's dtype. One that does not fit (made for another model) is a CheckpointError
    in one line saying what it seems made for."""
    from ldm.checkpoint import mismatch_report
    from ldm.convert import controlnet_from_diffusers
    factor = model.latent_downsampling_factor
    if factor != 8:   # the hint encoder takes its image down 8x, to the latents' size
        raise CheckpointError(f"ControlNets are made for latents of 8x8 pixels and this "
                              f"model's are {factor}x{factor} (the built-in model): use a "
                              "Stable Diffusion checkpoint with --control")
    sd, layout = read_controlnet(path)
    net = build_controlnet(model, hint_channels=_hint_channels(sd, layout))
    context = _context_width(sd)
    own = net.params.get("context_dim")
    if context is not None and own is not None and context != own:
        from ldm.families import of_text_width
        raise CheckpointError(f"ControlNet {Path(path).name} is made for "
                              f"{of_text_width(context)}; this model attends to "
                              f"{own:,}-wide text: use a ControlNet made for it")
    try:
        if layout == "diffusers":
            sd = controlnet_from_diffusers(net, sd)
    except CheckpointError as e:
        raise CheckpointError(f"ControlNet {Path(path).name}: {e}") from None
    report = mismatch_report(net, sd)
    if report:
        raise CheckpointError(f"ControlNet {Path(path).name} does not fit this model: "
                              f"{report.split('. This looks like')[0]}")
    net.load_state_dict(sd, strict=True)
    from ldm.devices import cast_weights
    param = next(model.model.diffusion_model.parameters())
    return cast_weights(net.to(param.device), param.dtype).eval().requires_grad_(False)


def _unsupported_kind(sd):
    """What a ControlNet-like file this code cannot run is, or None: Stability's
    control-LoRAs (low-rank ``.up``/``.down`` pairs, a ``lora_controlnet`` marker) and
    "union" models (one network for many map kinds: a task embedding)."""
    if "lora_controlnet" in sd or any(k.endswith((".up", ".down")) for k in sd):
        return "a control-LoRA (Stability's low-rank ControlNet)"
    if any(k.split(".")[-2:-1] == ["task_embedding"] or k.startswith(
            ("task_embedding", "control_add_embedding", "spatial_ch_projs",
             "control_model.task_embedding")) for k in sd):
        return "a \"union\" ControlNet (one network for many kinds of map)"
    return None


def _hint_channels(sd, layout):
    key = ("controlnet_cond_embedding.conv_in.weight" if layout == "diffusers"
           else "input_hint_block.0.weight")
    return sd[key].shape[1] if key in sd else 3


def _context_width(sd):
    """The text width the ControlNet's cross-attention reads (its first attn2.to_k)."""
    for k, v in sd.items():
        if k.endswith("attn2.to_k.weight"):
            return v.shape[1]
    return None


@dataclass
class ControlUnit:
    """One ControlNet in a run: the network, its control image (PIL, resized to the
    image's size), its weight, and the part of the sampling steps it acts in, as fractions
    (diffusers' ``control_guidance_start``/``_end``: step i of n runs it when
    start <= i / n and (i + 1) / n <= end)."""
    net: object
    image: object
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    name: str = "controlnet"
    preprocess: str = "none"   # what made the map from the given image (``preprocess``)
    # A1111's control mode: "balanced", "prompt" (my prompt is more important), "control"
    # (ControlNet is more important); ``guess``: diffusers' guess mode (no prompt needed)
    mode: str = "balanced"
    guess: bool = False

    def __post_init__(self):
        if self.mode not in CONTROL_MODES:
            raise ValueError(f"control mode {self.mode!r}: one of {', '.join(CONTROL_MODES)}")

    def acts(self, step, steps):
        return not (step / steps < self.start or (step + 1) / steps > self.end)


def control_hints(units, height, width, batch, device, dtype):
    """The control images as the networks read them, [batch, sum of channels, height, width]
    in [0, 1] (diffusers' control image processor: RGB, resized with Lanczos when its size
    differs, not normalised), one unit after the other along the channels."""
    import numpy as np
    import torch
    from PIL import Image
    parts = []
    for unit in units:
        image = unit.image.convert("RGB")
        if image.size != (width, height):
            if (id(unit.image), (width, height)) not in _said:   # once per image and size
                _said.add((id(unit.image), (width, height)))
                log.warning("the control image of %s is %dx%d: resized to %dx%d, the image's "
                            "size", unit.name, *image.size, width, height)
            image = image.resize((width, height), Image.LANCZOS)
        t = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        parts.append(t)
    hint = torch.cat(parts)[None].expand(batch, -1, -1, -1)
    return hint.to(device, dtype)


# preprocessors that need no downloaded weights: name -> (parameters and their defaults)
PREPROCESSORS = {"none": (), "canny": (("low", 100), ("high", 200)), "invert": (),
                 "threshold": (("level", 127),), "scribble": (("low", 100), ("high", 200))}


def parse_preprocess(spec, flag="--control_preprocess"):
    """"canny:100:200" -> ("canny", {"low": 100, "high": 200}); a bad name or value is a
    UsageError in one line naming what there is."""
    from ldm.errors import UsageError
    name, *values = str(spec).strip().split(":")
    name = name.lower()
    if name not in PREPROCESSORS:
        raise UsageError(f"{flag} {spec!r}: unknown; one of "
                         f"{', '.join(PREPROCESSORS)} (other maps: give them as images)")
    params = PREPROCESSORS[name]
    if len(values) > len(params):
        raise UsageError(f"{flag} {spec!r}: {name} takes "
                         f"{len(params)} number(s)" + (
                             f" ({':'.join(p for p, _ in params)})" if params else ""))
    out = {}
    for (key, default), text in zip(params, values + [None] * len(params)):
        if text is None:
            out[key] = default
            continue
        try:
            value = int(text)
        except ValueError:
            raise UsageError(f"{flag} {spec!r}: {key} must be a whole number "
                             f"from 0 to 255, got {text!r}") from None
        if not 0 <= value <= 255:
            raise UsageError(f"{flag} {spec!r}: {key} must be from 0 to 255, "
                             f"got {value}")
        out[key] = value
    if name in ("canny", "scribble") and out["low"] > out["high"]:
        raise UsageError(f"{flag} {spec!r}: the low threshold is above the "
                         "high one")
    return name, out


def preprocess(image, spec):
    """The control map of ``image`` (PIL) by ``spec`` (``parse_preprocess``): "canny", the
    Canny edges (OpenCV, on the greyscale image; white on black, as the canny ControlNets
    read them); "scribble", those edges thickened (two 3x3 dilations), a scribble-like map
    without a model; "threshold", white where the greyscale is above the level; "invert",
    the negative (line art drawn black on white, for ControlNets that read white lines);
    "none", the image itself. RGB out."""
    import cv2
    import numpy as np
    from PIL import Image, ImageOps
    name, p = parse_preprocess(spec)
    image = image.convert("RGB")
    if name == "none":
        return image
    if name == "invert":
        return ImageOps.invert(image)
    grey = np.asarray(image.convert("L"))
    if name == "threshold":
        out = np.where(grey > p["level"], 255, 0).astype(np.uint8)
    else:
        out = cv2.Canny(grey, p["low"], p["high"])
        if name == "scribble":
            out = cv2.dilate(out, np.ones((3, 3), np.uint8), iterations=2)
    return Image.fromarray(out).convert("RGB")
