"""One request: what to make, as one value, validated once.

Every way in builds a ``Request`` with ``Request.build``: the library's ``Pipeline``
methods, the scripts (a batch at a time), each line of a JSONL job. ``Pipeline.run``
consumes it. A bad value raises the errors of ``ldm.errors`` (``UsageError``, a
``ValueError``; ``WrongType``, a ``TypeError``), worded in the caller's names: the
library's keywords by default, the scripts' flags when they pass ``names=FLAGS``.

Numbers are checked by ``check_number``, which the scripts' argparse types call too, so the
command line and the library give the same message for the same bad value (the table in
``tests/test_request.py`` runs each through both).

Model-dependent defaults (sampler, steps, guidance scale) live in one place,
``ModelInfo.default``: None in a request means "the model's". This module imports neither
torch nor PIL at import time.
"""
import logging
import math
import numbers
import secrets
from dataclasses import dataclass, field, replace
from pathlib import Path

from ldm.errors import ResourceError, UsageError, WrongType

log = logging.getLogger(__name__)

TASKS = ("txt2img", "img2img", "inpaint", "upscale")   # upscale: the SD x4 upscaler's
# what the masked part starts from before inpainting at a strength below 1 (A1111's
# inpainting_fill: 0 fill, 1 original, 2 latent noise, 3 latent nothing)
FILLS = ("fill", "original", "latent-noise", "latent-nothing")
UPSCALE_DEFAULTS = {"noise_level": 20, "tile": 128, "tile_overlap": 32}   # diffusers' level
SEED_MAX = 2 ** 64 - 1       # torch.Generator.manual_seed takes an unsigned 64-bit seed
RANDOM_SEED = -1             # a seed to be drawn, as A1111's -1
RANDOM_SEED_RANGE = 2 ** 32  # drawn seeds are below this, as A1111 draws them
# An input image of more than this many times the model's own area is resized down to that
# area unless asked to keep its size: the work grows with the area (and the attention's
# with its square), so a 12-megapixel photo would take hours at full size on SD v1.
LARGE_INPUT_AREA = 4


@dataclass(frozen=True)
class Limit:
    """A numeric field: its kind (int or float) and range (None: unbounded)."""
    kind: type
    lo: float = None
    hi: float = None


LIMITS = {
    "steps": Limit(int, 1, 1000),
    "scale": Limit(float, 0, 100),
    "eta": Limit(float, 0, 1),
    "rescale": Limit(float, 0, 1),
    "slg": Limit(float, 0, 20),
    "strength": Limit(float, 0, 1),
    "height": Limit(int, 1, None),
    "width": Limit(int, 1, None),
    "mask_blur": Limit(int, 0, 256),
    "refiner_switch": Limit(float, 0, 1),
    "aesthetic_score": Limit(float, 0, 10),
    "negative_aesthetic_score": Limit(float, 0, 10),
    "hr_scale": Limit(float, 1, 8),         # the hires fix's (ldm.hires)
    "hr_steps": Limit(int, 0, 1000),
    "hr_strength": Limit(float, 0, 1),
    "hr_resize_x": Limit(int, 0, 16384),
    "hr_resize_y": Limit(int, 0, 16384),
    "noise_level": Limit(int, 0, 350),       # the x4 upscaler's (its max_noise_level)
    "tile": Limit(int, 0, 16384),
    "tile_overlap": Limit(int, 0, 1024),
}
# SDXL's size conditioning (the request's fields; ``DiffusionEngine.size_values``)
SIZE_CONDITIONING = ("original_size", "crop", "target_size", "aesthetic_score",
                     "negative_aesthetic_score")
# of which (height, width) pairs, and the crop's (top, left)
PAIRS = {"original_size": Limit(int, 1, 16384), "target_size": Limit(int, 1, 16384),
         "crop": Limit(int, 0, 16384)}
