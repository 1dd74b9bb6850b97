"""OpenCLIP's text transformer (ViT-H/14 for SD 2.x, ViT-bigG/14 for SDXL), written so attribute paths are the
keys SD 2 checkpoints hold under ``cond_stage_model.model.``: ``token_embedding``,
``positional_embedding``, ``transformer.resblocks.N.{ln_1, attn.in_proj_weight,
attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}``, ``ln_final``, ``text_projection`` and
``logit_scale`` (the projection is SDXL's pooled embedding; SD 2 uses neither, they are
kept so its checkpoints load strictly). Ours,
needing neither ``open_clip`` nor a download; checked against transformers' CLIPTextModel
holding the same weights as diffusers converts them (tests/families/test_sd2.py).
"""
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.diffusionmodules.util import Linear


class MultiheadAttention(nn.Module):
    """torch's ``nn.MultiheadAttention`` parameters (``in_proj_weight`` [3w, w],
    ``in_proj_bias``, ``out_proj``) as OpenCLIP saves them, computed batch-first with
    scaled dot-product attention."""

    def __init__(self, width, heads):
        super().__init__()
        if width % heads:
            raise ValueError(f"OpenCLIP width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x, causal=True):
        b, n, d = x.shape
        qkv = F.linear(x, self.in_proj_weight.to(x.dtype), self.in_proj_bias.to(x.dtype))
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm block: x + attn(ln_1(x)), then x + mlp(ln_2(x)); GELU (exact) in the MLP."""

    def __init__(self, width, heads, mlp_ratio=4.0):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", Linear(width, hidden)),
                                              ("gelu", nn.GELU()),
                                              ("c_proj", Linear(hidden, width))]))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads)
                                       for _ in range(layers))

    def forward(self, x, layers_run=None, first=0):
        """Through blocks ``first`` to ``layers_run`` (None: to the last)."""
        for block in self.resblocks[first:layers_run]:
            x = block(x)
        return x


class OpenCLIPTextModel(nn.Module):
    """Token ids [B, 77] -> the hidden states after ``layers_run`` blocks, with ``ln_final``
    applied (as SD 2's ``FrozenOpenCLIPEmbedder`` conditions on them)."""

    def __init__(self, vocab_size=49408, width=1024, layers=24, heads=16, context_length=77,
                 embed_dim=1024):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = Transformer(width, layers, heads)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    @property
    def layers(self):
        return len(self.transformer.resblocks)

    def forward(self, ids, layers_run=None, final_norm=True):
        """``final_norm`` False: the hidden states without ``ln_final`` (SDXL's)."""
        x = self.transformer(self.embed(ids), layers_run)
        return self.ln_final(x) if final_norm else x

    def embed(self, ids):
        return self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]].to(
            self.token_embedding.weight.dtype)

    def hidden_and_pooled(self, ids, layers_run):
        """(hidden states after ``layers_run`` blocks without ``ln_final``, the pooled text
        embedding): ``ln_final`` of the last block's output at each prompt's end token (its
        highest id, as OpenCLIP and SDXL pick it) through ``text_projection``, in one pass
        over the blocks."""
        hidden = self.transformer(self.embed(ids), layers_run)
        last = self.ln_final(self.transformer(hidden, None, layers_run))
        end = last[torch.arange(ids.shape[0], device=ids.device), ids.argmax(dim=-1)]
        return hidden, end @ self.text_projection.to(end.dtype)
