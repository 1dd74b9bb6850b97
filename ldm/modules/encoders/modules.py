"""Text conditioning: SD v1's CLIP ViT-L/14 text encoder (``cond_stage_model.transformer.*``
keys), SD 2.x's OpenCLIP ViT-H/14 (``cond_stage_model.model.*``) and SDXL's pair of them
(CLIP ViT-L and OpenCLIP ViT-bigG under ``conditioner.embedders.N.``), with one prompt
machinery (A1111 weighting and long prompts, truncation warnings, textual inversion)."""
import logging

import torch
from torch import nn

from ldm.modules.encoders.clip import CLIPTextConfig, CLIPTextModel

log = logging.getLogger(__name__)


class ChunkPadding:
    """Long prompts at one length: a text encoder (or SDXL's conditioner) with ``self(texts)``
    giving the plain encoding and ``max_length`` tokens per chunk pads encodings of fewer
    chunks with the empty prompt's, as A1111 does."""

    def pad_to(self, encoded, n):
        """[n_i, 77, width] encodings -> [B, 77 * n, width], each padded with the empty
        prompt's encoding (as A1111 pads a shorter prompt, and the unconditional one)."""
        empty = None
        rows = []
        for z in encoded:
            if z.shape[0] < n and empty is None:
                empty = self([""])
            if z.shape[0] < n:
                z = torch.cat([z, empty.to(z.dtype).expand(n - z.shape[0], -1, -1)])
            rows.append(z.reshape(1, -1, z.shape[-1]))
        return torch.cat(rows)

    def equalize(self, cond, uncond):
        """``cond`` and ``uncond`` ([B, 77 * n, width]) at one length: the shorter padded
        with the empty prompt's encoding, chunk by chunk."""
        if uncond is None or cond.shape[1] == uncond.shape[1]:
            return cond, uncond
        n = max(cond.shape[1], uncond.shape[1]) // self.max_length

        def pad(z):
            return self.pad_to(list(z.reshape(z.shape[0], -1, self.max_length, z.shape[-1])), n)
        return pad(cond), pad(uncond)


