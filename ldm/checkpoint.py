"""Reading checkpoints safely and loading them strictly into our models.

Checkpoints are untrusted input. ``.safetensors`` holds only tensors. A ``.ckpt``/``.bin``
is a pickle; we unpickle it with an allow-list: tensor and storage rebuilders, plain
containers and numpy scalars are allowed; classes of training-time libraries that Lightning
checkpoints reference (callbacks, OmegaConf configs, ...) become inert placeholders that are
never imported; anything else (``os.system``, ``builtins.eval``, ...) is refused.
"""
import hashlib
import logging
import pickle
import re
import zipfile
from pathlib import Path

import torch

from ldm import families, source
from ldm.errors import CheckpointError, InputError, UnsafeCheckpointError  # noqa: F401

log = logging.getLogger(__name__)


# (module, name) pairs a tensor checkpoint legitimately needs; all are data constructors.
_SAFE_GLOBALS = {
    ("collections", "OrderedDict"), ("collections", "defaultdict"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
    ("builtins", "complex"), ("builtins", "bytearray"), ("builtins", "object"),
    ("builtins", "dict"), ("builtins", "list"), ("builtins", "tuple"),
    ("builtins", "int"), ("builtins", "float"), ("builtins", "str"), ("builtins", "bool"),
    ("_codecs", "encode"),  # protocol-2 pickles encode bytes with it
    ("copyreg", "_reconstructor"),  # protocol-2 objects; its class arguments pass through here
    ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"), ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"), ("torch", "Size"), ("torch", "device"),
    ("torch", "dtype"), ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch.nn.parameter", "Parameter"),
    ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
}
_SAFE_PREFIXES = ("torch.", "numpy.dtypes.")
_SAFE_NAMES = re.compile(r"^(\w+Storage|float\d*|bfloat16|half|u?int\d+|bool|complex\d+)$")
# Training-time libraries whose objects Lightning and CompVis pickled beside the weights.
_INERT_MODULES = ("pytorch_lightning", "lightning", "lightning_fabric", "omegaconf",
                  "torchmetrics", "ldm", "main", "__main__", "sgm", "typing", "pathlib",
                  "argparse", "enum", "fractions", "decimal", "datetime", "numpy.random")


class _Inert:
    """Placeholder for a training-time object: swallows construction and state, runs nothing."""

    def __init__(self, *args, **kwargs):
        self._args = args

    def __setstate__(self, state):
        self._state = state

    def __call__(self, *args, **kwargs):
        return _Inert()

    def __setitem__(self, key, value):
        pass

    def append(self, item):
        pass

    def extend(self, items):
        pass


def _inert_class(module, name):
    return type(name, (_Inert,), {"__module__": f"inert.{module}"})


_PY2_NAMES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        module = _PY2_NAMES.get(module, module)
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and _SAFE_NAMES.match(name):
            return super().find_class(module, name)
        if module.split(".")[0] in _INERT_MODULES:
            return _inert_class(module, name)
        if module.startswith(_SAFE_PREFIXES) and name[:1].isupper() and "Storage" in name:
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"refusing to load: the checkpoint's pickle calls {module}.{name}, which could run "
            "code. Use a .safetensors file, or convert this one in a sandbox you trust.")


class _RestrictedPickleModule:
    """What ``torch.load(pickle_module=...)`` needs: an Unpickler and load()."""

    __name__ = "restricted_pickle"
    Unpickler = _RestrictedUnpickler

    @staticmethod
    def load(file, **kwargs):
        return _RestrictedUnpickler(file, **kwargs).load()


def _load_pickle(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False,
                          pickle_module=_RestrictedPickleModule, mmap=zipfile.is_zipfile(path))
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(f"{path}: {e}") from None
    except (pickle.UnpicklingError, EOFError, RuntimeError, zipfile.BadZipFile, OSError,
            AttributeError, ValueError, IndexError, KeyError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: it is truncated or not a "
                              f"PyTorch checkpoint ({type(e).__name__}: {str(e)[:120]}). "
                              "Download it again.") from None


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool}


