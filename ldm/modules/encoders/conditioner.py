"""SDXL's conditioning (Stability's ``sgm.modules.GeneralConditioner``): several embedders
under ``conditioner.embedders.N.``, each reading one input of the batch (its
``input_key``): the text encoders read the prompt ("txt") and give the cross-attention
states, concatenated along the channels (CLIP ViT-L 768 + OpenCLIP ViT-bigG 1280 = 2048),
and the pooled text embedding; the size embedders (``ConcatTimestepEmbedderND``) read the
original size, the crop's top-left corner, the target size (base) or the aesthetic score
(refiner) and give Fourier features. The pooled embedding and those features, in the
embedders' order, are the UNet's vector ``y`` (base 1280 + 3 x 512 = 2816, refiner
1280 + 2 x 512 + 256 = 2560).

For the pipeline the conditioner is the text encoder: the prompt settings (clip skip,
A1111 syntax) reach every text embedder, and a long prompt's chunks are padded per
embedder to one count.
"""
import torch
from torch import nn

from ldm.modules.diffusionmodules.util import timestep_embedding
from ldm.modules.encoders.modules import ChunkPadding
from ldm.util import instantiate_from_config

TEXT_KEY = "txt"


class ConcatTimestepEmbedderND(nn.Module):
    """Values [B, d] (or [B]) -> [B, d * outdim]: each value's sinusoidal embedding
    (``timestep_embedding``, cos first), concatenated. No weights."""

    def __init__(self, outdim):
        super().__init__()
        self.outdim = outdim

    def forward(self, x):
        if x.dim() == 1:
            x = x[:, None]
        b, d = x.shape
        return timestep_embedding(x.reshape(-1), self.outdim).reshape(b, d * self.outdim)


class GeneralConditioner(ChunkPadding, nn.Module):
    """``emb_models``: sgm's list of embedder configs (``target``/``params`` with
    ``input_key``, ``is_trainable``, ``ucg_rate``, ``legacy_ucg_value``; the training-only
    ones are kept on the embedder and not used here)."""

    def __init__(self, emb_models):
        nn.Module.__init__(self)
        embedders = []
        for cfg in emb_models:
            cfg = dict(cfg)
            embedder = instantiate_from_config({k: cfg[k] for k in ("target", "params")
                                                if k in cfg})
            embedder.input_key = cfg.get("input_key")
            embedder.is_trainable = bool(cfg.get("is_trainable", False))
            embedder.ucg_rate = float(cfg.get("ucg_rate", 0.0))
            if embedder.input_key is None:
                raise ValueError(f"embedder {cfg['target']} has no input_key")
            embedders.append(embedder)
        self.embedders = nn.ModuleList(embedders)
        if not self.text_embedders:
            raise ValueError("a GeneralConditioner here needs a text embedder (input_key: txt)")
        self.max_length = self.text_embedders[0].max_length

    @property
    def text_embedders(self):
        return [e for e in self.embedders if e.input_key == TEXT_KEY]

    @property
    def value_keys(self):
        """The inputs besides the prompt, in order (``original_size_as_tuple``, ...)."""
        return [e.input_key for e in self.embedders if e.input_key != TEXT_KEY]

    # -- the prompt settings, for every text embedder --------------------------------------
    def _every(name):
        def get(self):
            return getattr(self.text_embedders[0], name)

        def set_(self, value):
            for e in self.text_embedders:
                setattr(e, name, value)
        return property(get, set_)

    clip_skip = _every("clip_skip")
    syntax = _every("syntax")
    del _every

    @property
    def layers(self):
        return min(e.layers for e in self.text_embedders)

    @property
    def text_width(self):
        """The width of the cross-attention states: the text embedders' together."""
        return sum(e.text_width for e in self.text_embedders)

    @property
    def added(self):
        return self.text_embedders[0].added

    def add_embedding(self, token, vectors):
        """A textual-inversion token on every text embedder: ``vectors`` {"clip_l": [n,
        768], "clip_g": [n, 1280]}, each embedder's part (``embeddings.vector_names``)."""
        from ldm.embeddings import vector_names
        for name, e in zip(vector_names(self.text_embedders), self.text_embedders):
            e.add_embedding(token, vectors[name])
        return self.added[token]

    def warn_truncated(self, texts):
        self.text_embedders[0].warn_truncated(texts)

    def freeze(self):
        self.eval()
        for p in self.parameters():
            p.requires_grad = False

    # -- encoding ----------------------------------------------------------------------------
    def encode_text(self, texts):
        """(cross-attention states [B, 77 * chunks, sum of widths], the pooled embeddings
        in the embedders' order)."""
        states, pooled = [], []
        for e in self.text_embedders:
            z, p = e.encode_pooled(texts)
            states.append(z)
            if p is not None:
                pooled.append(p)
        n = max(z.shape[1] for z in states) // self.max_length
        states = [e.pad_to(list(z.reshape(z.shape[0], -1, self.max_length, z.shape[-1])), n)
                  if z.shape[1] != n * self.max_length else z
                  for e, z in zip(self.text_embedders, states)]
        return torch.cat(states, dim=2), pooled

    def forward(self, texts):
        """Prompts -> the cross-attention states alone (``ChunkPadding``'s empty prompt)."""
        return self.encode_text(texts)[0]

    def encode(self, texts):
        return self(texts)

    def conditioning(self, texts, values, zero=None):
        """{"crossattn": [B, 77 * chunks, 2048], "vector": [B, adm]}: ``values`` holds each
        size embedder's input as [1 or B, d] (``value_keys``). ``zero``: [B] booleans, the
        rows whose text conditioning (states and pooled embedding, not the sizes) is zeros
        (an empty negative prompt, as sgm and diffusers give SDXL base)."""
        crossattn, pooled = self.encode_text(texts)
        if zero is not None and any(zero):
            keep = torch.tensor([not z for z in zero], device=crossattn.device)
            crossattn = crossattn * keep[:, None, None].to(crossattn.dtype)
            pooled = [p * keep[:, None].to(p.dtype) for p in pooled]
        vector = []
        for e in self.embedders:
            if e.input_key == TEXT_KEY:
                if getattr(e, "always_return_pooled", False):
                    vector.append(pooled.pop(0).float())
            else:
                v = torch.as_tensor(values[e.input_key], dtype=torch.float32,
                                    device=crossattn.device)
                vector.append(e(v.expand(crossattn.shape[0], *v.shape[1:])))
        return {"crossattn": crossattn, "vector": torch.cat(vector, dim=1)}
