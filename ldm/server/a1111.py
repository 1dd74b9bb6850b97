"""AUTOMATIC1111's HTTP API (``/sdapi/v1``): its requests read into ``Generation``s, its
responses written from our samples, with A1111's field names, defaults and shapes.

What A1111 fields do here:
- used: prompt, negative_prompt, seed, sampler_name (or sampler_index), scheduler,
  batch_size, n_iter, steps, cfg_scale, width, height, eta, override_settings (checkpoint,
  VAE, clip skip), send_images, save_images, do_not_save_grid, force_task_id; img2img's
  init_images, denoising_strength, resize_mode, mask, mask_blur, inpainting_fill (0 fill,
  1 original, 2 latent noise, 3 latent nothing), inpaint_full_res(_padding),
  inpainting_mask_invert; ``<lora:name:weight>`` in the prompt; txt2img's hires fix:
  enable_hr, hr_scale, hr_resize_x/y, hr_upscaler (the Latent ones, Lanczos, Nearest,
  ESRGAN and Real-ESRGAN files of the models' ESRGAN/ and RealESRGAN/ folders),
  hr_second_pass_steps, denoising_strength (``ldm.hires``); ``alwayson_scripts.controlnet``
  units (model from the ControlNet folder, image, module none/canny/invert/threshold,
  weight, guidance_start/end, control_mode, resize_mode; ``control_units``).
- refused with 422, because the client would get a different kind of picture than it asked
  for without knowing: subseed_strength > 0 (variation seeds), tiling, script_name,
  enabled alwayson_scripts other than ControlNet (ADetailer...), a ControlNet module that
  needs downloaded weights, a refiner, a hires fix with another
  upscaler, sampler, checkpoint or prompt (hr_sampler_name, hr_checkpoint_name,
  hr_prompt...), resize_mode 3 (latent upscale), more than one init image.
- accepted and ignored with a note in ``info`` ("notes"): restore_faces, styles, the s_*
  sampler tunings, initial_noise_multiplier, image_cfg_scale and other fields that change
  nothing here; override_settings_restore_afterwards=false (overrides never outlive their
  request here: POST /sdapi/v1/options keeps settings); unknown fields are ignored silently, as A1111 (pydantic) does.
"""
import json
import math
import re
import time

from ldm.errors import UsageError, WrongType
from ldm.request import FILLS, RANDOM_SEED, check_seed, draw_seed
from ldm.server.service import (Generation, check_bool, check_float, check_int, check_text,
                                decode_image)

# our Request fields in A1111's words (for one-line errors)
NAMES = {"steps": "steps", "scale": "cfg_scale", "eta": "eta", "strength": "denoising_strength",
         "height": "height", "width": "width", "mask_blur": "mask_blur", "seeds": "seed",
         "prompts": "prompt", "negative_prompts": "negative_prompt", "sampler": "sampler_name",
         "schedule": "scheduler", "image": "init_images", "mask": "mask",
         "resize_mode": "resize_mode", "batch": "batch_size",
         "vae_tiling": "the server's --vae_tiling", "full_size": "a smaller image",
         "rescale": "rescale", "hr_scale": "hr_scale", "hr_upscaler": "hr_upscaler",
         "hr_steps": "hr_second_pass_steps", "hr_strength": "denoising_strength",
         "hr_resize_x": "hr_resize_x", "hr_resize_y": "hr_resize_y"}

# A1111's schedulers and ours
SCHEDULERS = [  # (name, label, ours)
    ("automatic", "Automatic", None), ("uniform", "Uniform", "discrete"),
    ("karras", "Karras", "karras"), ("exponential", "Exponential", "exponential"),
    ("sgm_uniform", "SGM Uniform", "sgm_uniform")]
# A1111 1.9+: the schedule a sampler uses when the scheduler is "automatic"
AUTOMATIC = {"dpmpp_2m": "karras", "dpmpp_sde": "karras", "dpmpp_2s_a": "karras",
             "dpmpp_2m_sde": "exponential", "dpm_2": "karras", "dpm_2_a": "karras"}

