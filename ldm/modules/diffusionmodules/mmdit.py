"""The MMDiT of Stable Diffusion 3 and 3.5 (Esser et al. 2024, "Scaling Rectified Flow
Transformers for High-Resolution Image Synthesis", sec. 4 and fig. 2), in the key names of
Stability's checkpoints (``model.diffusion_model.*``: ``x_embedder``, ``pos_embed``,
``t_embedder``, ``y_embedder``, ``context_embedder``, ``joint_blocks.N.{context_block,
x_block}``, ``final_layer``), so a file loads strictly with no renaming.

The latents are cut into 2x2 patches; the patch tokens and the text tokens each have their
own weights (a ``DismantledBlock`` per stream and block) but attend jointly, the text's
queries, keys and values placed before the image's. Each block is modulated (adaLN) by the
timestep's embedding plus the pooled text embedding. The last text block is "pre-only": it
gives keys and values and nothing after. SD 3.5's variants: RMS-normed queries and keys
(``qk_norm: rms``, 3.5 Large and Medium) and MMDiT-X's second self-attention over the
image tokens alone in the first blocks (``x_block_self_attn_layers``, 3.5 Medium).
"""
import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.diffusionmodules.util import Conv2d, Linear, timestep_embedding


def modulate(x, shift, scale):
    """adaLN: x * (1 + scale) + shift, per image ([B, D] over [B, L, D])."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_2d(dim, side):
    """The fixed 2-D sine-cosine position table [side * side, dim] (MAE's, which SD 3's
    ``pos_embed`` holds): half the channels for the row, half for the column, each
    sin then cos of positions times 10000^(-k / (dim / 4))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(side, dtype=torch.float64),
                                torch.arange(side, dtype=torch.float64), indexing="ij")

    def axis(pos):
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)
    return torch.cat([axis(rows), axis(cols)], dim=1).float()


class PatchEmbed(nn.Module):
    """Latents [B, C, H, W] -> patch tokens [B, H/p * W/p, D] (``x_embedder.proj``)."""

    def __init__(self, patch_size, in_channels, dim):
        super().__init__()
        self.patch_size = patch_size
        self.proj = Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class MLPEmbedder(nn.Module):
    """``mlp.0`` -> SiLU -> ``mlp.2`` (the timestep's and the pooled text's embedders)."""

    def __init__(self, in_dim, dim):
        super().__init__()
        self.mlp = nn.Sequential(Linear(in_dim, dim), nn.SiLU(), Linear(dim, dim))

    def forward(self, x):
        return self.mlp(x)


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dimension (SD 3.5's query and key norm)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.to(x.dtype)


class SelfAttention(nn.Module):
    """One stream's projections (``qkv``, ``proj``; none after a pre-only block) and its
    optional per-head query/key norms (``ln_q``, ``ln_k``)."""

    def __init__(self, dim, heads, pre_only=False, qk_norm=None):
        super().__init__()
        self.heads = heads
        self.qkv = Linear(dim, dim * 3)
        if not pre_only:
            self.proj = Linear(dim, dim)
        if qk_norm not in (None, "rms"):
            raise ValueError(f"qk_norm must be None or 'rms' (SD 3.5's), not {qk_norm!r}")
        self.ln_q = RMSNorm(dim // heads) if qk_norm else nn.Identity()
        self.ln_k = RMSNorm(dim // heads) if qk_norm else nn.Identity()

    def qkv_heads(self, x):
        """[B, L, D] -> q, k, v as [B, heads, L, head dim]."""
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        return self.ln_q(q), self.ln_k(k), v


def attend(q, k, v):
    """Scaled dot-product attention over heads -> [B, L, D]."""
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)


class DismantledBlock(nn.Module):
    """One stream's half of a joint block: adaLN-modulated attention inputs, then (unless
    ``pre_only``) the gated attention output and the gated MLP. ``adaLN_modulation.1``
    gives shift, scale, gate for the attention and for the MLP (and for MMDiT-X's second
    attention: 9 in all; 2 for a pre-only block)."""

    def __init__(self, dim, heads, mlp_ratio=4.0, pre_only=False, qk_norm=None,
                 self_attn2=False):
        super().__init__()
        self.pre_only = pre_only
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, heads, pre_only, qk_norm)
        if self_attn2:
            self.attn2 = SelfAttention(dim, heads, False, qk_norm)
        self.self_attn2 = self_attn2
        n_mods = 2 if pre_only else 9 if self_attn2 else 6
        if not pre_only:
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            hidden = int(dim * mlp_ratio)
            self.mlp = nn.Module()
            self.mlp.fc1, self.mlp.fc2 = Linear(dim, hidden), Linear(hidden, dim)
        # adaLN_modulation.0 is the SiLU, kept for the checkpoint's ``.1`` numbering
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(dim, n_mods * dim))

    def pre_attention(self, x, c):
        """(q, k, v of the stream, what ``post_attention`` needs)."""
        mods = self.adaLN_modulation(c).chunk(2 if self.pre_only else
                                              9 if self.self_attn2 else 6, dim=1)
        normed = self.norm1(x)
        qkv = self.attn.qkv_heads(modulate(normed, mods[0], mods[1]))
        if self.self_attn2:   # MMDiT-X: the second attention reads its own modulation
            return qkv, (x, normed, mods)
        return qkv, (x, None, mods)

    def post_attention(self, out, saved):
        x, normed, mods = saved
        x = x + mods[2].unsqueeze(1) * self.attn.proj(out)
        if self.self_attn2:
            q, k, v = self.attn2.qkv_heads(modulate(normed, mods[6], mods[7]))
            x = x + mods[8].unsqueeze(1) * self.attn2.proj(attend(q, k, v))
        h = modulate(self.norm2(x), mods[3], mods[4])
        return x + mods[5].unsqueeze(1) * self.mlp.fc2(F.gelu(self.mlp.fc1(h), approximate="tanh"))


