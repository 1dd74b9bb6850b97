"""The OpenVINO backend: the model's heavy networks run as OpenVINO models on the CPU,
converted from our own torch modules, with everything around them (samplers, guidance,
LoRA merging, embeddings, prompt weighting, the seed contract) unchanged.

Which modules: the UNet (``model.model.diffusion_model``), the autoencoder's encoder and
decoder, and each text encoder's transformer blocks (the module an encoder names as its
``blocks``: the token lookup stays in torch, so textual-inversion embeddings that grow the
table never need a new conversion). For any family: it is the same four kinds of module.

How: each module's call is replaced (``nn.Module._compiled_call_impl``, the hook
``torch.compile`` uses) by a ``Network``. On its first call it converts the module with
``openvino.convert_model`` (of our module traced by TorchScript, weights as constants, the
tensors' sizes left symbolic) and saves the IR under the cache folder, keyed by the
weights' fingerprint, the non-tensor arguments (e.g. clip skip) and the OpenVINO version;
each new input shape (batch, height, width) then only compiles that IR with static shapes
for the CPU (latency hint, torch's thread count; seconds). The next process reads the IR
instead of converting; a LoRA, another VAE or other weights give another fingerprint, so
another conversion.

Why ``convert_model`` rather than ``torch.compile(backend="openvino")``: the IR it makes
can be saved and read by the next process in seconds, where the compile path traces again
in every process (the step time of the two was not compared; both hand OpenVINO one graph).

Precision: the IR holds float32 weights; ``bf16`` is OpenVINO's inference-precision hint
(its kernels compute in bfloat16 where the CPU has it), as optimum-intel does. Inputs and
outputs cross as float32.
"""
import hashlib
import logging
import os
import shutil
import time
import warnings
from contextlib import redirect_stdout, redirect_stderr
from io import StringIO
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CACHE_VERSION = 1   # bump when what a conversion holds changes
NAMES = {"unet": "UNet", "vae_decoder": "autoencoder's decoder",
         "vae_encoder": "autoencoder's encoder", "text": "text encoder"}


def cache_root():
    """Where converted models live: $LDM_OPENVINO_CACHE, else ~/.cache/ldm/openvino (or
    under $XDG_CACHE_HOME)."""
    given = os.environ.get("LDM_OPENVINO_CACHE")
    if given:
        return Path(given)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ldm" / "openvino"


def fingerprint(module):
    """A digest of ``module``'s weights that changes when any of them does: every tensor's
    name, shape and dtype and 64 of its values spread over it. A merged LoRA changes whole
    weights (a low-rank update is dense), a fine-tune all of them, so a sample suffices."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // 64)
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(flat[::step][:64].float().cpu().numpy().tobytes())
    return h.hexdigest()


def networks(model):
    """{name: module} of a ``LatentDiffusion``'s networks that run on OpenVINO."""
    found = {"unet": model.model.diffusion_model,
             "vae_encoder": model.first_stage_model.encoder,
             "vae_decoder": model.first_stage_model.decoder}
    encoders = [m for m in model.cond_stage_model.modules()
                if isinstance(getattr(type(m), "blocks", None), property)]
    for i, encoder in enumerate(encoders):
        found["text" if i == 0 else f"text{i + 1}"] = encoder.blocks
    return found


class _Slot:
    """Where the i-th tensor argument goes in a call's arguments."""

    def __init__(self, i):
        self.i = i

    def __repr__(self):
        return f"<tensor {self.i}>"


def _split(args, kwargs):
    """(args and kwargs with tensors replaced by slots, the tensors, a hashable key of the
    rest): what varies per call and what a conversion fixes."""
    tensors = []

    def slot(v):
        if isinstance(v, torch.Tensor):
            tensors.append(v)
            return _Slot(len(tensors) - 1)
        return v
    targs = tuple(slot(a) for a in args)
    tkwargs = {k: slot(v) for k, v in sorted(kwargs.items())}
    static = repr((tuple(a for a in targs if not isinstance(a, _Slot)),
                   tuple((k, v) for k, v in tkwargs.items() if not isinstance(v, _Slot)),
                   tuple(i for i, a in enumerate(targs) if isinstance(a, _Slot)),
                   tuple(k for k, v in tkwargs.items() if isinstance(v, _Slot))))
    return targs, tkwargs, tensors, static


