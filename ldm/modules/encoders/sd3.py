"""SD 3's text conditioning: three encoders under ``text_encoders.{clip_l, clip_g,
t5xxl}.transformer.`` (Esser et al. 2024, sec. 5.2; Stability's ``sd3_infer.py`` and
diffusers' ``StableDiffusion3Pipeline.encode_prompt``):

- CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 in ``transformers``' ``CLIPTextModelWithProjection``
  layout: each gives its penultimate layer's states (no final norm; 768 + 1,280 wide, padded
  with zeros to T5's 4,096) and its pooled embedding (the final norm at the end token,
  projected), the two pooled embeddings concatenated (2,048) as the MMDiT's vector ``y``;
- T5 v1.1 XXL's encoder (``ldm.modules.encoders.t5``): its last states, 256 tokens by
  default (diffusers'; Stability's reference takes 77), placed after the CLIP states along
  the sequence. Optional, as SD 3 was trained with it dropped: without it (no weights,
  or no tokenizer) its tokens are zeros, as many as it would give (256), as diffusers does
  (ComfyUI gives 77), and the run says so.

Prompts are plain text (CompVis' syntax): at most 77 CLIP tokens and the T5 length; A1111
weights and chunks are refused in one line.
"""
import logging

import torch
from torch import nn

from ldm.modules.diffusionmodules.util import Linear
from ldm.modules.encoders.modules import FrozenCLIPEmbedder
from ldm.modules.encoders.t5 import T5EncoderModel

log = logging.getLogger(__name__)

EOS = 49407   # CLIP's end token


class CLIPWithProjection(FrozenCLIPEmbedder):
    """A CLIP text tower with its projection (``transformer.text_model.*``,
    ``transformer.text_projection``): the penultimate layer's states and the projected
    pooled embedding. ``pad_id``: None pads with the end token (CLIP-L's tokenizer), 0
    with "!" (CLIP-G's, as SDXL)."""

    def __init__(self, width=768, layers=12, heads=12, hidden_act="quick_gelu", pad_id=None,
                 vocab_size=49408, max_length=77, intermediate_size=None):
        super().__init__(max_length=max_length, freeze=False, vocab_size=vocab_size,
                         width=width, layers=layers, heads=heads,
                         intermediate_size=intermediate_size, hidden_act=hidden_act,
                         layer="hidden", layer_idx=layers - 1)
        self.transformer.text_projection = Linear(width, width, bias=False)
        self.pad_id = pad_id
        self.freeze()

    def tokenize(self, texts, max_length=77, added=None):
        from ldm.modules.encoders.tokenizer import tokenize
        return tokenize(list(texts), max_length, added, self.pad_id)

    def encode_ids_pooled(self, ids):
        """(the states ``clip_skip`` allows, [B, 77, width]; the pooled embedding)."""
        text = self.transformer.text_model
        x = text.embeddings(ids)
        stop = len(text.encoder.layers) - (self.base_skip + self.clip_skip - 1) + 1
        hidden = None
        for i, layer in enumerate(text.encoder.layers):
            x = layer(x, True)
            if i + 1 == stop:
                hidden = x
        last = text.final_layer_norm(x)
        end = (ids == EOS).int().argmax(dim=-1)   # the first end token, as transformers
        pooled = last[torch.arange(ids.shape[0], device=ids.device), end]
        return hidden, self.transformer.text_projection(pooled)


class T5Embedder(nn.Module):
    """T5-XXL's encoder under ``transformer.`` with its tokenizer (``tokenizer``: a
    ``ldm.modules.encoders.t5.T5Tokenizer``, set when loading), ``max_length`` tokens."""

    def __init__(self, max_length=256, **t5):
        super().__init__()
        self.max_length = max_length
        self.transformer = T5EncoderModel(**t5)
        self.tokenizer = None
        self.eval()
        for p in self.parameters():
            p.requires_grad = False

    @property
    def width(self):
        return self.transformer.shared.weight.shape[1]

    def forward(self, texts):
        ids = self.tokenizer(texts, self.max_length).to(self.transformer.shared.weight.device)
        return self.transformer(ids)


