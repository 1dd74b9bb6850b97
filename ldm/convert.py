"""SD weights in the diffusers layout and in ours (CompVis', Stability's): the one place
that knows how the two name the same modules.

Our modules carry the original checkpoint's names (``model.diffusion_model.input_blocks.1.1
...``); diffusers renames them (``unet.down_blocks.0.attentions.0...``). The map is read off
our model's own structure (which input block is a ResBlock of which level, where the
downsamplers are), so it holds for any UNet and autoencoder our configs build, SD v1's and
the tiny test models alike. It serves three readers:

- a diffusers pipeline folder given as ``--ckpt`` (``load_diffusers_folder``), converted
  to our keys on load: the reverse of diffusers' single-file converter;
- a VAE file in the diffusers layout (``--vae``);
- LoRA files, whose module names are diffusers' (kohya-ss trains SD 1.x and 2.x on
  diffusers' UNet and transformers' CLIPTextModel) or ours (``module_names``).

SD 2's text encoder is OpenCLIP's tower in its own names (``ldm.modules.encoders.open_clip``);
diffusers holds it as a transformers ``CLIPTextModel`` (``convert_open_clip_checkpoint``): one
attention input projection ``in_proj_weight`` [3w, w] is three (``q_proj``, ``k_proj``,
``v_proj``), and its folders keep only the blocks SD 2 runs (23 of 24) and no
``text_projection``. ``OPENCLIP_BLOCK`` and ``qkv_slices`` say how the two name it.

Module prefixes: ours are full paths in ``LatentDiffusion``; diffusers' start with the
pipeline component (``unet.``, ``vae.``, ``text_encoder.``).
"""
from pathlib import Path

import torch

from ldm.checkpoint import load_state_dict_file
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.errors import CheckpointError
from ldm.source import WEIGHT_FILES, component_files, is_diffusers_folder  # noqa: F401

UNET, VAE, TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."
OPENCLIP_BLOCK = {"ln_1": "layer_norm1", "attn.out_proj": "self_attn.out_proj",
                  "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
QKV = ("q_proj", "k_proj", "v_proj")
RESBLOCK_INNER = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                  "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
VAE_RESNET_INNER = {"nin_shortcut": "conv_shortcut"}
VAE_ATTENTION_INNER = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v",
                       "proj_out": "to_out.0"}
# diffusers' older names for the VAE's attention (before 0.15), still in many saved folders
VAE_ATTENTION_LEGACY = {"to_q": "query", "to_k": "key",
                        "to_v": "value", "to_out.0": "proj_attn"}