def _fill(targs, tkwargs, tensors):
    def put(v):
        return tensors[v.i] if isinstance(v, _Slot) else v
    return tuple(put(a) for a in targs), {k: put(v) for k, v in tkwargs.items()}


class _Bound(torch.nn.Module):
    """``module.forward`` with the non-tensor arguments of one signature fixed and the
    tensors positional: what is traced."""

    def __init__(self, module, targs, tkwargs):
        super().__init__()
        self.inner = module
        self.targs, self.tkwargs = targs, tkwargs

    def forward(self, *tensors):
        args, kwargs = _fill(self.targs, self.tkwargs, tensors)
        return self.inner.forward(*args, **kwargs)


class Network:
    """One module run by OpenVINO: its IR per set of fixed arguments (converted once, for
    any shape: the traced graph keeps the tensors' sizes symbolic), compiled for each
    shape it is called with (the last ``KEEP`` kept)."""

    KEEP = 2

    def __init__(self, backend, name, module):
        self.backend, self.name, self.module = backend, name, module
        self.models = {}        # fixed arguments -> ov.Model (the IR, read from the cache)
        self.compiled = {}      # (shapes, fixed arguments) -> infer request
        self._fingerprint = None

    def reset(self):
        """Forget the converted and compiled models (the weights changed: LoRA, VAE)."""
        self.models.clear()
        self.compiled.clear()
        self._fingerprint = None

    @property
    def fingerprint(self):
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.module)
        return self._fingerprint

    def __call__(self, *args, **kwargs):
        targs, tkwargs, tensors, static = _split(args, kwargs)
        shapes = tuple(tuple(t.shape) for t in tensors)
        request = self.compiled.get((shapes, static))
        if request is None:
            model = self.models.get(static)
            if model is None:
                model = self.models[static] = self.backend.ir(self, static, targs, tkwargs,
                                                              tensors)
            while len(self.compiled) >= self.KEEP:
                self.compiled.pop(next(iter(self.compiled)))
            request = self.compiled[shapes, static] = self.backend.compile(model, shapes)
        inputs = [t.detach().to("cpu", torch.float32).contiguous().numpy() for t in tensors]
        request.infer(inputs)
        out = torch.from_numpy(request.get_output_tensor(0).data.copy())
        like = tensors[0]
        return out.to(like.device, like.dtype if like.is_floating_point() else torch.float32)