# how the scripts name each field (their flags); the library uses the keys themselves
FLAGS = {"steps": "--ddim_steps", "scale": "--scale", "eta": "--ddim_eta",
         "rescale": "--rescale", "slg": "--slg",
         "strength": "--strength", "height": "--H", "width": "--W", "mask_blur": "--mask-blur",
         "seeds": "--seed", "prompts": "--prompt", "negative_prompts": "--negative-prompt",
         "sampler": "--sampler", "schedule": "--schedule", "image": "--init-img",
         "mask": "--mask", "full_size": "--full-size", "resize_mode": "--resize-mode",
         "batch": "--n_samples", "vae_tiling": "--vae_tiling",
         "refiner_switch": "--refiner_switch", "original_size": "--original_size", "target_size": "--target_size", "crop": "--crop",
         "aesthetic_score": "--aesthetic_score",
         "negative_aesthetic_score": "--negative_aesthetic_score",
         "hr_scale": "--hr_scale", "hr_upscaler": "--hr_upscaler", "hr_steps": "--hr_steps",
         "hr_strength": "--denoising_strength", "hr_resize_x": "--hr_resize_x",
         "hr_resize_y": "--hr_resize_y", "noise_level": "--noise_level", "tile": "--tile",
         "tile_overlap": "--tile_overlap", "fill": "--fill"}


def check_number(value, kind, lo=None, hi=None):
    """``value`` as a finite ``kind`` (int or float) in [lo, hi], else ValueError (or
    TypeError for a non-number) whose message is the body both the command line and the
    library print after the field's name: "nan is not a finite number"."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{value!r} is not {'an integer' if kind is int else 'a number'}")
    if not math.isfinite(value):
        raise ValueError(f"{value} is not a finite number")
    if kind is int:
        if value != int(value):
            raise ValueError(f"{value} is not an integer")
        value = int(value)
    else:
        value = float(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bound = (f"must be in [{_g(lo)}, {_g(hi)}]" if lo is not None and hi is not None else
                 f"must be at least {_g(lo)}" if lo is not None else f"must be at most {_g(hi)}")
        raise ValueError(f"{_g(value)} is out of range: {bound}")
    return value


def check_seed(value):
    """A seed in [0, 2**64 - 1], or -1 (``RANDOM_SEED``) for one to be drawn."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{value!r} is not an integer")
    if not (isinstance(value, numbers.Integral) or (math.isfinite(value) and value == int(value))):
        raise ValueError(f"{value} is not an integer")
    value = int(value)
    if value != RANDOM_SEED and not 0 <= value <= SEED_MAX:
        raise ValueError(f"{value} is out of range: seeds are 0 to 2**64 - 1 (or -1 for a "
                         "random one)")
    return value


def draw_seed():
    """A random seed, as A1111 draws them (below 2**32)."""
    return secrets.randbelow(RANDOM_SEED_RANGE)


def _g(x):
    return f"{x:g}" if isinstance(x, float) else str(x)


@dataclass(frozen=True)
class ModelInfo:
    """What a request is checked against and completed from: the model's latent factor,
    native (training) size, timesteps, and its own sampling defaults (its config's
    ``sampling:`` section). Known before the weights load (``ModelInfo.of_choice``)."""
    factor: int
    native_size: int
    timesteps: int = 1000
    defaults: dict = field(default_factory=dict)
    inpainting: bool = False  # a dedicated inpainting model (9-channel UNet)
    guidance_embedded: bool = False  # guidance as a UNet input, not by a negative pass
    upscaler: bool = False    # the SD x4 upscaler (its one task: "upscale")
    flow: bool = False        # a rectified-flow model (SD 3): the flow samplers only

    @classmethod
    def of_choice(cls, choice):
        """From a ``ldm.config.ModelChoice`` (the config alone, no weights)."""
        g = choice.geometry
        return cls(g.factor or 8, g.native_size or 512, g.timesteps, choice.defaults,
                   g.is_inpainting, g.guidance_embedded, g.upscaler, g.flow)

    def default(self, name, task="txt2img"):
        """The one place for sampling defaults: the model config's own (``sampling:``),
        else CompVis': DDIM (Euler for a rectified-flow model), 50 steps, guidance 7.5 (5.0 for image-to-image, as CompVis'
        img2img.py), strength 0.75 for image-to-image and 1 for inpainting, no guidance
        rescale."""
        if name in self.defaults:
            return self.defaults[name]
        if name == "sampler" and self.flow:   # rectified flow: diffusers' and KerasHub's
            return "euler"
        from ldm.samplers import DEFAULT_SAMPLER
        return {"sampler": DEFAULT_SAMPLER, "steps": 50,
                "scale": 5.0 if task == "img2img" else 7.5,
                "strength": 0.75 if task == "img2img" else 1.0, "rescale": 0.0,
                "slg": 0.0}[name]