def _unet_blocks(unet):
    """[(our module path, diffusers module path, inner renames)] for the UNet's blocks."""
    from ldm.modules.attention import SpatialTransformer
    from ldm.modules.diffusionmodules.openaimodel import Downsample, ResBlock, Upsample
    blocks = [("time_embed.0", "time_embedding.linear_1", {}),
              ("time_embed.2", "time_embedding.linear_2", {}),
              *([("label_emb.0.0", "add_embedding.linear_1", {}),     # SDXL's vector
                 ("label_emb.0.2", "add_embedding.linear_2", {})]
                if getattr(unet, "adm_in_channels", None) else []),
              *([("time_embedding.cond_proj", "time_embedding.cond_proj", {})]  # LCM's
                if getattr(unet, "time_cond_proj_dim", None) else []),
              *([("label_emb", "class_embedding", {})]   # the x4 upscaler's noise level
                if getattr(unet, "num_classes", None) else []),
              ("input_blocks.0.0", "conv_in", {}),
              *([("out.0", "conv_norm_out", {}), ("out.2", "conv_out", {})]
                if hasattr(unet, "out") else [])]   # a ControlNet has no decoder side

    def parts(ours, layers, level, j, up):
        for n, layer in enumerate(layers):
            if isinstance(layer, ResBlock):
                blocks.append((f"{ours}.{n}", f"{up}.{level}.resnets.{j}", RESBLOCK_INNER))
            elif isinstance(layer, SpatialTransformer):
                blocks.append((f"{ours}.{n}", f"{up}.{level}.attentions.{j}", {}))
            elif isinstance(layer, Downsample):
                blocks.append((f"{ours}.{n}", f"{up}.{level}.downsamplers.0", {"op": "conv"}))
            elif isinstance(layer, Upsample):
                blocks.append((f"{ours}.{n}", f"{up}.{level}.upsamplers.0", {}))

    level = j = 0
    for k, block in enumerate(unet.input_blocks[1:], start=1):
        parts(f"input_blocks.{k}", block, level, j, "down_blocks")
        if isinstance(block[0], Downsample):
            level, j = level + 1, 0
        else:
            j += 1
    for n, name in enumerate(["resnets.0", "attentions.0", "resnets.1"]):
        blocks.append((f"middle_block.{n}", f"mid_block.{name}",
                       RESBLOCK_INNER if name.startswith("resnets") else {}))
    level = j = 0
    for k, block in enumerate(getattr(unet, "output_blocks", ())):
        parts(f"output_blocks.{k}", block, level, j, "up_blocks")
        if isinstance(block[-1], Upsample):
            level, j = level + 1, 0
        else:
            j += 1
    if hasattr(unet, "input_hint_block"):   # a ControlNet's own parts (diffusers' names)
        convs = [n for n, layer in enumerate(unet.input_hint_block)
                 if isinstance(layer, torch.nn.Conv2d)]
        blocks.append((f"input_hint_block.{convs[0]}", "controlnet_cond_embedding.conv_in", {}))
        blocks += [(f"input_hint_block.{n}", f"controlnet_cond_embedding.blocks.{i}", {})
                   for i, n in enumerate(convs[1:-1])]
        blocks.append((f"input_hint_block.{convs[-1]}", "controlnet_cond_embedding.conv_out",
                       {}))
        blocks += [(f"zero_convs.{i}.0", f"controlnet_down_blocks.{i}", {})
                   for i in range(len(unet.zero_convs))]
        blocks.append(("middle_block_out.0", "controlnet_mid_block", {}))
    return blocks


def _vae_blocks(vae):
    blocks = [("quant_conv", "quant_conv", {}), ("post_quant_conv", "post_quant_conv", {})]
    for side in ("encoder", "decoder"):
        net = getattr(vae, side)
        blocks += [(f"{side}.conv_in", f"{side}.conv_in", {}),
                   (f"{side}.conv_out", f"{side}.conv_out", {}),
                   (f"{side}.norm_out", f"{side}.conv_norm_out", {}),
                   (f"{side}.mid.block_1", f"{side}.mid_block.resnets.0", VAE_RESNET_INNER),
                   (f"{side}.mid.attn_1", f"{side}.mid_block.attentions.0", VAE_ATTENTION_INNER),
                   (f"{side}.mid.block_2", f"{side}.mid_block.resnets.1", VAE_RESNET_INNER)]
        way = "down" if side == "encoder" else "up"
        stages = getattr(net, way)
        for i, stage in enumerate(stages):
            # the decoder's up[i] is resolution level i, run last; diffusers counts in run order
            d = i if side == "encoder" else len(stages) - 1 - i
            ours, theirs = f"{side}.{way}.{i}", f"{side}.{way}_blocks.{d}"
            for j in range(len(stage.block)):
                blocks.append((f"{ours}.block.{j}", f"{theirs}.resnets.{j}", VAE_RESNET_INNER))
            for j in range(len(stage.attn)):
                blocks.append((f"{ours}.attn.{j}", f"{theirs}.attentions.{j}",
                               VAE_ATTENTION_INNER))
            for name in ("downsample", "upsample"):
                if hasattr(stage, name):
                    blocks.append((f"{ours}.{name}", f"{theirs}.{name}rs.0", {}))
    return blocks


def _rename(name, inner):
    for ours, theirs in inner.items():
        if name == ours or name.startswith(ours + "."):
            return theirs + name[len(ours):]
    return name


