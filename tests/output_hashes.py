"""Record the pixel hashes of a fixed set of SD 1.x outputs, to prove a refactor changed no
image: run it before and after, then compare the two files.

    python tests/output_hashes.py ~/.cache/ldm-hashes/before.json
    python tests/output_hashes.py ~/.cache/ldm-hashes/after.json --compare ~/.cache/ldm-hashes/before.json

Every case runs a script as a user would (built-in models, and the tests' tiny SD-v1 model
with seeded random weights, a LoRA, an embedding): every task, several samplers, a1111
syntax, clip skip, bf16, a JSONL job, and library calls with explicit arguments. Only the
pixels are hashed (the PNG metadata may gain fields). Hashes depend on the CPU's float
rounding: compare files made on one machine.
"""
import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]


def pixels_hash(folder):
    files = sorted(Path(folder).rglob("*.png"))
    h = hashlib.sha256()
    for f in files:
        with Image.open(f) as im:
            h.update(f"{f.relative_to(folder)}:{im.size}:".encode() + im.convert("RGB").tobytes())
    return f"{len(files)}:{h.hexdigest()[:16]}"


def make_inputs(folder):
    photo = Image.new("RGB", (64, 64), (200, 220, 240))
    d = ImageDraw.Draw(photo)
    d.ellipse((8, 8, 40, 40), fill=(220, 30, 30))
    d.rectangle((36, 30, 60, 58), fill=(30, 30, 200))
    photo.save(folder / "photo.png")
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((30, 24, 62, 62), fill=255)
    mask.save(folder / "mask.png")
    indir = folder / "indir"
    indir.mkdir()
    photo.save(indir / "a.png")
    mask.save(indir / "a_mask.png")
    (folder / "job.jsonl").write_text(
        '{"prompt": "a red circle", "n": 2}\n'
        '{"prompt": "a blue square", "seed": 7, "steps": 6, "sampler": "DPM++ 2M Karras"}\n')


def make_tiny(folder):
    import torch
    from safetensors.torch import save_file
    from conftest import build_tiny, official_layout
    from test_toolbox import kohya_lora
    model = build_tiny()
    torch.save({"state_dict": official_layout(model)}, folder / "tiny.ckpt")
    save_file(kohya_lora(model), folder / "style.safetensors")
    save_file({"emb_params": torch.randn(2, 32, generator=torch.Generator().manual_seed(3))},
              folder / "zqthing.safetensors")


def cases(f):
    few = ["--n_samples", "2", "--n_iter", "1", "--ddim_steps", "8", "--safety_checker", "none"]
    tiny = ["--ckpt", f / "tiny.ckpt", "--config", ROOT / "configs/tiny/tiny-inference.yaml",
            "--H", "32", "--W", "32"]
    t2i, i2i, inp = "txt2img.py", "img2img.py", "inpaint.py"
    return {
        "txt2img-ddim": (t2i, few + ["--prompt", "a red circle"]),
        "txt2img-plms": (t2i, few + ["--plms"]),
        "txt2img-dpmpp2m-karras": (t2i, few + ["--sampler", "DPM++ 2M Karras"]),
        "txt2img-euler-a": (t2i, few + ["--sampler", "Euler a"]),
        "txt2img-ddim-eta": (t2i, few + ["--ddim_eta", "0.5"]),
        "txt2img-dpmpp-sde": (t2i, few + ["--sampler", "dpmpp_sde", "--seed", "3"]),
        "txt2img-heun-exp": (t2i, few + ["--sampler", "heun", "--schedule", "exponential"]),
        "txt2img-unipc-negative": (t2i, few + ["--sampler", "unipc", "--negative-prompt",
                                               "blue"]),
        "txt2img-bf16": (t2i, few + ["--precision", "bf16", "--sampler", "dpmpp_2m"]),
        "txt2img-a1111": (t2i, few + ["--prompt-syntax", "a1111", "--prompt",
                                      "a (red:1.3) circle BREAK [blue] square"]),
        "txt2img-fixed-code-96": (t2i, few + ["--fixed_code", "--H", "96", "--W", "64"]),
        "txt2img-jsonl": (t2i, few + ["--from-file", f / "job.jsonl"]),
        "img2img": (i2i, few + ["--init-img", f / "photo.png", "--strength", "0.6"]),
        "img2img-euler": (i2i, few + ["--init-img", f / "photo.png", "--sampler", "euler",
                                      "--scale", "6"]),
        "inpaint-builtin": (inp, few + ["--image", f / "photo.png", "--mask", f / "mask.png",
                                        "--prompt", "a circle"]),
        "inpaint-no-blend": (inp, few + ["--image", f / "photo.png", "--mask", f / "mask.png",
                                         "--no-latent-blend", "--sampler", "dpmpp_2m"]),
        "inpaint-txt2img-model": (inp, few + [
            "--image", f / "photo.png", "--mask", f / "mask.png", "--strength", "0.8",
            "--ckpt", ROOT / "models/ldm/shapes/model.safetensors"]),
        "inpaint-indir": (inp, few + ["--indir", f / "indir"]),
        "tiny-lora-embedding": (t2i, few + tiny + ["--lora", f"{f / 'style.safetensors'}:0.7",
                                                   "--embedding", f / "zqthing.safetensors",
                                                   "--prompt", "a zqthing on a table"]),
        "tiny-clip-skip-a1111": (t2i, few + tiny + ["--clip-skip", "2", "--prompt-syntax",
                                                    "a1111", "--prompt", "(a cat:1.2)"]),
        "tiny-img2img": (i2i, few + tiny[:4] + ["--init-img", f / "photo.png",
                                                "--sampler", "lms"]),
    }


