"""Record SD v1's token ids for tricky prompts, from transformers 4.x's slow CLIPTokenizer.

SD v1 ran with transformers 4.x's slow ``CLIPTokenizer`` for ``openai/clip-vit-large-patch14``
with ftfy installed. transformers 5 no longer has it, so the ids are recorded once, in a
separate environment, into ``tests/data/clip_tokenizer_ids.json``; ``tests/test_tokenizer.py``
checks ``ldm.modules.encoders.tokenizer`` against them. The tokenizer's files are built here
from the BPE merges the repo ships (the hub's vocab.json is this construction: byte units,
byte units + ``</w>``, one entry per merge, then the two special tokens):

    python -m venv /tmp/tok4 && /tmp/tok4/bin/pip install "transformers<5" ftfy regex
    /tmp/tok4/bin/python scripts/record_tokenizer_ids.py
"""
import gzip
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BPE = ROOT / "ldm" / "modules" / "encoders" / "bpe_simple_vocab_16e6.txt.gz"
OUT = ROOT / "tests" / "data" / "clip_tokenizer_ids.json"

PROMPTS = [
    "",
    " ",
    "a photograph of an astronaut riding a horse",
    "A Photograph Of An ASTRONAUT, riding a horse!!!",
    "a  cat\tsitting\non a mat  ",
    "it's a dog's life, isn't it? we'll see, they'd say, you're right, I'm sure",
    "café naïve façade résumé Ærø",
    "cafÃ© mojibake â€œtextâ€",
    "e\u0301 combining accent, zero\u200bwidth, non\u00a0breaking",
    "an emoji party 🎉🐱 👩‍🚀 🇯🇵 ❤️",
    "一只猫坐在月球上，油画",
    "富士山の夕焼け、浮世絵風",
    "서울의 밤거리, 네온사인",
    "قطة على القمر",
    "एक बिल्ली चाँद पर",
    "кошка на луне",
    "fish &amp; chips &lt;3 &gt; &quot;tasty&quot; &#39;yes&#39; &nbsp;",
    "AT&T and <b>bold</b> &amp;",
    "ﬁne ﬂowers ﬀ ﬃ ligatures",
    "ＦＵＬＬ　ＷＩＤＴＨ　ｔｅｘｔ　１２３",
    "“curly double” ‘curly single’ „low“ «guillemets»",
    "em—dash en–dash … ellipsis",
    "<|endoftext|>",
    "a cat<|endoftext|>a dog",
    "<|startoftext|>hello <|endoftext|> world",
    "3.14159 pi 2024 1e-5 #hashtag @user",
    "trending on artstation, 8k, octane render, unreal engine 5, highly detailed",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "(masterpiece:1.2), [bad hands], {best quality}",
    "snake_case CamelCase kebab-case path/to/file.png",
    " ".join(f"word{i}" for i in range(100)),
    "a " * 80 + "horse",
    "a very long prompt describing " + "a beautiful landscape with mountains, rivers and trees, " * 8,
    "🐱" * 60,
]


def build_files(folder):
    with gzip.open(BPE, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    byte_chars = [chr(b) for b in printable] + [chr(256 + n) for n, b in
                                                enumerate(b for b in range(256) if b not in printable)]
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), "utf-8")
    (folder / "merges.txt").write_text("\n".join(lines[:1] + merges) + "\n", "utf-8")


def main():
    import ftfy
    import transformers
    from transformers import CLIPTokenizer
    if int(transformers.__version__.split(".")[0]) >= 5:
        sys.exit("needs transformers 4.x (its slow CLIPTokenizer); see the docstring")
    with tempfile.TemporaryDirectory() as tmp:
        build_files(Path(tmp))
        tok = CLIPTokenizer(Path(tmp) / "vocab.json", Path(tmp) / "merges.txt",
                            pad_token="<|endoftext|>")
        assert tok.fix_text is not None, "ftfy must be installed"
        rows = tok(PROMPTS, padding="max_length", max_length=77, truncation=True)["input_ids"]
    record = {"transformers": transformers.__version__, "ftfy": ftfy.__version__,
              "tokenizer": "CLIPTokenizer (slow), padding=max_length, max_length=77, truncation",
              "cases": [{"text": p, "ids": r} for p, r in zip(PROMPTS, rows)]}
    OUT.write_text(json.dumps(record, ensure_ascii=False, indent=0) + "\n", "utf-8")
    print(f"wrote {len(PROMPTS)} cases to {OUT}")


if __name__ == "__main__":
    main()
