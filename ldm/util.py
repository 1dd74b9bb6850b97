"""Config plumbing shared by the library and scripts (CompVis' ``instantiate_from_config``)."""
import importlib
import os
import select
import signal
import sys
import threading
import time
from contextlib import contextmanager


# Stability's generative-models (``sgm``) targets, as its SDXL configs name them, and the
# classes here that build the same modules (the same keys) for inference.
SGM_TARGETS = {
    "sgm.models.diffusion.DiffusionEngine": "ldm.models.diffusion.engine.DiffusionEngine",
    "sgm.modules.diffusionmodules.openaimodel.UNetModel":
        "ldm.modules.diffusionmodules.openaimodel.UNetModel",
    "sgm.modules.GeneralConditioner": "ldm.modules.encoders.conditioner.GeneralConditioner",
    "sgm.modules.encoders.modules.GeneralConditioner":
        "ldm.modules.encoders.conditioner.GeneralConditioner",
    "sgm.modules.encoders.modules.FrozenCLIPEmbedder":
        "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
    "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2":
        "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder2",
    "sgm.modules.encoders.modules.ConcatTimestepEmbedderND":
        "ldm.modules.encoders.conditioner.ConcatTimestepEmbedderND",
    "sgm.models.autoencoder.AutoencoderKL": "ldm.models.autoencoder.AutoencoderKL",
    "sgm.models.autoencoder.AutoencoderKLInferenceWrapper":
        "ldm.models.autoencoder.AutoencoderKL",
    # lllyasviel's ControlNet (configs/controlnet/cldm_v15.yaml, cldm_v21.yaml)
    "cldm.cldm.ControlNet": "ldm.modules.diffusionmodules.controlnet.ControlNet",
    "cldm.cldm.ControlledUnetModel": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
}


def resolve_target(string):
    """A config's ``target`` as the class path to import: an ``sgm.`` (or ControlNet's
    ``cldm.``) target through ``SGM_TARGETS`` (unknown ones unchanged, so the import names
    them)."""
    return SGM_TARGETS.get(str(string), str(string))


def get_obj_from_str(string):
    """``"pkg.module.Name"`` -> the object ``Name`` of ``pkg.module`` (``sgm.`` targets:
    ours, ``resolve_target``)."""
    module, name = resolve_target(string).rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def instantiate_from_config(config, **extra):
    """Build ``config.target(**config.params, **extra)``, the CompVis config schema."""
    if "target" not in config:
        if config in ("__is_first_stage__", "__is_unconditional__"):
            return None
        raise KeyError(f"config has no 'target' key: {config}")
    params = dict(config.get("params", None) or {})
    return get_obj_from_str(config["target"])(**params, **extra)


def count_params(model):
    return sum(p.numel() for p in model.parameters())


# Held while a file is written (``interrupts_deferred``): a forced stop waits for it, so no
# file is left half-written and no finished one unrecorded.
WRITING = threading.RLock()


@contextmanager
def interrupts_deferred():
    """Ctrl-C (SIGINT) or SIGTERM during the block waits until the block is done, then acts
    as it would have: a file being written is finished (or removed) before the interrupt.
    A forced stop (``InterruptWatchdog``) waits for the block too."""
    if threading.current_thread() is not threading.main_thread():
        with WRITING:
            yield
        return
    caught = []
    signals = (signal.SIGINT, signal.SIGTERM)
    with WRITING:
        previous = {s: signal.signal(s, lambda signum, frame: caught.append((signum, frame)))
                    for s in signals}
        try:
            yield
        finally:
            for s in signals:
                signal.signal(s, previous[s])
    if caught and callable(previous[caught[0][0]]):
        previous[caught[0][0]](*caught[0])


class InterruptWatchdog:
    """Ctrl-C and SIGTERM that end the process within seconds, whatever it is running.

    Python runs a signal's handler only between bytecodes of the main thread, so one long
    call into C++ (an attention over a huge image, a big convolution) would hold an
    interrupt for as long as it runs. CPython's own C-level handler writes each signal's
    number to a wakeup fd (``signal.set_wakeup_fd``) the moment it arrives; a thread
    watching that fd sees it too. When the main thread has not taken an interrupt
    (``handled()``) within ``grace`` seconds, or a second one comes, the watchdog waits for
    any file being written (``WRITING``), says ``line(signum)`` on stderr and ends the
    process with ``status(signum)``: finished files are whole and kept, none is partial."""

    def __init__(self, line, status, grace=2.0):
        self.line, self.status, self.grace = line, status, grace
        self._handled = threading.Event()
        self._read = self._write = None
        self._previous_fd = -1

    def start(self):
        if threading.current_thread() is not threading.main_thread():
            return self
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._previous_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, name="interrupt-watchdog", daemon=True).start()
        return self

    def handled(self):
        """The main thread took the interrupt: it ends the run itself."""
        self._handled.set()

    def stop(self):
        if self._write is None:
            return
        signal.set_wakeup_fd(self._previous_fd)
        os.close(self._write)  # the watching thread reads EOF, closes its end and returns
        self._write = None

    def _watch(self):
        stops = (signal.SIGINT, signal.SIGTERM)
        pending = None  # (signal, when) of an interrupt the main thread has not taken
        try:
            while True:
                timeout = (None if pending is None else
                           max(0.0, pending[1] + self.grace - time.monotonic()))
                ready, _, _ = select.select([self._read], [], [], timeout)
                if not ready:  # the grace is over
                    if not self._handled.is_set():
                        self._force(pending[0])
                    pending = None
                    continue
                data = os.read(self._read, 64)
                if not data:
                    return
                arrived = [s for s in data if s in stops]
                if not arrived or self._handled.is_set():
                    continue
                if pending is not None or len(arrived) > 1:  # a second one: at once
                    self._force(pending[0] if pending else arrived[0])
                pending = (arrived[0], time.monotonic())
        finally:
            os.close(self._read)

    def _force(self, signum):
        with WRITING:  # a file being written is finished first
            if self._handled.is_set():
                return
            try:
                sys.stdout.flush()
                print(self.line(signum), file=sys.stderr, flush=True)
            finally:
                os._exit(self.status(signum))
