"""Text to image, with the CompVis flags: python scripts/txt2img.py --prompt "..." --plms

Samples go to OUTDIR/samples/NNNNN.png (numbered after what is there) and a grid to
OUTDIR/grid-NNNN.png; nothing is overwritten. Image k of a run (counting across --n_iter and
--from-file prompts) has seed --seed + k and carries its parameters in a PNG text chunk:
--seed SEED+k --n_samples 1 --n_iter 1 makes it again.
"""
import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Generate images from text with Stable Diffusion.")
    p.add_argument("--prompt", type=str, nargs="?", default="a painting of a virus monster playing guitar",
                   help="the prompt to render")
    p.add_argument("--negative-prompt", "--negative_prompt", dest="negative_prompt", default="",
                   help="what the image should not show (replaces the empty unconditional prompt)")
    p.add_argument("--outdir", type=str, nargs="?", default="outputs/txt2img-samples",
                   help="dir to write results to")
    p.add_argument("--skip_grid", action="store_true", help="do not save a grid")
    p.add_argument("--skip_save", action="store_true", help="do not save individual samples")
    p.add_argument("--ddim_steps", type=int, default=50, help="number of sampling steps")
    p.add_argument("--plms", action="store_true", help="use PLMS sampling (default: DDIM)")
    p.add_argument("--laion400m", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--fixed_code", action="store_true",
                   help="every image starts from the same noise (image 0's)")
    p.add_argument("--ddim_eta", type=float, default=0.0, help="DDIM eta (0: deterministic)")
    p.add_argument("--n_iter", type=int, default=2, help="sample this often")
    p.add_argument("--H", type=int, default=None, help="image height (default: the model's, 512 for SD v1)")
    p.add_argument("--W", type=int, default=None, help="image width (default: the model's)")
    p.add_argument("--C", type=int, default=None, help="latent channels (default: the model's, 4)")
    p.add_argument("--f", type=int, default=None, help="downsampling factor (default: the model's, 8 for SD v1)")
    p.add_argument("--n_samples", type=int, default=3, help="batch size: images per prompt per iteration")
    p.add_argument("--n_rows", type=int, default=0, help="images per grid row (default: n_samples)")
    p.add_argument("--scale", type=float, default=None,
                   help="classifier-free guidance scale (default: 7.5, or the model config's "
                        "own `sampling: scale:`, as the built-in model has)")
    p.add_argument("--from-file", "--from_file", dest="from_file", type=str,
                   help="a text file with one prompt per line")
    p.add_argument("--config", type=str, default=None,
                   help="model config (default: config.yaml beside the checkpoint, else SD v1's)")
    p.add_argument("--ckpt", type=str, default=None,
                   help="checkpoint (default: models/ldm/stable-diffusion-v1/model.ckpt if present, "
                        "else the built-in model)")
    p.add_argument("--seed", type=int, default=42, help="seed of image 0; image k uses seed + k")
    p.add_argument("--precision", choices=["full", "autocast", "bf16"], default="autocast",
                   help="autocast: fp16 on CUDA, fp32 elsewhere; full: fp32; bf16: bfloat16 autocast")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, mps")
    p.add_argument("--safety_checker", default=None,
                   help="safety checker weights (default: models/safety_checker/ or the HF cache)")
    return p.parse_args(argv)


class UsageError(ValueError):
    pass


def read_prompts(path):
    """Prompts from a file: UTF-8 (a BOM is fine), any line endings, blank lines skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UsageError(f"prompt file not found: {path}")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read prompt file {path} as UTF-8 text ({e.__class__.__name__})")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"prompt file {path} has no prompts (one per line)")
    return prompts


def batches(args):
    """[(prompts, seeds)] in CompVis order: for each iteration, for each prompt batch."""
    if args.n_samples < 1 or args.n_iter < 1:
        raise UsageError("--n_samples and --n_iter must be at least 1")
    if args.from_file:
        prompts = read_prompts(args.from_file)
        data = [prompts[i:i + args.n_samples] for i in range(0, len(prompts), args.n_samples)]
    else:
        data = [[args.prompt] * args.n_samples]
    out, k = [], 0
    for _ in range(args.n_iter):
        for group in data:
            seeds = [args.seed] * len(group) if args.fixed_code else list(range(args.seed + k, args.seed + k + len(group)))
            out.append((group, seeds))
            k += len(group)
    return out


def check_geometry(args, pipe):
    if args.C is not None and args.C != pipe.model.channels:
        raise UsageError(f"--C {args.C} does not match the model's {pipe.model.channels} latent channels")
    if args.f is not None and args.f != pipe.factor:
        raise UsageError(f"--f {args.f} does not match the model's downsampling factor {pipe.factor}")
    height = pipe.native_size if args.H is None else args.H
    width = pipe.native_size if args.W is None else args.W
    pipe.check_size(height, width)
    return height, width


def run(args):
    from tqdm import tqdm
    from ldm.image_io import check_writable, make_grid, save_numbered
    from ldm.pipeline import INSTALL_HINT, Txt2Img

    if args.ddim_steps < 1:
        raise UsageError("--ddim_steps must be at least 1")
    if args.plms and args.ddim_eta != 0:
        raise UsageError("PLMS is deterministic: drop --ddim_eta or --plms")
    work = batches(args)  # reads --from-file before the slow model load
    outdir = Path(args.outdir)
    sample_dir = outdir / "samples"
    check_writable(sample_dir)
    pipe = Txt2Img.load(args.ckpt, args.config, args.device, args.precision,
                        safety_checker_path=args.safety_checker)
    hint = "" if args.ckpt or "Stable Diffusion" in pipe.model_name else f"; {INSTALL_HINT}"
    print(f"using {pipe.model_name} on {pipe.device}{hint}", file=sys.stderr)
    height, width = check_geometry(args, pipe)

    sampler = "plms" if args.plms else "ddim"
    done, saved = [], []
    for prompts, seeds in tqdm(work, desc="batches", disable=len(work) < 2):
        samples = pipe.generate(prompts, seeds, [args.negative_prompt] * len(prompts), sampler,
                                args.ddim_steps, args.scale, args.ddim_eta, height, width)
        for s in samples:
            if args.fixed_code:
                s.parameters["fixed_code"] = True
            if not args.skip_save:
                saved.append(save_numbered(s.image, sample_dir, "{:05}.png", s.parameters))
        done.extend(samples)
    if not args.skip_grid and done:
        grid = make_grid([s.image for s in done], args.n_rows or args.n_samples)
        params = {"grid_of": [s.parameters for s in done]}
        saved.append(save_numbered(grid, outdir, "grid-{:04}.png", params))
    print(f"Your samples are ready and waiting for you here: \n{outdir} \n \nEnjoy.")
    return done


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    from ldm.checkpoint import CheckpointError
    from ldm.image_io import OutputError
    from ldm.pipeline import ModelNotFound
    try:
        run(args)
    except KeyboardInterrupt:
        print("\ninterrupted: the images finished so far are saved", file=sys.stderr)
        return 130
    except (UsageError, CheckpointError, OutputError, ModelNotFound, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