def module_names(model):
    """{our module path: diffusers module path} for every module of ``model`` (a
    ``LatentDiffusion``) that holds weights: UNet, autoencoder and text encoder."""
    out = {}
    net = model.model.diffusion_model
    parts = [(VAE, "vae.", model.first_stage_model, _vae_blocks(model.first_stage_model))]
    if isinstance(net, UNetModel):
        parts.insert(0, (UNET, "unet.", net, _unet_blocks(net)))
    else:   # SD 3's MMDiT (its stacked q/k/v: ``qkv_slices``)
        out.update(mmdit_names(net))
    for ours_root, theirs_root, net, blocks in parts:
        out.update(_block_names(net, blocks, ours_root, theirs_root))
    for prefix, encoder, component in text_encoders(model):
        out.update(_text_modules(prefix, encoder, component))
    return out


def _block_names(net, blocks, ours_root="", theirs_root=""):
    """{our module path: diffusers'} for the modules with weights in ``blocks``
    (``_unet_blocks``, ``_vae_blocks``) of ``net``."""
    out = {}
    for ours, theirs, inner in blocks:
        module = net.get_submodule(ours)
        for name, sub in module.named_modules():
            if any(True for _ in sub.parameters(recurse=False)):
                key = f"{ours}.{name}" if name else ours
                out[ours_root + key] = theirs_root + (f"{theirs}.{_rename(name, inner)}"
                                                      if name else theirs)
    return out


def controlnet_from_diffusers(net, sd):
    """A diffusers ``ControlNetModel`` state dict as ``net``'s (a
    ``ldm.modules.diffusionmodules.controlnet.ControlNet``) keys: the encoder's names as
    the UNet's (``_unet_blocks``), the hint encoder, zero convolutions and middle output
    as diffusers names them. Keys left over or not filled raise CheckpointError."""
    names = {f"{theirs}.{param}": f"{ours}.{param}"
             for ours, theirs in _block_names(net, _unet_blocks(net)).items()
             for param, _ in net.get_submodule(ours).named_parameters(recurse=False)}
    own = net.state_dict()
    out, left = {}, []
    for key, value in sd.items():
        ours = names.get(key)
        if ours is None:
            left.append(key)
            continue
        if value.dim() == 2 and own[ours].dim() == 4:   # 1x1 convolutions as Linear
            value = value[:, :, None, None]
        out[ours] = value
    missing = sorted(own.keys() - out.keys())
    if left or missing:
        raise CheckpointError(f"not a ControlNet of this model's shape: "
                              f"{len(left)} keys left over ({', '.join(left[:3])}), "
                              f"{len(missing)} missing ({', '.join(missing[:3])})")
    return out


def text_encoders(model):
    """[(our key prefix, text encoder, diffusers component)]: SD 1/2's one encoder
    (``cond_stage_model.``, "text_encoder"); SDXL's text embedders
    (``conditioner.embedders.N.``): CLIP ViT-L as "text_encoder" and OpenCLIP bigG as
    "text_encoder_2" (the refiner's bigG alone too)."""
    conditioner = model.cond_stage_model
    if hasattr(conditioner, "clips"):   # SD 3's three, under text_encoders.NAME.
        named = [("clip_l", conditioner.clip_l, "text_encoder"),
                 ("clip_g", conditioner.clip_g, "text_encoder_2"),
                 ("t5xxl", conditioner.t5xxl, "text_encoder_3")]
        return [(f"text_encoders.{n}.", e, c) for n, e, c in named if e is not None]
    if not hasattr(conditioner, "embedders"):
        return [("cond_stage_model.", conditioner, "text_encoder")]
    texts = conditioner.text_embedders
    return [(f"conditioner.embedders.{i}.", e,
             "text_encoder" if len(texts) > 1 and e is texts[0] else "text_encoder_2")
            for i, e in enumerate(conditioner.embedders) if any(e is t for t in texts)]


def _is_openclip(encoder):
    return not hasattr(encoder, "transformer")


