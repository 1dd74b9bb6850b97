"""SD v1's text tokenizer: CLIP's byte-level BPE, as transformers 4.x's slow CLIPTokenizer
for ``openai/clip-vit-large-patch14`` ran it with ftfy installed. Offline: the merges ship
beside this file (``bpe_simple_vocab_16e6.txt.gz``, MIT, see CLIP_LICENSE.txt).

Per text: split out the literal special tokens ``<|startoftext|>`` / ``<|endoftext|>``; each
other piece gets ``ftfy.fix_text``, whitespace runs collapsed, lower case, CLIP's regex
pre-split, each piece's UTF-8 bytes mapped to printable characters and BPE-merged with
``</w>`` marking the word end. Ids are then ``[BOS] + ids[:77 - 2] + [EOS]``, padded with EOS.
``tests/data/clip_tokenizer_ids.json`` (recorded by ``scripts/record_tokenizer_ids.py``)
pins the behaviour.
"""
import functools
import gzip
from pathlib import Path

import regex

BPE_PATH = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
VOCAB_SIZE = 49408
N_MERGES = VOCAB_SIZE - 2 * 256 - 2
_SPECIAL = regex.compile(r"(<\|startoftext\|>|<\|endoftext\|>)")
_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE)


@functools.lru_cache(1)
def bytes_to_unicode():
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    # order matters: it is the order of the first 512 vocabulary entries
    chars = {b: chr(b) for b in printable}
    rest = [b for b in range(256) if b not in chars]
    chars.update({b: chr(256 + n) for n, b in enumerate(rest)})
    return chars


def _clean(text, html=False):
    import ftfy
    text = ftfy.fix_text(text)
    if html:  # OpenAI's and OpenCLIP's own tokenizers; transformers' slow one did not
        import html as html_module
        text = html_module.unescape(html_module.unescape(text))
    return regex.sub(r"\s+", " ", text).strip().lower()


class CLIPTokenizer:
    """``html``: unescape HTML entities first ("&amp;" -> "&"), as OpenCLIP's tokenizer
    (SD 2.x) does and SD v1's did not."""

    def __init__(self, bpe_path=BPE_PATH, html=False):
        self.html = html
        with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")[1:N_MERGES + 1]
        merges = [tuple(line.split()) for line in lines]
        units = list(bytes_to_unicode().values())
        vocab = units + [u + "</w>" for u in units] + ["".join(m) for m in merges] + [BOS, EOS]
        if len(vocab) != VOCAB_SIZE:
            raise ValueError(f"{bpe_path}: expected {VOCAB_SIZE} tokens, built {len(vocab)}")
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.decoder = vocab
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.bos_id, self.eos_id = self.encoder[BOS], self.encoder[EOS]
        self._cache = {}

    def bpe(self, token):
        if token in self._cache:
            return self._cache[token]
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word, word[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        if len(self._cache) < 100_000:
            self._cache[token] = word
        return word

    def tokens(self, text):
        """BPE tokens of ``text`` (no BOS/EOS added)."""
        out = []
        for piece in _SPECIAL.split(text):
            if piece in (BOS, EOS):
                out.append(piece)
                continue
            for word in _PATTERN.findall(_clean(piece, self.html)):
                out.extend(self.bpe("".join(self.byte_encoder[b] for b in word.encode("utf-8"))))
        return out

    def encode(self, text, added=None):
        """Token ids of ``text``, without BOS/EOS. ``added``: {token: [ids]} of tokens
        beyond the vocabulary (textual-inversion embeddings), found anywhere in the text,
        case-insensitively, longest first (as transformers' added tokens)."""
        return [i for unit in self.units(text, added) for i in unit]

    def units(self, text, added=None):
        """``encode`` grouped: [[id]] for each BPE token, [ids] for each added token (an
        embedding's vectors stay together)."""
        if not added:
            return [[self.encoder[t]] for t in self.tokens(text)]
        out = []
        for n, piece in enumerate(_added_pattern(tuple(sorted(added))).split(text)):
            if n % 2:
                out.append(list(added[_lookup(added, piece)]))
            elif piece:
                out.extend([self.encoder[t]] for t in self.tokens(piece))
        return out

    def in_vocabulary(self, token):
        """Whether ``token`` is one entry of the BPE vocabulary (a word or a word piece)."""
        t = _clean(token)
        return t in self.encoder or t + "</w>" in self.encoder

    def decode(self, ids):
        text = "".join(self.decoder[i] for i in ids if i not in (self.bos_id, self.eos_id))
        raw = bytearray(self.byte_decoder[c] for c in text.replace("</w>", self.byte_encoder[32]))
        return raw.decode("utf-8", errors="replace").replace("\x00", "").strip()

    def __call__(self, texts, context_length=77, added=None, pad_id=None):
        """``[B, context_length]`` ids: BOS, at most context_length - 2 tokens, EOS, then
        padding: EOS (SD v1's tokenizer), or ``pad_id`` (OpenCLIP's: 0)."""
        pad = self.eos_id if pad_id is None else pad_id
        rows = []
        for text in texts:
            ids = self.encode(text, added)[:context_length - 2]
            rows.append([self.bos_id] + ids + [self.eos_id]
                        + [pad] * (context_length - 2 - len(ids)))
        return rows


@functools.lru_cache(64)
def _added_pattern(tokens):
    return regex.compile("(" + "|".join(regex.escape(t) for t in sorted(tokens, key=len,
                                                                        reverse=True)) + ")",
                         regex.IGNORECASE)


def added_in(texts, tokens):
    """The added ``tokens`` that occur in any of ``texts``, found as the tokenizer finds
    them (case-insensitively, longest first)."""
    if not tokens:
        return set()
    pattern = _added_pattern(tuple(sorted(tokens)))
    return {_lookup(tokens, m) for text in texts for m in pattern.findall(text)}


def _lookup(added, piece):
    if piece in added:
        return piece
    return next(t for t in added if t.lower() == piece.lower())


@functools.lru_cache(2)
def get_tokenizer(html=False):
    return CLIPTokenizer(html=html)


def tokenize(texts, context_length=77, added=None, pad_id=None, html=False):
    """SD v1 token ids for a list of texts, as a ``LongTensor[B, context_length]``
    (``added``: see ``CLIPTokenizer.encode``); with ``pad_id=0, html=True``, OpenCLIP's."""
    import torch
    if isinstance(texts, str):
        texts = [texts]
    return torch.tensor(get_tokenizer(html)(list(texts), context_length, added, pad_id),
                        dtype=torch.long)


def truncation(text, context_length=77, added=None, html=False):
    """The words of ``text`` (as the user wrote them) that do not fit in ``context_length``
    tokens, or None when it all fits. A word cut in the middle counts as dropped."""
    tok = get_tokenizer(html)
    keep = context_length - 2
    if len(tok.encode(text, added)) <= keep:
        return None
    words = text.split()
    lo, hi = 0, len(words)  # the largest k whose first k words fit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(tok.encode(" ".join(words[:mid]), added)) <= keep:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[lo:]) or text