class SD3TextEncoders(nn.Module):
    """``clip_l``, ``clip_g`` (configs of ``CLIPWithProjection``) and ``t5xxl`` (of
    ``T5Embedder``; None: a model without T5). ``t5_zeros``: the tokens of the zeros that
    stand for T5 when it is left out (None: T5's length, else 256; diffusers')."""

    def __init__(self, clip_l, clip_g, t5xxl=None, t5_zeros=None, context_dim=4096):
        super().__init__()
        self.clip_l = CLIPWithProjection(**clip_l)
        self.clip_g = CLIPWithProjection(**clip_g)
        self.t5xxl = T5Embedder(**t5xxl) if t5xxl is not None else None
        if t5_zeros is None:
            t5_zeros = self.t5xxl.max_length if self.t5xxl is not None else 256
        self.t5_zeros, self.context_dim = t5_zeros, context_dim
        self.use_t5 = self.t5xxl is not None
        self.max_length = 77

    @property
    def t5_length(self):
        """The tokens T5 reads (its zeros' count when it is left out): 256 by default,
        diffusers' ``max_sequence_length``; Stability's reference takes 77."""
        return self.t5_zeros

    @t5_length.setter
    def t5_length(self, n):
        self.t5_zeros = int(n)
        if self.t5xxl is not None:
            self.t5xxl.max_length = int(n)

    def drop_t5(self):
        """Run without T5 (no weights or no tokenizer): its part of the states is zeros."""
        self.t5xxl, self.use_t5 = None, False

    @property
    def clips(self):
        return [self.clip_l, self.clip_g]

    # -- the prompt settings the pipeline sets on a text encoder ---------------------------
    @property
    def clip_skip(self):
        return self.clip_l.clip_skip

    @clip_skip.setter
    def clip_skip(self, value):
        for e in self.clips:
            e.clip_skip = value

    @property
    def syntax(self):
        return "compvis"

    @syntax.setter
    def syntax(self, value):
        if value != "compvis":
            raise ValueError("SD 3 takes plain prompts here: A1111's weights and BREAK "
                             "(--prompt-syntax a1111) are not read for it: drop the flag")

    @property
    def layers(self):
        return min(e.layers for e in self.clips)

    @property
    def added(self):
        return {}

    @property
    def text_width(self):
        return self.context_dim

    def warn_truncated(self, texts):
        self.clip_l.warn_truncated(texts)
        if self.use_t5 and self.t5xxl.tokenizer is not None:
            for text in dict.fromkeys(texts):
                n = len(self.t5xxl.tokenizer.ids(text)) + 1
                if n > self.t5xxl.max_length:
                    log.warning("prompt is %d T5 tokens; T5 reads the first %d", n,
                                self.t5xxl.max_length)

    def equalize(self, cond, uncond):
        return cond, uncond

    def freeze(self):
        self.eval()
        for p in self.parameters():
            p.requires_grad = False

    # -- encoding ------------------------------------------------------------------------
    def conditioning(self, texts):
        """{"crossattn": [B, 77 + T5 tokens, 4096], "vector": [B, 2048]}."""
        states, pooled = [], []
        for e in self.clips:
            ids = e.tokenize(texts, e.max_length).to(e.token_embedding.weight.device)
            z, p = e.encode_ids_pooled(ids)
            states.append(z)
            pooled.append(p)
        clip = torch.cat(states, dim=-1)
        clip = nn.functional.pad(clip, (0, self.context_dim - clip.shape[-1]))
        if self.use_t5:
            t5 = self.t5xxl(texts).to(clip.dtype)
        else:
            t5 = clip.new_zeros(clip.shape[0], self.t5_zeros, self.context_dim)
        return {"crossattn": torch.cat([clip, t5], dim=1), "vector": torch.cat(pooled, dim=-1)}

    def encode(self, texts):
        return self.conditioning(texts)["crossattn"]