def _text_modules(prefix, encoder, component):
    """{our module path: diffusers'} for one text encoder: CLIP ViT-L is transformers'
    CLIPTextModel already; OpenCLIP's (SD 2, SDXL's bigG) as diffusers converts it, less
    the attention input projections (``qkv_slices``) and the bare parameters (position
    embedding, projection: ``parameter_names``)."""
    if not _is_openclip(encoder):
        return {prefix + "transformer." + name: f"{component}.{name}"
                for name, sub in encoder.transformer.named_modules()
                if name and any(True for _ in sub.parameters(recurse=False))}
    tower, layers = prefix + "model.", f"{component}.text_model.encoder.layers."
    out = {tower + "token_embedding": f"{component}.text_model.embeddings.token_embedding",
           tower + "ln_final": f"{component}.text_model.final_layer_norm"}
    for i in range(encoder.model.layers):
        for ours, theirs in OPENCLIP_BLOCK.items():
            out[f"{tower}transformer.resblocks.{i}.{ours}"] = f"{layers}{i}.{theirs}"
    return out


def qkv_slices(model):
    """{diffusers module path ("text_encoder...layers.N.self_attn.q_proj"): (our module
    path, its parameter holding all three, first row, end row)} for the OpenCLIP text
    encoders of ``model`` (SD 2's, SDXL's bigG); {} for none."""
    out = {}
    for prefix, encoder, component in text_encoders(model):
        if not _is_openclip(encoder):
            continue
        width = encoder.model.token_embedding.weight.shape[1]
        out.update({f"{component}.text_model.encoder.layers.{i}.self_attn.{proj}":
                    (f"{prefix}model.transformer.resblocks.{i}.attn", "in_proj_weight",
                     n * width, (n + 1) * width)
                    for i in range(encoder.model.layers) for n, proj in enumerate(QKV)})
    net = model.model.diffusion_model
    if not isinstance(net, UNetModel):   # SD 3: q, k, v of each stream stacked in ``qkv``
        width = net.x_embedder.proj.out_channels
        for i, block in enumerate(net.joint_blocks):
            ours = f"{UNET}joint_blocks.{i}."
            for module, theirs in MMDIT_QKV.items():
                if module == "x_block.attn2" and not block.x_block.self_attn2:
                    continue
                for n, part in enumerate("qkv"):
                    out[f"transformer.transformer_blocks.{i}.{theirs.format(part)}"] = (
                        ours + module + ".qkv", "weight", n * width, (n + 1) * width)
    return out


# OpenCLIP's projection is a bare [width, dim] parameter, transformers' a Linear's weight
TRANSPOSED = ("text_projection",)


def parameter_names(model):
    """{diffusers parameter key (with its component prefix): our key} for ``model``."""
    out = {}
    modules = module_names(model)
    for key in model.state_dict():
        module, _, param = key.rpartition(".")
        if module in modules:
            out[f"{modules[module]}.{param}"] = key
    for prefix, encoder, component in text_encoders(model):
        if not _is_openclip(encoder):
            continue
        # OpenCLIP's bare parameters; in_proj_* stand for q/k/v (_merge_qkv)
        tower = prefix + "model."
        out[f"{component}.text_model.embeddings.position_embedding.weight"] = (
            tower + "positional_embedding")
        if getattr(encoder, "always_return_pooled", False):   # SDXL's pooled embedding
            out[f"{component}.text_projection.weight"] = tower + "text_projection"
        for i in range(encoder.model.layers):
            for param in ("weight", "bias"):
                out[f"{component}.text_model.encoder.layers.{i}.self_attn.in_proj_{param}"] = (
                    f"{tower}transformer.resblocks.{i}.attn.in_proj_{param}")
    return out


