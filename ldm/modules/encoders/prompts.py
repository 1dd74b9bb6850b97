"""A1111's prompt syntax (``--prompt-syntax a1111``): weights, BREAK, prompts of any length.

- ``(words)`` multiplies the words' weight by 1.1, ``((words))`` by 1.21, ``[words]``
  divides it by 1.1, ``(words:1.3)`` sets the factor to 1.3; brackets nest and multiply.
  ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are the literal characters.
- ``BREAK`` (upper case, a word of its own) ends the current chunk of 75 tokens.
- The tokens are cut into chunks of 75, each encoded as its own 77 (BOS, 75, EOS; short
  chunks padded with EOS), and the chunks' encodings are concatenated along the sequence.
  A chunk that fills up within 20 tokens after a comma is cut after that comma instead,
  the rest moving on to the next chunk; an embedding's vectors are never split.
- Each token's encoding is multiplied by its weight, then the chunk is rescaled so that its
  mean is the unweighted one (``weight_chunks``).

Where A1111 differs and we do not follow: an unbalanced bracket (an opening one never
closed, a closing one never opened) is kept as the literal character, with a warning,
rather than weighting the rest of the prompt; and the mean is rescaled per prompt, where
A1111 takes it over the whole batch (an image would then depend on its batch-mates; ours
is the same alone or in a batch, and equal to A1111's for a batch of one).
"""
import re
from dataclasses import dataclass, field

ROUND, SQUARE = 1.1, 1 / 1.1
CHUNK = 75            # tokens per chunk, between BOS and EOS
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack
BREAK = "BREAK"
_TOKENS = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)|\)|\]|"
                     r"[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def parse_attention(text):
    """(pieces, warnings): ``pieces`` is [(text, weight)] in order, with (BREAK, None) for
    each BREAK, neighbouring pieces of one weight merged; ``warnings`` names unbalanced
    brackets (kept as literal text)."""
    out = []         # [text, weight] or [BREAK, None]; an open bracket is ["(", 1.0, "open"]
    opened = {"(": [], "[": []}
    warnings = []

    def scale(start, factor):
        for item in out[start:]:
            if item[1] is not None:
                item[1] *= factor

    for m in _TOKENS.finditer(text):
        tok, number = m.group(0), m.group(1)
        if tok.startswith("\\") and len(tok) == 2:
            out.append([tok[1], 1.0])
        elif tok == "\\":
            out.append(["\\", 1.0])
        elif tok in "([":
            opened[tok].append(len(out))
            out.append([tok, 1.0, "open"])
        elif number is not None and opened["("]:
            start = opened["("].pop()
            out[start] = ["", 1.0]
            scale(start, float(number))
        elif tok == ")" and opened["("]:
            start = opened["("].pop()
            out[start] = ["", 1.0]
            scale(start, ROUND)
        elif tok == "]" and opened["["]:
            start = opened["["].pop()
            out[start] = ["", 1.0]
            scale(start, SQUARE)
        else:
            if tok in (")", "]") or (number is not None):
                warnings.append(f"unbalanced {tok[-1]!r} in the prompt, kept as text")
            for n, part in enumerate(_BREAK.split(tok)):
                if n:
                    out.append([BREAK, None])
                out.append([part, 1.0])
    for bracket, starts in opened.items():
        for start in starts:
            out[start] = [bracket, out[start][1]]
            warnings.append(f"unbalanced {bracket!r} in the prompt, kept as text")
    pieces = []
    for item in out:
        text_, weight = item[0], item[1]
        if weight is not None and not text_:
            continue
        if pieces and weight is not None and pieces[-1][1] == weight:
            pieces[-1] = (pieces[-1][0] + text_, weight)
        else:
            pieces.append((text_, weight))
    return pieces or [("", 1.0)], warnings


@dataclass
class Chunk:
    """77 token ids (BOS, 75, EOS) and their weights."""
    ids: list = field(default_factory=list)
    weights: list = field(default_factory=list)


def chunk_prompt(pieces, units, bos, eos, comma, pad=None):
    """[Chunk] of a parsed prompt: ``units(text)`` gives a piece's tokens grouped as
    ``CLIPTokenizer.units`` does (an embedding's ids together); ``comma`` is the id of
    ``,``; ``pad`` the id after a chunk's end (EOS when None; OpenCLIP's 0, as A1111's
    ``id_pad``)."""
    pad_id = eos if pad is None else pad
    chunks, ids, weights = [], [], []
    last_comma = -1

    def close():
        nonlocal ids, weights, last_comma
        n = CHUNK - len(ids)
        chunks.append(Chunk([bos] + ids + [eos] + [pad_id] * n, [1.0] + weights + [1.0] * n
                            + [1.0]))
        ids, weights, last_comma = [], [], -1

    for text, weight in pieces:
        if weight is None:  # BREAK
            close()
            continue
        for unit in units(text):
            if unit == [comma]:
                last_comma = len(ids)
            elif (len(ids) == CHUNK and last_comma != -1
                  and len(ids) - last_comma <= COMMA_BACKTRACK):
                keep = last_comma + 1
                moved = ids[keep:], weights[keep:]
                ids, weights = ids[:keep], weights[:keep]
                close()
                ids, weights = list(moved[0]), list(moved[1])
            if len(ids) == CHUNK or len(ids) + len(unit) > CHUNK:
                close()
            ids += unit
            weights += [weight] * len(unit)
    if ids or not chunks:
        close()
    return chunks


def weight_chunks(z, weights):
    """A1111's emphasis on one prompt's encoded chunks ``z`` [n, 77, width] with their
    ``weights`` [n, 77]: each token's encoding times its weight, then each chunk rescaled
    to its unweighted mean."""
    import torch
    w = torch.as_tensor(weights, dtype=torch.float32, device=z.device).reshape(z.shape[0], -1, 1)
    z = z.float()
    before = z.mean(dim=(1, 2), keepdim=True)
    z = z * w
    return z * (before / z.mean(dim=(1, 2), keepdim=True))
