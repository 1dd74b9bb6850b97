"""The server without HTTP: its model folders, options, limits, queue and output folder.

``Service`` is what the routes of ``ldm.server.app`` call; the A1111 and OpenAI dialects
(``ldm.server.a1111``, ``ldm.server.openai``) turn their requests into ``Generation``s,
which run as jobs on the queue through the same ``Request`` and ``Pipeline.run`` as the
scripts, and are saved (when asked) by the same writer.
"""
import base64
import binascii
import io
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from ldm.errors import LdmError, UsageError, WrongType
from ldm.server.folders import hash_entry
from ldm.server.worker import Engine, Job, JobQueue, Settings, Stopped

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (each a flag of scripts/serve.py)."""
    max_pixels: int = 2048 * 2048          # per image
    max_request_pixels: int = 16 * 2048 * 2048   # all images of a request together
    max_batch: int = 16                    # images per request (batch_size x n_iter, n)
    max_body: int = 64 * 2 ** 20           # bytes of a request body
    max_prompt: int = 20000                # characters of a prompt or negative prompt
    max_queue: int = 256                   # jobs waiting


class TooBusy(LdmError):
    """The queue is full (503)."""


@dataclass
class Generation:
    """One request to make images, in our terms: the task, the prompt, the first seed and
    the batches (``n_iter`` of ``batch_size``, seeds counting up as the scripts'), the other
    ``Request.build`` values, and what to do with the images."""
    task: str
    prompt: str
    negative_prompt: str
    seed: int
    batch_size: int = 1
    n_iter: int = 1
    values: dict = field(default_factory=dict)   # Request.build keywords
    names: dict = None                           # the dialect's words for the fields
    region: tuple = None           # inpaint only masked: the box, sampled at values' size
    whole: object = None           # ... and the whole image it is pasted back into
    save: bool = False
    save_grid: bool = True
    notes: list = field(default_factory=list)     # what was ignored, said in the info
    kind: str = "txt2img"          # the output folder's name (txt2img, img2img)
    response_format: str = "b64_json"   # OpenAI's: b64_json or url
    # ControlNet units (A1111's alwayson_scripts.controlnet, ``a1111.control_units``):
    # {entry, image, preprocess, weight, start, end, mode, resize_mode}
    controls: list = field(default_factory=list)


@dataclass
class Result:
    samples: list          # ldm.pipeline.Sample, in order
    stopped: bool = False  # interrupted (some images are unfinished)
    saved: list = field(default_factory=list)


class Service:
    """``load(entry, vae, device) -> Pipeline`` builds a pipeline the way the server was
    told (scripts' flags); ``devices``: one worker per device."""

    def __init__(self, folders, load, initial, devices=("auto",), limits=Limits(),
                 outdir="outputs", prompt_syntax="a1111"):
        self.folders = folders
        self.limits = limits
        self.outdir = Path(outdir)
        self.prompt_syntax = prompt_syntax
        self.options = default_options()
        self._infos = {}
        self.finished = {}       # recent job id -> job (for progress by id)
        self.settings = Settings(hash_entry(initial))
        self.options.update(sd_model_checkpoint=self.settings.checkpoint.title,
                            sd_checkpoint_hash=self.settings.checkpoint.sha256)
        self.engines = [Engine(load, device) for device in devices]
        self.queue = JobQueue(self.engines)
        self.flags = {}          # the server's own settings, for cmd-flags
        from ldm.image_io import Outputs
        self.outputs = Outputs(self.outdir)   # what was saved, for the last line

    def start(self, preload=True):
        self.queue.start()
        if preload:   # the first model loads now, so that a bad one stops the server
            self.wait(self.submit(lambda engine, job: engine.ready(job.settings) and None,
                                  self.settings, "load"))
        return self

    def close(self):
        self.queue.close()

    # -- jobs ----------------------------------------------------------------------------
    def submit(self, work, settings=None, kind="txt2img", job_id=None, batches=1):
        if len(self.queue.queued) >= self.limits.max_queue:
            raise TooBusy(f"the queue is full ({self.limits.max_queue} jobs waiting): try "
                          "again later")
        job = Job(work, settings or self.settings, kind, batches=batches)
        if job_id:
            if not isinstance(job_id, str) or len(job_id) > 128:
                raise UsageError("force_task_id: give a string of at most 128 characters")
            job.id = job_id
        self.queue.submit(job)
        return job

    def wait(self, job):
        """Block until ``job`` ends (for callers without an event loop); its result or
        error."""
        job.done.wait()
        return self.outcome(job)

    def outcome(self, job):
        self._remember(job)
        if job.error is not None:
            raise job.error
        return job.result

    def _remember(self, job):
        self.finished[job.id] = job
        while len(self.finished) > 256:
            self.finished.pop(next(iter(self.finished)))

    def find(self, job_id):
        return self.queue.find(job_id) or self.finished.get(job_id)

    def current_job(self):
        running = list(self.queue.running.values())
        return running[0] if running else None

    # -- models --------------------------------------------------------------------------
    def info_for(self, entry):
        """The ``ModelInfo`` of a checkpoint entry, from its config (no weights read)."""
        key = entry.path
        if key not in self._infos:
            from ldm.config import choose_model
            from ldm.request import ModelInfo
            choice = choose_model(entry.path, entry.config)
            self._infos[key] = (ModelInfo.of_choice(choice), choice.geometry)
        return self._infos[key]

    def settings_with(self, overrides=None, loras=()):
        """The settings a job runs with: the server's, ``override_settings`` over them,
        the prompt's LoRAs."""
        s = self.settings
        notes = []
        for key, value in (overrides or {}).items():
            if key == "sd_model_checkpoint":
                s = replace(s, checkpoint=hash_entry(self.folders.lookup(
                    "checkpoints", value, "sd_model_checkpoint")))
            elif key == "sd_vae":
                s = replace(s, vae=self.vae_entry(value))
            elif key == "CLIP_stop_at_last_layers":
                s = replace(s, clip_skip=check_int(value, "CLIP_stop_at_last_layers", 1, 12))
            elif key in self.options:
                notes.append(f"override_settings {key}: has no effect on this server")
            else:
                raise UsageError(f"override_settings: unknown option {key!r}")
        return replace(s, loras=tuple(loras)), notes

    def vae_entry(self, value):
        if value in (None, "Automatic", "None", "automatic", "none"):
            return None
        return self.folders.lookup("vae", value, "sd_vae")

    def set_options(self, values):
        """A1111's POST options: checked whole first, then applied; a model or autoencoder
        change loads in its turn on the queue and is waited for by the caller (the job is
        returned, else None)."""
        if not isinstance(values, dict):
            raise WrongType("options: give a JSON object of option: value")
        s = self.settings
        changed = {}
        for key, value in values.items():
            if key == "sd_model_checkpoint":
                entry = self.folders.lookup("checkpoints", value, "sd_model_checkpoint")
                s = replace(s, checkpoint=hash_entry(entry))
                changed.update(sd_model_checkpoint=entry.title, sd_checkpoint_hash=entry.sha256)
            elif key == "sd_vae":
                s = replace(s, vae=self.vae_entry(value))
                changed[key] = value if s.vae is not None else "Automatic"
            elif key == "CLIP_stop_at_last_layers":
                s = replace(s, clip_skip=check_int(value, key, 1, 12))
                changed[key] = s.clip_skip
            elif key in OPTION_TYPES:
                changed[key] = check_option(key, value)
            else:
                raise UsageError(f"unknown option {key!r}: see GET /sdapi/v1/options")
        load = (s.checkpoint.path, getattr(s.vae, "path", None)) != (
            self.settings.checkpoint.path, getattr(self.settings.vae, "path", None))
        self.settings = s
        self.options.update(changed)
        if load:
            return self.submit(lambda engine, job: engine.ready(job.settings) and None, s,
                               "load")
        return None

    # -- running a generation ------------------------------------------------------------
    def check(self, gen, settings):
        """Everything about ``gen`` that needs no weights, before it is queued: the
        request itself (``Request.build`` on the model's facts), the sizes against the
        limits."""
        from ldm.request import Request
        info, geometry = self.info_for(settings.checkpoint)
        if gen.task == "txt2img" and info.inpainting:
            raise UsageError("the model is an inpainting model (9-channel UNet): use img2img "
                             "with a mask")
        values = dict(gen.values)
        if gen.task == "txt2img":
            values.setdefault("height", info.native_size)
            values.setdefault("width", info.native_size)
        request = Request.build(gen.task, info, [gen.prompt], [gen.seed or 0],
                                names=gen.names,
                                **_upscaler_named(values, "lanczos", gen.names))
        count = gen.batch_size * gen.n_iter
        if count > self.limits.max_batch:
            raise UsageError(f"{count} images in one request: at most "
                             f"{self.limits.max_batch} (batch_size x n_iter)")
        w, h = sampled_size(request, info, final=True)
        if w * h > self.limits.max_pixels:
            raise UsageError(f"{w}x{h} is more than the server's {self.limits.max_pixels:,} "
                             "pixels per image: ask for a smaller size")
        if w * h * count > self.limits.max_request_pixels:
            raise UsageError(f"{count} images of {w}x{h} are more than the server's "
                             f"{self.limits.max_request_pixels:,} pixels per request: ask "
                             "for fewer or smaller images")
        gen.values = values
        return request

    def run(self, gen, engine, job):
        """The work of a generation job: its batches on the engine's pipeline, each
        stopped at the next step by an interrupt (the rest not run) or a skip (the next
        batch runs); the images saved when asked."""
        from ldm.request import Request
        pipe = engine.ready(job.settings)
        samples, stopped = [], False
        t0 = time.time()
        for b in range(gen.n_iter):
            if job.interrupted or job.cancelled:
                break
            job.batch, job.skipped, job.latest = b, False, None
            first = gen.seed + b * gen.batch_size
            seeds = list(range(first, first + gen.batch_size))
            request = Request.build(gen.task, pipe.info, [gen.prompt] * len(seeds), seeds,
                                    negative_prompts=gen.negative_prompt, names=gen.names,
                                    **_upscaler_named(gen.values, engine.upscaler, gen.names))
            steps = pipe.steps_run(request)
            pipe.set_controls(engine.control_units(gen.controls, *sampled_size(request,
                                                                                 pipe.info)))
            try:
                out = pipe.run(request, progress=False, callback=job.callback(steps))
            finally:
                pipe.set_controls([])
            if job.step < steps:
                stopped = True
                for s in out:
                    s.parameters["stopped_at_step"] = f"{job.step}/{steps}"
            if gen.region is not None:
                out = [uncrop(s, gen) for s in out]
            samples.extend(out)
        if job.cancelled:
            raise Stopped("cancelled: the client went away")
        result = Result(samples, stopped)
        if gen.save and samples:
            result.saved = self.save(gen, samples)
        log.info("%s: %d image%s in %.1f s%s", gen.kind, len(samples),
                 "" if len(samples) == 1 else "s", time.time() - t0,
                 " (interrupted)" if stopped else "")
        return result

    def save(self, gen, samples):
        """Through the scripts' writer: numbered, never over a file, with the metadata."""
        from ldm.image_io import make_grid
        out = self.outputs
        paths = [out.save_numbered(s.image, "{:05}.png", s.parameters, f"{gen.kind}-images")
                 for s in samples]
        if gen.save_grid and len(samples) > 1 and len({s.image.size for s in samples}) == 1:
            grid = make_grid([s.image for s in samples], gen.batch_size)
            paths.append(out.save_numbered(grid, "grid-{:04}.png",
                                           {"grid_of": [s.parameters for s in samples]},
                                           f"{gen.kind}-grids"))
        return paths

    def preview(self, job):
        """The running job's latest estimate as a PNG (bytes), or None."""
        latest = job.latest if job is not None else None
        engine = next((e for e in self.engines if e.pipe is not None), None)
        if latest is None or engine is None:
            return None
        kind = self.options.get("show_progress_type", "TAESD")
        previews = getattr(engine.pipe, "_previews", {})
        previewer = previews.get(PREVIEW_KINDS[kind]) or previews.get("cheap")
        if previewer is None:
            return None
        cached = getattr(job, "_preview", None)   # polled often; a step changes it less often
        if cached is None or cached[0] is not latest or cached[1] is not previewer:
            cached = job._preview = (latest, previewer, previewer.png(latest))
        return cached[2]


def _upscaler_named(values, replacement, names=None):
    """``values`` with the hires fix's keywords (``a1111.hires``) built into a ``Hires``,
    an upscaler file's entry replaced first: by a name (checking, before the queue) or by
    ``replacement(entry)`` (the worker's loaded upscaler)."""
    hires = values.get("hires")
    if hires is None:
        return values
    from ldm.hires import Hires
    entry = hires.get("upscaler")
    if not isinstance(entry, (str, type(None))):
        hires = {**hires, "upscaler": replacement if isinstance(replacement, str)
                 else replacement(entry)}
    return {**values, "hires": Hires.build(**hires, names=names)}


def uncrop(sample, gen):
    """An "only masked" result pasted back into the whole image at its box."""
    from ldm.pipeline import Sample
    whole = gen.whole.copy()
    l, t, r, b = gen.region
    whole.paste(sample.image.resize((r - l, b - t)) if sample.image.size != (r - l, b - t)
                else sample.image, (l, t))
    params = dict(sample.parameters, inpaint_area="only masked", inpaint_box=[l, t, r, b],
                  output_size=f"{whole.width}x{whole.height}")
    return Sample(whole, params)


def sampled_size(request, info, final=False):
    """(width, height) a request samples at (``working_size``'s answer for an image;
    ``final``: with the hires fix, the second pass's)."""
    if request.task == "txt2img":
        if final and request.hires is not None:
            return request.hires.sizes(request.width, request.height, info.factor)[1]
        return request.width, request.height
    from ldm.request import working_size
    (w, h), _ = working_size(request.image.size, info.factor, info.native_size,
                             request.height, request.width, request.full_size)
    return w, h


# ------------------------------------------------------------------------------ values

def check_int(value, name, lo=None, hi=None):
    from ldm.request import check_number
    try:
        return check_number(value, int, lo, hi)
    except TypeError as e:
        raise WrongType(f"{name}: {e}") from None
    except ValueError as e:
        raise UsageError(f"{name}: {e}") from None


def check_float(value, name, lo=None, hi=None):
    from ldm.request import check_number
    try:
        return check_number(value, float, lo, hi)
    except TypeError as e:
        raise WrongType(f"{name}: {e}") from None
    except ValueError as e:
        raise UsageError(f"{name}: {e}") from None


def check_bool(value, name):
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    raise WrongType(f"{name}: {value!r} is not true or false")


def check_text(value, name, limit, default=""):
    if value is None:
        return default
    if not isinstance(value, str):
        raise WrongType(f"{name}: must be a string, not {type(value).__name__}")
    if len(value) > limit:
        raise UsageError(f"{name}: {len(value)} characters, more than the server's {limit}")
    if "\x00" in value:
        raise UsageError(f"{name}: contains a NUL character")
    return value


def decode_image(text, name, limits, mode="RGB"):
    """A PIL image from base64 (with or without a ``data:image/...;base64,`` prefix),
    checked for size before its pixels are read."""
    if not isinstance(text, str) or not text:
        raise WrongType(f"{name}: give a base64-encoded image")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        data = base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError):
        raise UsageError(f"{name}: not valid base64") from None
    return open_image(data, name, limits, mode)


def open_image(data, name, limits, mode="RGB"):
    from PIL import Image, UnidentifiedImageError
    from ldm.image_io import to_rgb
    try:
        im = Image.open(io.BytesIO(data))
        w, h = im.size
        if w * h > 4 * limits.max_pixels:
            raise UsageError(f"{name}: a {w}x{h} image is too large for this server (at "
                             f"most {4 * limits.max_pixels:,} pixels)")
        im.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, UsageError):
            raise
        raise UsageError(f"{name}: not an image this server can read (PNG, JPEG, WebP...)") from None
    except Image.DecompressionBombError:
        raise UsageError(f"{name}: the image is too large") from None
    if mode == "keep":
        return im
    return to_rgb(im) if mode == "RGB" else to_rgb(im, (0, 0, 0)).convert("L")