def _merge_qkv(sd):
    """A CLIPTextModel state_dict (keys from ``text_model.``) with each layer's q, k and v
    projections stacked into one ``self_attn.in_proj_{weight,bias}``, as OpenCLIP holds them."""
    out = dict(sd)
    for key in sd:
        head, sep, tail = key.partition(".self_attn.q_proj.")
        if not sep:
            continue
        parts = [out.pop(f"{head}.self_attn.{proj}.{tail}", None) for proj in QKV]
        if any(p is None for p in parts):
            raise CheckpointError(f"the text encoder's {head} lacks some of q_proj, k_proj, v_proj")
        out[f"{head}.self_attn.in_proj_{tail}"] = torch.cat(parts)
    return out


def unused_openclip(model):
    """Our keys of the parts of an OpenCLIP tower that the model never runs and diffusers'
    folders leave out: ``logit_scale``; for SD 2 also the blocks after the layer the
    config conditions on and ``text_projection`` (SDXL's bigG runs every block, for its
    pooled embedding through the projection). None for CLIP ViT-L."""
    keys = []
    for prefix, encoder, _ in text_encoders(model):
        if not _is_openclip(encoder):
            continue
        tower = prefix + "model."
        keys.append(tower + "logit_scale")
        if not getattr(encoder, "always_return_pooled", False):
            keys.append(tower + "text_projection")
            keys += [f"{tower}transformer.resblocks.{i}."
                     for i in range(encoder.model.layers - encoder.layer_idx,
                                    encoder.model.layers)]
    keys = tuple(keys)
    return [k for k in model.state_dict() if k.startswith(keys)]


def from_diffusers(model, components):
    """Our state_dict from diffusers-layout ones: ``components`` maps "unet", "vae",
    "text_encoder" to their state_dicts (any may be missing). The VAE's 1x1 attention
    projections are Linear weights in diffusers and 1x1 convolutions here; its older
    attention names (``query``, ``proj_attn``) are read too; SD 2's text encoder gets its
    q/k/v stacked and its unused parts as zeros (``unused_openclip``). Keys left over, or
    ours not filled for a given component, raise CheckpointError naming a few."""
    names = parameter_names(model)
    own = model.state_dict()
    out, left = {}, []
    for component, sd in components.items():
        if component == "text_encoder_3":   # T5: its tied second token table left out
            sd = {k: v for k, v in sd.items() if k != "encoder.embed_tokens.weight"}
        elif component.startswith("text_encoder"):
            sd = {(k if k.startswith(("text_model.", "text_projection.")) else
                   "text_model." + k): v
                  for k, v in sd.items() if not k.endswith("position_ids")}
            if any(k.startswith(component + ".") for k in qkv_slices(model)):
                sd = _merge_qkv(sd)
        for key, value in sd.items():
            theirs = f"{component}.{key}"
            ours = names.get(theirs) or names.get(_modern_vae_name(theirs))
            if ours is None:
                left.append(theirs)
                continue
            if value.dim() == 2 and own[ours].dim() == 4:
                value = value[:, :, None, None]
            if ours.endswith(TRANSPOSED):
                value = value.T.contiguous()
            out[ours] = value
    if any(c.startswith("text_encoder") for c in components):
        # a block of zeros is the identity, so even a ``layer: last`` config conditions on
        # what the folder's CLIPTextModel gives
        out.update({k: torch.zeros(own[k].shape) for k in unused_openclip(model)
                    if k not in out})
    missing = [ours for theirs, ours in names.items()
               if theirs.split(".")[0] in components and ours not in out]
    if left or missing:
        what = []
        if left:
            what.append(f"{len(left)} unexpected ({', '.join(sorted(left)[:3])})")
        if missing:
            what.append(f"{len(missing)} missing ({', '.join(sorted(missing)[:3])})")
        raise CheckpointError("diffusers-layout weights do not fit this model's config: "
                              + "; ".join(what))
    return out


def _modern_vae_name(key):
    for new, old in VAE_ATTENTION_LEGACY.items():
        if f".attentions.0.{old}." in key:
            return key.replace(f".attentions.0.{old}.", f".attentions.0.{new}.")
    return key


