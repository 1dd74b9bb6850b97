"""Upscalers: the SD x4 upscaler as a hires-fix upscaler (``SDUpscaler``), and the tiles
the x4 upscaler works in (``tile_boxes``, ``blend_weights``).

Pixel upscalers people download (ESRGAN, RealESRGAN, SwinIR, 4x-UltraSharp) are loaded by
``spandrel`` in ComfyUI and A1111's forks. It cannot be installed beside a CPU build of
torch from the package registry: it needs torchvision, whose only build for torch 2.13 on
PyPI is a CUDA one (its operators fail to load without libtorch_cuda), and a newer one
replaces torch with a CUDA build. Such a file is refused in one line (``load_upscaler``).
"""
from pathlib import Path

from ldm.errors import CheckpointError

SPANDREL_NOTE = ("pixel upscalers (ESRGAN, RealESRGAN, SwinIR, 4x-UltraSharp) are not run "
                 "here yet: spandrel, which loads them, needs a torchvision that PyPI has "
                 "only for CUDA builds of torch")


def tile_boxes(height, width, tile, overlap):
    """The tiles covering a ``height`` x ``width`` image as (top, left, height, width):
    ``tile`` x ``tile`` squares (the image's side where it is smaller) overlapping by at
    least ``overlap``, the last of each row and column flush with the edge; one box for
    ``tile`` 0 or an image no larger than a tile."""
    def spans(n):
        if not tile or n <= tile:
            return [(0, n)]
        starts = list(range(0, n - tile, tile - overlap)) + [n - tile]
        return [(s, tile) for s in starts]
    return [(top, left, h, w) for top, h in spans(height) for left, w in spans(width)]


def blend_weights(height, width, top, left, full_height, full_width, ramp):
    """[1, 1, height, width] weights of a tile at (top, left) in a full_height x full_width
    image: 1 inside, rising linearly over ``ramp`` pixels from each edge that another tile
    overlaps (never 0, so every pixel has weight); tiles' sums are divided by the total."""
    import torch

    def along(n, start, full):
        w = torch.ones(n)
        if ramp:
            i = torch.arange(n, dtype=torch.float32)
            if start > 0:
                w = torch.minimum(w, (i + 0.5) / ramp)
            if start + n < full:
                w = torch.minimum(w, (n - i - 0.5) / ramp)
        return w
    return (along(height, top, full_height)[:, None]
            * along(width, left, full_width)[None, :])[None, None]


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
        out = self.pipe.upscale(prompt, seed, image, progress=False, **self.values)[0].image
        return out if out.size == (width, height) else out.resize((width, height),
                                                                  Image.LANCZOS)


def load_upscaler(path, pipe, flag="--upscaler"):
    """An upscaler's file, for ``pipe`` (its device and precision): the SD x4 upscaler
    (x4-upscaler-ema in Stability's layout, found by its keys or by a config.yaml beside
    it) as an ``SDUpscaler``; anything else a CheckpointError in one line."""
    from ldm import families
    from ldm.checkpoint import checkpoint_shapes
    from ldm.config import choose_model
    from ldm.errors import InputError
    path = Path(path)
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
