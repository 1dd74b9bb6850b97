"""LoRA and LoCon files as people download them, merged into our CompVis-layout modules.

A LoRA file holds, for some of the model's Linear and convolution layers, a low-rank update
``delta W = up @ down * alpha / rank``; applied with a user weight ``w`` the layer's weight
becomes ``W + w * delta W``. The layouts read (``read_lora``):

- kohya-ss (``lora_unet_*``, ``lora_te_*``; SDXL's ``lora_te1_*`` and ``lora_te2_*``; with
  ``.lora_down``, ``.lora_up``, ``.alpha``):
  module names are diffusers' with ``_`` for ``.`` (kohya trains SD 1.x and 2.x on
  diffusers' UNet and transformers' CLIPTextModel: for SD 2's OpenCLIP tower a
  ``q_proj``/``k_proj``/``v_proj`` update goes to its third of ``in_proj_weight``, as
  A1111 merges them), or ours (CompVis', ``lora_unet_input_blocks_1_1_...``); LoCon/LyCORIS adds the
  ResBlocks' 3x3 convolutions (down ``[r, in, 3, 3]``, up ``[out, r, 1, 1]``); LyCORIS'
  LoHa (``hada_w1_a`` ...) and LoKr (``lokr_w1``, ``lokr_w2_a`` ...) in the same names;
- diffusers/PEFT (``unet.<module>.lora_A.weight``/``lora_B``, with or without ``unet.``
  / ``text_encoder.`` / ``base_model.model.``), and diffusers' older attention-processor
  names (``attn1.processor.to_q_lora.down.weight``, ``lora_linear_layer``).

Merged, not applied on the fly: a merged LoRA costs nothing per step (on the fly, every
touched layer does two extra matmuls at every UNet call). Unmerging is exact because the
first merge into a layer keeps that layer's weight as it was (``LoraStack``), and unmerging
puts that very tensor back: no subtraction, so no rounding (bf16 weights included).

LoRA files are untrusted input: ``.safetensors``, or a pickle read by the checkpoints'
restricted unpickler.
"""
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ldm.checkpoint import CheckpointError, file_hash, load_state_dict_file

log = logging.getLogger(__name__)


class LoraError(CheckpointError):
    """A LoRA file that cannot be applied to this model; nothing of it was applied."""


@dataclass
class LoraLayer:
    """One layer's update times ``scale``: ``up @ down`` (LoRA, LoCon), or LyCORIS' LoHa
    ``(w1_a @ w1_b) * (w2_a @ w2_b)`` (Hadamard product) or LoKr ``kron(w1, w2)`` (each
    factor whole or as a product ``a @ b``); convolution weights flattened to matrices."""
    module: str        # our module path, e.g. model.diffusion_model.input_blocks.1.1.proj_in
    down: torch.Tensor = None
    up: torch.Tensor = None
    scale: float = 1.0  # alpha / rank (1 when the file gives no alpha)
    kind: str = "lora"
    factors: dict = field(default_factory=dict)  # LoHa / LoKr tensors by their suffix
    param: str = "weight"   # the module's parameter it updates
    rows: tuple = None      # (first, end): the rows of that parameter it updates (q of q/k/v)

    def target(self, modules):
        """(the parameter it updates, the shape of the part it updates)."""
        weight = getattr(modules[self.module], self.param)
        if self.rows is None:
            return weight, weight.shape
        return weight, (self.rows[1] - self.rows[0], *weight.shape[1:])

    def full_delta(self, weight, shape):
        """The update as a tensor of ``weight``'s whole shape (zeros outside ``rows``)."""
        d = self.delta(shape)
        if self.rows is None:
            return d
        full = torch.zeros(weight.shape, dtype=d.dtype)
        full[self.rows[0]:self.rows[1]] = d
        return full

    def delta(self, shape):
        """The update as a float32 tensor of the weight's ``shape`` (ValueError when it
        cannot be one)."""
        shape = torch.Size(shape)
        out = shape[0]
        f = {k: v.float() for k, v in self.factors.items()}
        if self.kind == "loha":
            d = (_flat(f["hada_w1_a"]) @ _flat(f["hada_w1_b"])) * \
                (_flat(f["hada_w2_a"]) @ _flat(f["hada_w2_b"]))
        elif self.kind == "lokr":  # as LyCORIS (and PEFT, which follows it) build it
            w1 = f["lokr_w1"] if "lokr_w1" in f else _flat(f["lokr_w1_a"]) @ _flat(f["lokr_w1_b"])
            w2 = f["lokr_w2"] if "lokr_w2" in f else _flat(f["lokr_w2_a"]) @ _flat(f["lokr_w2_b"])
            if w2.dim() == 4:  # a whole convolution factor: kernel positions kept apart
                d = torch.kron(w1.reshape(*w1.shape[:2], 1, 1), w2)
            else:
                d = torch.kron(_flat(w1), w2)
            d = d.reshape(d.shape[0], -1)
        else:
            d = _flat(self.up.float()) @ _flat(self.down.float())
        if d.numel() != shape.numel() or d.shape[0] != out:
            raise ValueError(f"update {tuple(d.shape)} does not fit weight {tuple(shape)}")
        return (d * self.scale).reshape(shape)


