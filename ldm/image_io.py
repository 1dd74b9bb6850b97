"""Images in and out: tensors to PIL, PNGs written whole and never over an existing file,
numbered CompVis-style, carrying their generation parameters; grids; input images."""
import json
import numbers
import os
import re
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from ldm.errors import InputError, OutputError
from ldm.util import interrupts_deferred

PARAMETERS_KEY = "ldm_parameters"   # JSON, read back by read_parameters
TEXT_KEY = "parameters"             # the same, in the "prompt / Negative prompt / Steps: ..."
                                    # text form other Stable Diffusion tools read and write


class ImageInputError(InputError):
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
    """The one-paragraph text form A1111 writes and reads: prompt, negative prompt, then
    "Key: value" pairs ("Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, ...")."""
    loras = p.get("loras") or []
    # A1111 reads LoRAs from the prompt: <lora:name:weight> (its "Lora hashes" names them)
    lines = [str(p.get("prompt", "")) + "".join(f" <lora:{x['name']}:{x['weight']:g}>"
                                                for x in loras)]
    if p.get("negative_prompt"):
        lines.append(f"Negative prompt: {p['negative_prompt']}")
    schedule = p.get("schedule")
    from ldm.samplers import SCHEDULE_LABELS
    values = dict(p, sampler=_a1111_sampler(p),
                  schedule=(SCHEDULE_LABELS.get(schedule) or schedule.capitalize())
                  if schedule and schedule != "discrete" else None)
    names = {"steps": "Steps", "sampler": "Sampler", "schedule": "Schedule type",
             "scale": "CFG scale", "seed": "Seed", "size": "Size", "eta": "Eta",
             "checkpoint_hash": "Model hash", "model": "Model",
             "strength": "Denoising strength", "hr_scale": "Hires upscale",
             "hr_resize": "Hires resize", "hr_steps": "Hires steps",
             "hr_upscaler": "Hires upscaler", "noise_level": "Noise level", "mask_blur": "Mask blur",
             "clip_skip": "Clip skip", "vae_hash": "VAE hash", "vae": "VAE",
             "lora_hashes": "Lora hashes", "ti_hashes": "TI hashes",
             "deepcache": "DeepCache interval", "vae_tiling": "Tiled VAE",
             "unet_named": "UNet", "refiner_named": "Refiner",
             "refiner_switch": "Refiner switch at"}
    # A1111 names a second model "name [hash]" ("Refiner: sd_xl_refiner_1.0 [7440042bbd]")
    for key in ("unet", "refiner"):
        if p.get(key):
            name = Path(str(p[key])).stem
            values[key + "_named"] = (f"{name} [{p[key + '_hash']}]" if p.get(key + "_hash")
                                      else name)
    if "width" in p and "height" in p:
        values["size"] = f"{p['width']}x{p['height']}"
    if p.get("embeddings"):
        values["ti_hashes"] = '"' + ", ".join(f"{x['token']}: {x['hash']}"
                                              for x in p["embeddings"]) + '"'
    if loras:
        values["lora_hashes"] = '"' + ", ".join(f"{x['name']}: {x['hash']}" for x in loras) + '"'

    pairs = [f"{label}: {values[key]}" for key, label in names.items()
             if values.get(key) is not None]
    lines.append(", ".join(pairs))
    return "\n".join(lines)


def _a1111_sampler(p):
    """The sampler's A1111 name without the schedule ("DPM++ 2M"), from a record."""
    if p.get("sampler") is None:
        return None
    try:
        from ldm.samplers import SAMPLERS
        return SAMPLERS[p["sampler"]].label
    except KeyError:
        return p["sampler"]


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


