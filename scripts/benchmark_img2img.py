"""Time a whole image-to-image run, ours vs diffusers' StableDiffusionImg2ImgPipeline, on
identical SD v1-size (random) weights, in one process.

    python scripts/benchmark_img2img.py                  # 256x256, strength 0.75, DDIM 50
    python scripts/benchmark_img2img.py --size 512 --repeats 1

Both run the user's path: a PIL image in, encode, text encoder, guidance (scale 7.5) over
the last int(50 * 0.75) = 37 DDIM steps, decode, PIL image out; alternating, after one
warm-up each. Prints the median seconds of each and their ratio.
"""
import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--strength", type=float, default=0.75)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    import numpy as np
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline
    from omegaconf import OmegaConf
    from PIL import Image

    from ldm.compare import diffusers_components, time_alternating
    from ldm.pipeline import SD_CONFIG, Pipeline, build_model

    torch.manual_seed(0)
    config = OmegaConf.load(SD_CONFIG)
    model = build_model(config).eval()
    with torch.no_grad():  # zero-initialised output layers would make the run vacuous
        for param in model.parameters():
            if not param.any():
                param.normal_(0, 0.02)
    ours = Pipeline(model, torch.device("cpu"), "full", watermark=False)
    with tempfile.TemporaryDirectory() as tmp:
        theirs = StableDiffusionImg2ImgPipeline(**diffusers_components(model, config, Path(tmp)))
    theirs.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (args.size, args.size, 3), dtype=np.uint8))
    prompt = "a photograph of an astronaut riding a horse"
    runs = {
        "ours": lambda: ours.img2img(prompt, [1], image, strength=args.strength, sampler="ddim",
                                     steps=args.steps, scale=7.5, progress=False)[0].image,
        "diffusers": lambda: theirs(prompt, image=image, strength=args.strength,
                                    num_inference_steps=args.steps, guidance_scale=7.5,
                                    generator=torch.Generator().manual_seed(1)).images[0],
    }
    with torch.inference_mode():
        times, _ = time_alternating(runs, args.repeats)
    med = {name: statistics.median(v) for name, v in times.items()}
    print(f"SD v1 img2img, {args.size}x{args.size}, strength {args.strength}, DDIM "
          f"{args.steps} ({int(args.steps * args.strength)} run), scale 7.5, fp32, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    for name in runs:
        print(f"  {name:10s} {med[name]:.2f} s  (all: {', '.join(f'{v:.2f}' for v in times[name])})")
    print(f"  ratio ours/diffusers = {med['ours'] / med['diffusers']:.3f}  (< 1: ours is faster)")


if __name__ == "__main__":
    main()