def b64_png(image, parameters=None):
    from ldm.image_io import png_bytes
    return base64.b64encode(png_bytes(image, parameters)).decode("ascii")


# ------------------------------------------------------------------------------ options

OPTION_TYPES = {   # options the server keeps (A1111's names) and their kinds
    "sd_model_checkpoint": str, "sd_checkpoint_hash": str, "sd_vae": str,
    "CLIP_stop_at_last_layers": int, "eta_ddim": float, "eta_ancestral": float,
    "return_grid": bool, "samples_format": str, "samples_save": bool, "grid_save": bool,
    "enable_pnginfo": bool, "show_progress_every_n_steps": int, "live_previews_enable": bool,
    "sd_lora": str, "outdir_txt2img_samples": str, "outdir_img2img_samples": str,
    "show_progress_type": str,
}
# A1111's live preview kinds -> ours: "TAESD" decodes with the tiny autoencoder in the
# VAE-approx folder made for the loaded model (the cheap map when there is none, as for the
# built-in model, whose latents are not TAESD's); "Full" with the model's own; "Approx NN"
# (a small network A1111 downloads) is served by the cheap linear map.
PREVIEW_KINDS = {"Approx cheap": "cheap", "Approx NN": "cheap", "TAESD": "taesd",
                 "Full": "full"}