def check_output_folder(folder):
    """Make sure files can be written in ``folder`` without creating it: the nearest part of
    the path that exists must be a folder that takes a (temporary, removed) file."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"cannot use {folder} as output folder: {existing} is a file; "
                          f"choose another --outdir")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-test-"):
            pass
    except OSError as e:
        raise OutputError(f"cannot write to {existing} ({e.strerror or e}); choose another "
                          f"--outdir") from None
    return folder


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_png(image, path, parameters=None):
    """Write ``image`` to ``path`` whole (temp file, then link into place); never replaces an
    existing file (raises FileExistsError). The file gets the usual permissions (0666 less
    the umask), not the temp file's 0600. Ctrl-C during the write waits until it is done."""
    path = Path(path)
    with interrupts_deferred():
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".png.tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                image.save(f, format="PNG", pnginfo=_pnginfo(parameters))
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())
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
    """1 + the highest number among files named exactly like ``pattern`` (e.g. "{:05}.png":
    five digits, or more without a leading zero past 99999), else 0. A stray "123.png" or
    "0001.png" does not move the numbering."""
    prefix, _, rest = pattern.partition("{")
    spec, _, suffix = rest.partition("}")
    width = int(spec.lstrip(":0") or 1) if spec.startswith(":0") else 1
    digits = rf"(\d{{{width}}}|[1-9]\d{{{width},}})"
    rx = re.compile(re.escape(prefix) + digits + re.escape(suffix) + "$")
    folder = Path(folder)
    names = os.listdir(folder) if folder.is_dir() else []
    numbers = [int(m.group(1)) for name in names if (m := rx.match(name))]
    return max(numbers) + 1 if numbers else 0


def save_numbered(image, folder, pattern, parameters=None):
    """Save as the next free number in ``folder`` (created if need be); returns the path."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create {folder} ({e.strerror or e}); choose another "
                          f"--outdir") from None
    n = next_number(folder, pattern)
    while True:
        try:
            return save_png(image, folder / pattern.format(n), parameters)
        except FileExistsError:   # another process took it: take the next one
            n += 1
        except OSError as e:
            raise OutputError(f"cannot write {folder / pattern.format(n)} "
                              f"({e.strerror or e}); choose another --outdir") from None


class Outputs:
    """The files a run writes under ``root``: checked up front without creating anything,
    folders made when their first file is written, numbered after what is there, the paths
    written so far in ``written``."""

    def __init__(self, root):
        self.root = Path(root)
        self.written = []

    def check(self):
        check_output_folder(self.root)
        return self

    def save(self, image, name, parameters=None):
        """Save as ``root/name``, which must not exist yet."""
        path = self.root / name
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with interrupts_deferred():
                save_png(image, path, parameters)
                self.written.append(path)
        except FileExistsError:
            raise OutputError(f"{path} already exists: it is kept; choose another --outdir") from None
        except OSError as e:
            raise OutputError(f"cannot write {path} ({e.strerror or e}); choose another "
                              f"--outdir") from None
        return path

    def save_numbered(self, image, pattern, parameters=None, subdir=""):
        with interrupts_deferred():  # a finished file is always counted
            path = save_numbered(image, self.root / subdir, pattern, parameters)
            self.written.append(path)
        return path


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


def load_image(path, what="image"):
    """An RGB PIL image from any file Pillow reads, as a person brings it: EXIF orientation
    applied, transparency flattened on white, greyscale, palette and 16-bit images turned
    into 8-bit RGB. ImageInputError says what is wrong otherwise."""
    return to_rgb(_open(path, what), background=(255, 255, 255))


def load_mask(path):
    """A mask as an 8-bit greyscale PIL image (white = repaint) from any file Pillow reads.
    A transparent mask is flattened on black (what is transparent is kept)."""
    return to_rgb(_open(path, "mask"), background=(0, 0, 0)).convert("L")


def _open(path, what):
    from PIL import ImageOps
    path = Path(path)
    if path.is_dir():
        raise ImageInputError(f"{what} {path} is a folder: give an image file")
    try:
        with Image.open(path) as im:
            im.load()
            return ImageOps.exif_transpose(im)
    except FileNotFoundError:
        raise ImageInputError(f"{what} not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageInputError(f"cannot read {path} as an image ({e.__class__.__name__}); "
                              f"give a PNG, JPEG, WebP or other image file") from None


def to_rgb(im, background=(255, 255, 255)):
    """8-bit RGB: 16-bit and 32-bit greyscale scaled down, alpha composited on
    ``background``."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(a * (255.0 if a.max() <= 1.0 else 1.0) + 0.5, 0, 255)
                             .astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        flat = Image.new("RGBA", im.size, background + (255,))
        return Image.alpha_composite(flat, im).convert("RGB")
    return im.convert("RGB")


RESIZE_MODES = ("resize", "crop", "fill")   # A1111's, for a size that is not the image's


