"""Prompt files as jobs: the JSONL form of ``--from-file``, read and checked before any load.

A ``.jsonl`` file (or any prompt file whose first line starts with ``{``) holds one JSON
object a line:

    {"prompt": "a lighthouse", "negative_prompt": "fog", "seed": 7, "steps": 20,
     "scale": 6.5, "sampler": "DPM++ 2M Karras", "H": 512, "W": 768, "n": 4}

Only ``prompt`` is required; a key left out takes the command line's value. ``n`` is how
many images the line makes (default 1). Images are numbered k = 0, 1, ... in line order,
``n`` per line, so an image's index depends on the prompt file alone; image k has seed
``--seed + k``, or ``seed + j`` for the j-th image of a line that gives its own ``seed``.
Every line is checked (JSON, known keys, types, ranges) before the model loads; a bad one is
one error naming its line.
"""
import json
import math
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from ldm.errors import InputError
from ldm.request import LIMITS, SEED_MAX

# how a line's keys are named in messages about the request they make
NAMES = {"negative_prompts": "negative_prompt", "eta": "eta"}


def _in(key, kind):
    """(type check, description) of a request's numeric field (``ldm.request.LIMITS``)."""
    lim = LIMITS[key]
    def ok(v):
        return ((_is_int(v) if kind == "an integer" else _is_number(v))
                and lim.lo <= v <= lim.hi)
    return (ok, f"{kind} in [{lim.lo}, {lim.hi}]")


# key: (type check, description)
KEYS = {
    "prompt": (lambda v: isinstance(v, str), "a string"),
    "negative_prompt": (lambda v: isinstance(v, str), "a string"),
    "seed": (lambda v: _is_int(v) and 0 <= v <= SEED_MAX, "an integer in [0, 2**64 - 1]"),
    "steps": _in("steps", "an integer"),
    "scale": _in("scale", "a number"),
    "sampler": (lambda v: isinstance(v, str) and v.strip() != "", "a sampler name"),
    "H": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "W": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "n": (lambda v: _is_int(v) and 1 <= v <= 100_000, "an integer in [1, 100000]"),
}


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))


@dataclass
class Request:
    """One line of a JSONL prompt file: what it asks for, None where it takes the flags'."""
    line: int
    prompt: str
    negative_prompt: str = None
    seed: int = None
    steps: int = None
    scale: float = None
    sampler: str = None
    H: int = None
    W: int = None
    n: int = 1


def is_jsonl(path, text):
    if Path(path).suffix.lower() == ".jsonl":
        return True
    first = next((line for line in text.splitlines() if line.strip()), "")
    return first.lstrip().startswith("{")


def parse_jsonl(text, path):
    """[Request] of a JSONL prompt file's text; InputError naming the first bad line."""
    requests = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise InputError(f"{where} is not JSON ({e.msg} at column {e.colno}): one "
                             "object a line, e.g. {\"prompt\": \"a red circle\"}") from None
        if not isinstance(obj, dict):
            raise InputError(f"{where} is a JSON {type(obj).__name__}, not an object with "
                             "a \"prompt\"")
        unknown = sorted(set(obj) - set(KEYS))
        if unknown:
            raise InputError(f"{where}: unknown key {unknown[0]!r} (known: "
                             f"{', '.join(KEYS)})")
        if "prompt" not in obj:
            raise InputError(f"{where} has no \"prompt\"")
        for key, value in obj.items():
            ok, what = KEYS[key]
            if not ok(value):
                raise InputError(f"{where}: {key} must be {what}, got {json.dumps(value)}")
        if not obj["prompt"].strip():
            raise InputError(f"{where}: the prompt is empty")
        requests.append(Request(line=number, **obj))
    if not requests:
        raise InputError(f"prompt file {path} has no prompts (one JSON object a line)")
    return requests


@dataclass
class Image:
    """Image k of a job: its request, its place j among the line's images, its seed."""
    k: int
    request: Request
    j: int
    seed: int