class JointBlock(nn.Module):
    """The text stream (``context_block``) and the image stream (``x_block``) attending
    jointly, text tokens first."""

    def __init__(self, dim, heads, mlp_ratio, pre_only, qk_norm, self_attn2):
        super().__init__()
        self.context_block = DismantledBlock(dim, heads, mlp_ratio, pre_only, qk_norm)
        self.x_block = DismantledBlock(dim, heads, mlp_ratio, False, qk_norm, self_attn2)

    def forward(self, context, x, c):
        (cq, ck, cv), c_saved = self.context_block.pre_attention(context, c)
        (xq, xk, xv), x_saved = self.x_block.pre_attention(x, c)
        out = attend(torch.cat([cq, xq], 2), torch.cat([ck, xk], 2), torch.cat([cv, xv], 2))
        n = context.shape[1]
        context = (None if self.context_block.pre_only
                   else self.context_block.post_attention(out[:, :n], c_saved))
        return context, self.x_block.post_attention(out[:, n:], x_saved)


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then the linear map of each token to its patch's values."""

    def __init__(self, dim, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class MMDiT(nn.Module):
    """Stability's ``MMDiTX`` parameters: ``depth`` blocks of width ``64 * depth`` with
    ``depth`` heads of 64 (their rule; ``head_dim`` is ours, for tiny test models),
    ``pos_embed_max_size`` the side of the position table the patches' positions are
    cropped from (centred), ``adm_in_channels`` the pooled text width (2,048),
    ``context_dim`` the text states' width (4,096) and ``qk_norm``,
    ``x_block_self_attn_layers`` SD 3.5's variants. ``input_size``, ``num_patches`` and the
    other training-time arguments of Stability's class are accepted and unused."""

    def __init__(self, depth, patch_size=2, in_channels=16, out_channels=None,
                 pos_embed_max_size=192, adm_in_channels=2048, context_dim=4096,
                 mlp_ratio=4.0, qk_norm=None, x_block_self_attn_layers=(), head_dim=64,
                 **unused):
        super().__init__()
        dim = head_dim * depth
        self.in_channels, self.patch_size = in_channels, patch_size
        self.out_channels = out_channels or in_channels
        self.pos_embed_max_size = pos_embed_max_size
        self.x_embedder = PatchEmbed(patch_size, in_channels, dim)
        # the fixed position table, stored in the checkpoint (loaded from it)
        self.register_buffer("pos_embed", sincos_2d(dim, pos_embed_max_size)[None])
        self.t_embedder = MLPEmbedder(256, dim)
        self.y_embedder = MLPEmbedder(adm_in_channels, dim)
        self.context_embedder = Linear(context_dim, dim)
        attn2 = set(x_block_self_attn_layers or ())
        self.joint_blocks = nn.ModuleList(
            JointBlock(dim, depth, mlp_ratio, i == depth - 1, qk_norm, i in attn2)
            for i in range(depth))
        self.final_layer = FinalLayer(dim, patch_size, self.out_channels)

    def cropped_pos_embed(self, h, w):
        """The position table's centre crop for an h x w grid of patches."""
        side = self.pos_embed_max_size
        if h > side or w > side:
            p = self.patch_size
            raise ValueError(f"latents of {h * p}x{w * p} are larger than this model's "
                             f"position table ({side * p}x{side * p} latent pixels)")
        top, left = (side - h) // 2, (side - w) // 2
        table = self.pos_embed.reshape(1, side, side, -1)[:, top:top + h, left:left + w]
        return table.reshape(1, h * w, -1)

    def forward(self, x, timesteps, context=None, y=None, skip_layers=()):
        """``x`` [B, C, H, W] at (float) ``timesteps`` [B] (sigma x 1000), ``context``
        [B, L, 4096] the text states, ``y`` [B, 2048] the pooled text; ``skip_layers``:
        blocks left out (skip-layer guidance). -> [B, C, H, W]."""
        _, _, H, W = x.shape
        p = self.patch_size
        h, w = H // p, W // p
        dtype = self.x_embedder.proj.weight.dtype
        tokens = self.x_embedder(x.to(dtype)) + self.cropped_pos_embed(h, w).to(dtype)
        t_freq = timestep_embedding(timesteps, 256).to(dtype)
        c = self.t_embedder(t_freq) + self.y_embedder(y.to(dtype))
        context = self.context_embedder(context.to(dtype))
        for i, block in enumerate(self.joint_blocks):
            if i in skip_layers:
                continue
            context, tokens = block(context, tokens, c)
        out = self.final_layer(tokens, c)     # [B, h * w, p * p * C]
        out = out.reshape(-1, h, w, p, p, self.out_channels)
        return torch.einsum("nhwpqc->nchpwq", out).reshape(-1, self.out_channels, H, W)

    @property
    def depth(self):
        return len(self.joint_blocks)

    def caching(self, interval, branch=1):
        """DeepCache is the UNet's (its skip branches); an MMDiT has none."""
        if interval > 1:
            raise ValueError("DeepCache needs a UNet: SD 3's MMDiT has no skip branches to "
                             "cache")
        from contextlib import nullcontext
        return nullcontext()