@dataclass(frozen=True)
class Request:
    """What to make, complete and valid (``build`` makes one). Lists are tuples, one entry
    per image; ``image``/``mask`` are PIL images at the input's own size (RGB, L)."""
    task: str
    prompts: tuple
    seeds: tuple
    negative_prompts: tuple
    sampler: str
    schedule: str
    eta: float
    steps: int
    scale: float
    height: int = None            # txt2img: the size; else the size asked for, or None
    width: int = None
    image: object = None
    mask: object = None
    strength: float = None
    resize_mode: str = "resize"
    full_size: bool = False
    mask_blur: int = 4
    paste_back: bool = True
    latent_blend: bool = True
    image_hash: str = None
    mask_hash: str = None
    rescale: float = 0.0          # guidance rescale (Lin et al. 2023, eq. 16), 0: none
    # SDXL's size conditioning (``DiffusionEngine.size_values``; SD 1/2 ignore them): the
    # original and target (height, width), None: the image's; the crop's (top, left), None:
    # (0, 0); the refiner's aesthetic scores, None: 6.0 and 2.5 (diffusers')
    original_size: tuple = None
    crop: tuple = None
    target_size: tuple = None
    aesthetic_score: float = None
    negative_aesthetic_score: float = None
    hires: object = None          # text-to-image: ``ldm.hires.Hires``, A1111's hires fix
    # upscaling (the SD x4 upscaler): the low-resolution image's noise level, and the tiles
    # (in low-resolution pixels, multiples of 8; 0: one pass) and their overlap
    noise_level: int = None
    tile: int = None
    tile_overlap: int = None
    fill: str = "original"        # inpainting: ``FILLS``
    slg: float = 0.0              # skip-layer guidance's scale (an MMDiT's), 0: none
    names: dict = field(default=None, compare=False, repr=False)  # its caller's words

    @property
    def batch_size(self):
        return len(self.seeds)

    def with_(self, **changes):
        """A copy with some fields changed (already-valid values only)."""
        return replace(self, **changes)

    @classmethod
    def build(cls, task, model, prompts, seeds, negative_prompts=None, sampler=None,
              schedule=None, eta=None, steps=None, scale=None, height=None, width=None,
              image=None, mask=None, strength=None, resize_mode="resize", full_size=False,
              mask_blur=4, paste_back=True, latent_blend=True, image_hash=None,
              mask_hash=None, rescale=None, original_size=None, crop=None, target_size=None,
              aesthetic_score=None, negative_aesthetic_score=None, hires=None,
              noise_level=None, tile=None, tile_overlap=None, fill=None, slg=None,
              names=None):
        """A valid ``Request`` for ``task`` on ``model`` (a ``ModelInfo``), None fields
        completed from the model's defaults, -1 seeds drawn; else UsageError or WrongType
        naming the field in ``names`` (default: the keywords here). ``image`` and
        ``mask``: a PIL image, a path, or a numpy array (H x W [x C], uint8, or float in
        [0, 1]). ``hires``: a ``ldm.hires.Hires`` (``Hires.build``)."""
        n = _namer(names)
        if task not in TASKS:
            raise UsageError(f"task must be one of {TASKS}, not {task!r}")
        prompts = _texts(prompts, n("prompts"))
        seeds = _seeds(seeds, n("seeds"))
        if len(prompts) == 1 and len(seeds) > 1:
            prompts = prompts * len(seeds)
        if len(prompts) != len(seeds):
            raise UsageError(f"give one seed per prompt ({len(prompts)} prompts, "
                             f"{len(seeds)} seeds)")
        if negative_prompts is None or isinstance(negative_prompts, str):
            negative_prompts = [negative_prompts or ""] * len(prompts)
        negative_prompts = _texts(negative_prompts, n("negative_prompts"))
        if len(negative_prompts) != len(prompts):
            raise UsageError(f"give one {n('negative_prompts')} per prompt (or one for all)")
        values = sampling(task, model, any(negative_prompts), sampler, schedule, eta, steps,
                          scale, names)
        for key, value in (("strength", strength), ("mask_blur", mask_blur),
                           ("rescale", rescale), ("slg", slg)):
            if value is None:
                value = model.default(key, task) if key != "mask_blur" else 4
            values[key] = _number(key, value, n)
        if values["slg"] and not model.flow:
            raise UsageError(f"{n('slg')} (skip-layer guidance) is for SD 3's MMDiT")
        if values["slg"] and values["scale"] == 1.0:
            raise UsageError(f"{n('slg')} works with guidance: raise {n('scale')} above 1")
        for key, value in (("height", height), ("width", width),
                           ("aesthetic_score", aesthetic_score),
                           ("negative_aesthetic_score", negative_aesthetic_score)):
            if value is not None:
                values[key] = _number(key, value, n)
        for key, value in (("original_size", original_size), ("crop", crop),
                           ("target_size", target_size)):
            if value is not None:
                values[key] = _pair(key, value, n)
        height, width = values.get("height"), values.get("width")
        from ldm.image_io import RESIZE_MODES
        if resize_mode not in RESIZE_MODES:
            raise UsageError(f"{n('resize_mode')} must be one of {RESIZE_MODES}, not "
                             f"{resize_mode!r}")
        if task == "txt2img":
            if image is not None or mask is not None:
                raise UsageError("text-to-image takes no image or mask (img2img and inpaint "
                                 "do)")
            height = model.native_size if height is None else height
            width = model.native_size if width is None else width
        check_size(model, height, width, names)
        if task != "txt2img":
            image = as_image(image, n("image"), "RGB")
        upscale = {}
        for key, value in (("noise_level", noise_level), ("tile", tile),
                           ("tile_overlap", tile_overlap)):
            if task == "upscale":
                upscale[key] = _number(key, UPSCALE_DEFAULTS[key] if value is None else value, n)
            elif value is not None:
                raise UsageError(f"{n(key)} is for the SD x4 upscaler (scripts/upscale.py)")
        if fill is not None and fill not in FILLS:
            raise UsageError(f"{n('fill')} must be one of {', '.join(FILLS)}, not {fill!r}")
        if fill not in (None, "original") and task != "inpaint":
            raise UsageError(f"{n('fill')} {fill} is for inpainting (what the masked part "
                             "starts from)")
        if task == "upscale":
            if upscale["tile"] % 8:
                raise UsageError(f"{n('tile')} {upscale['tile']} is not a multiple of 8 "
                                 f"(e.g. 128; 0: no tiles)")
            if upscale["tile"] and 2 * upscale["tile_overlap"] >= upscale["tile"]:
                raise UsageError(f"{n('tile_overlap')} {upscale['tile_overlap']} must be less "
                                 f"than half of {n('tile')} {upscale['tile']}")
        if task == "inpaint":
            mask = as_image(mask, n("mask"), "L")
        elif mask is not None:
            raise UsageError("only inpainting takes a mask")
        if hires is not None:
            if not callable(getattr(hires, "sizes", None)):
                raise WrongType(f"hires must be a ldm.hires.Hires (Hires.build), not "
                                f"{type(hires).__name__}")
            if task != "txt2img":
                raise UsageError(f"hires fix is for text-to-image; {task} takes the size it "
                                 f"is given ({n('height')}/{n('width')})")
        return cls(task, tuple(prompts), tuple(seeds), tuple(negative_prompts),
                   values["sampler"], values["schedule"], values["eta"], values["steps"],
                   values["scale"], height, width, image,
                   mask, values["strength"] if task in ("img2img", "inpaint") else None,
                   resize_mode,
                   bool(full_size), values["mask_blur"], bool(paste_back), bool(latent_blend),
                   image_hash, mask_hash, values["rescale"], values.get("original_size"),
                   values.get("crop"), values.get("target_size"), values.get("aesthetic_score"),
                   values.get("negative_aesthetic_score"), hires, upscale.get("noise_level"),
                   upscale.get("tile"), upscale.get("tile_overlap"), fill or "original",
                   values["slg"], names)


