"""Cold start: a fresh process, to N images on disk, with the built-in model; ours
(scripts/txt2img.py at its defaults) against diffusers' StableDiffusionPipeline holding the
same weights (converted once beforehand, not timed), in the same run. ``--task inpaint``:
scripts/inpaint.py with its default model (the built-in inpainting model on a machine
without SD weights) on a rendered scene and a box mask, against
StableDiffusionInpaintPipeline.

    python scripts/benchmark_cold_start.py                  # 4 images, 3 repeats each
    python scripts/benchmark_cold_start.py --task inpaint
"""
import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DIFFUSERS_RUN = """
import sys, torch
from diffusers import StableDiffusionPipeline
folder, n, steps, size, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
g = torch.Generator().manual_seed(42)
images = pipe(["a red circle"] * n, num_inference_steps=steps, guidance_scale=7.5,
              height=size, width=size, generator=g).images
for i, im in enumerate(images):
    im.save(f"{out}/{i:05}.png")
"""

DIFFUSERS_INPAINT = """
import sys, torch
from PIL import Image
from diffusers import StableDiffusionInpaintPipeline
folder, n, steps, size, out, image, mask = sys.argv[1:8]
n, steps, size = int(n), int(steps), int(size)
pipe = StableDiffusionInpaintPipeline.from_pretrained(folder, safety_checker=None)
g = torch.Generator().manual_seed(42)
images = pipe(["a red circle"] * n, image=Image.open(image), mask_image=Image.open(mask),
              num_inference_steps=steps, guidance_scale=7.5, height=size, width=size,
              generator=g).images
for i, im in enumerate(images):
    im.save(f"{out}/{i:05}.png")
"""


def timed(cmd):
    start = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if r.returncode:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{r.stderr[-2000:]}")
    return elapsed


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=4, help="images")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (txt2img's default)")
    p.add_argument("--skip-diffusers", action="store_true")
    p.add_argument("--task", choices=["txt2img", "inpaint"], default="txt2img")
    args = p.parse_args()

    from ldm.config import choose_model
    choice = choose_model(task=args.task)
    ckpt, config, name = choice.ckpt, choice.config_path, choice.name
    print(f"model: {name} ({ckpt}, {ckpt.stat().st_size / 1e6:.1f} MB)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        inputs = []
        if args.task == "inpaint":  # a one-shape scene, a box over the shape
            from ldm.data.inpainting import render_scene
            from ldm.data.shapes import Scene, Shape
            from PIL import Image
            size = choice.geometry.native_size
            render_scene(Scene([Shape("star", "blue", "big", "centre")], "gray"),
                         size).save(tmp / "image.png")
            mask = Image.new("L", (size, size), 0)
            mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
            mask.save(tmp / "mask.png")
            inputs = [str(tmp / "image.png"), str(tmp / "mask.png")]
        script = "txt2img.py" if args.task == "txt2img" else "inpaint.py"
        ours_cmd = lambda i: [sys.executable, str(ROOT / "scripts" / script),
                              "--prompt", "a red circle", "--n_samples", str(args.n),
                              "--n_iter", "1", "--ddim_steps", str(args.steps), "--scale", "7.5",
                              "--outdir", str(tmp / f"ours{i}")] + (
            ["--image", inputs[0], "--mask", inputs[1]] if inputs else [])
        runs = {"ours": ours_cmd}
        if not args.skip_diffusers:
            from omegaconf import OmegaConf
            from ldm.compare import save_diffusers_pipeline
            from ldm.pipeline import load_model
            model = load_model(ckpt, config)
            # the built-in model's spatial_pos_emb has no diffusers counterpart: its twin
            # lacks those Linear(16, C) layers (a few thousand multiply-adds per token)
            save_diffusers_pipeline(model, OmegaConf.load(config), tmp / "diffusers",
                                    drop_pos_emb=True,
                                    cls="StableDiffusionPipeline" if args.task == "txt2img"
                                    else "StableDiffusionInpaintPipeline")
            size = model.image_size * model.latent_downsampling_factor
            del model

            def theirs_cmd(i):
                (tmp / f"theirs{i}").mkdir()
                run = DIFFUSERS_RUN if args.task == "txt2img" else DIFFUSERS_INPAINT
                return [sys.executable, "-c", run, str(tmp / "diffusers"), str(args.n),
                        str(args.steps), str(size), str(tmp / f"theirs{i}")] + inputs
            runs["diffusers"] = theirs_cmd
        times = {k: [] for k in runs}
        for i in range(args.repeats):
            for k, cmd in runs.items():
                times[k].append(timed(cmd(i)))
        assert len(list((tmp / "ours0" / "samples").glob("*.png"))) == args.n
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"cold start of {script} to {args.n} images, DDIM {args.steps} steps, scale 7.5, "
          f"median of {args.repeats} fresh processes:")
    for k in runs:
        print(f"  {k:10s} {med[k]:6.2f} s  (all: {', '.join(f'{t:.2f}' for t in times[k])})")
    if "diffusers" in med:
        print(f"  ratio ours/diffusers = {med['ours'] / med['diffusers']:.2f} (< 1: ours is faster)")


if __name__ == "__main__":
    main()