def _load_safetensors(path):
    """Read a .safetensors file tensor by tensor with plain reads (format: 8-byte header
    length, JSON header, raw data). Unlike a memory map, the file's pages then never count
    as our memory, so casting while loading keeps the peak near the model's own size."""
    import json
    size = path.stat().st_size

    def bad(why):
        return CheckpointError(f"cannot read {path}: truncated or not a safetensors file "
                               f"({why}). Download it again.")
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad("no header")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, 100 << 20):
            raise bad("header length beyond the file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError):
            raise bad("header is not JSON") from None
        header.pop("__metadata__", None)
        base, out = 8 + n, {}
        for key, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
            begin, end = info["data_offsets"]
            if dtype is None:
                raise bad(f"unsupported dtype {info.get('dtype')} for {key}")
            if base + end > size:
                raise bad(f"{key} ends past the end of the file")
            shape = info["shape"]
            count = 1
            for d in shape:
                count *= d
            if (end - begin) != count * torch.empty((), dtype=dtype).element_size():
                raise bad(f"{key} has the wrong byte length")
            buf = bytearray(end - begin)
            f.seek(base + begin)
            if f.readinto(buf) != len(buf):
                raise bad(f"{key} is cut short")
            out[key] = (torch.frombuffer(buf, dtype=dtype) if buf else
                        torch.empty(0, dtype=dtype)).reshape(shape)
    return out


def load_state_dict_file(path):
    """A checkpoint file (``.safetensors``, ``.ckpt``, ``.pt``, ``.bin``) -> {key: tensor}.

    Lightning checkpoints keep the weights under ``state_dict`` (BasicSR's, as Real-ESRGAN's,
    under ``params_ema`` or ``params``); other entries (optimizer states, callbacks,
    hyper-parameters) are ignored.
    """
    path = Path(path)
    try:
        kind = source.sniff(path)  # missing, a folder, empty, a text file: said plainly
    except InputError as e:
        raise CheckpointError(str(e)) from None
    if kind == "diffusers":
        raise CheckpointError(f"{path} is a diffusers folder: give one of its weight files")
    if kind == "safetensors":
        sd = _load_safetensors(path)
    else:
        sd = _load_pickle(path)
    for wrapper in ("state_dict", "params_ema", "params"):   # Lightning's, BasicSR's
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
            break
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path} holds no state_dict (found {type(sd).__name__})")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def file_hash(path, chars=10):
    """Short SHA-256 of a checkpoint, as recorded in image metadata (cached beside nothing:
    hashing reads the file once; a 4 GB file takes a few seconds). A diffusers folder's
    hash is over its three weight files (``ldm.convert.folder_weights_hash``)."""
    if Path(path).is_dir():
        return folder_weights_hash(path)[:chars]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()[:chars]


def folder_weights_hash(folder):
    """A short hash of a diffusers folder's weight files (as one checkpoint's hash): those of
    ``source.WEIGHT_FILES`` it has (SD 1/2: three; SDXL's second text encoder too; SD 3's
    transformer and three text encoders)."""
    h = hashlib.sha256()
    for c in source.WEIGHT_FILES:
        if not (Path(folder) / c).is_dir():
            continue
        for path in source.component_files(folder, c):
            h.update(file_hash(path, 64).encode())
    return h.hexdigest()[:10]


def checkpoint_shapes(path):
    """{key: shape} of a single-file checkpoint: a safetensors file's from its header alone,
    a pickle's by loading it through the restricted unpickler (memory-mapped when it is a
    zip, as torch saves them). CheckpointError when it cannot be read."""
    shapes = source.header_shapes(path)
    if shapes is not None:
        return shapes
    return {k: tuple(v.shape) for k, v in load_state_dict_file(path).items()}


# ---------------------------------------------------------------------------------------
# Strict loading into LatentDiffusion

# What real checkpoints carry besides our model's weights; dropped before the strict load.
IGNORED_KEYS = re.compile(
    r"^(model_ema\.|cond_ema\.|first_stage_model\.loss\.|logvar$|lvlb_weights$|"
    r"low_scale_model\.|"   # the x4 upscaler's noise schedule: derived from the config
    r"model_ema_decay|scale_factor$|scale_set$|"
    r"cond_stage_model\.transformer\.(text_model\.)?embeddings\.position_ids$)")