def plan(requests, seed):
    """The job's images in order (k = 0, 1, ...), with their seeds."""
    images, k = [], 0
    for r in requests:
        for j in range(r.n):
            s = (r.seed + j) if r.seed is not None else seed + k
            if s > SEED_MAX:
                raise InputError(f"prompt file line {r.line}: image {j} would have seed {s}, "
                                 "beyond 2**64 - 1")
            images.append(Image(k, r, j, s))
            k += 1
    return images


def settings(request, args):
    """(negative prompt, sampler name, steps, scale, H, W) of a request, the flags filling in."""
    return (request.negative_prompt if request.negative_prompt is not None else args.negative_prompt,
            request.sampler, request.steps if request.steps is not None else args.ddim_steps,
            request.scale if request.scale is not None else args.scale,
            request.H if request.H is not None else args.H,
            request.W if request.W is not None else args.W)


def batches(images, args, batch_size):
    """[(prompts, seeds, request)]: consecutive images of the same ``settings``, at most
    ``batch_size`` a batch; ``request`` is the batch's first image's (its settings are the
    batch's)."""
    out, keys = [], []
    for image in images:
        key = settings(image.request, args)
        if out and keys[-1] == key and len(out[-1][0]) < batch_size:
            out[-1][0].append(image.request.prompt)
            out[-1][1].append(image.seed)
        else:
            out.append(([image.request.prompt], [image.seed], image.request))
            keys.append(key)
    return out


# ---------------------------------------------------------------------------------------
# resumable jobs: file names from k, a manifest of finished images, shards

GRID_LIMIT = 64  # a job of more images writes no grid
WAIT = timedelta(days=7)  # how long workers wait for each other
MANIFEST = "manifest.jsonl"
JOB_FLAGS = ("ckpt", "config", "precision", "seed", "ddim_steps", "sampler", "schedule",
             "ddim_eta", "scale", "H", "W", "n_samples", "negative_prompt", "lora", "embedding",
             "vae", "clip_skip", "prompt_syntax", "deepcache", "vae_tiling", "compile",
             "attention_slicing", "safety_checker", "strength")