def _flat(t):
    return t.reshape(t.shape[0], -1)


LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


@dataclass
class Lora:
    path: Path
    layers: list
    layout: str                      # "kohya" or "peft"
    hash: str = ""
    name: str = field(default="")

    def __post_init__(self):
        self.name = self.name or self.path.stem


def kohya_names(model_names, slices=None):
    """{kohya-ss layer name: our module path, or (module, parameter, (first, end row))}
    from ``ldm.convert.module_names`` and ``qkv_slices``: the diffusers-based names kohya
    writes (the text encoder's as transformers' CLIPTextModel names it) and CompVis-based
    ones for the UNet."""
    from ldm.convert import UNET
    two = any(t.startswith("text_encoder_2.") for t in model_names.values())
    # kohya's text encoder prefixes: lora_te_ for SD 1/2's one, lora_te1_ / lora_te2_ for
    # SDXL's CLIP ViT-L and OpenCLIP bigG (transformers' names for both), lora_te3_ for
    # SD 3's T5
    prefixes = {"text_encoder": "lora_te1_" if two else "lora_te_",
                "text_encoder_2": "lora_te2_", "text_encoder_3": "lora_te3_"}

    def text_name(theirs):
        component, _, inner = theirs.partition(".")
        return prefixes[component] + inner.replace(".", "_")
    out = {}
    for ours, theirs in model_names.items():
        if ours.startswith(UNET):
            out["lora_unet_" + theirs.partition(".")[2].replace(".", "_")] = ours
            out["lora_unet_" + ours[len(UNET):].replace(".", "_")] = ours
        elif theirs.startswith(("text_encoder.", "text_encoder_2.", "text_encoder_3.")):
            out[text_name(theirs)] = ours
    for theirs, (module, param, first, end) in (slices or {}).items():
        if not theirs.startswith("transformer."):
            out[text_name(theirs)] = (module, param, (first, end))
    return out


def peft_names(model_names, slices=None):
    """{diffusers module path without its component ("unet.down_blocks..." minus "unet."
    kept as given): our module path, or (module, parameter, rows)}, for the UNet and text
    encoder."""
    out = {theirs: ours for ours, theirs in model_names.items()
           if theirs.startswith(("unet.", "transformer.", "text_encoder.", "text_encoder_2.",
                                 "text_encoder_3."))}
    out.update({theirs: (module, param, (first, end))
                for theirs, (module, param, first, end) in (slices or {}).items()})
    return out


def _layer(target, **kw):
    """A LoraLayer for a ``kohya_names``/``peft_names`` value."""
    if isinstance(target, tuple):
        module, param, rows = target
        return LoraLayer(module, param=param, rows=rows, **kw)
    return LoraLayer(target, **kw)


_PEFT_SUFFIX = re.compile(
    r"^(?P<module>.+?)(?:\.lora_(?P<peft>A|B)\.(?:default\.)?weight|"
    r"(?:\.lora_linear_layer|\.lora|_lora)\.(?P<old>down|up)\.weight|\.alpha)$")