class FrozenCLIPEmbedder(ChunkPadding, nn.Module):
    """Prompts -> CLIP last hidden states [B, 77, width], as SD v1 conditions its UNet.

    Built from a local config, never downloaded: the defaults are ViT-L/14's text tower and
    every size can be overridden from the YAML (tiny test models, the built-in model).
    ``version`` and ``device`` are accepted for compatibility with CompVis configs.
    ``freeze=False`` leaves the weights trainable (the built-in model trains its encoder).
    """

    def __init__(self, version="openai/clip-vit-large-patch14", device=None, max_length=77,
                 freeze=True, vocab_size=49408, width=768, layers=12, heads=12,
                 intermediate_size=None, hidden_act="quick_gelu", layer="last",
                 layer_idx=None, always_return_pooled=False):
        super().__init__()
        if layer not in ("last", "hidden") or (layer == "hidden") != (layer_idx is not None):
            raise ValueError(f"layer must be 'last', or 'hidden' with a layer_idx (SDXL's "
                             f"11), not {layer!r} with layer_idx {layer_idx!r}")
        if always_return_pooled:
            raise ValueError("CLIP ViT-L's pooled output is not used by any SD model here")
        if layer_idx is not None and not 0 < layer_idx <= layers:
            raise ValueError(f"layer_idx must be in [1, {layers}], got {layer_idx}")
        self.prompt_state(max_length)
        # sgm's layer "hidden": hidden_states[layer_idx], the output of that many layers,
        # without the final layer norm (SDXL: 11 of 12, the penultimate)
        self.base_skip = 1 if layer_idx is None else layers - layer_idx + 1
        self.final_norm = layer_idx is None
        self.transformer = CLIPTextModel(CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=width, num_hidden_layers=layers,
            num_attention_heads=heads, intermediate_size=intermediate_size or 4 * width,
            max_position_embeddings=max_length, hidden_act=hidden_act))
        if freeze:
            self.freeze()

    def prompt_state(self, max_length, pad_id=None, html=False):
        """The prompt settings every text encoder here has (``pad_id``/``html``: SD v1's
        tokenizer pads with EOS and does not unescape HTML; OpenCLIP's pads with 0 and
        does)."""
        self.max_length = max_length
        self.clip_skip = 1  # 2: the penultimate layer's output (A1111's clip skip)
        self.syntax = "compvis"  # or "a1111": weights, BREAK, any length (prompts.py)
        self.added = {}  # textual-inversion tokens -> their ids (``add_embedding``)
        self.pad_id, self.html = pad_id, html

    def freeze(self):
        self.eval()
        for p in self.parameters():
            p.requires_grad = False

    @property
    def layers(self):
        """How many layers ``clip_skip`` can count back over."""
        return len(self.transformer.text_model.encoder.layers) - (self.base_skip - 1)

    @staticmethod
    def tokenize(texts, max_length=77, added=None):
        """Token ids [B, max_length] exactly as SD v1's tokenizer gave them (see tokenizer.py);
        ``added``: {token: [ids]} of textual-inversion embeddings."""
        from ldm.modules.encoders.tokenizer import tokenize
        return tokenize(list(texts), max_length, added)

    def warn_truncated(self, texts):
        if self.syntax == "a1111":
            return self.warn_syntax(texts)
        from ldm.modules.encoders.tokenizer import truncation
        for text in dict.fromkeys(texts):
            dropped = truncation(text, self.max_length, self.added, self.html)
            if dropped is not None:
                log.warning("prompt is longer than %d tokens and was cut; dropped: %r "
                            "(--prompt-syntax a1111 takes prompts of any length)",
                            self.max_length, dropped)

    def warn_syntax(self, texts):
        from ldm.modules.encoders.prompts import parse_attention
        for text in dict.fromkeys(texts):
            for warning in parse_attention(text)[1]:
                log.warning("%s: %r", warning, text)
            if "<lora:" in text:
                log.warning("the prompt's <lora:...> is read as text here: give LoRAs with "
                            "--lora FILE:WEIGHT")

    @property
    def token_embedding(self):
        return self.transformer.text_model.embeddings.token_embedding

    @property
    def text_width(self):
        """The width of the text states the UNet attends to."""
        return self.token_embedding.weight.shape[1]

    @property
    def blocks(self):
        """The transformer layers, between the token lookup and the final norm: what an
        execution backend runs (``ldm.backends``)."""
        return self.transformer.text_model.encoder

    def forward(self, texts):
        ids = self.tokenize(texts, self.max_length, self.added)
        return self.encode_ids(ids.to(self.token_embedding.weight.device))

    def encode_ids(self, ids):
        return self.transformer(ids, self.base_skip + self.clip_skip - 1, self.final_norm)

    def encode_ids_pooled(self, ids):
        """(``encode_ids``, the pooled text embedding or None for an encoder without one)."""
        return self.encode_ids(ids), None

    def encode(self, texts):
        """Prompts -> [B, 77 * chunks, width]: CompVis' plain text (77 tokens), or with
        ``syntax = "a1111"`` weighted and of any length (``ldm.modules.encoders.prompts``;
        prompts of fewer chunks are padded with the empty prompt's encoding)."""
        return self.encode_pooled(texts)[0]

    def encode_pooled(self, texts):
        """(``encode``, the pooled embeddings [B, dim] or None): for a long A1111 prompt
        the pooled embedding of its first chunk, unweighted (as A1111 does for SDXL)."""
        device = self.token_embedding.weight.device
        if self.syntax != "a1111":
            ids = self.tokenize(texts, self.max_length, self.added)
            return self.encode_ids_pooled(ids.to(device))
        encoded = [self.encode_weighted(text) for text in texts]
        z = self.pad_to([z for z, _ in encoded], max(z.shape[0] for z, _ in encoded))
        pooled = [p for _, p in encoded]
        return z, (None if pooled[0] is None else torch.stack(pooled))

    def encode_weighted(self, text):
        """One prompt in A1111's syntax -> (its weighted chunks [n, 77, width], the first
        chunk's pooled embedding or None)."""
        from ldm.modules.encoders.prompts import chunk_prompt, parse_attention, weight_chunks
        from ldm.modules.encoders.tokenizer import get_tokenizer
        tok = get_tokenizer(self.html)
        pieces, _ = parse_attention(text)
        chunks = chunk_prompt(pieces, lambda t: tok.units(t, self.added), tok.bos_id,
                              tok.eos_id, tok.encoder[",</w>"], self.pad_id)
        ids = torch.tensor([c.ids for c in chunks], device=self.token_embedding.weight.device)
        z, pooled = self.encode_ids_pooled(ids)
        return (weight_chunks(z, [c.weights for c in chunks]).to(z.dtype),
                None if pooled is None else pooled[0])

    # -- textual inversion ---------------------------------------------------------------
    def add_embedding(self, token, vectors):
        """Grow the vocabulary by ``token``, ``vectors`` [n, width] long: n new rows of the
        token embedding table, and the tokenizer maps ``token`` in any prompt to their
        ids. Nothing else changes."""
        table = self.token_embedding
        first = table.weight.shape[0]
        grown = torch.cat([table.weight.data,
                           vectors.to(table.weight.dtype, copy=True).to(table.weight.device)])
        table.weight = torch.nn.Parameter(grown, requires_grad=False)
        table.num_embeddings = grown.shape[0]
        self.added = {**self.added, token: list(range(first, first + vectors.shape[0]))}
        return self.added[token]


