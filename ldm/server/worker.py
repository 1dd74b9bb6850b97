"""One model, one queue: jobs run first in, first out, one at a time per device, on the
pipeline of the settings each job was submitted with.

A ``Job`` is a function of an ``Engine`` (the loaded pipeline and what is merged into it)
submitted to the ``JobQueue``; the HTTP side waits for it without holding a thread. Each
device has one worker thread and its own engine (``--device cuda:0,cuda:1``): the one queue
feeds them all, and as every image's noise comes from its own seed on the CPU, the same
seeds give the same images whichever worker runs them.

A job's settings (checkpoint, VAE, clip skip, LoRAs) are taken when it is submitted, so a
model switch (``options``) applies to the jobs after it and waits for the ones before.
"""
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    """What a job needs loaded: a checkpoint entry, an autoencoder entry (None: the
    checkpoint's own), the clip skip, the LoRAs ((entry, weight), ...)."""
    checkpoint: object
    vae: object = None
    clip_skip: int = 1
    loras: tuple = ()


class Engine:
    """The pipeline one worker runs, reloaded or changed only when a job's settings differ
    from what is loaded. ``load(entry, vae)`` is the server's way to build a pipeline (the
    scripts' flags, the model's embeddings)."""

    def __init__(self, load, device=None):
        self._load = load
        self.device = device
        self.pipe = None
        self.loaded = None   # the Settings the pipe matches
        self.controlnets = {}   # path -> ControlNet loaded for this pipe
        self.upscalers = {}     # path -> PixelUpscaler

    def ready(self, settings):
        """The pipeline for ``settings``, after whatever load or change they need."""
        have = self.loaded
        if have is None or (have.checkpoint.path, _path(have.vae)) != (
                settings.checkpoint.path, _path(settings.vae)):
            self.pipe = None   # the old weights go before the new ones are read
            self.loaded = None
            self.controlnets = {}
            self.pipe = self._load(settings.checkpoint, settings.vae, self.device)
            have = Settings(settings.checkpoint, settings.vae, 1, ())
        if have.clip_skip != settings.clip_skip:
            self.pipe.set_text_options(clip_skip=settings.clip_skip,
                                       prompt_syntax=self.pipe.model.cond_stage_model.syntax)
        if [(e.path, w) for e, w in have.loras] != [(e.path, w) for e, w in settings.loras]:
            self.pipe.set_loras([(e.path, w) for e, w in settings.loras])
        self.loaded = settings
        return self.pipe


    def upscaler(self, entry):
        """The pixel upscaler of an upscaler folder's entry, loaded once, named as A1111
        lists it."""
        if entry.path not in self.upscalers:
            from ldm.upscalers import load_pixel_upscaler
            up = load_pixel_upscaler(entry.path, self.pipe.device, "hr_upscaler")
            up.name = entry.name
            self.upscalers[entry.path] = up
        return self.upscalers[entry.path]

    def control_units(self, specs, width, height):
        """``ldm.controlnet.ControlUnit``s of a generation's ControlNet specs for images of
        ``width`` x ``height``: each network loaded once for the loaded model, each
        control image fitted to the size by its resize mode, then preprocessed."""
        from ldm.controlnet import ControlUnit, load_controlnet, preprocess
        from ldm.image_io import fit_image
        units = []
        for spec in specs:
            path = spec["entry"].path
            if path not in self.controlnets:
                self.controlnets[path] = load_controlnet(path, self.pipe.model)
            image, _ = fit_image(spec["image"], 1, width, height, spec["resize_mode"])
            units.append(ControlUnit(self.controlnets[path], preprocess(image, spec["preprocess"]),
                                     spec["weight"], spec["start"], spec["end"],
                                     name=spec["entry"].name, preprocess=spec["preprocess"],
                                     mode=spec["mode"]))
        return units


def _path(entry):
    return None if entry is None else entry.path


class Stopped(Exception):
    """A job ended before it started: cancelled (its client went away) or refused."""