LIBRARY = '''
import hashlib, json, sys
from PIL import Image
from ldm.pipeline import Pipeline
photo = Image.open(sys.argv[1]).convert("RGB"); mask = Image.open(sys.argv[2]).convert("L")
pipe = Pipeline.load(safety=False)
out = {}
def h(samples):
    return hashlib.sha256(b"".join(s.image.tobytes() for s in samples)).hexdigest()[:16]
out["lib-generate"] = h(pipe.generate("a red circle", [1, 2], sampler="plms", steps=8,
                                      scale=4.0, progress=False))
out["lib-generate-dpm"] = h(pipe.generate(["a", "b"], [5, 6], sampler="dpmpp_2m",
                                          schedule="karras", steps=6, scale=5.0,
                                          height=64, width=96, progress=False))
out["lib-img2img"] = h(pipe.img2img("a blue square", [3], photo, strength=0.5, sampler="ddim",
                                    steps=10, scale=4.0, progress=False))
ip = Pipeline.load(task="inpaint", safety=False)
out["lib-inpaint"] = h(ip.inpaint("a circle", [4], photo, mask, sampler="ddim", steps=8,
                                  scale=4.0, progress=False))
print(json.dumps(out))
'''


def run_all(folder):
    make_inputs(folder)
    make_tiny(folder)
    results = {}
    for name, (script, argv) in cases(folder).items():
        out = folder / "out" / name
        cmd = [sys.executable, str(ROOT / "scripts" / script), *map(str, argv),
               "--outdir", str(out)]
        p = subprocess.run(cmd, capture_output=True, text=True)
        results[name] = pixels_hash(out) if p.returncode == 0 else f"exit {p.returncode}: " \
            + p.stderr.strip().splitlines()[-1]
        print(f"{name:28} {results[name]}", flush=True)
    p = subprocess.run([sys.executable, "-c", LIBRARY, str(folder / "photo.png"),
                        str(folder / "mask.png")], capture_output=True, text=True, cwd=ROOT)
    lib = (json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else
           {"library": "failed: " + p.stderr.strip().splitlines()[-1]})
    for name, value in lib.items():
        print(f"{name:28} {value}", flush=True)
    results.update(lib)
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--compare", help="an earlier file to compare with")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = run_all(Path(tmp))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    if args.compare:
        before = json.loads(Path(args.compare).read_text())
        changed = [k for k in before if before[k] != results.get(k)]
        for k in changed:
            print(f"CHANGED {k}: {before[k]} -> {results.get(k)}")
        print(f"{len(before) - len(changed)} of {len(before)} identical")
        return 1 if changed else 0
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
