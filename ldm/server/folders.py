"""The files a server may load: checkpoints, autoencoders, LoRAs and embeddings found in its
models folders, and nothing else. Clients name them (A1111's titles, names or file names);
a name is looked up in what a scan found, never joined onto a path, so ``..``, an absolute
path or a link out of the folder cannot reach another file.

The layout follows A1111's: checkpoints anywhere under the models folder (``--ckpt-dir``),
autoencoders in ``VAE/``, LoRAs in ``Lora/``, embeddings in ``embeddings/``, each folder
settable on its own, ControlNets in ``ControlNet/`` (files or diffusers folders with a
``config.json``), and the previews' tiny autoencoders (TAESD's ``taesd_decoder.pth``,
``taesdxl_decoder.pth``) in ``VAE-approx/``. A diffusers folder (one with ``model_index.json``) is a checkpoint.
"""
import os
from dataclasses import dataclass, field
from pathlib import Path

from ldm.errors import UsageError

WEIGHTS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
# folders under the models folder that hold other things than checkpoints
NOT_CHECKPOINTS = {"lora", "lycoris", "vae", "vae-approx", "embeddings", "safety_checker",
                   "unet", "controlnet", "esrgan", "openvino"}


class NotFound(UsageError):
    """A name that is not among the server's files (a 404 where a route names it, else a
    422)."""


@dataclass
class Entry:
    """One file a client may choose: its path, the name clients use, A1111's title."""
    path: Path
    name: str             # the path under its folder, without the suffix ("sd/v1-5")
    filename: str         # the file's own name
    hash: str = None      # short SHA-256 (A1111's), once known
    sha256: str = None
    config: Path = None   # a config.yaml beside it

    @property
    def title(self):
        """A1111's title: "name.safetensors [hash]" (no hash before it is computed)."""
        rel = self.name + (self.path.suffix if self.path.is_file() else "")
        return f"{rel} [{self.hash}]" if self.hash else rel

    def matches(self, text):
        # "name [hash]" as A1111's ControlNet lists models: the name decides
        return text in (self.title, self.name, self.filename, self.title.split(" [")[0]) or (
            self.hash is not None and text == self.hash) or text.split(" [")[0] == self.name


@dataclass
class Folders:
    """The server's model folders and what a scan found in them (``refresh``)."""
    checkpoints: Path
    vae: Path
    lora: Path
    embeddings: Path
    vae_approx: Path = None
    controlnet: Path = None
    upscalers: tuple = ()   # ESRGAN/ and RealESRGAN/: pixel upscalers for the hires fix
    extra_checkpoints: list = field(default_factory=list)  # --ckpt given outside the folder
    found: dict = field(default_factory=dict)

    @classmethod
    def under(cls, models, ckpt_dir=None, vae_dir=None, lora_dir=None, embeddings_dir=None):
        models = Path(models)
        return cls(Path(ckpt_dir) if ckpt_dir else models,
                   Path(vae_dir) if vae_dir else models / "VAE",
                   Path(lora_dir) if lora_dir else models / "Lora",
                   Path(embeddings_dir) if embeddings_dir else models / "embeddings",
                   models / "VAE-approx", models / "ControlNet",
                   (models / "ESRGAN", models / "RealESRGAN"))

    def refresh(self):
        """Scan the folders again (A1111's refresh-checkpoints); hashes already computed
        are kept for files that did not change."""
        old = {e.path: e for kind in self.found.values() for e in kind}
        def keep(entry):
            prev = old.get(entry.path)
            if prev is not None and prev.hash and _stamp(prev.path) == getattr(prev, "_stamp", None):
                entry.hash, entry.sha256 = prev.hash, prev.sha256
                entry._stamp = prev._stamp
            return entry
        self.found = {
            "checkpoints": [keep(e) for e in self._checkpoints()],
            "vae": [keep(e) for e in _files(self.vae, WEIGHTS)],
            "lora": [keep(e) for e in _files(self.lora, (".safetensors", ".pt", ".ckpt",
                                                          ".bin"))],
            "embeddings": [keep(e) for e in _files(self.embeddings, WEIGHTS)],
            "vae_approx": [e for e in (_files(self.vae_approx, WEIGHTS) if self.vae_approx
                                       else []) if "decoder" in e.filename.lower()],
            "controlnet": [keep(e) for e in _controlnets(self.controlnet)],
            "upscalers": [keep(_upscaler_named(e)) for folder in self.upscalers
                          for e in _files(folder, (".pth", ".safetensors"))],
        }
        return self

    def _checkpoints(self):
        skip = {p.resolve() for p in (self.vae, self.lora, self.embeddings, self.vae_approx)
                if p is not None}
        entries = []
        root = self.checkpoints
        if root.is_dir():
            for folder, dirs, files in os.walk(root, followlinks=False):
                here = Path(folder)
                if "model_index.json" in files and here != root:   # a diffusers folder
                    entries.append(Entry(here, here.relative_to(root).as_posix(), here.name))
                    dirs[:] = []
                    continue
                dirs[:] = sorted(d for d in dirs if d.lower() not in NOT_CHECKPOINTS
                                 and (here / d).resolve() not in skip and not d.startswith("."))
                for f in sorted(files):
                    path = here / f
                    if path.suffix in CHECKPOINT_SUFFIXES and not path.is_symlink():
                        rel = path.relative_to(root).with_suffix("").as_posix()
                        config = path.with_name("config.yaml")
                        entries.append(Entry(path, rel, f, config=config if config.is_file()
                                             else None))
        for path in self.extra_checkpoints:
            path = Path(path)
            if not any(_same(e.path, path) for e in entries):
                entries.append(Entry(path, path.with_suffix("").name, path.name))
        return entries

    def lookup(self, kind, text, what):
        """The entry of ``kind`` that ``text`` names (title, name, file name or hash), else
        ``NotFound`` saying where to look."""
        if not isinstance(text, str) or not text.strip():
            raise UsageError(f"{what}: give a name from the list")
        for entry in self.found.get(kind, ()):
            if entry.matches(text):
                return entry
        route = {"checkpoints": "sdapi/v1/sd-models", "vae": "sdapi/v1/sd-vae",
                 "lora": "sdapi/v1/loras", "embeddings": "sdapi/v1/embeddings",
                 "controlnet": "controlnet/model_list",
                 "upscalers": "sdapi/v1/upscalers"}[kind]
        where = ("" if "/" not in text and "\\" not in text and ".." not in text else
                 " (only files in the server's models folders can be loaded, by name)")
        raise NotFound(f"{what}: no {kind[:-1] if kind.endswith('s') else kind} named "
                       f"{text!r}{where}; see /{route}")

    def entry_for(self, path):
        """The checkpoint entry of a loaded path (None if it is not listed)."""
        for entry in self.found.get("checkpoints", ()):
            if _same(entry.path, path):
                return entry
        return None


