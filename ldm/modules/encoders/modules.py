"""Text conditioning: SD v1's CLIP ViT-L/14 text encoder (``cond_stage_model.*`` keys)."""
import logging

import torch
from torch import nn

from ldm.modules.encoders.clip import CLIPTextConfig, CLIPTextModel

log = logging.getLogger(__name__)


class FrozenCLIPEmbedder(nn.Module):
    """Prompts -> CLIP last hidden states [B, 77, width], as SD v1 conditions its UNet.

    Built from a local config, never downloaded: the defaults are ViT-L/14's text tower and
    every size can be overridden from the YAML (tiny test models, the built-in model).
    ``version`` and ``device`` are accepted for compatibility with CompVis configs.
    ``freeze=False`` leaves the weights trainable (the built-in model trains its encoder).
    """

    def __init__(self, version="openai/clip-vit-large-patch14", device=None, max_length=77,
                 freeze=True, vocab_size=49408, width=768, layers=12, heads=12,
                 intermediate_size=None, hidden_act="quick_gelu"):
        super().__init__()
        self.max_length = max_length
        self.transformer = CLIPTextModel(CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=width, num_hidden_layers=layers,
            num_attention_heads=heads, intermediate_size=intermediate_size or 4 * width,
            max_position_embeddings=max_length, hidden_act=hidden_act))
        if freeze:
            self.freeze()

    def freeze(self):
        self.transformer.eval()
        for p in self.parameters():
            p.requires_grad = False

    @staticmethod
    def tokenize(texts, max_length=77):
        """Token ids [B, max_length] exactly as SD v1's tokenizer gave them (see tokenizer.py)."""
        from ldm.modules.encoders.tokenizer import tokenize
        return tokenize(list(texts), max_length)

    def warn_truncated(self, texts):
        from ldm.modules.encoders.tokenizer import truncation
        for text in dict.fromkeys(texts):
            dropped = truncation(text, self.max_length)
            if dropped is not None:
                log.warning("prompt is longer than %d tokens and was cut; dropped: %r",
                            self.max_length, dropped)

    def forward(self, texts):
        ids = self.tokenize(texts, self.max_length)
        return self.encode_ids(ids.to(self.transformer.text_model.embeddings.token_embedding.weight.device))

    def encode_ids(self, ids):
        return self.transformer(ids)

    def encode(self, texts):
        return self(texts)
