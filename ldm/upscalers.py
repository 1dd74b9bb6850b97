"""Upscalers for the hires fix and ``scripts/upscale.py``: the SD x4 upscaler
(``SDUpscaler``) and the pixel upscalers people download (``PixelUpscaler``: ESRGAN,
Real-ESRGAN, 4x-UltraSharp and others of ESRGAN's architecture, Real-ESRGAN's compact
models; ``ldm.modules.sr``); both work in tiles (``ldm.image_io.tile_boxes``,
``blend_tiles``).

ComfyUI and A1111's forks load pixel upscalers with ``spandrel``, which knows many more
architectures (SwinIR, HAT, DAT...). It cannot be installed beside a CPU build of torch
from the package registry: it needs torchvision, whose only build for torch 2.13 on PyPI is
a CUDA one (its operators fail to load without libtorch_cuda), and a newer one replaces
torch with a CUDA build. So the two architectures most used for the hires fix are written
here, checked against outputs spandrel made (``tests/upscaler_reference.py``), and other
files are refused in one line (``load_upscaler``).
"""
import logging
from pathlib import Path

from ldm.errors import CheckpointError
from ldm.image_io import blend_tiles, tile_boxes

log = logging.getLogger(__name__)

SPANDREL_NOTE = ("of pixel upscalers, ESRGAN (RealESRGAN_x4plus, 4x-UltraSharp...) and "
                 "Real-ESRGAN's compact models run here; others (SwinIR, HAT, DAT...) need "
                 "spandrel, which needs a torchvision that PyPI has only for CUDA builds of "
                 "torch")
SR_KEYS = ("conv_first.weight", "model.0.weight", "body.0.weight")


class SDUpscaler:
    """The SD x4 upscaler as a hires-fix upscaler: each image four times larger with the
    image's prompt and seed (``Pipeline.upscale``), then resized to the size asked for
    (Lanczos), as A1111 does with an upscaler of another scale."""
    scale = 4

    def __init__(self, pipe, name, noise_level=None, steps=None, tile=None, tile_overlap=None):
        self.pipe, self.name = pipe, name
        self.values = {k: v for k, v in dict(noise_level=noise_level, steps=steps, tile=tile,
                                             tile_overlap=tile_overlap).items()
                       if v is not None}

    def upscale(self, image, width, height, prompt="", seed=0):
        from PIL import Image
        request = self.pipe.request("upscale", prompt, seed, image=image, **self.values)
        log.info("upscaling %dx%d 4x with %s: %d denoising steps (the progress bar waits)",
                 image.width, image.height, self.name, self.pipe.steps_run(request))
        out = self.pipe.run(request, progress=False)[0].image
        return out if out.size == (width, height) else out.resize((width, height),
                                                                  Image.LANCZOS)


class PixelUpscaler:
    """A pixel upscaler (``ldm.modules.sr``) on ``device``: ``upscale`` makes an image
    ``scale`` times larger in tiles of at most ``tile`` input pixels overlapping by
    ``overlap``, blended with linear ramps, then resizes it to the size asked (Lanczos), as
    A1111 does with an upscaler of another scale."""

    def __init__(self, net, name, architecture, device="cpu", tile=192, overlap=16):
        self.net, self.name, self.architecture = net.to(device), name, architecture
        self.scale, self.device = net.scale, device
        self.tile, self.overlap = tile, overlap

    def __call__(self, x):
        """[B, 3, h, w] in [0, 1] -> [B, 3, scale h, scale w] in [0, 1], tiled."""
        import torch
        s, pad = self.scale, getattr(self.net, "unshuffle", 1)

        def make(top, left, th, tw):
            part = x[..., top:top + th, left:left + tw].to(self.device)
            ph, pw = -th % pad, -tw % pad   # the unshuffle needs sides it divides
            if ph or pw:
                part = torch.nn.functional.pad(part, (0, pw, 0, ph), mode="reflect")
            with torch.no_grad():
                return self.net(part).float().cpu()[..., :th * s, :tw * s]
        h, w = x.shape[-2:]
        return blend_tiles(tile_boxes(h, w, self.tile, self.overlap), h, w, s, self.overlap,
                           make).clamp(0, 1)

    def upscale(self, image, width, height, prompt="", seed=0):
        import numpy as np
        import torch
        from PIL import Image
        x = torch.from_numpy(np.asarray(image.convert("RGB"), np.float32) / 255)
        y = self(x.permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()
        out = Image.fromarray((y * 255).round().astype(np.uint8))
        return out if out.size == (width, height) else out.resize((width, height),
                                                                  Image.LANCZOS)


def load_pixel_upscaler(path, device="cpu", flag="--upscaler"):
    """A pixel upscaler's file (read by the restricted loader: never code from a pickle)
    as a ``PixelUpscaler``; a CheckpointError in one line for an architecture not run
    here."""
    from ldm.checkpoint import load_state_dict_file
    from ldm.modules.sr import from_state_dict
    path = Path(path)
    try:
        sd = load_state_dict_file(path)
    except CheckpointError as e:
        raise type(e)(f"{flag} {e}" if str(path) in str(e) else f"{flag} {path}: {e}") from None
    try:
        net, architecture = from_state_dict(sd)
    except ValueError as e:
        raise CheckpointError(f"{flag} {path}: {e}; {SPANDREL_NOTE}") from None
    return PixelUpscaler(net, path.stem, architecture, device)


def load_upscaler(path, pipe, flag="--upscaler"):
    """An upscaler's file, for ``pipe`` (its device and precision): a pixel upscaler
    (``load_pixel_upscaler``), or the SD x4 upscaler (x4-upscaler-ema in Stability's
    layout, found by its keys or by a config.yaml beside it) as an ``SDUpscaler``; anything
    else a CheckpointError in one line."""
    from ldm import families
    from ldm.checkpoint import checkpoint_shapes
    from ldm.config import choose_model
    from ldm.errors import InputError
    path = Path(path)
    if path.is_file():
        try:
            shapes = checkpoint_shapes(path)
        except CheckpointError as e:
            raise type(e)(f"{flag} {e}" if str(path) in str(e) else f"{flag} {path}: {e}") from None
        if any(k in shapes for k in SR_KEYS):   # ESRGAN's or Real-ESRGAN's first layer
            return load_pixel_upscaler(path, pipe.device, flag)
    try:
        choice = choose_model(path)
    except InputError as e:
        raise type(e)(f"{flag} {path}: {e}") from None
    if not choice.geometry.upscaler:
        what = None if choice.family is None or choice.variant is None else \
            choice.family.label + " checkpoint"
        if what is None and path.is_file():
            what = families.describe(checkpoint_shapes(path))
        raise CheckpointError(f"{flag} {path}: not an upscaler this project runs"
                              f"{f' (it is {what})' if what else ''}; the SD x4 upscaler "
                              f"(x4-upscaler-ema) is, and {SPANDREL_NOTE}")
    from ldm.pipeline import Pipeline
    upscaler = Pipeline.load(choice, device=pipe.device, precision=pipe.precision,
                             safety=False, watermark=False, backend="torch")
    return SDUpscaler(upscaler, path.stem)