@dataclass
class Job:
    """A unit of work: ``work(engine, job)`` returns its result. The worker and the
    sampling callback fill in the progress; ``interrupt``/``skip``/``cancel`` are read at
    the next step."""
    work: object
    settings: Settings
    kind: str = "txt2img"
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    submitted: float = field(default_factory=time.time)
    started: float = None
    finished: float = None
    state: str = "queued"          # queued, running, done, failed, cancelled
    batches: int = 1               # A1111's job_count inside the job (n_iter)
    batch: int = 0
    step: int = 0
    steps: int = 0
    latest: object = None          # the latest x0 estimate of the batch's first image
    interrupted: bool = False
    skipped: bool = False
    cancelled: bool = False
    worker: int = None             # the engine (device) that ran it
    result: object = None
    error: BaseException = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def progress(self):
        """0 to 1 over the job's batches and their steps."""
        if self.state in ("done", "failed", "cancelled"):
            return 1.0
        if self.state != "running" or not self.steps:
            return 0.0
        return min(1.0, (self.batch + self.step / self.steps) / max(1, self.batches))

    def callback(self, steps):
        """A sampling callback for one batch of ``steps`` steps: records the progress and
        the latest estimate; an interrupt, skip or cancel ends the batch there
        (``StopSampling``) with what is done."""
        from ldm.pipeline import StopSampling
        self.step, self.steps = 0, steps

        def on_step(i, x, pred_x0):
            self.step = i + 1
            self.latest = pred_x0[:1].detach().float().cpu()
            if self.interrupted or self.skipped or self.cancelled:
                raise StopSampling(pred_x0)
        return on_step


class JobQueue:
    """FIFO over one engine per device; ``submit`` returns the job, which the caller
    waits for (``job.done``)."""

    def __init__(self, engines):
        self.engines = list(engines)
        self._jobs = deque()
        self._cond = threading.Condition()
        self.running = {}        # engine index -> job
        self._threads = []
        self._closed = False

    def start(self):
        for i, engine in enumerate(self.engines):
            t = threading.Thread(target=self._loop, args=(i, engine), daemon=True,
                                 name=f"worker-{i}")
            t.start()
            self._threads.append(t)
        return self

    def close(self):
        with self._cond:
            self._closed = True
            for job in self._jobs:
                job.cancelled = True
            self._cond.notify_all()
        for job in list(self.running.values()):
            job.interrupted = True

    def submit(self, job):
        with self._cond:
            self._jobs.append(job)
            self._cond.notify()
        return job

    def position(self, job):
        """How many jobs are ahead of a queued one (0: next), None once it runs."""
        with self._cond:
            for n, queued in enumerate(self._jobs):
                if queued is job:
                    return n
        return None

    def find(self, job_id):
        with self._cond:
            for job in list(self._jobs) + list(self.running.values()):
                if job.id == job_id:
                    return job
        return None

    def cancel(self, job):
        """Drop a queued job (its client went away); a running one stops at its next
        step."""
        with self._cond:
            job.cancelled = True
            if job in self._jobs:
                self._jobs.remove(job)
                job.state = "cancelled"
                job.error = Stopped("cancelled: the client went away")
                job.done.set()

    @property
    def queued(self):
        with self._cond:
            return list(self._jobs)

    def _loop(self, index, engine):
        while True:
            with self._cond:
                while not self._jobs and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job = self._jobs.popleft()
                self.running[index] = job
            job.state, job.started, job.worker = "running", time.time(), index
            try:
                job.result = job.work(engine, job)
                job.state = "done"
            except BaseException as e:   # reported to the waiting request, never lost
                job.error, job.state = e, "failed"
                if not _expected(e):
                    log.exception("job %s failed", job.id)
            finally:
                job.finished = time.time()
                with self._cond:
                    self.running.pop(index, None)
                job.done.set()


def _expected(e):
    from ldm.errors import LdmError
    return isinstance(e, (LdmError, Stopped))