class FrozenOpenCLIPEmbedder(FrozenCLIPEmbedder):
    """SD 2.x's text encoder: prompts -> OpenCLIP ViT-H/14's hidden states [B, 77, 1024]
    after all blocks (``layer: last``) or all but the last (``layer: penultimate``, SD 2's
    configs), with the final layer norm, as Stability's ``FrozenOpenCLIPEmbedder``.
    OpenCLIP's tokenisation: the same BPE, HTML entities unescaped, padded with 0.
    ``clip_skip`` N > 1 stops N - 1 blocks before the config's layer.

    Built from the config alone, never downloaded: ``arch`` and ``version`` are accepted
    for compatibility with Stability's configs; the sizes default to ViT-H/14's and can be
    overridden (tiny test models)."""

    LAYERS = {"last": 0, "penultimate": 1}

    def __init__(self, arch="ViT-H-14", version="laion2b_s32b_b79k", device=None,
                 max_length=77, freeze=True, layer="last", vocab_size=49408, width=1024,
                 layers=24, heads=16, embed_dim=None):
        nn.Module.__init__(self)
        from ldm.modules.encoders.open_clip import OpenCLIPTextModel
        if layer not in self.LAYERS:
            raise ValueError(f"layer must be one of {sorted(self.LAYERS)}, not {layer!r}")
        self.prompt_state(max_length, pad_id=0, html=True)
        self.layer, self.layer_idx = layer, self.LAYERS[layer]
        self.model = OpenCLIPTextModel(vocab_size, width, layers, heads, max_length,
                                       embed_dim or width)
        if freeze:
            self.freeze()

    @property
    def layers(self):
        return self.model.layers - self.layer_idx

    def tokenize(self, texts, max_length=77, added=None):
        from ldm.modules.encoders.tokenizer import tokenize
        return tokenize(list(texts), max_length, added, self.pad_id, self.html)

    @property
    def token_embedding(self):
        return self.model.token_embedding

    @property
    def blocks(self):
        return self.model.transformer

    def encode_ids(self, ids):
        return self.model(ids, self.model.layers - self.layer_idx - (self.clip_skip - 1))


class FrozenOpenCLIPEmbedder2(FrozenOpenCLIPEmbedder):
    """SDXL's second text encoder (sgm's ``FrozenOpenCLIPEmbedder2``): OpenCLIP ViT-bigG/14
    (1,280 wide, 32 layers) under ``conditioner.embedders.1.model.*``. With ``legacy:
    False`` (SDXL's configs) the hidden states are taken without ``ln_final``; with
    ``always_return_pooled`` it also gives the pooled text embedding (``ln_final`` of the
    last layer at the end token, through ``text_projection``), which SDXL's UNet gets in
    its vector. The sizes default to ViT-bigG/14's."""

    def __init__(self, arch="ViT-bigG-14", version="laion2b_s39b_b160k", device=None,
                 max_length=77, freeze=True, layer="penultimate", always_return_pooled=False,
                 legacy=True, vocab_size=49408, width=1280, layers=32, heads=20,
                 embed_dim=None):
        super().__init__(arch, version, device, max_length, freeze, layer, vocab_size, width,
                         layers, heads, embed_dim)
        self.always_return_pooled, self.legacy = always_return_pooled, legacy

    def encode_ids(self, ids):
        return self.model(ids, self.model.layers - self.layer_idx - (self.clip_skip - 1),
                          self.legacy)

    def encode_ids_pooled(self, ids):
        if not self.always_return_pooled:
            return self.encode_ids(ids), None
        hidden, pooled = self.model.hidden_and_pooled(
            ids, self.model.layers - self.layer_idx - (self.clip_skip - 1))
        return (self.model.ln_final(hidden) if self.legacy else hidden), pooled