TXT2IMG_DEFAULTS = {
    "prompt": "", "negative_prompt": "", "styles": None, "seed": -1, "subseed": -1,
    "subseed_strength": 0, "seed_resize_from_h": -1, "seed_resize_from_w": -1,
    "sampler_name": None, "scheduler": None, "batch_size": 1, "n_iter": 1, "steps": 50,
    "cfg_scale": 7.0, "width": 512, "height": 512, "restore_faces": None, "tiling": None,
    "do_not_save_samples": False, "do_not_save_grid": False, "eta": None,
    "denoising_strength": None, "s_min_uncond": None, "s_churn": None, "s_tmax": None,
    "s_tmin": None, "s_noise": None, "override_settings": None,
    "override_settings_restore_afterwards": True, "refiner_checkpoint": None,
    "refiner_switch_at": None, "disable_extra_networks": False, "comments": None,
    "enable_hr": False, "firstphase_width": 0, "firstphase_height": 0, "hr_scale": 2.0,
    "hr_upscaler": None, "hr_second_pass_steps": 0, "hr_resize_x": 0, "hr_resize_y": 0,
    "hr_checkpoint_name": None, "hr_sampler_name": None, "hr_scheduler": None,
    "hr_prompt": "", "hr_negative_prompt": "", "force_task_id": None,
    "sampler_index": "Euler", "script_name": None, "script_args": [], "send_images": True,
    "save_images": False, "alwayson_scripts": {}, "infotext": None}
IMG2IMG_DEFAULTS = {
    **{k: v for k, v in TXT2IMG_DEFAULTS.items() if not k.startswith(("hr_", "enable_hr",
                                                                        "firstphase"))},
    "init_images": None, "resize_mode": 0, "image_cfg_scale": None, "mask": None,
    "mask_blur_x": 4, "mask_blur_y": 4, "mask_blur": None, "mask_round": True,
    "inpainting_fill": 0, "inpaint_full_res": True, "inpaint_full_res_padding": 0,
    "inpainting_mask_invert": 0, "initial_noise_multiplier": None, "latent_mask": None,
    "denoising_strength": 0.75, "include_init_images": False}

RESIZE = {0: "resize", 1: "crop", 2: "fill"}
LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?(?::[^>]*)?>")
# fields that change nothing here at these values; other values are noted as ignored
QUIET = {"restore_faces": (None, False), "styles": (None, []), "s_min_uncond": (None, 0, 0.0),
         "s_churn": (None, 0, 0.0), "s_tmax": (None, 0, 0.0, math.inf), "s_tmin": (None, 0, 0.0),
         "s_noise": (None, 1, 1.0), "initial_noise_multiplier": (None, 1, 1.0),
         "image_cfg_scale": (None,), "comments": (None, {}), "infotext": (None, ""),
         "seed_resize_from_h": (None, -1, 0), "seed_resize_from_w": (None, -1, 0),
         "disable_extra_networks": (None, False), "latent_mask": (None,)}


def read(body, service, task):
    """(Generation, settings, job id) of a txt2img or img2img body, checked whole: a bad
    field raises UsageError/WrongType (422) in A1111's words, before anything is queued."""
    if not isinstance(body, dict):
        raise WrongType("the request body must be a JSON object")
    lim = service.limits
    notes = []
    refuse(body, task)
    for key, quiet in QUIET.items():
        if key in body and not _same(body[key], quiet):
            notes.append(f"ignored: {key} (not available on this server)")
    prompt = check_text(body.get("prompt"), "prompt", lim.max_prompt)
    negative = check_text(body.get("negative_prompt"), "negative_prompt", lim.max_prompt)
    prompt, loras = lora_tags(prompt, service)
    seed = body.get("seed", -1)
    seed = _seed(seed)
    batch_size = check_int(body.get("batch_size", 1) or 1, "batch_size", 1)
    n_iter = check_int(body.get("n_iter", 1) or 1, "n_iter", 1)
    if seed == RANDOM_SEED:
        seed = draw_seed()
    if seed + batch_size * n_iter - 1 > 2 ** 64 - 1:
        raise UsageError("seed: the images' seeds (seed + k) pass 2**64 - 1")
    overrides = body.get("override_settings") or {}
    if not isinstance(overrides, dict):
        raise WrongType("override_settings: give a JSON object")
    settings, more = service.settings_with(overrides, loras)
    notes += more
    if overrides and not check_bool(body.get("override_settings_restore_afterwards", True),
                                    "override_settings_restore_afterwards"):
        notes.append("ignored: override_settings_restore_afterwards=false (override_settings "
                     "apply to this request only; POST /sdapi/v1/options to keep them)")
    values = sampling_values(body, service)
    for key in ("width", "height"):
        if body.get(key) not in (None, 0):
            values[key] = body[key]
    if task == "txt2img" and check_bool(body.get("enable_hr", False) or False, "enable_hr"):
        values["hires"] = hires(body, service)
    gen = Generation(task, prompt, negative, seed, batch_size, n_iter, values, NAMES,
                     save=check_bool(body.get("save_images", False), "save_images"),
                     save_grid=not check_bool(body.get("do_not_save_grid", False),
                                              "do_not_save_grid"),
                     notes=notes, kind="txt2img" if task == "txt2img" else "img2img")
    if task != "txt2img":
        image_fields(body, gen, service)
    scripts = body.get("alwayson_scripts") or {}
    for name, value in scripts.items():
        if name.lower() == "controlnet":
            gen.controls = control_units(value, service, values.get("image"))
    service.check(gen, settings)
    job_id = body.get("force_task_id")
    return gen, settings, job_id


