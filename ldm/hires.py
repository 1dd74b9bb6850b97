"""A1111's hires fix: make the image at the model's size, upscale it, then refine it at the
larger size as image-to-image with the same seed.

``Hires`` is the part of a text-to-image ``Request`` that asks for it, validated once by
``Hires.build``; ``Pipeline.run`` does the second pass (``Pipeline._hires``). The sizes,
steps and noise follow A1111's ``StableDiffusionProcessingTxt2Img`` (processing.py):

- the target: ``hr_scale`` times the first pass's size, or ``hr_resize_x``/``hr_resize_y``
  (one of them 0: the other from the aspect ratio; both: upscaled to cover them, then the
  latents cropped to them around the centre); latent sides are the target's floored to the
  autoencoder's factor, as A1111's latent interpolation does;
- the upscaler: "Latent" and its variants interpolate the latents (bilinear, bicubic,
  nearest, with or without antialiasing); "Lanczos", "Nearest" or a model (a pixel upscaler,
  the SD x4 upscaler) work on the decoded image, which is then encoded again;
- the second pass runs exactly ``hr_steps`` (0: the first pass's steps) steps, the last ones
  of a schedule of ``int(hr_steps / min(strength, 0.999))`` (A1111's img2img with its
  "fix steps" rule, which its hires pass always uses), from fresh noise of the same seeds
  at the new size.

This module imports neither torch nor PIL at import time (``ldm.request`` imports it).
"""
from dataclasses import dataclass

from ldm.errors import UsageError, WrongType

# our names -> (torch interpolation mode, antialias); A1111's "Latent (...)" upscalers
LATENT_MODES = {
    "latent": ("bilinear", False),
    "latent-antialiased": ("bilinear", True),
    "latent-bicubic": ("bicubic", False),
    "latent-bicubic-antialiased": ("bicubic", True),
    "latent-nearest": ("nearest", False),
    "latent-nearest-exact": ("nearest-exact", False),
}
PIXEL_MODES = ("lanczos", "nearest")   # PIL's resampling on the decoded image
LABELS = {"latent": "Latent", "latent-antialiased": "Latent (antialiased)",
          "latent-bicubic": "Latent (bicubic)",
          "latent-bicubic-antialiased": "Latent (bicubic antialiased)",
          "latent-nearest": "Latent (nearest)", "latent-nearest-exact": "Latent (nearest-exact)",
          "lanczos": "Lanczos", "nearest": "Nearest"}
DEFAULT_STRENGTH = 0.7   # A1111's hires fix "Denoising strength" default


def upscaler_key(name):
    """Our key of an upscaler's name, ours or A1111's ("Latent (nearest-exact)" ->
    "latent-nearest-exact"), or None for a name that is neither."""
    key = name.strip().lower().replace(" (", "-").replace(")", "").replace(" ", "-")
    return key if key in LABELS else None