def sampling(task, model, negative=False, sampler=None, schedule=None, eta=None, steps=None,
             scale=None, names=None):
    """The sampling values of a request, checked and completed from ``model``'s defaults:
    {"sampler" (an id), "schedule", "eta", "steps", "scale"}. ``negative``: whether there
    is a negative prompt (it needs guidance). The scripts call it before the model loads."""
    n = _namer(names)
    values = {}
    for key, value in (("steps", steps), ("scale", scale)):
        values[key] = _number(key, model.default(key, task) if value is None else value, n)
    if values["steps"] > model.timesteps:
        raise UsageError(f"{n('steps')} {values['steps']} is more than the model's "
                         f"{model.timesteps} timesteps")
    if model.guidance_embedded and negative:
        what = n("negative_prompts") if names else "a negative prompt"
        raise UsageError(f"{what} has no effect on this consistency model: it takes "
                         f"{n('scale')} as an embedding, with no unconditional pass; drop "
                         f"{n('negative_prompts')}")
    if values["scale"] == 1.0 and negative:
        what, at = ((n("negative_prompts"), n("scale")) if names else
                    ("a negative prompt", "guidance scale"))
        raise UsageError(f"{what} has no effect at {at} 1 (no guidance): raise "
                         f"{n('scale')} or drop {n('negative_prompts')}")
    values["sampler"], values["schedule"], values["eta"] = resolve_sampling(
        model.default("sampler", task) if sampler is None else sampler, schedule, eta, n)
    from ldm.samplers import SAMPLERS, check_flow_sampler, sampler_label
    if model.flow:
        try:
            check_flow_sampler(values["sampler"])
        except ValueError as e:
            raise UsageError(str(e)) from None
    if SAMPLERS[values["sampler"]].spacing == "lcm" and values["steps"] > 50:
        raise UsageError(f"{n('steps')} {values['steps']}: {sampler_label(values['sampler'])} "
                         "takes at most 50 steps (its distillation's schedule; 2 to 8 is "
                         "what it is made for)")
    return values


