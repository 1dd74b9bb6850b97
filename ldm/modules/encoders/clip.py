"""CLIP transformers (text and vision), written so attribute paths are the Hugging Face keys.

SD v1 checkpoints store OpenAI's CLIP ViT-L/14 text encoder under
``cond_stage_model.transformer.text_model.*`` and the safety checker stores the ViT-L/14 vision
tower under ``vision_model.vision_model.*``, both in the layout of ``transformers``' CLIP
classes. Mirroring those names lets both load with a plain ``load_state_dict``; the
implementation itself is ours and needs neither ``transformers`` nor a download.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.diffusionmodules.util import Linear


@dataclass
class CLIPTextConfig:
    """Defaults are OpenAI CLIP ViT-L/14's text tower, the one SD v1 conditions on."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"


@dataclass
class CLIPVisionConfig:
    """Defaults are OpenAI CLIP ViT-L/14's vision tower (used by the SD safety checker)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"


def quick_gelu(x):
    """OpenAI CLIP's GELU approximation, x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class CLIPAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        if dim % heads:
            raise ValueError(f"CLIP width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.q_proj = Linear(dim, dim)
        self.k_proj = Linear(dim, dim)
        self.v_proj = Linear(dim, dim)
        self.out_proj = Linear(dim, dim)

    def forward(self, x, causal):
        b, n, d = x.shape
        q, k, v = (p(x).view(b, n, self.heads, -1).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class CLIPMLP(nn.Module):
    def __init__(self, dim, hidden, act):
        super().__init__()
        self.act = ACTIVATIONS[act]
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, dim, heads, hidden, act, eps):
        super().__init__()
        self.self_attn = CLIPAttention(dim, heads)
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.mlp = CLIPMLP(dim, hidden, act)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x, causal):
        x = x + self.self_attn(self.layer_norm1(x), causal)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList(
            CLIPEncoderLayer(cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size,
                             cfg.hidden_act, cfg.layer_norm_eps)
            for _ in range(cfg.num_hidden_layers))

    def forward(self, x, causal, skip=1):
        """Through the layers, all but the last ``skip - 1``."""
        for layer in self.layers[:len(self.layers) - (skip - 1)]:
            x = layer(x, causal)
        return x


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, ids):
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, ids, skip=1, final_norm=True):
        """Token ids [B, N] -> last hidden state [B, N, width] (causal attention, final LN).
        ``skip`` = N > 1: the hidden state N - 1 layers before the last, with the final
        layer norm applied (A1111's "clip skip") unless ``final_norm`` is False (SDXL's
        ``layer: hidden``)."""
        x = self.encoder(self.embeddings(ids), causal=True, skip=skip)
        return self.final_layer_norm(x) if final_norm else x


class CLIPTextModel(nn.Module):
    """Holds ``text_model`` so keys read ``text_model.encoder.layers.0...`` as in transformers."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.config = cfg
        self.text_model = CLIPTextTransformer(cfg)

    def forward(self, ids, skip=1, final_norm=True):
        return self.text_model(ids, skip, final_norm)


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size,
                                         stride=cfg.patch_size, bias=False)
        n_positions = (cfg.image_size // cfg.patch_size) ** 2 + 1
        self.position_embedding = nn.Embedding(n_positions, cfg.hidden_size)

    def forward(self, pixels):
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class CLIPVisionTransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic: HF key
        self.encoder = CLIPEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixels):
        """Normalised pixels [B, 3, S, S] -> pooled output [B, width] (post-LN class token)."""
        x = self.encoder(self.pre_layrnorm(self.embeddings(pixels)), causal=False)
        return self.post_layernorm(x[:, 0])


class CLIPVisionModel(nn.Module):
    """Holds ``vision_model`` so keys read ``vision_model.encoder...`` as in transformers."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.config = cfg
        self.vision_model = CLIPVisionTransformer(cfg)

    def forward(self, pixels):
        return self.vision_model(pixels)
