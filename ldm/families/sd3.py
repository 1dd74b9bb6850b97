"""Stable Diffusion 3 and 3.5 (Stability AI; Esser et al. 2024): an MMDiT under
``model.diffusion_model.joint_blocks.N.{context_block,x_block}``, rectified flow with the
timestep shift 3.0, three text encoders under ``text_encoders.{clip_l,clip_g,t5xxl}.``
(CLIP ViT-L and OpenCLIP ViT-bigG in transformers' layout, T5 v1.1 XXL's encoder; any of
them may be missing from a file and given apart), the 16-channel f8 autoencoder at scale
1.5305 and shift 0.0609, native size 1024. Variants, told by the network's depth, its
position table and SD 3.5's layers: SD 3 Medium ("sd3-medium": 24 blocks, 192x192
positions), SD 3.5 Medium ("sd3.5-medium": 24 blocks, 384x384 positions, RMS-normed
queries and keys, MMDiT-X's second attention), SD 3.5 Large ("sd3.5-large": 38 blocks,
RMS-normed queries and keys) and its Turbo (the same keys, told by a file name with "turbo"
in it)."""
from ldm.families.base import Family

NET = "model.diffusion_model."
PATCH = NET + "x_embedder.proj.weight"       # [64 x depth, 16, 2, 2]
POS = NET + "pos_embed"                      # [1, side^2, 64 x depth]
QK_NORM = NET + "joint_blocks.0.x_block.attn.ln_q.weight"
ATTN2 = NET + "joint_blocks.0.x_block.attn2.qkv.weight"


def match(shapes):
    """The variant of an SD 3 / 3.5 checkpoint's {key: shape}, else None."""
    patch, pos = shapes.get(PATCH), shapes.get(POS)
    if patch is None or pos is None or len(patch) != 4 or tuple(patch[1:]) != (16, 2, 2):
        return None
    side = round(pos[1] ** 0.5)
    return variant(patch[0] // 64, side if side * side == pos[1] else None,
                   QK_NORM in shapes, ATTN2 in shapes)


def variant(depth, side, norm, attn2):
    """The variant of an MMDiT of ``depth`` blocks, a ``side`` x ``side`` position table,
    with or without qk norm and MMDiT-X's second attention; None for another."""
    if depth == 24 and side == 192 and not norm and not attn2:
        return "sd3-medium"
    if depth == 24 and side == 384 and norm and attn2:
        return "sd3.5-medium"
    if depth == 38 and side == 192 and norm and not attn2:
        return "sd3.5-large"
    return None


def match_folder(index, transformer, scheduler):
    """The variant of a diffusers SD 3 pipeline folder, from its transformer's config
    (``source.folder_configs`` gives it in the UNet's place)."""
    if "transformer" not in index or transformer.get("in_channels", 16) != 16:
        return None
    return variant(transformer.get("num_layers"), transformer.get("pos_embed_max_size"),
                   bool(transformer.get("qk_norm")),
                   bool(transformer.get("dual_attention_layers")))


FAMILY = Family(
    name="sd3", label="Stable Diffusion 3",
    configs={"sd3-medium": "stable-diffusion/sd3_medium.yaml",
             "sd3.5-medium": "stable-diffusion/sd3.5_medium.yaml",
             "sd3.5-large": "stable-diffusion/sd3.5_large.yaml",
             "sd3.5-large-turbo": "stable-diffusion/sd3.5_large_turbo.yaml"},
    labels={"sd3-medium": "SD 3 Medium", "sd3.5-medium": "SD 3.5 Medium",
            "sd3.5-large": "SD 3.5 Large", "sd3.5-large-turbo": "SD 3.5 Large Turbo"},
    match=match, match_folder=match_folder,
    prefixes={"unet": NET, "vae": "first_stage_model.", "text": "text_encoders."},
    native_size=1024, prediction="flow", vae_scale=1.5305, vae_shift=0.0609, text_width=4096,
    name_variants={"sd3.5-large": {"turbo": "sd3.5-large-turbo"}},
)