def check_field(key, value, names=None):
    """One numeric field of ``LIMITS`` checked alone (UsageError or WrongType)."""
    return _number(key, value, _namer(names))


# the library's words for what is not a keyword of its own
LIBRARY_NAMES = {"batch": "the batch of seeds", "vae_tiling": "VAE tiling (set_options)",
                 "full_size": "full_size=True"}


def _namer(names):
    names = LIBRARY_NAMES if names is None else names
    return lambda key: names.get(key, key)


def _number(key, value, n):
    limit = LIMITS[key]
    try:
        return check_number(value, limit.kind, limit.lo, limit.hi)
    except TypeError as e:
        raise WrongType(f"{n(key)}: {e}") from None
    except ValueError as e:
        raise UsageError(f"{n(key)}: {e}") from None


def _pair(key, value, n):
    """A (height, width) or (top, left) pair of ``PAIRS[key]``: two numbers, or a string
    "H,W" / "HxW"."""
    if isinstance(value, str):
        value = value.lower().replace("x", ",").split(",")
        try:
            value = [float(v) for v in value]
        except ValueError:
            raise UsageError(f"{n(key)}: {','.join(value)!r} is not two numbers "
                             f"(e.g. 1024,1024)") from None
    if not _is_sequence(value) or len(value) != 2:
        raise UsageError(f"{n(key)}: give two numbers (e.g. 1024,1024), not {value!r}")
    limit = PAIRS[key]
    try:
        return tuple(check_number(v, limit.kind, limit.lo, limit.hi) for v in value)
    except TypeError as e:
        raise WrongType(f"{n(key)}: {e}") from None
    except ValueError as e:
        raise UsageError(f"{n(key)}: {e}") from None


def _texts(value, name):
    """A string or a sequence of strings -> list of strings."""
    if isinstance(value, str):
        return [value]
    if value is None or not _is_sequence(value):
        raise WrongType(f"{name} must be a string or a list of strings, not "
                        f"{type(value).__name__}")
    out = list(value)
    bad = [v for v in out if not isinstance(v, str)]
    if bad:
        raise WrongType(f"{name} must be strings, got {type(bad[0]).__name__} {bad[0]!r}")
    if not out:
        raise UsageError(f"{name} is empty: give at least one")
    return out