def fit_image(image, factor, width=None, height=None, mode="resize", resample=Image.LANCZOS):
    """(image, note) with sides the model takes. Without ``width``/``height``: the sides are
    resized (Lanczos) down to the nearest multiple of ``factor``, with a note saying so. With
    them, as A1111: "resize" stretches to the size, "crop" scales to cover it and crops the
    centre, "fill" scales to fit inside it and fills the rest with the stretched edges."""
    w, h = image.size
    if width is None and height is None:
        tw, th = w // factor * factor, h // factor * factor
        if tw < factor or th < factor:
            raise ImageInputError(f"the image is {w}x{h}: too small for this model (a side "
                                  f"under {factor} pixels)")
        if (tw, th) == (w, h):
            return image, None
        return (image.resize((tw, th), resample),
                f"resized the {w}x{h} image to {tw}x{th} (sides must be multiples of {factor})")
    tw, th = width or w, height or h
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, not {mode!r}")
    if (tw, th) == (w, h):
        return image, None
    note = f"{mode} {w}x{h} to {tw}x{th}"
    if mode == "resize":
        return image.resize((tw, th), resample), note
    if mode == "crop":
        k = max(tw / w, th / h)
        sw, sh = max(tw, round(w * k)), max(th, round(h * k))
        big = image.resize((sw, sh), resample)
        left, top = (sw - tw) // 2, (sh - th) // 2
        return big.crop((left, top, left + tw, top + th)), note
    k = min(tw / w, th / h)
    sw, sh = max(1, round(w * k)), max(1, round(h * k))
    out = image.resize((tw, th), resample)  # the stretched image behind the fitted one
    out.paste(image.resize((sw, sh), resample), ((tw - sw) // 2, (th - sh) // 2))
    return out, note


def fit_mask(mask, size):
    """(mask, note): the mask at the image's ``size`` (bilinear, then binarised later)."""
    if mask.size == tuple(size):
        return mask, None
    note = f"resized the {mask.size[0]}x{mask.size[1]} mask to the image's {size[0]}x{size[1]}"
    return mask.resize(tuple(size), Image.BILINEAR), note


def image_sha256(image):
    """SHA-256 of an image's size and RGB pixels (what was sampled from, whatever its file)."""
    import hashlib
    rgb = image.convert("RGB")
    return hashlib.sha256(f"{rgb.size[0]}x{rgb.size[1]}:".encode() + rgb.tobytes()).hexdigest()


def paste_back(generated, original, mask, blur=4):
    """``generated`` inside the mask (binarised at 0.5), ``original`` exactly outside it;
    feathered inwards by a Gaussian of radius ``blur`` pixels, so that the seam is soft while
    every pixel outside the mask stays the input's own."""
    from PIL import ImageChops, ImageFilter
    hard = mask.convert("L").point(lambda v: 255 if v >= 128 else 0)
    soft = (ImageChops.multiply(hard.filter(ImageFilter.GaussianBlur(blur)), hard)
            if blur > 0 else hard)
    return Image.composite(generated.convert("RGB"), original.convert("RGB"), soft)


def png_bytes(image, parameters=None):
    """The PNG file ``save_png`` writes, as bytes (the same metadata): what a server sends."""
    import io
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=_pnginfo(parameters))
    return buffer.getvalue()


def fill_masked(image, mask, rounds=8):
    """``image`` with the masked pixels (mask >= 128) replaced by the colours around them,
    spread inwards by blurs of growing radius (A1111's inpainting_fill "fill"): a start for
    image-to-image that does not keep what was under the mask. Pixels outside the mask are
    unchanged."""
    from scipy.ndimage import gaussian_filter
    hard = np.asarray(mask.convert("L")) >= 128
    if not hard.any():
        return image
    rgb = np.asarray(image.convert("RGB"), np.float64)
    known = (~hard).astype(np.float64)
    if not known.any():
        return image
    out = rgb.copy()
    filled = ~hard
    for k in range(rounds):
        radius = 2 ** k
        def blur(a):
            return gaussian_filter(a, radius, mode="constant")
        weight = blur(known)
        colour = np.stack([blur(rgb[..., c] * known) for c in range(3)], -1)
        reach = (weight > 1e-3) & ~filled
        out[reach] = colour[reach] / weight[reach, None]
        filled |= reach
        if filled.all():
            break
    out[~filled] = (rgb * known[..., None]).sum((0, 1)) / known.sum()
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8), "RGB")


