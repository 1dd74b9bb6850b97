"""Peak memory of a whole 512x512 txt2img run at SD v1 size, random weights; ours
(scripts/txt2img.py) against diffusers' StableDiffusionPipeline on the same weights.

    python scripts/benchmark_memory.py [--steps 2] [--cache ~/.cache/sd-bench]

Official weights cannot be downloaded here, so a random SD v1 checkpoint (official key
layout, fp16 safetensors like the published ones) is written once to the cache folder, and
the same weights converted by diffusers' converter. Each run is a fresh process; its peak
resident memory (ru_maxrss) is reported. Sampling steps do not change the peak, so few are run.
"""
import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DIFFUSERS_RUN = """
import sys, torch
from diffusers import StableDiffusionPipeline
folder, steps, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
dtype = getattr(torch, sys.argv[4] if len(sys.argv) > 4 else "float32")
size = int(sys.argv[5]) if len(sys.argv) > 5 else 512
pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, torch_dtype=dtype)
image = pipe("a painting of a virus monster playing guitar", num_inference_steps=steps,
             height=size, width=size, generator=torch.Generator().manual_seed(42)).images[0]
image.save(out)
"""


def peak_rss_gib(cmd):
    """Run ``cmd`` alone; (peak RSS of that child in GiB, seconds)."""
    wrapper = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
               "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
               "sys.stderr.write(r.stderr[-3000:]) if r.returncode else None; "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
               "time.perf_counter() - t); sys.exit(r.returncode)")
    r = subprocess.run([sys.executable, "-c", wrapper, *map(str, cmd)], capture_output=True,
                       text=True)
    if r.returncode:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{r.stderr}")
    kib, seconds = r.stdout.split()
    return int(kib) / 2**20, float(seconds)


def make_weights(cache, config_path=None):
    """A random checkpoint (fp16 safetensors) and its diffusers folder, of SD v1 or of the
    model ``config_path`` describes (e.g. SD 2's v2-inference-v.yaml)."""
    from safetensors.torch import save_file
    stem = "sd-v1" if config_path is None else Path(config_path).stem
    ckpt, folder = cache / f"{stem}-random.safetensors", cache / f"{stem}-random-diffusers"
    if ckpt.exists() and (folder / "model_index.json").exists():
        return ckpt, folder
    cache.mkdir(parents=True, exist_ok=True)
    from ldm.compare import random_sd, save_diffusers_pipeline
    model, config = random_sd(config_path=config_path)
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, ckpt)
    save_diffusers_pipeline(model, config, folder)
    return ckpt, folder


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "sd-bench")
    p.add_argument("--skip-diffusers", action="store_true")
    args = p.parse_args()
    ckpt, folder = make_weights(args.cache)
    with tempfile.TemporaryDirectory() as tmp:
        ours = peak_rss_gib([sys.executable, ROOT / "scripts" / "txt2img.py", "--ckpt", ckpt,
                             "--H", 512, "--W", 512, "--n_samples", 1, "--n_iter", 1,
                             "--ddim_steps", args.steps, "--outdir", Path(tmp) / "ours",
                             "--skip_grid"])
        print(f"ours:      peak RSS {ours[0]:.2f} GiB ({ours[1]:.0f} s)", flush=True)
        if not args.skip_diffusers:
            theirs = peak_rss_gib([sys.executable, "-c", DIFFUSERS_RUN, folder, args.steps,
                                   Path(tmp) / "theirs.png"])
            print(f"diffusers: peak RSS {theirs[0]:.2f} GiB ({theirs[1]:.0f} s)")
            print(f"ratio ours/diffusers = {ours[0] / theirs[0]:.2f} (< 1: ours uses less)")
    print(f"512x512, batch 1 with guidance, fp32 on CPU, {args.steps} DDIM steps, "
          f"SD v1 architecture with random weights ({ckpt.stat().st_size / 2**30:.2f} GiB fp16 file)")


if __name__ == "__main__":
    main()