def _is_sequence(value):
    return isinstance(value, (list, tuple)) or (hasattr(value, "__len__") and hasattr(value, "__iter__")
                                                 and not isinstance(value, (str, bytes, dict)))


def _seeds(value, name):
    """An int or a sequence of ints -> list of valid seeds, each -1 drawn (and said)."""
    items = list(value) if _is_sequence(value) and not isinstance(value, str) else [value]
    if not items:
        raise UsageError(f"{name} is empty: give at least one seed")
    seeds = []
    for v in items:
        try:
            s = check_seed(getattr(v, "item", lambda: v)() if hasattr(v, "dtype") else v)
        except TypeError as e:
            raise WrongType(f"{name}: {e}") from None
        except ValueError as e:
            raise UsageError(f"{name}: {e}") from None
        if s == RANDOM_SEED:
            s = draw_seed()
            log.info("seed: %d (drawn at random for a seed of -1; it is recorded)", s)
        seeds.append(s)
    return seeds


def resolve_sampling(sampler, schedule=None, eta=None, n=None):
    """(sampler id, schedule, eta) from a sampler name (ours, k-diffusion's or A1111's,
    "DPM++ 2M Karras"), a schedule (None: the name's, else "discrete") and eta (None: the
    sampler's default); UsageError otherwise, in the caller's names."""
    from ldm.samplers import resolve_eta, resolve_sampler
    n = n or _namer(None)
    if not isinstance(sampler, str):
        raise WrongType(f"{n('sampler')} must be a sampler's name, not "
                        f"{type(sampler).__name__}")
    if eta is not None:
        eta = _number("eta", eta, n)
    try:
        sampler, schedule = resolve_sampler(sampler, schedule)
        eta = resolve_eta(sampler, eta)
    except ValueError as e:
        message = str(e).replace("eta must be 0", f"drop {n('eta')}" if n("eta") != "eta"
                                 else "eta must be 0")
        raise UsageError(message) from None
    return sampler, schedule, eta


def check_size(model, height, width, names=None):
    """A size the model takes: positive multiples of its factor (None: decided later)."""
    n = _namer(names)
    f = model.factor
    for key, value in (("height", height), ("width", width)):
        if value is not None and value % f:
            raise UsageError(f"{n(key)} {value} is not a multiple of {f}: "
                             f"{n('height')} and {n('width')} must be multiples of {f} for "
                             f"this model (e.g. {model.native_size})")


def check_memory(geometry, height, width, batch, device="cpu", vae_tile=None, names=None):
    """Refuse up front a size whose activations alone exceed the memory there is (the
    CPU's; a GPU says so when it allocates), with what to change; when the autoencoder is
    what does not fit, say that VAE tiling would. ``geometry``: a ``ldm.config.Geometry``."""
    n = _namer(names)
    need = geometry.activation_bytes(height, width, batch, vae_tile)
    have = available_memory(device)
    if have is not None and need > have:
        tiling = (f" or add {n('vae_tiling')}" if not vae_tile and geometry.activation_bytes(
            height, width, batch, 64) <= have else "")
        raise ResourceError(
            f"{width}x{height} with {n('batch')} {batch} needs at least {need / 2**30:.0f} GiB "
            f"for activations and this machine has {have / 2**30:.0f} GiB free: lower "
            f"{n('height')}/{n('width')} (the model's own size is {geometry.native_size}) or "
            f"{n('batch')}{tiling}")


# The autoencoder's middle block attends over all latent pixels at once: one call whose work
# grows with the square of the area. Past this many times the model's own latent area it
# is said (minutes of one uninterruptible-looking computation; memory is not the limit, as
# the attention is fused), with the flag that splits it.
LONG_ATTENTION_AREA = 16


