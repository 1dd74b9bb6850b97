"""Textual-inversion embeddings as people download them: new words for the text encoder.

An embedding is n vectors of the text encoder's width (768 for SD 1.x) with a token that
stands for them in prompts. The layouts read (``read_embedding``):

- A1111's ``.pt``: {"string_to_param": {"*": [n, 768]}, "string_to_token": ..., "name": ...};
- A1111's ``.safetensors``: {"emb_params": [n, 768]};
- diffusers' (its textual_inversion script, ``learned_embeds.bin`` / ``.safetensors``):
  {"<token>": [768] or [n, 768]}.

The token is the file's name (as A1111 names embeddings), or the one given
(``--embedding FILE:TOKEN``). It is matched in prompts anywhere and case-insensitively,
longest first, as transformers' added tokens are; a multi-vector embedding takes n
positions of the 75. Files are untrusted: the checkpoints' restricted unpickler reads
pickles.
"""
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm.checkpoint import CheckpointError, _load_pickle, _load_safetensors, file_hash

class EmbeddingError(CheckpointError):
    """An embedding that cannot be added; nothing of it was added."""


@dataclass
class Embedding:
    token: str
    vectors: object    # [n, width]; SDXL's: {"clip_l": [n, 768], "clip_g": [n, 1280]}
    path: Path
    hash: str

    @property
    def count(self):
        """How many vectors (token positions) it takes."""
        v = self.vectors
        return (next(iter(v.values())) if isinstance(v, dict) else v).shape[0]


def read_embedding(path, token=None):
    path = Path(path)
    if not path.is_file():
        raise EmbeddingError(f"embedding {path}: " + ("is a folder: give the file itself"
                                                      if path.is_dir() else "not found"))
    try:
        with open(path, "rb") as f:
            head = f.read(8)
        if not head:
            raise EmbeddingError(f"embedding {path} is empty (0 bytes): download it again")
        if path.suffix == ".safetensors" or (len(head) == 8 and head[:2] != b"PK"
                                             and head[:1] != b"\x80"):
            data = _load_safetensors(path)
        else:
            data = _load_pickle(path)
    except EmbeddingError:
        raise
    except CheckpointError as e:
        raise EmbeddingError(str(e).replace("checkpoint", "embedding")) from None
    if isinstance(data, dict) and ("clip_g" in data or "clip_l" in data):
        # SDXL's: one set of vectors per text encoder, as A1111 and diffusers save them
        parts = {k: _checked(data[k], path, f" {k}") for k in ("clip_l", "clip_g")
                 if k in data}
        if len({v.shape[0] for v in parts.values()}) != 1:
            raise EmbeddingError(f"embedding {path}: its clip_l and clip_g hold different "
                                 "numbers of vectors")
        return Embedding(token or path.stem, parts, path, file_hash(path))
    vectors = _checked(_vectors(data, path), path)
    return Embedding(token or path.stem, vectors, path, file_hash(path))


def _checked(vectors, path, what=""):
    if not isinstance(vectors, torch.Tensor):
        raise EmbeddingError(f"embedding {path}:{what} is not a tensor")
    if vectors.dim() == 1:
        vectors = vectors[None]
    if vectors.dim() != 2 or vectors.shape[0] == 0 or not vectors.is_floating_point():
        raise EmbeddingError(f"embedding {path}{what} holds a {tuple(vectors.shape)} tensor, "
                             "not [vectors, width]")
    if not torch.isfinite(vectors).all():
        raise EmbeddingError(f"embedding {path}{what} holds NaN or infinite values")
    return vectors.detach().float()


def _vectors(data, path):
    if not isinstance(data, dict):
        raise EmbeddingError(f"{path} is not a textual-inversion embedding (found "
                             f"{type(data).__name__})")
    if "string_to_param" in data:
        params = data["string_to_param"]
        tensors = [v for v in getattr(params, "values", lambda: [])()
                   if isinstance(v, torch.Tensor)]
        if len(tensors) != 1:
            raise EmbeddingError(f"embedding {path}: its string_to_param holds "
                                 f"{len(tensors)} tensors, expected 1")
        return tensors[0]
    if "emb_params" in data and isinstance(data["emb_params"], torch.Tensor):
        return data["emb_params"]
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    raise EmbeddingError(f"{path} is not a textual-inversion embedding this project reads "
                         "(no string_to_param, emb_params, or single token tensor)")


def check_embedding(embedding, encoder):
    """Refuse, in one line, an embedding whose width is not the text encoder's or whose
    token clashes with the vocabulary or with another embedding."""
    from ldm.families import of_text_width
    from ldm.modules.encoders.tokenizer import get_tokenizer
    pairs = isinstance(embedding.vectors, dict)
    texts = getattr(encoder, "text_embedders", None)
    if texts is None and pairs:
        raise EmbeddingError(f"embedding {embedding.path} is for SDXL (clip_l and clip_g "
                             f"vectors); this model is {of_text_width(encoder.text_width)}")
    if texts is not None and not pairs:
        got = embedding.vectors.shape[1]
        raise EmbeddingError(f"embedding {embedding.path} is {got} wide, for "
                             f"{of_text_width(got)}; this model (SDXL) takes clip_l and "
                             "clip_g vectors, one set per text encoder")
    for part, e in (zip(vector_names(texts), texts) if pairs else [(None, encoder)]):
        vectors = embedding.vectors.get(part) if pairs else embedding.vectors
        if vectors is None:
            raise EmbeddingError(f"embedding {embedding.path} has no {part} vectors, which "
                                 "this model's text encoders need")
        width, got = e.token_embedding.weight.shape[1], vectors.shape[1]
        if got != width:
            raise EmbeddingError(f"embedding {embedding.path}{f' {part}' if part else ''} is "
                                 f"{got} wide, for {of_text_width(got)}; this model's text "
                                 f"encoder is {width} wide")
    token = embedding.token
    if not token.strip() or any(c.isspace() for c in token):
        raise EmbeddingError(f"embedding token {token!r} must be one word without spaces "
                             "(--embedding FILE:TOKEN)")
    if any(token.lower() == t.lower() for t in encoder.added):
        raise EmbeddingError(f"embedding token {token!r} is already taken by another "
                             "embedding: give one another with --embedding FILE:TOKEN")
    if get_tokenizer().in_vocabulary(token):
        raise EmbeddingError(f"embedding token {token!r} is a word of CLIP's vocabulary, so "
                             "prompts could not tell them apart: give it another with "
                             "--embedding FILE:TOKEN")


def vector_names(text_embedders):
    """The part of an SDXL embedding each text embedder takes: "clip_l" for CLIP ViT-L,
    "clip_g" for OpenCLIP bigG."""
    return ["clip_g" if hasattr(e, "model") else "clip_l" for e in text_embedders]