def hash_entry(entry):
    """Compute (once) an entry's A1111 short hash and full SHA-256."""
    if entry.hash is None:
        from ldm.checkpoint import file_hash
        entry.sha256 = file_hash(entry.path, 64)
        entry.hash = entry.sha256[:10]
        entry._stamp = _stamp(entry.path)
    return entry


def _files(folder, suffixes):
    folder = Path(folder)
    if not folder.is_dir():
        return []
    out = []
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in suffixes and path.is_file() and not path.is_symlink():
            out.append(Entry(path, path.relative_to(folder).with_suffix("").as_posix(),
                             path.name))
    return out


# A1111's names of the Real-ESRGAN files it knows (its realesrgan_model.py)
REALESRGAN_NAMES = {"RealESRGAN_x4plus": "R-ESRGAN 4x+",
                    "RealESRGAN_x4plus_anime_6B": "R-ESRGAN 4x+ Anime6B",
                    "RealESRGAN_x2plus": "R-ESRGAN 2x+",
                    "realesr-general-x4v3": "R-ESRGAN General 4xV3",
                    "realesr-general-wdn-x4v3": "R-ESRGAN General WDN 4xV3",
                    "realesr-animevideov3": "R-ESRGAN AnimeVideo"}


def _upscaler_named(entry):
    """An upscaler file under the name A1111 lists it by ("R-ESRGAN 4x+" for
    RealESRGAN_x4plus.pth, else the file's stem)."""
    entry.name = REALESRGAN_NAMES.get(entry.path.stem, entry.name)
    return entry


def _controlnets(folder):
    """The ControlNet files of a folder, and its diffusers ControlNet folders (a
    ``config.json`` beside the weights)."""
    if folder is None or not Path(folder).is_dir():
        return []
    files = [e for e in _files(folder, WEIGHTS) if e.path.with_name("config.json").is_file()
             is False]
    dirs = [Entry(p.parent, p.parent.relative_to(folder).as_posix(), p.parent.name)
            for p in sorted(Path(folder).rglob("config.json"))
            if p.parent != Path(folder) and not p.parent.is_symlink()]
    return files + dirs


def _stamp(path):
    try:
        st = Path(path).stat()
        return (st.st_size, st.st_mtime_ns)
    except OSError:
        return None


def _same(a, b):
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False
