"""What a checkpoint or diffusers folder holds when no family here runs it: the generations
this project does not run yet, and the add-ons (LoRA, embedding, VAE) people give as a
model. Each is one phrase for a one-line error, read from keys and shapes alone (diffusers'
``infer_diffusers_model_type`` keeps a table of the same kind)."""

import re

UNET = "model.diffusion_model."
# a tiny autoencoder's (TAESD's) weights: diffusers' AutoencoderTiny, or the author's
# numbered Sequential layers, bare or under ours/ComfyUI's prefixes
TINY_DIFFUSERS = re.compile(r"^(encoder|decoder)\.layers\.(\d+)\.(.*)$")
TINY_NUMBERED = re.compile(r"^(?:taesd_encoder\.|taesd_decoder\.|encoder\.|decoder\.)?"
                           r"\d+\.(?:weight|bias|conv\.\d+\.weight|conv\.\d+\.bias|"
                           r"skip\.weight)$")


def _shape(shapes, key):
    return tuple(shapes.get(key) or ())


def _any(shapes, *prefixes):
    return any(k.startswith(prefixes) for k in shapes)


def describe(shapes):
    """A phrase naming what ``shapes`` ({key: shape}) is, or None."""
    return addon(list(shapes)) or generation(shapes) or hint(shapes)


def generation(shapes):
    """The model generation a checkpoint this project does not run belongs to, or None."""
    if _any(shapes, UNET + "joint_blocks."):
        # SD 3 Medium, 3.5 Medium and 3.5 Large are a family (sd3.py): this is another
        # MMDiT of that layout, or one with parts missing
        blocks = {k.split(".")[3] for k in shapes if k.startswith(UNET + "joint_blocks.")}
        n = len(blocks)
        return (f"an MMDiT checkpoint in SD 3's layout ({n} joint block{'s' * (n != 1)}) but "
                "not SD 3 Medium, 3.5 Medium or 3.5 Large; a partial or other-sized one")
    if _any(shapes, "double_blocks.", UNET + "double_blocks."):
        return "a FLUX checkpoint"
    conv_in = _shape(shapes, UNET + "input_blocks.0.0.weight")
    adm = _shape(shapes, UNET + "label_emb.0.0.weight")
    in_ch = conv_in[1] if len(conv_in) == 4 else None
    if _any(shapes, "conditioner.embedders."):
        # SDXL base, refiner and inpainting are a family (sdxl.py); this is another model
        # of the generative-models layout, or one with parts missing
        if adm and adm[1] == 2560:
            detail, kind = "OpenCLIP ViT-bigG, 2,560-wide ADM input", "refiner"
        else:
            detail = "two text encoders, 2,816-wide ADM input"
            kind = "inpainting model" if in_ch == 9 else "model"
        return (f"a checkpoint in SDXL's layout ({detail}) but not a whole SDXL {kind}; a "
                "distilled or partial one")
    cross = _shape(shapes, UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    openclip = _any(shapes, "cond_stage_model.model.")
    if openclip or (cross and cross[1] == 1024):
        if _any(shapes, "embedder.", "noise_augmentor.") or adm:
            return "an SD 2.x unCLIP checkpoint (image variations)"
        if _any(shapes, "depth_model."):
            return "an SD 2 depth-to-image checkpoint (5-channel UNet input)"
        if in_ch == 7:
            return "an SD x4 upscaler checkpoint (7-channel UNet input)"
        kind = "inpainting " if in_ch == 9 else ""
        return (f"an SD 2.x {kind}checkpoint (OpenCLIP ViT-H text encoder, 1,024-wide "
                "conditioning)")
    if in_ch == 8:
        return "an instruct-pix2pix checkpoint (8-channel UNet input)"
    return None


def hint(shapes):
    """What a checkpoint of no known generation seems to be, for the error of a strict
    load that failed (its config's), or None."""
    conv_in = _shape(shapes, UNET + "input_blocks.0.0.weight")
    in_ch = conv_in[1] if len(conv_in) == 4 else None
    if in_ch == 9:
        return ("an inpainting checkpoint (9-channel UNet input: latents, mask, masked "
                "image): use scripts/inpaint.py with an inpainting config")
    if _any(shapes, "down_blocks.", "unet.", "mid_block."):
        return ("weights in diffusers' folder layout: give the whole pipeline folder, or the "
                "single-file original checkpoint (.ckpt/.safetensors)")
    if conv_in and conv_in[0] != 320:
        return (f"a model with {conv_in[0]} base channels (SD's have 320): pass the config "
                "it was trained with (--config)")
    if not _any(shapes, UNET):
        return "not a Stable Diffusion checkpoint (no model.diffusion_model.* weights)"
    return None


def addon(keys):
    """What an add-on file is and the flag that takes it, or None."""
    lora = [k for k in keys if any(m in k for m in (".lora_down.", ".lora_up.", ".lora_A.",
                                                     ".lora_B.", ".hada_w", ".lokr_w",
                                                     "lora.down.", "lora.up."))]
    if lora and not any(k.startswith(UNET) for k in keys):
        return f"a LoRA ({len(lora)} LoRA weights), not a model: pass it with --lora"
    embedding = {"emb_params", "string_to_param", "string_to_token", "name", "step",
                 "sd_checkpoint", "sd_checkpoint_name", "clip_l", "clip_g"}
    if keys and all(k in embedding or k.startswith("<") for k in keys):
        return "a textual-inversion embedding, not a model: pass it with --embedding"
    if is_tiny_autoencoder(keys):
        return "a tiny autoencoder (TAESD) alone, not a model: pass it with --vae"
    if keys and all(k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv."))
                    for k in keys):
        return "an autoencoder (VAE) alone, not a whole model: pass it with --vae"
    return None


def is_tiny_autoencoder(keys):
    """Whether ``keys`` are all a TAESD encoder's or decoder's, in any form people
    download (``ldm.models.tiny_autoencoder.tiny_state_dict`` reads them)."""
    keys = list(keys)
    return bool(keys) and (all(TINY_DIFFUSERS.match(k) for k in keys)
                           or all(TINY_NUMBERED.match(k) for k in keys))


def describe_folder(index, unet, scheduler):
    """A phrase naming what a diffusers pipeline folder holds, or None."""
    cls = index.get("_class_name", "")
    dim = unet.get("cross_attention_dim")
    if "XL" in cls or "text_encoder_2" in index or dim == 2048:
        return f"an SDXL pipeline ({cls or 'its UNet attends to 2,048-wide text'})"
    if "3" in cls and "transformer" in index:
        return f"a Stable Diffusion 3 pipeline ({cls})"
    if "Depth" in cls:
        return f"an SD 2 depth-to-image pipeline ({cls})"
    if "UnCLIP" in cls:
        return f"an SD 2.x unCLIP pipeline ({cls})"
    if dim == 1024:
        return "an SD 2.x pipeline (its UNet attends to 1,024-wide text, SD 1.x's to 768)"
    prediction = scheduler.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        return (f"a pipeline whose scheduler predicts {prediction} (SD 1.x predicts the "
                "noise)")
    return None


def text_width(width):
    """The generation not run here whose UNet attends to ``width``-wide text, or None."""
    return {1280: "SDXL's second text encoder (OpenCLIP ViT-bigG, 1,280-wide)",
            2048: "SDXL (2,048-wide text: CLIP ViT-L and OpenCLIP ViT-bigG)",
            4096: "Stable Diffusion 3 / FLUX (T5, 4,096-wide text)"}.get(width)