def refuse(body, task):
    """422 for what would change the picture in a way we cannot do."""
    if body.get("subseed_strength") not in (None, 0, 0.0):
        raise UsageError("subseed_strength: variation seeds are not available on this "
                         "server; use 0")
    if body.get("tiling"):
        raise UsageError("tiling: seamless tiling is not available on this server")
    if body.get("script_name"):
        raise UsageError(f"script_name: no script {body['script_name']!r} on this server "
                         "(see /sdapi/v1/scripts)")
    if body.get("refiner_checkpoint") not in (None, "", "None"):
        raise UsageError("refiner_checkpoint: a refiner is not available through the server "
                         "yet (scripts/txt2img.py --refiner)")
    scripts = body.get("alwayson_scripts") or {}
    if not isinstance(scripts, dict):
        raise WrongType("alwayson_scripts: give a JSON object")
    for name, value in scripts.items():
        if name.lower() == "controlnet":
            continue   # ``control_units``
        args = value.get("args") if isinstance(value, dict) else None
        if args and not (args[0] is False or (isinstance(args[0], dict)
                                              and args[0].get("enabled") is False)):
            raise UsageError(f"alwayson_scripts: {name!r} is not available on this server")


# the ControlNet extension's control modes and resize modes, and its preprocessors that
# run here (``ldm.controlnet.PREPROCESSORS``): module -> our spec from threshold_a/_b
CONTROL_MODES = {0: "balanced", 1: "prompt", 2: "control", "balanced": "balanced",
                 "my prompt is more important": "prompt",
                 "controlnet is more important": "control"}
CONTROL_RESIZE = {0: "resize", 1: "crop", 2: "fill", "just resize": "resize",
                  "crop and resize": "crop", "resize and fill": "fill"}
CONTROL_MODULES = {
    "none": lambda a, b: "none",
    "canny": lambda a, b: f"canny:{int(100 if a is None else a)}:{int(200 if b is None else b)}",
    "invert": lambda a, b: "invert",
    "invert (from white bg & black line)": lambda a, b: "invert",
    "threshold": lambda a, b: f"threshold:{int(127 if a is None else a)}"}