# diffusers' older attention-processor names: attn1.processor.to_q_lora -> attn1.to_q;
# in the text encoder self_attn.to_q_lora -> self_attn.q_proj
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)$")
_TEXT_OLD = re.compile(r"\.self_attn\.(to_q|to_k|to_v|to_out)$")
_TEXT_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def made_for(sd):
    """(who, text width) of the generation a LoRA file was made for, as far as its key names
    and the widths its layers take tell (width None: not a UNet of text cross-attention at
    all), or None when nothing tells."""
    from ldm import families
    keys = list(sd)
    xl = any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for k in keys)
    if any("joint_blocks" in k or k.startswith("lora_te3_") for k in keys):   # kohya's SD 3
        return "Stable Diffusion 3 (an MMDiT, not a UNet)", None
    if any(k.startswith(("lora_transformer_", "transformer.", "diffusion_model.")) for k in keys):
        return "a transformer model (SD3, Flux or similar), not a UNet", None
    for k, v in sd.items():   # the width the UNet's cross-attention keys take
        down = "lora_down" in k or "lora_A" in k or ".down." in k
        if down and getattr(v, "dim", lambda: 0)() >= 2 and (
                ("attn2" in k and "to_k" in k) or ("lora_te_" in k and "self_attn" in k)):
            who = "SDXL (two text encoders)" if xl else families.of_text_width(v.shape[1])
            return who, v.shape[1]
    if xl:   # text encoders only: SDXL's pair
        return "SDXL (two text encoders)", 2048
    return None


def read_lora(path, model, model_names=None):
    """A ``Lora`` for ``model`` from a file; LoraError (one line, nothing applied) for a
    file that is not a LoRA, is for another architecture, or names layers ``model`` lacks."""
    from ldm import families
    from ldm.convert import UNET, module_names, qkv_slices
    path = lora_file(path)
    try:
        sd = load_state_dict_file(path)
    except CheckpointError as e:
        raise LoraError(str(e).replace("checkpoint", "LoRA file")) from None
    if not sd:
        raise LoraError(f"LoRA {path} holds no tensors")
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    width = model.cond_stage_model.text_width
    transformer = not isinstance(model.model.diffusion_model, UNetModel)   # SD 3's MMDiT
    found = made_for(sd)
    if found is not None and found[1] != width and not (transformer and found[1] is None):
        raise LoraError(f"LoRA {path} is for {found[0]}; this model is "
                        f"{families.of_text_width(width)}")
    names = model_names or module_names(model)
    slices = qkv_slices(model)
    kohya = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")
    if any(k.startswith(kohya) for k in sd):
        table = kohya_names(names, slices)
        if transformer:   # kohya's SD 3 names are Stability's, stacked q/k/v included
            table.update({"lora_unet_" + name.replace(".", "_"): UNET + name
                          for name, m in model.model.diffusion_model.named_modules()
                          if isinstance(m, torch.nn.Linear)})
        layers, leftover, layout = _kohya_layers(sd, table)
    elif any(_PEFT_SUFFIX.match(k) for k in sd):
        layers, leftover, layout = _peft_layers(sd, peft_names(names, slices), peft_alphas(path))
    else:
        unsupported = _lycoris_kind(sd)
        raise LoraError(f"{path} is not a LoRA file this project reads"
                        + (f" ({unsupported} is not supported)" if unsupported else
                           " (no lora_down/lora_up or lora_A/lora_B weights)"))
    if leftover:
        kind = _lycoris_kind({k: None for k in leftover})
        why = (f"its {kind} layers are incomplete or of a form not supported" if kind else
               f"{len(leftover)} of its tensors name layers this model does not have "
               f"({', '.join(sorted(leftover)[:2])})")
        raise LoraError(f"LoRA {path} cannot be applied: {why}; is it for another model?")
    if not layers:
        raise LoraError(f"LoRA {path} has no layers")
    own = dict(model.named_modules())
    for layer in layers:
        _, shape = layer.target(own)
        try:
            layer.delta(shape)
        except (ValueError, RuntimeError) as e:
            raise LoraError(f"LoRA {path} does not fit this model: {layer.module} is "
                            f"{tuple(shape)} ({e}); is it for another model?") from None
    return Lora(path, layers, layout, file_hash(path))