READ_ONLY = {"sd_checkpoint_hash", "samples_format", "outdir_txt2img_samples",
             "outdir_img2img_samples", "enable_pnginfo"}


def default_options():
    return {"sd_model_checkpoint": None, "sd_checkpoint_hash": None, "sd_vae": "Automatic",
            "CLIP_stop_at_last_layers": 1, "eta_ddim": 0.0, "eta_ancestral": 1.0,
            "return_grid": True, "samples_format": "png", "samples_save": True,
            "grid_save": True, "enable_pnginfo": True, "show_progress_every_n_steps": 1,
            "live_previews_enable": True, "show_progress_type": "TAESD", "sd_lora": "None",
            "outdir_txt2img_samples": "txt2img-images", "outdir_img2img_samples": "img2img-images"}


def check_option(key, value):
    kind = OPTION_TYPES[key]
    if key in READ_ONLY:
        raise UsageError(f"option {key} is fixed on this server")
    if kind is bool:
        return check_bool(value, key)
    if kind is int:
        return check_int(value, key, 0)
    if kind is float:
        return check_float(value, key, 0)
    if not isinstance(value, str):
        raise WrongType(f"{key}: must be a string")
    if key == "show_progress_type" and value not in PREVIEW_KINDS:
        raise UsageError(f"show_progress_type: one of {', '.join(PREVIEW_KINDS)}")
    return value