def control_units(value, service, init_image=None):
    """The enabled units of ``alwayson_scripts.controlnet`` (the sd-webui-controlnet
    extension's fields) as specs for ``Engine.control_units``: the model a name in the
    server's ControlNet folder, the image a base64 image (img2img: the init image when
    none is given), the module one that needs no downloaded weights."""
    from ldm.controlnet import parse_preprocess
    args = value.get("args") if isinstance(value, dict) else None
    if not isinstance(args, list):
        raise WrongType("alwayson_scripts.controlnet: give {\"args\": [unit, ...]}")
    specs = []
    for i, unit in enumerate(args):
        where = f"controlnet unit {i}"
        if unit is False or unit is None:
            continue
        if not isinstance(unit, dict):
            raise WrongType(f"{where}: give a JSON object")
        if not check_bool(unit.get("enabled", True), f"{where} enabled"):
            continue
        entry = service.folders.lookup("controlnet", unit.get("model"), f"{where} model")
        image = unit.get("image") or unit.get("input_image")
        if isinstance(image, dict):
            image = image.get("image")
        if image:
            image = decode_image(image, f"{where} image", service.limits)
        elif init_image is not None:
            image = init_image
        else:
            raise UsageError(f"{where} image: give the control image (base64)")
        if unit.get("mask") not in (None, ""):
            raise UsageError(f"{where} mask: a ControlNet mask is not available on this "
                             "server")
        module = str(unit.get("module") or "none").lower()
        if module not in CONTROL_MODULES:
            raise UsageError(f"{where} module: {unit.get('module')!r} is not available on "
                             f"this server ({', '.join(CONTROL_MODULES)}); give the "
                             "processed map with module none")
        spec = CONTROL_MODULES[module](unit.get("threshold_a"), unit.get("threshold_b"))
        parse_preprocess(spec, f"{where} thresholds")
        mode = unit.get("control_mode", 0)
        mode = mode.lower() if isinstance(mode, str) else mode
        if mode not in CONTROL_MODES:
            raise UsageError(f"{where} control_mode: {unit.get('control_mode')!r}; one of "
                             "0 Balanced, 1 My prompt is more important, 2 ControlNet is "
                             "more important")
        resize = unit.get("resize_mode", 1)
        resize = resize.lower() if isinstance(resize, str) else resize
        if resize not in CONTROL_RESIZE:
            raise UsageError(f"{where} resize_mode: {unit.get('resize_mode')!r}; one of Just "
                             "Resize, Crop and Resize, Resize and Fill")
        start = check_float(unit.get("guidance_start", 0.0), f"{where} guidance_start", 0, 1)
        end = check_float(unit.get("guidance_end", 1.0), f"{where} guidance_end", 0, 1)
        if start >= end:
            raise UsageError(f"{where}: guidance_start {start:g} is not before guidance_end "
                             f"{end:g}")
        if unit.get("hr_option", "Both") not in ("Both", None):
            raise UsageError(f"{where} hr_option: only Both is available on this server")
        specs.append(dict(entry=entry, image=image, preprocess=spec,
                          weight=check_float(unit.get("weight", 1.0), f"{where} weight", 0, 2),
                          start=start, end=end, mode=CONTROL_MODES[mode],
                          resize_mode=CONTROL_RESIZE[resize]))
    return specs


def control_detect(body, service):
    """The extension's /controlnet/detect: each image through a module, as base64 PNGs."""
    from ldm.controlnet import preprocess
    from ldm.server.service import b64_png
    if not isinstance(body, dict):
        raise WrongType("the request body must be a JSON object")
    module = str(body.get("controlnet_module") or "none").lower()
    if module not in CONTROL_MODULES:
        raise UsageError(f"controlnet_module: {body.get('controlnet_module')!r} is not "
                         f"available on this server ({', '.join(CONTROL_MODULES)})")
    spec = CONTROL_MODULES[module](body.get("controlnet_threshold_a"),
                                   body.get("controlnet_threshold_b"))
    images = body.get("controlnet_input_images") or body.get("controlnet_images")
    if not isinstance(images, list) or not images:
        raise UsageError("controlnet_input_images: give a list of base64 images")
    out = [b64_png(preprocess(decode_image(x, f"controlnet_input_images[{i}]",
                                           service.limits), spec))
           for i, x in enumerate(images)]
    return {"images": out, "info": "Success"}


def hires(body, service):
    """The hires fix a txt2img body asks for, as ``Hires.build``'s keywords (A1111's
    defaults: scale 2, Latent, the first pass's steps, denoising strength 0.7); an
    upscaler file of the ESRGAN/ or RealESRGAN/ folder as its entry (loaded by the
    worker: ``Engine.upscaler``)."""
    from ldm.hires import upscaler_key
    for key in ("hr_checkpoint_name", "hr_sampler_name", "hr_scheduler", "hr_prompt",
                "hr_negative_prompt"):
        if body.get(key) not in (None, "", "Use same checkpoint", "Use same sampler",
                                 "Use same scheduler"):
            raise UsageError(f"{key}: a second pass with another {key[3:].split('_')[0]} is "
                             "not available on this server; leave it empty")
    name = body.get("hr_upscaler")
    if name is not None and not isinstance(name, str):
        raise WrongType("hr_upscaler: give an upscaler's name (see /sdapi/v1/upscalers)")
    if name in ("None", ""):
        name = "lanczos"   # A1111's "None": a plain resize
    if name is not None and upscaler_key(name) is None:
        found = [e for e in service.folders.found.get("upscalers", ()) if e.matches(name)]
        if not found:
            raise UsageError(f"hr_upscaler: {name!r} is not available on this server; choose "
                             "Latent (or its antialiased, bicubic, nearest variants), "
                             "Lanczos, Nearest, or a file of the ESRGAN/ or RealESRGAN/ "
                             "folder (see /sdapi/v1/upscalers)")
        name = found[0]
    return dict(scale=body.get("hr_scale", 2.0), upscaler=name,
                steps=body.get("hr_second_pass_steps", 0) or 0,
                strength=body.get("denoising_strength"),
                resize_x=body.get("hr_resize_x", 0) or 0,
                resize_y=body.get("hr_resize_y", 0) or 0)