class OpenVINOBackend:
    """The networks of ``model`` run by OpenVINO on the CPU, at ``precision`` ("f32" or
    "bf16": OpenVINO's inference-precision hint)."""

    def __init__(self, model, precision="f32", cache=None):
        import openvino as ov
        self.ov = ov
        self.model = model
        self.precision = precision
        self.cache = Path(cache) if cache else cache_root()
        self.core = ov.Core()
        self.core.set_property({"CACHE_DIR": str(self.cache / "compiled")})
        self.networks = {name: Network(self, name, module)
                         for name, module in networks(model).items()}
        self.attached = False

    def attach(self):
        for network in self.networks.values():
            network.module._compiled_call_impl = network
        self.attached = True

    def detach(self):
        for network in self.networks.values():
            network.module._compiled_call_impl = None
        self.attached = False

    def reset(self, *names):
        """Forget the models of the networks ``names`` start (all when none): their weights
        changed."""
        for name, network in self.networks.items():
            if not names or any(name.startswith(n) for n in names):
                network.reset()

    def config(self):
        return {"INFERENCE_PRECISION_HINT": self.precision, "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_NUM_THREADS": torch.get_num_threads()}

    def folder(self, network, static):
        key = repr((CACHE_VERSION, self.ov.__version__, network.name, network.fingerprint,
                    static))
        return self.cache / f"{network.name}-{hashlib.sha256(key.encode()).hexdigest()[:24]}"

    def ir(self, network, static, targs, tkwargs, tensors):
        """The network's IR for these fixed arguments: from the cache, or converted now
        (one line before, one after, with the time it took)."""
        folder = self.folder(network, static)
        if not (folder / "model.xml").is_file():
            self.convert(network, targs, tkwargs, tensors, folder)
        return self.core.read_model(folder / "model.xml")

    def compile(self, model, shapes):
        """An infer request of ``model`` compiled for these input shapes."""
        model = model.clone()
        model.reshape({i: self.ov.PartialShape(list(s)) for i, s in enumerate(shapes)})
        return self.core.compile_model(model, "CPU", self.config()).create_infer_request()

    def convert(self, network, targs, tkwargs, tensors, folder):
        log.warning("converting the %s to OpenVINO (once for these weights; cached in %s)",
                    NAMES.get(network.name.rstrip("0123456789"), network.name), self.cache)
        start = time.perf_counter()
        module = network.module
        tensors_of = dict(module.named_parameters())
        tensors_of.update(module.named_buffers())
        dtypes = {name: t.dtype for name, t in tensors_of.items()}
        if any(t.is_floating_point() and t.dtype != torch.float32 for t in tensors_of.values()):
            module.float()   # the IR holds float32 weights (bf16 is a hint)
        try:
            with torch.no_grad(), torch.autocast("cpu", enabled=False), _unhooked(module), \
                    warnings.catch_warnings(), _quiet():
                warnings.simplefilter("ignore")   # the tracer's notes are not the user's
                example = tuple(t.detach().to("cpu", torch.float32) for t in tensors)
                # traced here without the trace check (a second run of the module that
                # only warns about float rounding): a third less time than convert_model
                # tracing the module itself, and the same graph
                traced = torch.jit.trace(_Bound(module, targs, tkwargs), example,
                                         check_trace=False)
                ov_model = self.ov.convert_model(traced, example_input=example)
                del traced
            folder.parent.mkdir(parents=True, exist_ok=True)
            partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
            shutil.rmtree(partial, ignore_errors=True)
            self.ov.save_model(ov_model, partial / "model.xml", compress_to_fp16=False)
            del ov_model
            try:
                partial.rename(folder)   # whole or not at all, even if interrupted
            except OSError:
                shutil.rmtree(partial, ignore_errors=True)   # another process was first
        finally:
            now = dict(module.named_parameters())
            now.update(module.named_buffers())
            for name, t in now.items():
                if t.dtype != dtypes[name]:
                    t.data = t.data.to(dtypes[name])
        log.warning("converted in %.0f s", time.perf_counter() - start)


class _unhooked:
    """The module's own forward while it is traced (not the OpenVINO call replacing it)."""

    def __init__(self, module):
        self.module = module

    def __enter__(self):
        self.saved = self.module._compiled_call_impl
        self.module._compiled_call_impl = None

    def __exit__(self, *exc):
        self.module._compiled_call_impl = self.saved


class _quiet:
    """What the tracer prints while a module converts (its trace check's "Tensor-likes are
    not close!" for float rounding) goes to the debug log, not the user's terminal. The
    redirect is the process's, so anything another thread prints meanwhile is logged the
    same way (at debug level), not lost; logging handlers and progress bars hold their
    own streams and are not affected."""

    def __enter__(self):
        self.buffer = StringIO()
        self.out, self.err = redirect_stdout(self.buffer), redirect_stderr(self.buffer)
        self.out.__enter__()
        self.err.__enter__()

    def __exit__(self, *exc):
        self.err.__exit__(*exc)
        self.out.__exit__(*exc)
        text = self.buffer.getvalue().strip()
        if text:
            log.debug("printed while converting:\n%s", text)