@dataclass(frozen=True)
class Hires:
    """What the second pass does. ``upscaler``: a key of ``LABELS`` or a loaded upscaler
    (an object with ``name`` and ``upscale(image, width, height, prompt, seed)`` returning
    a PIL image of that size: ``ldm.upscalers``). ``steps`` 0: the first pass's;
    ``resize``: A1111's (hr_resize_x, hr_resize_y), or None for ``scale``."""
    scale: float = 2.0
    upscaler: object = "latent"
    steps: int = 0
    strength: float = DEFAULT_STRENGTH
    resize: tuple = None

    @classmethod
    def build(cls, scale=None, upscaler=None, steps=None, strength=None, resize_x=None,
              resize_y=None, names=None):
        """A valid ``Hires`` (None: A1111's defaults: scale 2, Latent, the first pass's
        steps, strength 0.7), else UsageError/WrongType in the caller's names (``names``
        maps hr_scale, hr_upscaler, hr_steps, hr_strength, hr_resize_x, hr_resize_y)."""
        from ldm.request import check_field
        what = (names or {}).get("hr_upscaler", "hr_upscaler")
        scale = check_field("hr_scale", 2.0 if scale is None else scale, names)
        steps = check_field("hr_steps", steps or 0, names)
        strength = check_field("hr_strength",
                               DEFAULT_STRENGTH if strength is None else strength, names)
        rx = check_field("hr_resize_x", resize_x or 0, names)
        ry = check_field("hr_resize_y", resize_y or 0, names)
        if upscaler is None:
            upscaler = "latent"
        if isinstance(upscaler, str):
            key = upscaler_key(upscaler)
            if key is None:
                raise UsageError(f"{what} {upscaler!r} is not an upscaler: give one of "
                                 f"{', '.join(LABELS)}, or an upscaler model's file")
            upscaler = key
        elif not (callable(getattr(upscaler, "upscale", None)) and hasattr(upscaler, "name")):
            raise WrongType(f"{what} must be an upscaler's name or a loaded upscaler "
                            f"(ldm.upscalers.load_upscaler), not "
                            f"{type(upscaler).__name__}")
        return cls(scale, upscaler, steps, strength, (rx, ry) if rx or ry else None)

    @property
    def latent(self):
        """Whether the latents are interpolated (no decoding between the passes)."""
        return isinstance(self.upscaler, str) and self.upscaler in LATENT_MODES

    @property
    def label(self):
        """The upscaler's name as A1111 writes it ("Latent", "Lanczos", a model's name)."""
        return LABELS.get(self.upscaler) if isinstance(self.upscaler, str) else self.upscaler.name

    def sizes(self, width, height, factor):
        """((width, height) upscaled to, (width, height) of the second pass) for a first
        pass of ``width`` x ``height``: A1111's ``calculate_target_resolution`` with the
        sides floored to multiples of ``factor`` (its latents' size), the second pass the
        upscaled latents cropped around the centre to the asked size."""
        if self.resize is None:
            up = (int(width * self.scale), int(height * self.scale))
            target = up
        else:
            rx, ry = self.resize
            if ry == 0:
                up = (rx, rx * height // width)
            elif rx == 0:
                up = (ry * width // height, ry)
            elif width / height < rx / ry:
                up = (rx, rx * height // width)
            else:
                up = (ry * width // height, ry)
            target = (rx or up[0], ry or up[1])
        crop = [(u - t) // factor for u, t in zip(up, target)]   # in latents, as A1111
        up = tuple(side // factor * factor for side in up)
        return up, (up[0] - crop[0] * factor, up[1] - crop[1] * factor)

    def schedule_steps(self, first_steps):
        """(the schedule's length, the steps run) of the second pass after a first pass of
        ``first_steps``: A1111's img2img "fix steps" rule."""
        run = self.steps or first_steps
        if self.strength <= 0:
            return run, 0
        return int(run / min(self.strength, 0.999)), run

    def record(self):
        """The PNG parameters of the second pass, in the keys ``parameters_text`` writes as
        A1111's "Hires upscale", "Hires resize", "Hires steps", "Hires upscaler",
        "Denoising strength"."""
        out = {"hr_upscaler": self.label, "strength": self.strength}
        if self.resize is None:
            out["hr_scale"] = self.scale
        else:
            out["hr_resize"] = f"{self.resize[0]}x{self.resize[1]}"
        if self.steps:
            out["hr_steps"] = self.steps
        return out


def upscale_latents(z, size, mode):
    """Latents [B, C, h, w] interpolated to ``size`` (h, w) by a ``LATENT_MODES`` key."""
    import torch.nn.functional as F
    how, antialias = LATENT_MODES[mode]
    return F.interpolate(z, size=size, mode=how, antialias=antialias)


def upscale_image(image, width, height, upscaler, prompt="", seed=0):
    """A PIL image resized to ``width`` x ``height`` by a ``PIXEL_MODES`` key or a loaded
    upscaler (its ``upscale(image, width, height, prompt, seed)``)."""
    if not isinstance(upscaler, str):
        return upscaler.upscale(image, width, height, prompt=prompt, seed=seed)
    from PIL import Image
    return image.resize((width, height), {"lanczos": Image.LANCZOS,
                                          "nearest": Image.NEAREST}[upscaler])


def crop_latents(z, size):
    """Latents cropped around the centre to ``size`` (h, w), as A1111 truncates them
    (the odd row or column off the end)."""
    ty, tx = z.shape[-2] - size[0], z.shape[-1] - size[1]
    return z[..., ty // 2:z.shape[-2] - (ty + 1) // 2, tx // 2:z.shape[-1] - (tx + 1) // 2]