def _same(value, quiet):
    return value is None or any(value == q for q in quiet)


def _seed(value):
    try:
        return check_seed(value)
    except TypeError as e:
        raise WrongType(f"seed: {e}") from None
    except ValueError as e:
        raise UsageError(f"seed: {e}") from None


def sampling_values(body, service):
    """sampler, schedule, steps, scale, eta of a body (A1111's defaults: Euler, 50 steps,
    CFG 7; eta only for the samplers that take one)."""
    from ldm.request import resolve_sampling
    from ldm.samplers import SAMPLERS
    name = body.get("sampler_name") or body.get("sampler_index") or "Euler"
    if not isinstance(name, str):
        raise WrongType("sampler_name: give a sampler's name (see /sdapi/v1/samplers)")
    scheduler = body.get("scheduler") or "automatic"
    if not isinstance(scheduler, str):
        raise WrongType("scheduler: give a scheduler's name (see /sdapi/v1/schedulers)")
    ours = {n: o for n, _, o in SCHEDULERS}
    ours.update({label.lower(): o for _, label, o in SCHEDULERS})
    if scheduler.lower() not in ours:
        raise UsageError(f"scheduler: {scheduler!r} is not available; choose from "
                         + ", ".join(n for n, _, _ in SCHEDULERS))
    schedule = ours[scheduler.lower()]
    sampler, suffix, _ = resolve_sampling(name, None, None, _namer())
    if SAMPLERS[sampler].timesteps:
        schedule = "discrete"   # DDIM, PLMS, DDPM run on the model's own timesteps
    elif schedule is None:
        schedule = suffix if suffix != "discrete" else AUTOMATIC.get(sampler, "discrete")
    eta = body.get("eta")
    info = SAMPLERS[sampler]
    if eta is None and info.stochastic and info.eta is None:   # TCD, LCM: their own
        eta = service.options["eta_ddim" if sampler == "ddim" else "eta_ancestral"]
    if not info.stochastic:
        eta = None
    values = dict(sampler=sampler, schedule=schedule,
                  steps=body.get("steps") if body.get("steps") is not None else 50,
                  scale=body.get("cfg_scale") if body.get("cfg_scale") is not None else 7.0)
    if eta is not None:
        values["eta"] = eta
    return values


def _namer():
    return lambda key: NAMES.get(key, key)


def lora_tags(prompt, service):
    """The prompt without its ``<lora:name:weight>`` tags, and [(entry, weight)]."""
    loras = []
    for m in LORA_TAG.finditer(prompt):
        entry = service.folders.lookup("lora", m.group(1), "prompt <lora:...>")
        weight = 1.0
        if m.group(2):
            try:
                weight = float(m.group(2))
            except ValueError:
                raise UsageError(f"prompt: <lora:{m.group(1)}:{m.group(2)}>: the weight is "
                                 "not a number") from None
            if not math.isfinite(weight):
                raise UsageError(f"prompt: <lora:{m.group(1)}:...>: the weight is not finite")
        loras.append((entry, weight))
    return LORA_TAG.sub("", prompt).strip() if loras else prompt, loras


