"""Our CLIP tokenizer against ids recorded from transformers 4.x's slow CLIPTokenizer
(scripts/record_tokenizer_ids.py), the tokenizer SD v1 ran with."""
import json
from pathlib import Path

import pytest
import torch

from ldm.modules.encoders.modules import FrozenCLIPEmbedder
from ldm.modules.encoders.tokenizer import get_tokenizer, tokenize, truncation

TABLE = json.loads((Path(__file__).parent / "data" / "clip_tokenizer_ids.json").read_text("utf-8"))


@pytest.mark.parametrize("case", TABLE["cases"], ids=lambda c: repr(c["text"][:30]))
def test_ids_match_slow_transformers_tokenizer(case):
    assert tokenize([case["text"]])[0].tolist() == case["ids"]


def test_table_covers_the_tricky_cases():
    texts = [c["text"] for c in TABLE["cases"]]
    for needle in ("", "&amp;", "ﬁ", "ＦＵＬＬ", "“", "<|endoftext|>", "🎉", "一只猫"):
        assert any(needle in t for t in texts) if needle else "" in texts
    assert any(c["ids"][-1] == 49407 and 49407 not in c["ids"][1:-1] for c in TABLE["cases"])
    assert sum(len(get_tokenizer().encode(t)) > 75 for t in texts) >= 3  # over-long ones


def test_known_sd_ids_and_layout():
    ids = FrozenCLIPEmbedder.tokenize(["a photograph of an astronaut riding a horse", ""])
    assert ids.shape == (2, 77) and ids.dtype == torch.long
    assert ids[0, :10].tolist() == [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]
    assert ids[0, 10:].eq(49407).all()
    assert ids[1].tolist() == [49406] + [49407] * 76


def test_overlong_keeps_eos_last_and_reports_the_cut():
    text = " ".join(f"word{i:02d}" for i in range(60))  # 3 tokens per word: 180 tokens
    ids = tokenize([text])[0]
    assert ids.shape == (77,) and ids[0] == 49406 and ids[-1] == 49407
    assert 49407 not in ids[1:-1].tolist()
    dropped = truncation(text)
    assert dropped == " ".join(f"word{i:02d}" for i in range(25, 60))  # 25 words = 75 tokens
    assert truncation("a short prompt") is None


def test_decode_round_trip():
    tok = get_tokenizer()
    text = "a big red circle café 一只猫 🎉"
    assert tok.decode(tok.encode(text)) == text
