"""What a ``--ckpt`` path is, found from the file itself before any weights are read.

``sniff`` says what kind of source a path is (a safetensors file, a pickle, a diffusers
pipeline folder) or, in one line, why it is none (missing, empty, a Git LFS pointer, a web
page); ``header_shapes`` reads a safetensors file's {key: shape} from its header alone;
``folder_configs`` a diffusers folder's JSON files. What family a source belongs to is
``ldm.families``' business, and reading the tensors ``ldm.checkpoint``'s.

Imports neither torch nor any other ``ldm`` module but ``ldm.errors``.
"""
import json
from pathlib import Path

from ldm.errors import CheckpointError, InputError, ModelNotFound

CHECKPOINT_SUFFIXES = (".ckpt", ".safetensors", ".pt", ".pth", ".bin")
MAX_HEADER = 100 << 20   # a safetensors header longer than this is not one
# a diffusers pipeline's weight files per component: (safetensors stem, .bin stem)
WEIGHT_FILES = {
    "unet": ("diffusion_pytorch_model", "diffusion_pytorch_model"),
    "vae": ("diffusion_pytorch_model", "diffusion_pytorch_model"),
    "text_encoder": ("model", "pytorch_model"),
    "text_encoder_2": ("model", "pytorch_model"),   # SDXL's OpenCLIP bigG
    "text_encoder_3": ("model", "pytorch_model"),   # SD 3's T5-XXL
    "transformer": ("diffusion_pytorch_model", "diffusion_pytorch_model"),   # SD 3's MMDiT
}


def sniff(path):
    """"safetensors", "pickle" or "diffusers" for a checkpoint ``path``; an InputError (or
    ModelNotFound) in one line when it is clearly no checkpoint: missing, a folder other
    than a diffusers pipeline folder, empty, a Git LFS pointer, a web page or other text."""
    path = Path(path)
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return "diffusers"
        if (path / "unet").is_dir():
            raise InputError(
                f"{path} looks like a diffusers folder without its model_index.json: give "
                f"the whole pipeline folder (model_index.json, unet/, vae/, text_encoder/), "
                f"or a single-file checkpoint (.ckpt/.safetensors)")
        inside = sorted(p.name for p in path.iterdir() if p.suffix in CHECKPOINT_SUFFIXES)
        raise InputError(f"--ckpt {path} is a folder: give the checkpoint file itself"
                         + (f" (it holds {', '.join(inside[:3])})" if inside else ""))
    if not path.is_file():
        raise ModelNotFound(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(1024)
    if not head:
        raise InputError(f"checkpoint {path} is empty (0 bytes): download it again")
    if head.startswith(b"version https://git-lfs"):
        raise InputError(f"{path} is a Git LFS pointer, not the weights: run `git lfs pull` "
                         f"where it was cloned, or download the file itself")
    if _looks_like_text(head):
        what = ("a web page (HTML)" if head.lstrip()[:1] == b"<" else "a text file")
        raise InputError(f"{path} is not a checkpoint: it is {what}; give a .ckpt or "
                         f".safetensors file (a failed download saves an error page)")
    if path.suffix == ".safetensors" or is_safetensors_head(head):
        return "safetensors"
    return "pickle"


def is_safetensors_head(head):
    """Whether a file's first bytes are a safetensors header length (not a zip, as torch's
    pickles are, nor a bare pickle's protocol byte)."""
    return len(head) >= 8 and head[:2] != b"PK" and head[:1] != b"\x80"


def safetensors_header(path):
    """A safetensors file's JSON header ({key: {dtype, shape, data_offsets}}, with
    ``__metadata__``), or None when the file is not one (the loader then says why)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if not is_safetensors_head(head):
                return None
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER:
                return None
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return header if isinstance(header, dict) else None


def header_shapes(path):
    """{key: shape} of a safetensors file from its header alone, or None."""
    header = safetensors_header(path)
    if header is None:
        return None
    try:
        return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    except (KeyError, TypeError):
        return None


def metadata(path):
    """The ``__metadata__`` strings of a .safetensors file ({} when none or not one)."""
    meta = (safetensors_header(path) or {}).get("__metadata__") or {}
    return {k: v for k, v in meta.items() if isinstance(v, str)} if isinstance(meta, dict) else {}


# -- diffusers folders -----------------------------------------------------------------
def is_diffusers_folder(path):
    return Path(path).is_dir() and (Path(path) / "model_index.json").is_file()


def read_json(path):
    try:
        return json.loads(Path(path).read_text("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the diffusers folder is incomplete") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"cannot read {path} ({type(e).__name__}): the diffusers "
                              "folder is damaged") from None


def folder_configs(folder):
    """(model_index, unet config, scheduler config) of a diffusers pipeline folder, as dicts
    (the scheduler's {} when it has none; SD 3's transformer config in the UNet's place)."""
    folder = Path(folder)
    index = read_json(folder / "model_index.json")
    # the denoiser's config: the UNet's, or SD 3's transformer's
    unet = (read_json(folder / "unet" / "config.json") if (folder / "unet").is_dir() else
            read_json(folder / "transformer" / "config.json")
            if (folder / "transformer").is_dir() else {})
    scheduler = folder / "scheduler" / "scheduler_config.json"
    return index, unet, read_json(scheduler) if scheduler.is_file() else {}


def component_files(folder, component):
    """The weights files of one component folder: safetensors before .bin, full precision
    before the ``.fp16`` variant (either is read; the pipeline casts); a sharded component
    (``*.index.json``) gives its shards."""
    sub = Path(folder) / component
    stems = WEIGHT_FILES.get(component, ("diffusion_pytorch_model", "diffusion_pytorch_model"))
    for stem, ext in ((stems[0], "safetensors"), (stems[0], "fp16.safetensors"),
                      (stems[1], "bin"), (stems[1], "fp16.bin")):
        path = sub / f"{stem}.{ext}"
        if path.is_file():
            return [path]
        index = sub / f"{stem}.{ext}.index.json"
        if index.is_file():
            shards = sorted(set((read_json(index).get("weight_map") or {}).values()))
            missing = [name for name in shards if not (sub / name).is_file()]
            if not shards or missing:
                raise CheckpointError(f"{index}: " + (f"shard {missing[0]} is missing"
                                                      if missing else "names no shards")
                                      + "; the diffusers folder is incomplete")
            return [sub / name for name in shards]
    raise CheckpointError(f"{sub}: no weights file ({stems[0]}.safetensors or "
                          f"{stems[1]}.bin); the diffusers folder is incomplete")


def _looks_like_text(head):
    if b"\x00" in head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return sum(c.isprintable() or c in "\r\n\t" for c in text) >= 0.95 * len(text)