def to_diffusers(model, sd=None):
    """The reverse: {component: state_dict} in diffusers' layout from our ``sd`` (default:
    ``model``'s own), for saving a diffusers folder from our weights (SD 2: the blocks of
    OpenCLIP that it runs, as diffusers' folders hold them)."""
    names = {ours: theirs for theirs, ours in parameter_names(model).items()}
    own = model.state_dict()
    sd = own if sd is None else sd
    unused = set(unused_openclip(model))
    out = {}
    for key, value in sd.items():
        if key not in names or key in unused:
            continue
        component, _, theirs = names[key].partition(".")
        if component == "vae" and value.dim() == 4 and ".attentions." in theirs:
            value = value[:, :, 0, 0]
        if key.endswith(TRANSPOSED):
            value = value.T.contiguous()
        head, sep, param = theirs.partition(".self_attn.in_proj_")
        if sep:   # OpenCLIP's stacked q/k/v, as CLIPTextModel's three
            for proj, part in zip(QKV, value.chunk(3)):
                out.setdefault(component, {})[f"{head}.self_attn.{proj}.{param}"] = part
            continue
        out.setdefault(component, {})[theirs] = value
    return out


# ---------------------------------------------------------------------------------------
# diffusers pipeline folders

def load_component(folder, component):
    """One component's state_dict (its shards merged)."""
    sd = {}
    for path in component_files(folder, component):
        sd.update(load_state_dict_file(path))
    return sd


def load_diffusers_folder(folder, model):
    """Our state_dict for ``model`` from a diffusers SD 1.x, 2.x or SDXL pipeline folder
    (``unet/``, ``vae/``, the text encoders the model has: ``text_encoder/``,
    ``text_encoder_2/``; safetensors or .bin through the safe unpickler, fp16 or fp32)."""
    folder = Path(folder)
    if not isinstance(model.model.diffusion_model, UNetModel):   # SD 3
        wanted = ["vae"] + [c for _, _, c in text_encoders(model)
                            if (folder / c).is_dir() or c != "text_encoder_3"]
        out = from_diffusers(model, {c: load_component(folder, c) for c in wanted})
        out.update(mmdit_from_diffusers(load_component(folder, "transformer")))
        return out
    wanted = ["unet", "vae"] + [c for _, _, c in text_encoders(model)]
    components = {c: load_component(folder, c) for c in wanted}
    return from_diffusers(model, components)


def vae_state_dict(sd, model):
    """Autoencoder weights from a ``--vae`` file's tensors, as ``first_stage_model.*`` keys:
    CompVis' own VAE files (``encoder.*``, ``decoder.*``; or a whole SD checkpoint's
    ``first_stage_model.*``) or diffusers' (``encoder.down_blocks.*``)."""
    if any(k.startswith(VAE) for k in sd):
        sd = {k[len(VAE):]: v for k, v in sd.items() if k.startswith(VAE)}
    sd = {k: v for k, v in sd.items() if not k.startswith(("loss.", "model_ema."))}
    if any(".down_blocks." in k or ".up_blocks." in k or ".mid_block." in k for k in sd):
        return from_diffusers(model, {"vae": sd})
    return {VAE + k: v for k, v in sd.items()}


def unet_state_dict(sd, model):
    """UNet weights from a ``--unet`` file's tensors, as ``model.diffusion_model.*`` keys:
    a whole checkpoint's or a UNet-only file in the original layout (with or without the
    ``model.diffusion_model.`` prefix: ComfyUI's UNet files), or diffusers' UNet
    (``down_blocks.*``, as SDXL-Lightning's UNet files are)."""
    if any(k.startswith(UNET) for k in sd):
        return {k: v for k, v in sd.items() if k.startswith(UNET)}
    if any(k.startswith(("down_blocks.", "up_blocks.", "mid_block.", "conv_in.")) for k in sd):
        return from_diffusers(model, {"unet": sd})
    return {UNET + k: v for k, v in sd.items()}


# ---------------------------------------------------------------------------------------
# SD 3: diffusers' SD3Transformer2DModel and friends -> Stability's single-file layout

