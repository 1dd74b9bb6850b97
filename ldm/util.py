"""Config plumbing shared by the library and scripts (CompVis' ``instantiate_from_config``)."""
import importlib
import signal
import threading
from contextlib import contextmanager


def get_obj_from_str(string):
    """``"pkg.module.Name"`` -> the object ``Name`` of ``pkg.module``."""
    module, name = string.rsplit(".", 1)
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


@contextmanager
def interrupts_deferred():
    """Ctrl-C (SIGINT) or SIGTERM during the block waits until the block is done, then acts
    as it would have: a file being written is finished (or removed) before the interrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: caught.append((signum, frame)))
                for s in signals}
    try:
        yield
    finally:
        for s in signals:
            signal.signal(s, previous[s])
        if caught and callable(previous[caught[0][0]]):
            previous[caught[0][0]](*caught[0])