def lora_file(path):
    """The file of a LoRA given as a file or as the folder diffusers' save_lora_weights
    writes (``pytorch_lora_weights.safetensors`` or ``.bin``)."""
    path = Path(path)
    if path.is_dir():
        for name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin"):
            if (path / name).is_file():
                return path / name
        raise LoraError(f"--lora {path} is a folder without pytorch_lora_weights.safetensors "
                        "(or .bin): give the LoRA file itself")
    return path


def _lycoris_kind(sd):
    keys = " ".join(sd)
    if ".hada_t1" in keys or ".hada_t2" in keys:
        return "LoHa with a Tucker core (hada_t1)"
    if ".lokr_t2" in keys:
        return "LoKr with a Tucker core (lokr_t2)"
    if ".hada_w1" in keys:
        return "LoHa (LyCORIS)"
    if ".lokr_w" in keys:
        return "LoKr (LyCORIS)"
    if ".lora_mid." in keys:
        return "LoCon with a Tucker middle (lora_mid)"
    if ".dora_scale" in keys:
        return "DoRA"
    if ".diff" in keys or ".diff_b" in keys:
        return "a full-weight difference (diff)"
    return None


def _kohya_layers(sd, names):
    """Layers of kohya-ss / LyCORIS names: LoRA and LoCon (``lora_down``/``lora_up``),
    LoHa (``hada_w1_a`` ...) and LoKr (``lokr_w1`` ...). The scale is alpha over the rank
    (LoHa: of w1_b; LoKr: of its decomposed factor, 1 when both are whole), as A1111."""
    groups = {}
    for key in sd:
        name, _, suffix = key.partition(".")
        groups.setdefault(name, {})[suffix] = key
    layers, used = [], set()
    for name, parts in groups.items():
        if name not in names:
            continue
        alpha = sd[parts["alpha"]] if "alpha" in parts else None
        if "lora_down.weight" in parts and "lora_up.weight" in parts:
            down, up = sd[parts["lora_down.weight"]], sd[parts["lora_up.weight"]]
            layer = _layer(names[name], down=down, up=up, scale=_scale(alpha, down.shape[0]))
        elif all(k in parts for k in LOHA):
            factors = {k: sd[parts[k]] for k in LOHA}
            layer = _layer(names[name], kind="loha", factors=factors,
                           scale=_scale(alpha, factors["hada_w1_b"].shape[0]))
        elif any(k in parts for k in LOKR):
            factors = {k: sd[parts[k]] for k in LOKR if k in parts}
            whole = [k for k in ("1", "2") if f"lokr_w{k}" in factors]
            pairs = [k for k in ("1", "2") if f"lokr_w{k}_a" in factors
                     and f"lokr_w{k}_b" in factors]
            if sorted(whole + pairs) != ["1", "2"]:
                continue  # incomplete: left over, reported by the caller
            rank = factors.get("lokr_w2_b", factors.get("lokr_w1_b"))
            layer = _layer(names[name], kind="lokr", factors=factors,
                           scale=_scale(alpha, rank.shape[0]) if rank is not None else 1.0)
        else:
            continue
        layers.append(layer)
        used.update(parts[k] for k in ("lora_down.weight", "lora_up.weight", "alpha", *LOHA, *LOKR)
                    if k in parts)
    return layers, [k for k in sd if k not in used], "kohya"


def _scale(alpha, rank):
    return float(alpha) / rank if alpha is not None else 1.0


def peft_alphas(path):
    """PEFT's LoRA settings that diffusers saves in a .safetensors header
    (``lora_adapter_metadata``: per component ``lora_alpha``, ``alpha_pattern``,
    ``use_rslora``), as {component: settings}; {} without them (then alpha = rank)."""
    import json
    from ldm.source import metadata
    raw = metadata(path).get("lora_adapter_metadata")
    try:
        meta = json.loads(raw) if raw else {}
    except ValueError:
        raise LoraError(f"LoRA {path}: its lora_adapter_metadata is not JSON") from None
    out = {}
    for key, value in (meta.items() if isinstance(meta, dict) else ()):
        component, _, name = key.partition(".")
        out.setdefault(component, {})[name] = value
    return out