def _swap_halves(w):
    """diffusers' AdaLayerNormContinuous gives (scale, shift); Stability's adaLN (shift,
    scale): the two halves of the projection swapped."""
    a, b = w.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


# our MMDiT module -> diffusers' SD3Transformer2DModel module, per joint block (the
# stacked q/k/v: ``MMDIT_QKV``; the text block's modulation: ``mmdit_names``)
MMDIT_BLOCK = {"x_block.attn.proj": "attn.to_out.0", "x_block.attn2.proj": "attn2.to_out.0",
               "context_block.attn.proj": "attn.to_add_out",
               "x_block.attn.ln_q": "attn.norm_q", "x_block.attn.ln_k": "attn.norm_k",
               "context_block.attn.ln_q": "attn.norm_added_q",
               "context_block.attn.ln_k": "attn.norm_added_k",
               "x_block.attn2.ln_q": "attn2.norm_q", "x_block.attn2.ln_k": "attn2.norm_k",
               "x_block.adaLN_modulation.1": "norm1.linear",
               "x_block.mlp.fc1": "ff.net.0.proj", "x_block.mlp.fc2": "ff.net.2",
               "context_block.mlp.fc1": "ff_context.net.0.proj",
               "context_block.mlp.fc2": "ff_context.net.2"}
# our stacked ``qkv`` -> diffusers' three projections ({} for q, k, v)
MMDIT_QKV = {"x_block.attn": "attn.to_{}", "context_block.attn": "attn.add_{}_proj",
             "x_block.attn2": "attn2.to_{}"}
MMDIT_TOP = {"x_embedder.proj": "pos_embed.proj", "context_embedder": "context_embedder",
             "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
             "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
             "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
             "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
             "final_layer.linear": "proj_out"}


def mmdit_from_diffusers(sd):
    """A diffusers SD3Transformer2DModel state dict in Stability's MMDiT names (the inverse
    of diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers``: q, k and v stacked
    into ``qkv``, the final layer's and the last text block's modulation halves swapped)."""
    out = {"pos_embed": sd["pos_embed.pos_embed"]}

    def take(ours, theirs, swap=False):
        for p in ("weight", "bias"):
            if f"{theirs}.{p}" in sd:
                value = sd[f"{theirs}.{p}"]
                out[f"{ours}.{p}"] = _swap_halves(value) if swap else value

    for ours, theirs in MMDIT_TOP.items():
        take(ours, theirs)
    take("final_layer.adaLN_modulation.1", "norm_out.linear", swap=True)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks."))
    for i in range(depth):
        b, j = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        for ours, theirs in MMDIT_QKV.items():
            for p in ("weight", "bias"):
                if b + f"{theirs.format('q')}.{p}" in sd:
                    out[j + f"{ours}.qkv.{p}"] = torch.cat(
                        [sd[b + f"{theirs.format(n)}.{p}"] for n in "qkv"])
        for ours, theirs in MMDIT_BLOCK.items():
            take(j + ours, b + theirs)
        take(j + "context_block.adaLN_modulation.1", b + "norm1_context.linear",
             swap=i == depth - 1)
    return {UNET + k: v for k, v in out.items()}


def mmdit_names(net):
    """{our module path: "transformer." + diffusers' module path} for an MMDiT's layers
    that both hold whole (what LoRA files name)."""
    weighted = {name for name, m in net.named_modules()
                if any(True for _ in m.parameters(recurse=False))}
    out = {UNET + ours: "transformer." + theirs for ours, theirs in MMDIT_TOP.items()}
    for i, block in enumerate(net.joint_blocks):
        for ours, theirs in MMDIT_BLOCK.items():
            if f"joint_blocks.{i}.{ours}" in weighted:
                out[f"{UNET}joint_blocks.{i}.{ours}"] = (
                    f"transformer.transformer_blocks.{i}.{theirs}")
        if not block.context_block.pre_only:
            out[f"{UNET}joint_blocks.{i}.context_block.adaLN_modulation.1"] = (
                f"transformer.transformer_blocks.{i}.norm1_context.linear")
    return out
