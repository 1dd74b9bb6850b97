"""Stable Diffusion 2.x (Stability AI): the OpenCLIP ViT-H/14 text encoder (1,024-wide, its
penultimate layer), a 320-wide UNet with linear projections and 64-wide heads, SD v1's f8
autoencoder. Variants: the 512-base model predicting the noise ("txt2img",
``v2-inference.yaml``), the 768 model predicting v ("v", ``v2-inference-v.yaml``: 768-v-ema,
v2-1_768-ema-pruned) and inpainting (9 input channels). The two text-to-image variants
have identical keys and shapes: for a single file one UNet call after loading tells them
apart (``prediction_variants``), unless ``--config`` says which; a diffusers folder's
scheduler says which it is. Two more share those keys: SD-Turbo ("turbo",
``sd-turbo.yaml``: 1 Euler step on trailing timesteps, no guidance), told by a file name
with "turbo" in it (``name_variants``) or a folder's trailing scheduler, and SD 2.1
zero-terminal-SNR fine-tunes ("zero-snr"), told by a folder's scheduler or ``--config``.
The SD x4 upscaler ("x4-upscaler", ``x4-upscaling.yaml``: 7 input channels, a 256-wide
UNet, the f4 autoencoder) shares the text encoder and runs one task, upscaling. Depth-to-image
and unCLIP checkpoints (also OpenCLIP, other inputs) are not this family
(``known.generation`` names them). Configs are Stability's."""
from ldm.families.base import Family

UNET = "model.diffusion_model."
IN = UNET + "input_blocks.0.0.weight"                                  # [320, 4 or 9, 3, 3]
CROSS = UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"  # [320, 1024]
TOKENS = "cond_stage_model.model.token_embedding.weight"              # [49408, 1024]
OTHER_INPUTS = (UNET + "label_emb.", "embedder.", "noise_augmentor.", "depth_model.",
                "conditioner.")


def match(shapes):
    """"txt2img", "inpainting" or "x4-upscaler" for an SD 2.x checkpoint's {key: shape},
    else None."""
    conv_in, cross, tokens = shapes.get(IN), shapes.get(CROSS), shapes.get(TOKENS)
    if (tuple(conv_in or ()) == (256, 7, 3, 3) and tokens is not None and tokens[-1] == 1024
            and UNET + "label_emb.weight" in shapes):
        return "x4-upscaler"   # the x4 upscaler: 4 latent + 3 image channels, noise level label
    if conv_in is None or cross is None or tokens is None or len(conv_in) != 4:
        return None
    if conv_in[0] != 320 or tuple(cross) != (320, 1024) or tokens[-1] != 1024:
        return None
    if any(k.startswith(OTHER_INPUTS) for k in shapes):
        return None
    return {4: "txt2img", 9: "inpainting"}.get(conv_in[1])


def match_folder(index, unet, scheduler):
    """The variant of a diffusers SD 2.x pipeline folder: one text encoder, a UNet that
    attends to 1,024-wide text with no extra embedding (or the x4 upscaler's 7-channel one
    with its noise-level classes); its scheduler tells the v model
    from the eps one, a zero-terminal-SNR fine-tune (``rescale_betas_zero_snr``) from the v
    model, and SD-Turbo (trailing timesteps) from the eps one."""
    if "text_encoder_2" in index or "XL" in index.get("_class_name", ""):
        return None
    if unet.get("cross_attention_dim") != 1024 or unet.get("addition_embed_type"):
        return None
    if "Depth" in index.get("_class_name", "") or "UnCLIP" in index.get("_class_name", ""):
        return None
    in_channels = unet.get("in_channels", 4)
    if in_channels == 7 and unet.get("num_class_embeds"):
        return "x4-upscaler"   # StableDiffusionUpscalePipeline
    if in_channels == 9:
        return "inpainting"
    if in_channels != 4:
        return None
    if scheduler.get("prediction_type") == "v_prediction":
        return "zero-snr" if scheduler.get("rescale_betas_zero_snr") else "v"
    return "turbo" if scheduler.get("timestep_spacing") == "trailing" else "txt2img"


FAMILY = Family(
    name="sd2", label="Stable Diffusion 2.x",
    configs={"txt2img": "stable-diffusion/v2-inference.yaml",
             "v": "stable-diffusion/v2-inference-v.yaml",
             "inpainting": "stable-diffusion/v2-inpainting-inference.yaml",
             "zero-snr": "stable-diffusion/v2-inference-v-zero-snr.yaml",
             "turbo": "stable-diffusion/sd-turbo.yaml",
             "x4-upscaler": "stable-diffusion/x4-upscaling.yaml"},
    match=match, match_folder=match_folder,
    defaults={"scale": 9.0},   # Stability's scripts' guidance; DDIM 50 as CompVis' else
    prefixes={"unet": UNET, "vae": "first_stage_model.", "text": "cond_stage_model.model."},
    native_size=512, prediction="eps", vae_scale=0.18215, text_width=1024,
    lora_prefixes=("lora_unet_", "lora_te_"),
    prediction_variants={"txt2img": {"eps": "txt2img", "v": "v"}},
    name_variants={"txt2img": {"turbo": "turbo"}},
)