def image_fields(body, gen, service):
    """img2img's image, mask and their options into ``gen``."""
    from PIL import ImageOps
    from ldm.image_io import fill_masked, mask_region
    lim = service.limits
    images = body.get("init_images")
    if not isinstance(images, list) or not images:
        raise UsageError("init_images: give a list with one base64-encoded image")
    if len(images) > 1:
        raise UsageError("init_images: one image per request on this server")
    image = decode_image(images[0], "init_images[0]", lim)
    values = gen.values
    mode = body.get("resize_mode", 0)
    if mode not in RESIZE:
        raise UsageError(f"resize_mode: {mode!r} is not available; choose 0 (just resize), "
                         "1 (crop and resize) or 2 (resize and fill)")
    values["resize_mode"] = RESIZE[mode]
    strength = body.get("denoising_strength")
    values["strength"] = 0.75 if strength is None else strength
    if body.get("mask") in (None, ""):
        values["image"] = image
        return
    mask = decode_image(body["mask"], "mask", lim, "L")
    if mask.size != image.size:
        raise UsageError(f"mask: {mask.width}x{mask.height}, the image "
                         f"{image.width}x{image.height}: give a mask of the image's size")
    if check_int(body.get("inpainting_mask_invert", 0) or 0, "inpainting_mask_invert", 0, 1):
        mask = ImageOps.invert(mask)
    blur = body.get("mask_blur")
    values["mask_blur"] = check_int(4 if blur is None else blur, "mask_blur", 0, 256)
    fill = check_int(body.get("inpainting_fill", 0), "inpainting_fill", 0, 3)
    if fill == 0:
        image = fill_masked(image, mask)
    elif fill >= 2:   # latent noise, latent nothing: the pipeline's (``Request.fill``)
        values["fill"] = FILLS[fill]
    gen.task = "inpaint"
    if check_bool(body.get("inpaint_full_res", True), "inpaint_full_res"):
        padding = check_int(body.get("inpaint_full_res_padding", 0) or 0,
                            "inpaint_full_res_padding", 0, 4096)
        w = values.get("width") or image.width
        h = values.get("height") or image.height
        box = mask_region(mask, padding, w, h)
        if box is None:
            raise UsageError("mask: the mask is empty (all black): nothing to repaint")
        gen.region, gen.whole = box, image
        values.update(image=image.crop(box), mask=mask.crop(box), width=w, height=h,
                      resize_mode="resize")
        return
    values.update(image=image, mask=mask)


# ------------------------------------------------------------------------------ answers

def response(gen, result, body, service, defaults):
    """A1111's {"images", "parameters", "info"}: the grid first when there are several
    images (A1111's return_grid), ``info`` a JSON string of what was made."""
    from ldm.image_io import make_grid
    from ldm.server.service import b64_png
    samples = result.samples
    images = []
    grid = len(samples) > 1 and service.options.get("return_grid", True) and \
        len({s.image.size for s in samples}) == 1
    if check_bool(body.get("send_images", True), "send_images"):
        if grid:
            images.append(b64_png(make_grid([s.image for s in samples], gen.batch_size),
                                  {"grid_of": [s.parameters for s in samples]}))
        images += [b64_png(s.image, s.parameters) for s in samples]
    parameters = {**defaults, **{k: v for k, v in body.items() if k in defaults}}
    if "init_images" in parameters:
        parameters["init_images"] = None
        parameters["mask"] = None
    return {"images": images, "parameters": parameters,
            "info": json.dumps(info(gen, result, service, grid))}


def info(gen, result, service, grid=False):
    """The generation info A1111 returns (``Processed.js()``), from the images' own
    parameters, with ours (``parameters``) and the notes."""
    from ldm.image_io import parameters_text
    samples = result.samples
    p = [s.parameters for s in samples]
    first = p[0] if p else {}
    return {
        "prompt": gen.prompt, "all_prompts": [x.get("prompt") for x in p],
        "negative_prompt": gen.negative_prompt,
        "all_negative_prompts": [x.get("negative_prompt") for x in p],
        "seed": first.get("seed", gen.seed), "all_seeds": [x.get("seed") for x in p],
        "subseed": -1, "all_subseeds": [-1] * len(p), "subseed_strength": 0,
        "width": first.get("width"), "height": first.get("height"),
        "sampler_name": _label(first), "scheduler": _schedule(first),
        "cfg_scale": first.get("scale"), "steps": first.get("steps"),
        "batch_size": gen.batch_size, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": first.get("model"), "sd_model_hash": first.get("checkpoint_hash"),
        "sd_vae_name": first.get("vae"), "sd_vae_hash": first.get("vae_hash"),
        "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": first.get("strength"),
        "extra_generation_params": {k: first[k] for k in ("stopped_at_step", "inpaint_area")
                                    if k in first},
        "index_of_first_image": 1 if grid else 0,
        "infotexts": [parameters_text(x) for x in p], "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": first.get("clip_skip", 1),
        "is_using_inpainting_conditioning": bool(first.get("inpainting_model")),
        "version": "latent-diffusion-txt2img", "interrupted": result.stopped,
        "saved": [str(x) for x in result.saved], "notes": gen.notes, "parameters": p,
    }