def _peft_scale(settings, module, rank, stored_alpha):
    """alpha / rank (alpha / sqrt(rank) with rsLoRA) for one module: the file's own
    ``.alpha`` tensor, else the metadata's alpha pattern or alpha, else the rank."""
    alpha = stored_alpha
    if alpha is None:
        alpha = settings.get("lora_alpha")
        for pattern, value in (settings.get("alpha_pattern") or {}).items():
            if module == pattern or module.endswith("." + pattern):
                alpha = value
    if alpha is None:
        return 1.0
    return float(alpha) / (rank ** 0.5 if settings.get("use_rslora") else rank)


def _peft_layers(sd, names, settings=None):
    parts, used = {}, set()
    for key in sd:
        m = _PEFT_SUFFIX.match(key)
        if not m:
            continue
        module = m["module"]
        for prefix in ("base_model.model.",):
            module = module.removeprefix(prefix)
        module = _PROCESSOR.sub(lambda p: "." + {"to_out": "to_out.0"}.get(p[1], p[1]), module)
        module = _TEXT_OLD.sub(lambda p: ".self_attn." + _TEXT_PROJ[p[1]], module)
        if not module.startswith(("unet.", "transformer.", "text_encoder.", "text_encoder_2.",
                                  "text_encoder_3.")):
            module = ("text_encoder." if module.startswith("text_model.") else
                      "transformer." if module.startswith("transformer_blocks.") else
                      "unet.") + module
        component, _, inner = module.partition(".")
        if component in ("text_encoder", "text_encoder_2") and not inner.startswith(
                ("text_model.", "text_projection")):
            # transformers 5's CLIPTextModel keys have no text_model. level
            module = f"{component}.text_model.{inner}"
        role = ("down" if m["peft"] == "A" or m["old"] == "down" else
                "up" if m["peft"] == "B" or m["old"] == "up" else "alpha")
        parts.setdefault(module, {})[role] = sd[key]
        parts[module].setdefault("keys", []).append(key)
    layers = []
    for module, p in parts.items():
        if module in names and "down" in p and "up" in p:
            component, _, inner = module.partition(".")
            scale = _peft_scale((settings or {}).get(component, {}), inner,
                                p["down"].shape[0], p.get("alpha"))
            layers.append(_layer(names[module], down=p["down"], up=p["up"], scale=scale))
            used.update(p["keys"])
    return layers, [k for k in sd if k not in used], "peft"


class LoraStack:
    """The LoRAs merged into one model, and the original weights of every layer they
    touched (kept on first touch, in the weight's own dtype and device)."""

    def __init__(self, model):
        self.model = model
        self.applied = []     # [(Lora, weight)]
        self.saved = {}       # (module path, parameter) -> original tensor

    def set(self, loras):
        """Merge exactly ``loras`` ([(Lora, weight)]), after restoring the base weights."""
        self.restore()
        modules = dict(self.model.named_modules())
        deltas = {}
        for lora, weight in loras:
            for layer in lora.layers:
                w, shape = layer.target(modules)
                d = layer.full_delta(w, shape).to(w.device) * float(weight)
                key = (layer.module, layer.param)
                deltas[key] = deltas[key] + d if key in deltas else d
        with torch.no_grad():
            for (name, attr), d in deltas.items():
                param = getattr(modules[name], attr)
                self.saved[name, attr] = param.data
                param.data = (param.data.float() + d).to(param.dtype)
        self.applied = list(loras)

    def restore(self):
        """The base weights back, bit for bit (the saved tensors themselves)."""
        modules = dict(self.model.named_modules())
        with torch.no_grad():
            for (name, attr), original in self.saved.items():
                getattr(modules[name], attr).data = original
        self.saved = {}
        self.applied = []

    def record(self):
        """[{name, hash, weight}] of the merged LoRAs, for image parameters."""
        return [{"name": lora.name, "hash": lora.hash, "weight": float(weight)}
                for lora, weight in self.applied]
