"""Upscale an image 4x with the SD x4 upscaler (Stability's x4-upscaler-ema), or with a
pixel upscaler (ESRGAN, Real-ESRGAN, 4x-UltraSharp...):
python scripts/upscale.py --ckpt x4-upscaler-ema.safetensors --image small.png --prompt "..."
python scripts/upscale.py --upscaler RealESRGAN_x4plus.pth --image small.png

The image (sides made multiples of 8) is given noise (--noise_level, 0 to 350: more noise,
more invented detail) and put beside the latents of an image four times its size, which
are denoised with the prompt. Large images are made in tiles of --tile low-resolution
pixels blended over --tile_overlap (0: one pass; memory and time grow with the square of
the side otherwise). Samples go to OUTDIR/samples/NNNNN.png (image k with seed --seed + k)
and a grid to OUTDIR/grid-NNNN.png; each PNG carries its parameters.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from ldm import cli  # noqa: E402  (standard library only: nothing slow before main)
from ldm.request import UPSCALE_DEFAULTS  # noqa: E402


def build_parser():
    p = cli.ArgumentParser(description="Upscale an image 4x with the SD x4 upscaler.")
    p.add_argument("--image", "--init-img", "--init_img", dest="image", type=cli.nonempty,
                   required=True, help="the image to upscale (any format Pillow reads)")
    p.add_argument("--upscaler", type=cli.nonempty, default=None, metavar="FILE",
                   help="a pixel upscaler instead of the SD x4 upscaler: ESRGAN and "
                        "Real-ESRGAN files (.pth/.safetensors), at their own scale; no "
                        "prompt, seed or steps")
    p.add_argument("--prompt", type=str, default="",
                   help="what the image shows (guides the detail the upscaler adds)")
    p.add_argument("--noise_level", type=cli.field("noise_level"),
                   default=UPSCALE_DEFAULTS["noise_level"],
                   help="noise given to the image, 0 to 350 (default 20, as diffusers)")
    p.add_argument("--tile", type=cli.field("tile"), default=UPSCALE_DEFAULTS["tile"],
                   help="tile side in input pixels, a multiple of 8 (default 128, the "
                        "model's training size; 0: the whole image at once)")
    p.add_argument("--tile_overlap", type=cli.field("tile_overlap"),
                   default=UPSCALE_DEFAULTS["tile_overlap"],
                   help="overlap of neighbouring tiles in input pixels (default 32)")
    cli.add_sampling_arguments(p, outdir="outputs/upscale-samples", n_samples=1, n_iter=1,
                               scale=9.0)
    cli.add_model_arguments(p)
    return p


# flags of the other scripts that mean nothing here
NOT_HERE = {"refiner": "--refiner", "control": "--control", "original_size": "--original_size",
            "crop": "--crop", "target_size": "--target_size", "unet": "--unet"}


def run(args, job):
    from ldm.checkpoint import file_hash
    from ldm.image_io import load_image
    for key, flag in NOT_HERE.items():
        if getattr(args, key, None):
            raise cli.UsageError(f"{flag} does not apply to the x4 upscaler")
    if args.from_file and str(args.from_file).endswith(".jsonl"):
        raise cli.UsageError("JSONL jobs are for txt2img.py and img2img.py; give prompts one "
                             "a line")
    if args.upscaler:
        return pixel_upscale(args, job)
    choice = cli.choose_model(args)  # the config is read and checked; no weights yet
    cli.check_sampling(args, choice, "upscale")
    image = load_image(args.image, "image")
    cli.check_model_files(args)
    cli.draw_seed(args)
    image_hash = file_hash(args.image, chars=64)
    work = cli.batches(args, cli.prompt_list(args))
    out = job.outdir(args.outdir)
    pipe = cli.load_pipeline(args, choice)  # the slow part

    def request(prompts, seeds):
        return cli.build_request(args, pipe.info, "upscale", prompts, seeds, image=image,
                                 image_hash=image_hash, noise_level=args.noise_level,
                                 tile=args.tile, tile_overlap=args.tile_overlap)

    def make(prompts, seeds, callback):
        samples = pipe.run(request(prompts, seeds), progress=False, callback=callback)
        for s in samples:
            s.parameters["init_image"] = str(args.image)
        return samples

    def steps(batch):
        return pipe.steps_run(request(*batch[:2]))
    return cli.generate_batches(args, out, work, steps, make, pipe)


def pixel_upscale(args, job):
    """--upscaler FILE: the image through a pixel upscaler, tiled, saved numbered with its
    parameters."""
    from ldm.checkpoint import file_hash
    from ldm.image_io import load_image
    if args.ckpt:
        raise cli.UsageError("--upscaler runs a pixel upscaler alone: drop --ckpt (or drop "
                             "--upscaler to use the SD x4 upscaler)")
    image = load_image(args.image, "image")
    out = job.outdir(args.outdir)
    cli.import_torch()
    from ldm.pipeline import pick_device
    from ldm.upscalers import load_pixel_upscaler
    up = load_pixel_upscaler(args.upscaler, pick_device(args.device), "--upscaler")
    up.tile, up.overlap = args.tile, args.tile_overlap
    cli.log.info("upscaling %dx%d by %d with %s (%s)", image.width, image.height, up.scale,
                 up.name, up.architecture)
    result = up.upscale(image, image.width * up.scale, image.height * up.scale)
    path = out.save_numbered(result, "{:05}.png", {
        "task": "upscale", "upscaler": up.name, "architecture": up.architecture,
        "scale": up.scale, "tile": args.tile, "tile_overlap": args.tile_overlap,
        "init_image": str(args.image), "init_image_sha256": file_hash(args.image, chars=64),
        "output_size": f"{result.width}x{result.height}"}, "samples")
    print(f"Your upscaled image is at {path}")
    return [path]


def main(argv=None):
    return cli.main(build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