def _label(p):
    from ldm.samplers import SAMPLERS
    return SAMPLERS[p["sampler"]].label if p.get("sampler") in SAMPLERS else None


def _schedule(p):
    return {"discrete": "Uniform", "karras": "Karras", "exponential": "Exponential"}.get(
        p.get("schedule"), "Automatic")


def samplers():
    from ldm.samplers import SAMPLERS, _ALIASES
    aliases = {}
    for alias, target in _ALIASES.items():
        aliases.setdefault(target, []).append(alias)
    return [{"name": s.label, "aliases": [s.id] + aliases.get(s.id, []),
             "options": {"scheduler": AUTOMATIC[s.id]} if s.id in AUTOMATIC else {}}
            for s in SAMPLERS.values()]


def schedulers():
    return [{"name": n, "label": label, "aliases": None,
             "default_rho": 7.0 if n == "karras" else -1, "need_inner_model": False}
            for n, label, _ in SCHEDULERS]


def progress(service, job, current_image=True):
    """A1111's progress answer for ``job`` (the running one when None)."""
    running = list(service.queue.running.values())
    queued = service.queue.queued
    job = job or (running[0] if running else None)
    state = {"skipped": bool(job and job.skipped), "interrupted": bool(job and job.interrupted),
             "stopping_generation": False, "job": "", "job_count": len(running) + len(queued),
             "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0,
             "queue_length": len(queued)}
    if job is None:
        return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None,
                "textinfo": None}
    position = service.queue.position(job)
    state.update(job=f"Batch {job.batch + 1} out of {job.batches}" if job.state == "running"
                 else job.state, job_no=job.batch, sampling_step=job.step,
                 sampling_steps=job.steps, id_task=job.id, status=job.state,
                 queue_position=position, submitted_at=job.submitted,
                 started_at=job.started, finished_at=job.finished,
                 job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(job.submitted)))
    done = job.progress
    eta = 0.0
    if job.state == "running" and job.started and done > 0:
        spent = time.time() - job.started
        eta = spent / done - spent
    image = None
    if current_image and job.state == "running":
        png = service.preview(job)
        if png is not None:
            import base64
            image = base64.b64encode(png).decode("ascii")
    text = (f"In queue: {position} ahead" if position is not None else
            f"Step {job.step} of {job.steps}" if job.state == "running" else job.state)
    return {"progress": done, "eta_relative": eta, "state": state, "current_image": image,
            "textinfo": text}


def png_info(body, service):
    """A1111's png-info: the parameters text of a PNG, its other text chunks, and the text
    read back into fields."""
    from ldm.image_io import PARAMETERS_KEY, TEXT_KEY
    if not isinstance(body, dict) or "image" not in body:
        raise UsageError("png-info: give {\"image\": a base64-encoded PNG}")
    im = decode_image(body["image"], "image", service.limits, "keep")
    chunks = {k: v for k, v in getattr(im, "text", {}).items() if isinstance(v, str)}
    text = chunks.get(TEXT_KEY, "")
    items = {k: v for k, v in chunks.items() if k != TEXT_KEY}
    params = {}
    if PARAMETERS_KEY in chunks:
        try:
            params = json.loads(chunks[PARAMETERS_KEY])
        except ValueError:
            params = {}
    return {"info": text, "items": items, "parameters": parse_infotext(text) if text else {},
            "ldm_parameters": params}


def parse_infotext(text):
    """A1111's infotext into a dict: Prompt, Negative prompt, and each "Key: value"."""
    lines = text.strip().split("\n")
    last = lines[-1] if lines else ""
    pairs = re.findall(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)', last)
    out = {}
    if len(pairs) >= 3:
        lines = lines[:-1]
        for k, v in pairs:
            v = v.strip()
            out[k.strip()] = v[1:-1] if v.startswith('"') and v.endswith('"') else v
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out["Prompt"] = "\n".join(prompt)
    out["Negative prompt"] = "\n".join(negative)
    if "Size" in out and "x" in out["Size"]:
        w, _, h = out["Size"].partition("x")
        out["Size-1"], out["Size-2"] = w, h
    return out
