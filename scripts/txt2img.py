"""Text to image, with the CompVis flags: python scripts/txt2img.py --prompt "..." --plms

Samples go to OUTDIR/samples/NNNNN.png (numbered after what is there) and a grid to
OUTDIR/grid-NNNN.png; nothing is overwritten. Image k of a run (counting across --n_iter and
--from-file prompts) has seed --seed + k and carries its parameters in a PNG text chunk:
--seed SEED+k --n_samples 1 --n_iter 1 makes it again.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from ldm import cli  # noqa: E402  (standard library only: nothing slow before main)
from ldm.cli import number  # noqa: E402


def build_parser():
    p = cli.ArgumentParser(description="Generate images from text with Stable Diffusion.")
    p.add_argument("--prompt", type=str, default="a painting of a virus monster playing guitar",
                   help="the prompt to render")
    cli.add_sampling_arguments(p, outdir="outputs/txt2img-samples", n_samples=3, n_iter=2,
                               jsonl=True)
    p.add_argument("--laion400m", action="store_true", help=cli.argparse.SUPPRESS)
    p.add_argument("--fixed_code", action="store_true",
                   help="reuse one batch of start codes: image j of every batch starts from "
                        "the noise of seed + j")
    p.add_argument("--H", type=cli.field("height"), default=None,
                   help="image height (default: the model's, 512 for SD v1)")
    p.add_argument("--W", type=cli.field("width"), default=None,
                   help="image width (default: the model's)")
    p.add_argument("--C", type=number(int, 1), default=None,
                   help="latent channels (default: the model's, 4)")
    p.add_argument("--f", type=number(int, 1), default=None,
                   help="downsampling factor (default: the model's, 8 for SD v1)")
    cli.add_hires_arguments(p)
    cli.add_job_arguments(p)
    cli.add_model_arguments(p)
    return p


def check(args, choice):
    """Everything that needs no weights, before the slow load: (height, width, the hires
    fix's keywords or None)."""
    cli.check_sampling(args, choice)
    g = choice.geometry
    if args.C is not None and g.channels is not None and args.C != g.channels:
        raise cli.UsageError(f"--C {args.C} does not match the model's {g.channels} latent channels")
    if args.f is not None and g.factor is not None and args.f != g.factor:
        raise cli.UsageError(f"--f {args.f} does not match the model's downsampling factor "
                             f"{g.factor}")
    height, width = args.H or g.native_size, args.W or g.native_size
    cli.check_size(g, height, width, args.n_samples, args.device, args.vae_tiling)
    hires = cli.hires_spec(args)
    if hires is not None and g.factor:
        from ldm.hires import Hires
        w, h = Hires.build(**dict(hires, upscaler=None)).sizes(width, height, g.factor)[1]
        cli.check_size(g, h, w, args.n_samples, args.device, args.vae_tiling)
    return height, width, hires


def run(args, job):

    choice = cli.choose_model(args)  # the config is read and checked; no weights yet
    height, width, hires = check(args, choice)
    cli.check_model_files(args)
    cli.draw_seed(args)
    job_run = cli.prepare_job(args, choice)  # a JSONL --from-file: checked, before the load
    if job_run is None:
        work = cli.batches(args, cli.prompt_list(args))  # reads --from-file before the load
    else:
        from ldm import jobs
        work, sampling = job_run.work, job_run.sampling
    out = job.outdir(args.outdir)
    pipe = cli.load_pipeline(args, choice)  # the slow part
    if hires is not None:
        hires = cli.hires_of(hires, pipe)

    def request(prompts, seeds, line=None):
        """The request of a batch: the flags', or a JSONL line's settings over them."""
        if line is None:
            return cli.build_request(args, pipe.info, "txt2img", prompts, seeds,
                                     height=height, width=width, hires=hires)
        negative, _, steps, scale, h, w = jobs.settings(line, args)
        sampler, schedule, eta = sampling[line.line]
        return cli.build_request(args, pipe.info, "txt2img", prompts, seeds,
                                 negative_prompts=negative, sampler=sampler,
                                 schedule=schedule, eta=eta, steps=steps, scale=scale,
                                 height=h or height, width=w or width, hires=hires)

    def make(prompts, seeds, callback, line=None):
        return pipe.run(request(prompts, seeds, line), progress=False, callback=callback)

    def steps(batch):
        return pipe.steps_run(request(*batch[:2], batch[2] if len(batch) > 2 else None))
    if job_run is not None:
        return job_run.run(out, steps, make)
    return cli.generate_batches(args, out, work, steps, make, pipe)


def main(argv=None):
    return cli.main(build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