def fingerprint(prompt_file, args, extra=""):
    """What fixes a job's files: the prompt file's bytes, the flags that change images
    (not the output folder, the shard or the grid) and ``extra`` (img2img: the init
    image's hash)."""
    import hashlib
    h = hashlib.sha256(Path(prompt_file).read_bytes() + extra.encode())
    h.update(json.dumps(job_flags(args), sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


# flags added since jobs began: in a job's settings only when given, so that the jobs
# started before them keep their fingerprint
LATER_JOB_FLAGS = ("rescale", "backend", "original_size", "crop", "target_size",
                   "aesthetic_score", "negative_aesthetic_score", "refiner", "refiner_config",
                   "refiner_switch", "unet", "control", "control_image", "control_preprocess",
                   "control_mode", "control_weight", "control_start", "control_end",
                   "enable_hr", "hr_scale", "hr_resize_x", "hr_resize_y", "hr_upscaler",
                   "hr_steps", "denoising_strength")


def _given(value):
    return value is not None and value is not False and not (isinstance(value, list)
                                                             and not value)


def job_flags(args):
    flags = {name: getattr(args, name, None) for name in JOB_FLAGS}
    flags.update({name: getattr(args, name) for name in LATER_JOB_FLAGS
                  if _given(getattr(args, name, None))})
    return flags


def job_settings(prompt_file, args, extra=""):
    """What ``fingerprint`` hashes, readable: kept in the manifest's header so that a
    changed job is refused naming what changed."""
    import hashlib
    settings = {"prompt file": hashlib.sha256(Path(prompt_file).read_bytes()).hexdigest()[:16]}
    if extra:
        settings["init image"] = extra[:16]
    flags = json.loads(json.dumps(job_flags(args), default=str))
    return {**settings, **{f"--{k}": v for k, v in flags.items()}}


def first_difference(old, new):
    """'--ddim_steps was 20, now 30' for the first setting that differs, else None."""
    for key in new:
        if key in old and old[key] != new[key]:
            if key in ("prompt file", "init image"):
                return f"the {key} changed"
            return f"{key} was {_shown(old[key])}, now {_shown(new[key])}"
    return None


def _shown(value):
    return "unset" if value is None else json.dumps(value)


def parse_shard(text):
    """``i/n`` -> (i, n), 0 <= i < n."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"{text!r} is not i/n (e.g. 0/4)") from None
    if not 0 <= i < n:
        raise ValueError(f"{text}: i must be in [0, n)")
    return i, n


def indexed_batches(images, args, batch_size):
    """``batches`` with each batch's image indices: [(prompts, seeds, request, ks)]. The
    batches are fixed by the prompt file and ``batch_size``, so any split of them over
    workers or shards computes every image in the same batch."""
    out, i = [], 0
    for prompts, seeds, request in batches(images, args, batch_size):
        out.append((prompts, seeds, request, [im.k for im in images[i:i + len(prompts)]]))
        i += len(prompts)
    return out


def file_name(k, total):
    return f"{k:0{max(6, len(str(total - 1)))}}.png"


class Manifest:
    """``OUTDIR/manifest.jsonl``: a header line naming the job, then one line per finished
    image ({"k", "file", "sha256", "seed", "prompt"}), each appended whole and synced after
    its PNG is in place. A line cut short by a kill is dropped when the manifest is read.

    ``read`` checks the folder and learns what is done without writing anything (before
    the model loads, so a failed load leaves no trace); ``open`` then starts or repairs the
    manifest for appending (rank 0 first); ``refresh`` reads the lines other workers have
    appended since."""

    def __init__(self, folder, job, total, overwrite=False, settings=None):
        self.folder, self.job, self.total = Path(folder), job, total
        self.settings = settings  # what made ``job``, named (``job_settings``)
        self.started = False      # whether this run started the manifest file
        self.path = self.folder / MANIFEST
        self.done = {}
        self.overwrite = overwrite
        self._offset = 0
        self._fd = None

    def _lines(self):
        """(header, entries, length of the whole lines) of the manifest on disk. A line cut
        short (by a crash mid-write) is no entry: at the end it is not yet a line, elsewhere
        it does not parse."""
        raw = self.path.read_bytes()
        whole = raw[:raw.rfind(b"\n") + 1]
        lines = [_entry(line) for line in whole.decode("utf-8", "replace").splitlines()]
        header = lines[0] if lines and lines[0] and "job" in lines[0] else {}
        return header, [e for e in lines if e and "k" in e], len(whole)

    def read(self):
        """What is done; InputError for a folder that holds another job's images, unless
        ``overwrite``. Writes nothing."""
        self.done, self._ours = {}, False
        if self.path.exists():
            header, entries, self._offset = self._lines()
            self._ours = header.get("job") == self.job
            if self._ours:
                self.done = {e["k"]: e for e in entries}
            elif not self.overwrite:
                changed = first_difference(header.get("settings") or {}, self.settings or {})
                raise InputError(
                    f"{self.folder} holds another job's images ("
                    + (f"{changed}" if changed else "a different prompt file or settings")
                    + "): use another --outdir, or --overwrite to replace them")
        else:
            samples = self.folder / "samples"
            if not self.overwrite and samples.is_dir() and any(samples.glob("*.png")):
                raise InputError(f"{samples} holds images of another run: use another "
                                 "--outdir, or --overwrite to replace them")
        return self

    def open(self):
        """Ready to append: the manifest started (or started afresh with ``overwrite``),
        PNGs left half-written by a killed run removed. Several processes may open one
        manifest at once (shards of an array job): a lock file makes one of them start it,
        and nothing is ever cut from it, so no other process's line is lost; a torn last
        line is ended with a newline instead, and skipped when read."""
        import os
        import time
        self.folder.mkdir(parents=True, exist_ok=True)
        with _locked(self.folder / ".manifest.lock"):
            for stale in (self.folder / "samples").glob(".*.png.tmp"):
                # a PNG being written when a run was killed (SIGKILL); a write takes
                # milliseconds, so one a minute old is no other worker's
                if time.time() - stale.stat().st_mtime > 60:
                    stale.unlink(missing_ok=True)
            self.read()
            if not self._ours:
                self._start()
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            with open(self.path, "rb") as f:
                torn = f.seek(0, os.SEEK_END) > 0 and f.seek(-1, os.SEEK_END) >= 0 \
                    and f.read(1) != b"\n"
            if torn:
                os.write(self._fd, b"\n")
        return self

    def _start(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        head = {"job": self.job, "images": self.total}
        if self.settings:
            head["settings"] = self.settings
        header = json.dumps(head, ensure_ascii=False) + "\n"
        tmp.write_text(header, "utf-8")
        tmp.replace(self.path)
        self.done, self._offset = {}, len(header.encode("utf-8"))
        self.started = True

    def refresh(self):
        """Take in the lines appended since the last read (other workers'). Returns how
        many images are newly known as done."""
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            raw = f.read()
        whole = raw[:raw.rfind(b"\n") + 1]
        self._offset += len(whole)
        new = 0
        for line in whole.decode("utf-8", "replace").splitlines():
            e = _entry(line)
            if e and "k" in e:
                new += e["k"] not in self.done
                self.done[e["k"]] = e
        return new

    def finished(self, k):
        return k in self.done and (self.folder / self.done[k]["file"]).is_file()

    def record(self, k, file, seed, prompt):
        import hashlib
        import os
        digest = hashlib.sha256((self.folder / file).read_bytes()).hexdigest()
        entry = {"k": k, "file": file, "sha256": digest, "seed": seed, "prompt": prompt}
        os.write(self._fd, (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8"))
        os.fsync(self._fd)
        self.done[k] = entry

    def close(self):
        import os
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _entry(line):
    """A manifest line's object; None for a line that is none (torn by a crash, empty)."""
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


class _locked:
    """An exclusive lock on ``path`` (flock) while the block runs; none where the system
    or file system has no such locks."""

    def __init__(self, path):
        self.path, self.fd = path, None

    def __enter__(self):
        import os
        try:
            import fcntl
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except (ImportError, OSError):
            if self.fd is not None:
                os.close(self.fd)
            self.fd = None
        return self

    def __exit__(self, *exc):
        import os
        if self.fd is not None:
            os.close(self.fd)  # closing releases the lock


# ---------------------------------------------------------------------------------------
# workers: PyTorch Lightning's Fabric (torch.distributed underneath)

def distributed_requested(args):
    """Whether a run asks for workers: --devices / --num_nodes, or it was started by
    torchrun or SLURM with more than one process."""
    import os
    if getattr(args, "devices", None) is not None or getattr(args, "num_nodes", 1) > 1:
        return True
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or int(os.environ.get("SLURM_NTASKS", "1")) > 1


def start_workers(args):
    """Launch (or join) the job's processes with Fabric: its ``launch`` starts the other
    local processes itself (each runs this script again), or joins those torchrun / SLURM
    started. Returns the Fabric (``global_rank``, ``world_size``, ``device``)."""
    try:
        from lightning_fabric import Fabric
    except ImportError:
        from ldm.errors import ResourceError
        raise ResourceError("--devices and --num_nodes run on PyTorch Lightning: "
                            "pip install -e \".[train]\"") from None
    devices = args.devices or "auto"
    if devices.lstrip("-").isdigit():
        devices = int(devices)  # a count (-1: all), as Lightning's own flag parses it
    fabric = Fabric(accelerator=args.accelerator, devices=devices,
                    num_nodes=args.num_nodes, strategy=args.strategy)
    from lightning_fabric.strategies import DDPStrategy
    if type(fabric.strategy) is DDPStrategy:
        # the job's last step waits for the slowest worker, which may be hours behind (a
        # resumed job's shares differ): no 30-minute collective timeout, a dead worker
        # still ends the wait
        fabric = Fabric(accelerator=args.accelerator, devices=devices,
                        num_nodes=args.num_nodes, strategy=DDPStrategy(timeout=WAIT))
    fabric.launch()
    if fabric.device.type == "cpu" and args.threads is None:  # cores shared among workers
        import os
        import torch
        local = max(1, fabric.world_size // max(1, args.num_nodes))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    return fabric
