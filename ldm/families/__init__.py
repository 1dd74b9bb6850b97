"""Model families: each Stable Diffusion generation in one file, found from a checkpoint's
keys and shapes.

A family module (``sd1.py``, ...) defines one ``Family`` (``base.py``): how to recognise
its single-file checkpoints (``match``: from the file's {key: shape}, before any weights
are read) and its diffusers folders (``match_folder``: from the folder's JSON files), the
configs of its variants (text-to-image, inpainting, ...), the sampling defaults of its
models, its latent space, and the key prefixes of its parts and add-ons. ``detect`` asks
each family in turn; for a file that no family here runs, ``describe`` gives one phrase
naming what it is (``known.py`` recognises the generations this project does not run yet,
and the add-ons people mistake for models).

Nothing here imports torch or any other ``ldm`` module.
"""
from typing import Optional

from ldm.families import distilled, known, sd1, sd2, sd3, sdxl  # noqa: F401
from ldm.families.base import CONFIGS, Detected, Family  # noqa: F401

FAMILIES = (sd1.FAMILY, sd2.FAMILY, sdxl.FAMILY, sd3.FAMILY)   # asked in this order


def detect(shapes) -> Optional[Detected]:
    """The family and variant of a checkpoint, from its {key: shape}; None when no family
    here runs it (``describe`` then says what it is)."""
    for family in FAMILIES:
        variant = family.match(shapes)
        if variant is not None:
            return Detected(family, variant)
    return None


def detect_folder(index, unet, scheduler) -> Optional[Detected]:
    """The family and variant of a diffusers pipeline folder, from its ``model_index.json``,
    ``unet/config.json`` and ``scheduler/scheduler_config.json`` (dicts)."""
    for family in FAMILIES:
        variant = family.match_folder(index, unet, scheduler)
        if variant is not None:
            return Detected(family, variant)
    return None


def describe(shapes):
    """One phrase naming what a checkpoint that no family here runs holds ("an SDXL refiner
    checkpoint (OpenCLIP ViT-bigG, 2,560-wide ADM input)"), or None when nothing is known
    about it."""
    return known.describe(shapes)


def describe_folder(index, unet, scheduler):
    """``describe`` for a diffusers pipeline folder no family here runs."""
    return known.describe_folder(index, unet, scheduler)


def generation(shapes):
    """The model generation no family here runs that a checkpoint belongs to ("an SDXL
    checkpoint (...)"), for a refusal before loading; else None."""
    return known.generation(shapes)


def runs():
    """"Stable Diffusion 1.x, Stable Diffusion 2.x and ..." (the families here, for
    messages)."""
    labels = [f.label for f in FAMILIES]
    return labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " and " + labels[-1]


def addon(keys):
    """"a LoRA (...), not a model: pass it with --lora" for the keys of an add-on file (a
    LoRA, a textual-inversion embedding, an autoencoder alone), else None."""
    return known.addon(keys)


def of_config(path):
    """The family whose config ``path`` is (one of ours, or an upstream copy of the same
    file name: Stability's ``v2-inference-v.yaml``), else None."""
    from pathlib import Path
    path = Path(path)
    for family in FAMILIES:
        for variant in family.configs:
            ours = family.config(variant)
            if path.name == ours.name or path.resolve() == ours.resolve():
                return family
    return None


def of_text_width(width):
    """Who conditions on ``width``-wide text, for a message about an add-on made for
    another generation: "Stable Diffusion 2.x (1,024-wide text)"."""
    for family in FAMILIES:
        if family.text_width == width:
            return f"{family.label} ({width:,}-wide text)"
    return known.text_width(width) or f"a model of {width:,}-wide text"


def by_name(name):
    """The family called ``name`` ("sd1")."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise KeyError(name)


def shapes_of(state_dict):
    """{key: shape} of a loaded state dict (what ``match`` reads)."""
    return {k: tuple(getattr(v, "shape", ())) for k, v in state_dict.items()}
