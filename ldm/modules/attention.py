"""Cross-attention transformer of the SD UNet (``SpatialTransformer``), CompVis key names."""
import math
import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.diffusionmodules.util import Conv2d, Linear, zero_module


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): one projection gives value and gate."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4, glu=True, dropout=0.0):
        super().__init__()
        inner = int(dim * mult)
        project_in = GEGLU(dim, inner) if glu else nn.Sequential(Linear(dim, inner), nn.GELU())
        # net.1 is a Dropout slot, kept so the output layer stays at net.2 as in checkpoints.
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), Linear(inner, dim))

    def forward(self, x):
        return self.net(x)


class CrossAttention(nn.Module):
    """Multi-head attention of x over context (itself when context is None), via SDPA."""

    def __init__(self, query_dim, context_dim=None, heads=8, dim_head=64, dropout=0.0):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = Linear(query_dim, inner, bias=False)
        self.to_k = Linear(context_dim, inner, bias=False)
        self.to_v = Linear(context_dim, inner, bias=False)
        # to_out.1 is a Dropout slot, kept for checkpoint compatibility.
        self.to_out = nn.Sequential(Linear(inner, query_dim), nn.Dropout(dropout))

    def forward(self, x, context=None):
        context = x if context is None else context
        b, n, _ = x.shape
        q, k, v = (t.view(b, t.shape[1], self.heads, -1).transpose(1, 2)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        rows = self.slice_rows
        if rows and n > rows:  # each query's row is independent: exact, in pieces
            out = torch.cat([F.scaled_dot_product_attention(q[:, :, i:i + rows], k, v)
                             for i in range(0, n, rows)], dim=2)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))

    slice_rows = None  # attention slicing: at most this many queries at a time (``set_attention_slicing``)


def set_attention_slicing(model, rows):
    """Attention slicing for every ``CrossAttention`` in ``model``: at most ``rows`` queries
    at a time (None: all at once). The attention weights of a slice are
    [batch, heads, rows, keys] instead of [batch, heads, queries, keys], which is what
    bounds memory where SDPA materialises them (its "math" kernel, e.g. on MPS or for
    dtypes without a fused kernel); the fused CPU and CUDA kernels never hold them whole,
    so there it saves nothing (see the README's speed section)."""
    if rows is not None and rows < 1:
        raise ValueError(f"attention slices must have at least 1 row, got {rows}")
    for module in model.modules():
        if isinstance(module, CrossAttention):
            module.slice_rows = rows
    return model


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention to the text, GEGLU feed-forward; pre-norm residuals."""

    def __init__(self, dim, n_heads, d_head, dropout=0.0, context_dim=None, gated_ff=True,
                 checkpoint=False, disable_self_attn=False):
        super().__init__()
        self.disable_self_attn = disable_self_attn
        self.attn1 = CrossAttention(dim, context_dim if disable_self_attn else None,
                                    n_heads, d_head, dropout)
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(dim, context_dim, n_heads, d_head, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x, context=None):
        x = x + self.attn1(self.norm1(x), context if self.disable_self_attn else None)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


def coordinate_features(h, w, device=None, dtype=None, n_freqs=4):
    """Fourier features of each pixel's centre in [-1, 1]^2, for an h x w map, row-major:
    [h*w, 4 * n_freqs] (sin and cos of 2^k * pi * x and * y). They depend on the relative
    position only, so a model using them runs at any size."""
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h * 2 - 1
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w * 2 - 1
    yx = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2)
    angles = yx[:, :, None] * (math.pi * 2.0 ** torch.arange(n_freqs, device=device))
    return torch.cat([angles.sin(), angles.cos()], -1).reshape(h * w, -1).to(dtype)


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, attending to ``context`` (the text).

    v1 projects in and out with 1x1 convolutions; SD 2.x configs set
    ``use_linear=True`` (Linear layers), which is what its checkpoints hold.

    ``pos_emb`` (not in any SD checkpoint; off by default) adds a projection of each pixel's
    coordinates (``coordinate_features``) to the tokens, so that cross-attention can tie
    words like "left" or "top" to places: a convolutional UNet otherwise learns where it is
    only slowly, from the zero padding. ``True`` or ``"zero"`` zero-initialises it, a no-op
    to start with (for adding it to a trained model); ``"random"`` gives it Linear's usual
    random start, so that from the first step every pixel's queries differ by place (for
    training from scratch: a zero start has to be pulled out of a saddle, see
    models/ldm/shapes/HISTORY.md).
    """

    def __init__(self, in_channels, n_heads, d_head, depth=1, dropout=0.0, context_dim=None,
                 disable_self_attn=False, use_linear=False, use_checkpoint=False, pos_emb=False):
        super().__init__()
        inner = n_heads * d_head
        self.use_linear = use_linear
        if pos_emb not in (False, None, True, "zero", "random"):
            raise ValueError(f"pos_emb must be false, true/'zero' or 'random', not {pos_emb!r}")
        self.pos_emb = nn.Linear(16, inner) if pos_emb else None
        if pos_emb in (True, "zero"):
            zero_module(self.pos_emb)
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6)
        if use_linear:
            self.proj_in = Linear(in_channels, inner)
            self.proj_out = zero_module(Linear(inner, in_channels))
        else:
            self.proj_in = Conv2d(in_channels, inner, 1)
            self.proj_out = zero_module(Conv2d(inner, in_channels, 1))
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, n_heads, d_head, dropout, context_dim,
                                  disable_self_attn=disable_self_attn)
            for _ in range(depth))

    def forward(self, x, context=None):
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)
        if self.use_linear:
            x = self.proj_in(x)
        if self.pos_emb is not None:
            x = x + self.pos_emb(coordinate_features(h, w, x.device, x.dtype))
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(b, -1, h, w)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in