def normalize_keys(sd):
    """Accept the CLIP text encoder saved by any transformers version: 4.x nests it under
    ``text_model.``, 5.x and some old exports do not."""
    prefix, nested = "cond_stage_model.transformer.", "cond_stage_model.transformer.text_model."
    out = {}
    for k, v in sd.items():
        if k.startswith(prefix) and not k.startswith(nested):
            k = nested + k[len(prefix):]
        out[k] = v
    return out


def not_a_model(sd, name):
    """One line for a file that holds an add-on rather than a model (a LoRA, a
    textual-inversion embedding, an autoencoder alone), saying which flag takes it; None
    for anything else."""
    what = families.addon(list(sd))
    return f"{name} is {what} (and a model with --ckpt)" if what else None


def guess_architecture(sd):
    """A phrase naming what a checkpoint that does not fit its config is (its family and
    variant, or what ``ldm.families.describe`` recognises), or None."""
    shapes = families.shapes_of(sd)
    found = families.detect(shapes)
    return found.phrase if found is not None else families.describe(shapes)


def _preview(keys, n=3):
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def mismatch_report(model, sd):
    """None when ``sd`` fits ``model`` exactly, else a short report."""
    own = model.state_dict()
    missing = own.keys() - sd.keys()
    unexpected = sd.keys() - own.keys()
    shapes = [k for k in own.keys() & sd.keys() if own[k].shape != sd[k].shape]
    if not (missing or unexpected or shapes):
        return None
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({_preview(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({_preview(unexpected)})")
    if shapes:
        k = sorted(shapes)[0]
        parts.append(f"{len(shapes)} of another shape (e.g. {k}: checkpoint "
                     f"{tuple(sd[k].shape)}, config {tuple(own[k].shape)})")
    hint = guess_architecture(sd)
    return "; ".join(parts) + (f". This looks like {hint}." if hint else "")


def check_schedule(model, sd):
    """Warn when a checkpoint's stored noise schedule differs from the config's."""
    stored = sd.get("alphas_cumprod")
    if stored is not None and stored.shape == model.alphas_cumprod.shape:
        if not torch.allclose(stored.float(), model.alphas_cumprod.cpu(), rtol=1e-3, atol=1e-5):
            log.warning("the checkpoint's noise schedule differs from the config's; "
                        "using the config's (check --config)")


def load_model_weights(model, sd, source="checkpoint", dtype=torch.float32, keep_float32=()):
    """Load an official-layout state_dict into ``model`` strictly (after IGNORED_KEYS and
    the schedule buffers are set aside); raise CheckpointError with a report otherwise.

    A model built on the ``meta`` device takes the checkpoint's tensors (cast to ``dtype``,
    except the keys in ``keep_float32``, cast to float32) without first allocating random
    weights. ``sd`` is consumed (emptied)."""
    from ldm.models.diffusion.ddpm import SCHEDULE_BUFFERS
    what = not_a_model(sd, source)
    if what:
        raise CheckpointError(what)
    source_dict, sd = sd, dict(normalize_keys(sd))
    source_dict.clear()  # consume the caller's dict, so tensors can be freed one by one below
    check_schedule(model, sd)
    sd = {k: v for k, v in sd.items() if k not in SCHEDULE_BUFFERS and not IGNORED_KEYS.match(k)}
    report = mismatch_report(model, sd)
    if report:
        raise CheckpointError(f"{source} does not match the config: {report}")
    if _is_meta(model):
        # cast one tensor at a time, dropping the source as we go: peak memory stays near
        # the model's size instead of source + model (6.3 -> ~4.3 GiB for SD v1 from fp16)
        cast = {}
        for k in list(sd):
            v = sd.pop(k)
            to = torch.float32 if k in keep_float32 else dtype
            cast[k] = v.to(to) if v.is_floating_point() else v
            del v
        model.load_state_dict(cast, strict=True, assign=True)
    else:
        model.load_state_dict(sd, strict=True)
    return model


def _is_meta(model):
    return any(p.is_meta for p in model.parameters())