def check_work(geometry, height, width, vae_tile=None, names=None):
    """One line (a warning) when the autoencoder's attention over a ``height`` x ``width``
    image is one very long computation, saying that VAE tiling splits it. Returns the line,
    or None."""
    n = _namer(names)
    if vae_tile or not (geometry.factor and geometry.latent_size):
        return None
    tokens = (height // geometry.factor) * (width // geometry.factor)
    if tokens <= LONG_ATTENTION_AREA * geometry.latent_size ** 2:
        return None
    line = (f"the autoencoder attends over all {tokens:,} latent pixels of a {width}x{height} "
            f"image at once, {tokens ** 2 / geometry.latent_size ** 4:,.0f}x the work at the "
            f"model's own size: one computation of minutes or more; {n('vae_tiling')} splits "
            "it into tiles")
    log.warning(line)
    return line


def available_memory(device="cpu"):
    """Bytes free for a run on ``device`` (a name or type): system memory for the CPU
    (Linux), None when unknown (GPUs are checked when they allocate)."""
    if str(device) not in ("auto", "cpu"):
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# ------------------------------------------------------------------------------ images

def as_image(value, name, mode):
    """A PIL image in ``mode`` ("RGB" or "L") from a PIL image, a path (str or Path) or a
    numpy array (H x W, H x W x 1/3/4; uint8, bool, or float in [0, 1])."""
    from PIL import Image
    from ldm.image_io import load_image, load_mask, to_rgb
    if value is None:
        raise WrongType(f"{name} is missing: give a PIL image, a path or a numpy array")
    if isinstance(value, (str, Path)):
        return load_image(value, name) if mode == "RGB" else load_mask(value)
    if isinstance(value, Image.Image):
        return to_rgb(value) if mode == "RGB" else to_rgb(value, (0, 0, 0)).convert("L")
    if type(value).__module__ == "numpy" and hasattr(value, "shape"):
        return _array_image(value, name, mode)
    raise WrongType(f"{name} must be a PIL image, a path or a numpy array, not "
                    f"{type(value).__name__}")


def _array_image(a, name, mode):
    import numpy as np
    from PIL import Image
    from ldm.image_io import to_rgb
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise UsageError(f"{name}: an array image must be H x W or H x W x 3 (or 4), got "
                         f"shape {tuple(a.shape)}")
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise UsageError(f"{name}: a float array image must hold values in [0, 1]")
        a = (a * 255 + 0.5).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise UsageError(f"{name}: an array image must be uint8, bool or float in [0, 1], "
                         f"not {a.dtype}")
    if min(a.shape[:2]) < 1:
        raise UsageError(f"{name}: the array image is empty ({a.shape[1]}x{a.shape[0]})")
    image = Image.fromarray(np.ascontiguousarray(a))
    return to_rgb(image) if mode == "RGB" else to_rgb(image, (0, 0, 0)).convert("L")


def working_size(size, factor, native, height=None, width=None, full_size=False,
                 names=None):
    """((width, height), note) at which an input image of ``size`` (w, h) is sampled:
    ``width``/``height`` if given (a missing one: the image's); else, for an image of more
    than ``LARGE_INPUT_AREA`` times the model's own area (``native``^2), that area at the
    image's aspect ratio unless ``full_size``; else the image's size down to multiples of
    ``factor``. The note (or None) says what changed, in one line."""
    n = _namer(names)
    w, h = size
    if height is not None or width is not None:
        return (width or w, height or h), None
    if not full_size and w * h > LARGE_INPUT_AREA * native * native:
        k = native / math.sqrt(w * h)
        tw = max(factor, round(w * k / factor) * factor)
        th = max(factor, round(h * k / factor) * factor)
        return (tw, th), (f"the {w}x{h} image is {w * h / native ** 2:.0f}x the model's "
                          f"{native}x{native} area: sampling at {tw}x{th} ({n('height')}/"
                          f"{n('width')} choose the size, {n('full_size')} keeps {w}x{h})")
    tw, th = w // factor * factor, h // factor * factor
    if tw < factor or th < factor:
        raise UsageError(f"the image is {w}x{h}: too small for this model (a side under "
                         f"{factor} pixels)")
    if (tw, th) == (w, h):
        return (w, h), None
    return (tw, th), f"the {w}x{h} image is sampled at {tw}x{th} (sides must be multiples of {factor})"
