"""OpenAI's images API (``/v1/images/generations``, ``/v1/images/edits``) read into
``Generation``s.

- ``prompt`` (required), ``n`` (1 to the server's batch limit), ``size`` ("WxH" or "auto":
  the model's own), ``model`` (a checkpoint's name from ``/sdapi/v1/sd-models``; OpenAI's
  own model names mean the loaded model), ``response_format`` ("b64_json"; "url" answers a
  ``data:`` URL, as nothing is hosted), ``output_format`` png only; ``quality``, ``style``,
  ``background``, ``user`` and the like are accepted and change nothing.
- extensions local servers share: ``seed``, ``negative_prompt``, ``steps``,
  ``guidance_scale``, ``sampler``, and for edits ``strength``.
- edits: ``image`` (a file; the first of ``image[]``) and ``mask``: where the mask is
  transparent (alpha 0) is repainted, as OpenAI's; a mask without alpha repaints where it is
  white (A1111's). No mask: the image's own transparent pixels, else image-to-image.
"""
import time

from ldm.errors import UsageError, WrongType
from ldm.request import RANDOM_SEED, check_seed, draw_seed
from ldm.server.service import Generation, check_int, check_text, open_image

NAMES = {"steps": "steps", "scale": "guidance_scale", "eta": "eta", "strength": "strength",
         "height": "size", "width": "size", "seeds": "seed", "prompts": "prompt",
         "negative_prompts": "negative_prompt", "sampler": "sampler", "schedule": "sampler",
         "image": "image", "mask": "mask", "batch": "n", "mask_blur": "mask_blur",
         "vae_tiling": "the server's --vae_tiling", "full_size": "a smaller image",
         "resize_mode": "size", "rescale": "rescale"}
OPENAI_MODELS = {"dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5"}


def read(fields, service, task, image=None, mask=None):
    """(Generation, settings) of a generations body or an edits form (``image``/``mask``:
    the uploaded files' bytes)."""
    if not isinstance(fields, dict):
        raise WrongType("the request body must be a JSON object")
    lim = service.limits
    prompt = fields.get("prompt")
    if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
        raise UsageError("prompt: required")
    prompt = check_text(prompt, "prompt", lim.max_prompt)
    negative = check_text(fields.get("negative_prompt"), "negative_prompt", lim.max_prompt)
    n = check_int(_number(fields.get("n", 1)), "n", 1, lim.max_batch)
    fmt = fields.get("response_format") or "b64_json"
    if fmt not in ("b64_json", "url"):
        raise UsageError(f"response_format: {fmt!r}: choose b64_json or url")
    if (fields.get("output_format") or "png") != "png":
        raise UsageError("output_format: this server writes png only")
    seed = fields.get("seed", -1)
    try:
        seed = check_seed(_number(seed))
    except TypeError as e:
        raise WrongType(f"seed: {e}") from None
    except ValueError as e:
        raise UsageError(f"seed: {e}") from None
    if seed == RANDOM_SEED:
        seed = draw_seed()
    settings = service.settings
    model = fields.get("model")
    if model and model not in OPENAI_MODELS:
        settings, _ = service.settings_with({"sd_model_checkpoint": model})
    values = {}
    size = fields.get("size") or "auto"
    if not isinstance(size, str):
        raise WrongType("size: give a string such as \"512x512\"")
    if size != "auto":
        w, sep, h = size.lower().partition("x")
        if not sep or not w.isdigit() or not h.isdigit():
            raise UsageError(f"size: {size!r} is not WIDTHxHEIGHT (e.g. 512x512) or auto")
        values.update(width=int(w), height=int(h))
    for ours, theirs, kind in (("steps", "steps", int), ("scale", "guidance_scale", float),
                               ("sampler", "sampler", str), ("strength", "strength", float)):
        if fields.get(theirs) is not None:
            values[ours] = _number(fields[theirs]) if kind is not str else fields[theirs]
    if task == "txt2img":
        values.pop("strength", None)
    gen = Generation(task, prompt, negative, seed, n, 1, values, NAMES,
                     kind="txt2img" if task == "txt2img" else "img2img")
    if task != "txt2img":
        edit_images(gen, service, image, mask)
    service.check(gen, settings)
    gen.response_format = fmt
    return gen, settings


def _number(value):
    """A form field's text as a number (multipart sends text); JSON numbers as they are."""
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            try:
                return float(value)
            except ValueError:
                return value
    return value


def edit_images(gen, service, image, mask):
    from PIL import Image
    lim = service.limits
    if image is None:
        raise UsageError("image: required (a PNG, JPEG or WebP file)")
    picture = open_image(image, "image", lim, "keep")
    values = gen.values
    if "width" not in values:   # "auto": the image's own size (in multiples of the factor)
        values.pop("height", None)
    values.setdefault("resize_mode", "resize")
    alpha = _alpha(picture)
    rgb = open_image(image, "image", lim, "RGB")
    if mask is not None:
        m = open_image(mask, "mask", lim, "keep")
        if m.size != rgb.size:
            raise UsageError(f"mask: {m.width}x{m.height}, the image {rgb.width}x{rgb.height}:"
                             " give a mask of the image's size")
        a = _alpha(m)
        repaint = (a.point(lambda v: 255 if v == 0 else 0) if a is not None
                   else m.convert("L").point(lambda v: 255 if v >= 128 else 0))
    elif alpha is not None and alpha.getextrema()[0] == 0:
        repaint = alpha.point(lambda v: 255 if v == 0 else 0)
    else:
        repaint = None
    values["image"] = rgb
    if repaint is None:
        gen.task = "img2img"
        return
    if repaint.getextrema()[1] == 0:
        raise UsageError("mask: nothing to repaint (no transparent pixels)")
    gen.task = "inpaint"
    values["mask"] = repaint
    if not isinstance(repaint, Image.Image):
        raise UsageError("mask: not an image")


def _alpha(im):
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        return im.convert("RGBA").getchannel("A")
    return None


def response(gen, result):
    from ldm.server.service import b64_png
    data = []
    for s in result.samples:
        b64 = b64_png(s.image, s.parameters)
        item = ({"b64_json": b64} if gen.response_format == "b64_json"
                else {"url": "data:image/png;base64," + b64})
        item["revised_prompt"] = gen.prompt
        data.append(item)
    first = result.samples[0].image.size if result.samples else (0, 0)
    return {"created": int(time.time()), "data": data, "output_format": "png",
            "size": f"{first[0]}x{first[1]}"}


def error(message, status):
    kind = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
            429: "rate_limit_error", 503: "server_error"}.get(status, "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}
