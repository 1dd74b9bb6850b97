"""Stable Diffusion 1.x (CompVis, RunwayML): one CLIP ViT-L/14 text encoder (768-wide,
its last layer), a 320-wide UNet predicting the noise, the f8 KL autoencoder (scale
0.18215). Variants: text-to-image (4 input channels), inpainting (9: latents, mask,
masked-image latents), and a latent consistency model with a guidance embedding (LCM:
``time_embedding.cond_proj``, diffusers' ``time_cond_proj_dim``). Configs are CompVis'."""
from ldm.families.base import Family

UNET = "model.diffusion_model."
IN = UNET + "input_blocks.0.0.weight"                                  # [320, 4 or 9, 3, 3]
CROSS = UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"  # [320, 768]
# transformers 4.x nests CLIP under text_model., 5.x and some old exports do not
TOKENS = ("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
          "cond_stage_model.transformer.embeddings.token_embedding.weight")
VARIANTS = {4: "txt2img", 9: "inpainting"}
COND_PROJ = UNET + "time_embedding.cond_proj.weight"                   # [320, 256]: LCM


def match(shapes):
    """"txt2img" or "inpainting" for an SD 1.x checkpoint's {key: shape}, else None."""
    conv_in, cross = shapes.get(IN), shapes.get(CROSS)
    tokens = next((shapes[k] for k in TOKENS if k in shapes), None)
    if conv_in is None or cross is None or len(conv_in) != 4 or conv_in[0] != 320:
        return None
    if tuple(cross) != (320, 768) or (tokens is not None and tokens[-1] != 768):
        return None
    if any(k.startswith((UNET + "label_emb.", "conditioner.")) for k in shapes):
        return None
    if COND_PROJ in shapes:
        return "lcm" if conv_in[1] == 4 else None
    return VARIANTS.get(conv_in[1])


def match_folder(index, unet, scheduler):
    """The variant of a diffusers SD 1.x pipeline folder: one text encoder, a UNet that
    attends to 768-wide text with no extra embedding, a noise-predicting scheduler."""
    if "text_encoder_2" in index or "XL" in index.get("_class_name", ""):
        return None
    if unet.get("cross_attention_dim") != 768 or unet.get("addition_embed_type"):
        return None
    if scheduler.get("prediction_type", "epsilon") != "epsilon":
        return None
    if unet.get("time_cond_proj_dim"):
        return "lcm" if unet.get("in_channels", 4) == 4 else None
    return VARIANTS.get(unet.get("in_channels", 4))


FAMILY = Family(
    name="sd1", label="Stable Diffusion 1.x",
    configs={"txt2img": "stable-diffusion/v1-inference.yaml",
             "inpainting": "stable-diffusion/v1-inpainting-inference.yaml",
             "lcm": "stable-diffusion/v1-lcm-inference.yaml"},
    match=match, match_folder=match_folder,
    # CompVis' scripts' defaults are SD 1.x's: DDIM 50, guidance 7.5 (img2img.py: 5.0)
    defaults={},
    prefixes={"unet": UNET, "vae": "first_stage_model.",
              "text": "cond_stage_model.transformer."},
    native_size=512, prediction="eps", vae_scale=0.18215, text_width=768,
    lora_prefixes=("lora_unet_", "lora_te_"),
)
