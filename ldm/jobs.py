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
from pathlib import Path

from ldm.errors import InputError

SEED_MAX = 2 ** 64 - 1
# key: (type check, description)
KEYS = {
    "prompt": (lambda v: isinstance(v, str), "a string"),
    "negative_prompt": (lambda v: isinstance(v, str), "a string"),
    "seed": (lambda v: _is_int(v) and 0 <= v <= SEED_MAX, "an integer in [0, 2**64 - 1]"),
    "steps": (lambda v: _is_int(v) and 1 <= v <= 1000, "an integer in [1, 1000]"),
    "scale": (lambda v: _is_number(v) and 0 <= v <= 100, "a number in [0, 100]"),
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