OUTPAINT_SIDES = ("left", "right", "up", "down")


def outpaint_canvas(image, left=0, right=0, up=0, down=0, blur=4):
    """(canvas, mask) for outpainting ``image`` by so many pixels on each side, as A1111's
    "Poor man's outpainting": the image pasted on a larger black canvas, the mask white
    over the new part and reaching 2 x ``blur`` pixels into the image on each extended
    side (a band repainted so the seam blends; the paste-back feathers it by ``blur``),
    black over the rest of the image, whose pixels the result keeps exactly. What the new
    part starts from is the request's ``fill``."""
    from ldm.errors import UsageError
    sides = dict(zip(OUTPAINT_SIDES, (left, right, up, down)))
    for name, value in sides.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise UsageError(f"outpaint {name}: {value!r} is not a whole number of pixels")
        if not 0 <= value <= 8192:
            raise UsageError(f"outpaint {name}: {value} is out of range: must be in [0, 8192]")
    if not any(sides.values()):
        raise UsageError("outpaint: give at least one side to extend (e.g. left=128)")
    w, h = image.size
    seam = 2 * blur
    left, right, up, down = (int(sides[k]) for k in OUTPAINT_SIDES)
    inner = (left + (seam if left else 0), up + (seam if up else 0),
             left + w - (seam if right else 0), up + h - (seam if down else 0))
    if inner[2] <= inner[0] or inner[3] <= inner[1]:
        raise UsageError(f"the {w}x{h} image is too small for a seam of {seam} pixels on "
                         f"each extended side (2 x mask blur): lower the mask blur")
    canvas = Image.new("RGB", (w + left + right, h + up + down))
    canvas.paste(image.convert("RGB"), (left, up))
    mask = Image.new("L", canvas.size, 255)
    mask.paste(0, inner)
    return canvas, mask


def mask_region(mask, padding, width, height):
    """The box (left, top, right, bottom) around the mask's white pixels, grown by
    ``padding`` pixels and then to the aspect ratio of ``width`` x ``height`` inside the
    image (A1111's "inpaint only masked"); None for an empty mask."""
    box = mask.convert("L").point(lambda v: 255 if v >= 128 else 0).getbbox()
    if box is None:
        return None
    w, h = mask.size
    l, t, r, b = box
    l, t, r, b = max(0, l - padding), max(0, t - padding), min(w, r + padding), min(h, b + padding)
    want = width / height
    if (r - l) / (b - t) > want:     # too wide: grow the height
        grow = round((r - l) / want) - (b - t)
        t, b = _grow(t, b, grow, h)
    else:
        grow = round((b - t) * want) - (r - l)
        l, r = _grow(l, r, grow, w)
    return l, t, r, b


def _grow(lo, hi, by, limit):
    """[lo, hi) grown by ``by`` (half each side), shifted to stay in [0, limit)."""
    lo, hi = lo - by // 2, hi + by - by // 2
    if hi > limit:
        lo, hi = lo - (hi - limit), limit
    if lo < 0:
        hi, lo = min(limit, hi - lo), 0
    return lo, hi


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


def blend_tiles(boxes, height, width, scale, ramp, make):
    """The tiles of a ``height`` x ``width`` image (``tile_boxes``) made larger by
    ``scale``: ``make(top, left, h, w)`` gives a tile's output [B, C, h * scale, w * scale],
    placed and blended with ``blend_weights`` over ``ramp`` input pixels."""
    out = total = None
    for top, left, th, tw in boxes:
        y = make(top, left, th, tw)
        if out is None:
            out = y.new_zeros(*y.shape[:2], height * scale, width * scale)
            total = y.new_zeros(1, 1, height * scale, width * scale)
        weight = blend_weights(th * scale, tw * scale, top * scale, left * scale,
                               height * scale, width * scale, ramp * scale)
        region = (..., slice(top * scale, (top + th) * scale),
                  slice(left * scale, (left + tw) * scale))
        out[region] += y * weight
        total[region] += weight
    return out / total
