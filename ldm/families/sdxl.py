"""Stable Diffusion XL (Stability AI, generative-models' ``sgm`` layout): two text encoders
(CLIP ViT-L/14's layer 11 and OpenCLIP ViT-bigG/14's penultimate, 768 + 1280 = 2048-wide
cross-attention) under ``conditioner.embedders.N.``, the bigG pooled embedding and the
size conditioning in the UNet's ADM vector (``label_emb``, 2816 wide), a 320-wide UNet of
three levels with 1, 2 and 10 transformer blocks, the f8 autoencoder at scale 0.13025,
native size 1024. Variants: the base model ("txt2img", ``sd_xl_base.yaml``) and the
refiner ("refiner", ``sd_xl_refiner.yaml``: bigG alone, a 384-wide UNet, the aesthetic
score instead of the target size, 2560-wide vector) and inpainting ("inpainting", 9 input
channels, ``sd_xl_inpainting.yaml``: diffusers' SDXL inpainting 0.1) and SDXL-Turbo
("turbo", ``sd_xl_turbo.yaml``: the base's keys, told by a file name with "turbo" in it
or a folder's trailing scheduler; 512 px, 1 Euler step, no guidance) and a latent
consistency model with a guidance embedding ("lcm", ``sd_xl_lcm.yaml``: LCM-SDXL, the
base's keys and ``time_embedding.cond_proj``, diffusers' ``time_cond_proj_dim``). Configs
are Stability's (inpainting: the base's with the wider input; LCM: the base's with the
guidance projection)."""
from ldm.families.base import Family

UNET = "model.diffusion_model."
IN = UNET + "input_blocks.0.0.weight"           # base [320, 4 or 9, 3, 3], refiner [384, 4, 3, 3]
ADM = UNET + "label_emb.0.0.weight"             # base [1280, 2816], refiner [1536, 2560]
CLIP_L = "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"
BIG_G = "conditioner.embedders.{}.model.token_embedding.weight"      # [49408, 1280]
COND_PROJ = UNET + "time_embedding.cond_proj.weight"                   # [320, 256]: LCM


def match(shapes):
    """"txt2img" (base), "inpainting" or "refiner" for an SDXL checkpoint's {key: shape},
    else None."""
    conv_in, adm = shapes.get(IN), shapes.get(ADM)
    if conv_in is None or adm is None or len(conv_in) != 4 or len(adm) != 2:
        return None
    clip_l, big_g = shapes.get(CLIP_L), shapes.get(BIG_G.format(1))
    if clip_l is not None and big_g is not None:
        if tuple(adm) != (1280, 2816) or conv_in[0] != 320:
            return None
        if COND_PROJ in shapes:
            return "lcm" if conv_in[1] == 4 else None
        return {4: "txt2img", 9: "inpainting"}.get(conv_in[1])
    if clip_l is None and shapes.get(BIG_G.format(0), (0, 0))[-1] == 1280:
        if tuple(adm) == (1536, 2560) and tuple(conv_in[:2]) == (384, 4):
            return "refiner"
    return None


def match_folder(index, unet, scheduler):
    """The variant of a diffusers SDXL pipeline folder: a UNet with the ``text_time``
    addition embedding; two text encoders (base: 768 + 1280 = 2048-wide cross-attention)
    or the second alone (refiner: 1280)."""
    if unet.get("addition_embed_type") != "text_time":
        return None
    first = (index.get("text_encoder") or [None])[0]
    second = (index.get("text_encoder_2") or [None])[0]
    in_channels = unet.get("in_channels", 4)
    if first and second:
        if unet.get("time_cond_proj_dim"):
            return "lcm" if in_channels == 4 else None
        if in_channels == 4 and scheduler.get("timestep_spacing") == "trailing":
            return "turbo"
        return {4: "txt2img", 9: "inpainting"}.get(in_channels)
    if second and in_channels == 4:
        return "refiner"
    return None


FAMILY = Family(
    name="sdxl", label="Stable Diffusion XL",
    configs={"txt2img": "stable-diffusion/sd_xl_base.yaml",
             "refiner": "stable-diffusion/sd_xl_refiner.yaml",
             "inpainting": "stable-diffusion/sd_xl_inpainting.yaml",
             "turbo": "stable-diffusion/sd_xl_turbo.yaml",
             "lcm": "stable-diffusion/sd_xl_lcm.yaml"},
    match=match, match_folder=match_folder,
    defaults={"scale": 5.0},   # diffusers' SDXL pipelines' guidance; DDIM 50 as CompVis' else
    prefixes={"unet": UNET, "vae": "first_stage_model.", "text": "conditioner.embedders."},
    native_size=1024, prediction="eps", vae_scale=0.13025, text_width=2048,
    lora_prefixes=("lora_unet_", "lora_te1_", "lora_te2_"),
    name_variants={"txt2img": {"turbo": "turbo"}},
)
