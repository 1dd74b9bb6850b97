"""Images in and out: tensors to PIL, PNGs written whole and never over an existing file,
numbered CompVis-style, carrying their generation parameters; grids; input images."""
import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

PARAMETERS_KEY = "ldm_parameters"   # JSON, read back by read_parameters
TEXT_KEY = "parameters"             # the same, in the "prompt / Negative prompt / Steps: ..."
                                    # text form other Stable Diffusion tools read and write


class OutputError(OSError):
    """An output folder or file that cannot be written."""


class ImageInputError(ValueError):
    """An input image that cannot be read."""


def tensor_to_pil(x):
    """[B, 3, H, W] in [-1, 1] -> list of RGB PIL images."""
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(dtype=__import__("torch").uint8)
    return [Image.fromarray(a) for a in x.permute(0, 2, 3, 1).cpu().numpy()]


def pil_to_tensor(images):
    """list of PIL images -> [B, 3, H, W] float32 in [-1, 1]."""
    import torch
    arr = np.stack([np.asarray(im.convert("RGB"), np.float32) for im in images])
    return torch.from_numpy(arr / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()


def parameters_text(p):
    """The one-paragraph text form: prompt, negative prompt, then "Key: value" pairs."""
    lines = [str(p.get("prompt", ""))]
    if p.get("negative_prompt"):
        lines.append(f"Negative prompt: {p['negative_prompt']}")
    names = {"steps": "Steps", "sampler": "Sampler", "scale": "CFG scale", "seed": "Seed",
             "eta": "Eta", "checkpoint_hash": "Model hash", "model": "Model"}
    pairs = [f"{label}: {p[key]}" for key, label in names.items() if p.get(key) is not None]
    if "width" in p and "height" in p:
        pairs.insert(4, f"Size: {p['width']}x{p['height']}")
    lines.append(", ".join(pairs))
    return "\n".join(lines)


def _pnginfo(parameters):
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_itxt(PARAMETERS_KEY, json.dumps(parameters, ensure_ascii=False))
        if "prompt" in parameters:
            info.add_itxt(TEXT_KEY, parameters_text(parameters))
    return info


def read_parameters(path):
    """The generation parameters stored in a PNG by ``save_png`` (a dict; {} if none)."""
    with Image.open(path) as im:
        im.load()
        raw = im.text.get(PARAMETERS_KEY) if hasattr(im, "text") else None
    return json.loads(raw) if raw else {}


def check_writable(folder):
    """Create ``folder`` if needed and make sure files can be written in it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except FileExistsError:
        raise OutputError(f"cannot use {folder} as output folder: a file of that name exists; "
                          f"choose another --outdir")
    except OSError as e:
        raise OutputError(f"cannot write to {folder} ({e.strerror or e}); choose another --outdir")
    return folder


def save_png(image, path, parameters=None):
    """Write ``image`` to ``path`` whole (temp file, then link into place); never replaces an
    existing file (raises FileExistsError)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".png.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=_pnginfo(parameters))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)   # atomic, and fails if path exists
        except FileExistsError:
            raise
        except OSError:          # a file system without hard links
            if path.exists():
                raise FileExistsError(path)
            os.rename(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def next_number(folder, pattern):
    """1 + the highest number among files named like ``pattern`` (e.g. "{:05}.png")."""
    prefix, _, suffix = pattern.partition("{")
    suffix = suffix.partition("}")[2]
    rx = re.compile(re.escape(prefix) + r"(\d+)" + re.escape(suffix) + "$")
    numbers = [int(m.group(1)) for name in os.listdir(folder) if (m := rx.match(name))]
    return max(numbers) + 1 if numbers else 0


def save_numbered(image, folder, pattern, parameters=None):
    """Save as the next free number in ``folder``; returns the path."""
    folder = Path(folder)
    n = next_number(folder, pattern)
    while True:
        try:
            return save_png(image, folder / pattern.format(n), parameters)
        except FileExistsError:   # another process took it: take the next one
            n += 1
        except OSError as e:
            raise OutputError(f"cannot write {folder / pattern.format(n)} "
                              f"({e.strerror or e}); choose another --outdir")


def make_grid(images, n_per_row, padding=2):
    """Images in rows of ``n_per_row`` with ``padding`` black pixels between and around."""
    n_per_row = max(1, min(n_per_row, len(images)))
    w, h = images[0].size
    rows = -(-len(images) // n_per_row)
    grid = Image.new("RGB", (n_per_row * (w + padding) + padding, rows * (h + padding) + padding))
    for i, im in enumerate(images):
        grid.paste(im, (padding + (i % n_per_row) * (w + padding),
                        padding + (i // n_per_row) * (h + padding)))
    return grid


def load_image(path):
    """An RGB PIL image from a file, or ImageInputError saying what is wrong."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError:
        raise ImageInputError(f"image not found: {path}")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ImageInputError(f"cannot read {path} as an image ({e.__class__.__name__}); "
                              f"give a PNG or JPEG file")
