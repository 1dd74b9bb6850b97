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
    cli.add_sampling_arguments(p, outdir="outputs/txt2img-samples", n_samples=3, n_iter=2)
    p.add_argument("--laion400m", action="store_true", help=cli.argparse.SUPPRESS)
    p.add_argument("--fixed_code", action="store_true",
                   help="reuse one batch of start codes: image j of every batch starts from "
                        "the noise of seed + j")
    p.add_argument("--H", type=number(int, 1), default=None,
                   help="image height (default: the model's, 512 for SD v1)")
    p.add_argument("--W", type=number(int, 1), default=None, help="image width (default: the model's)")
    p.add_argument("--C", type=number(int, 1), default=None,
                   help="latent channels (default: the model's, 4)")
    p.add_argument("--f", type=number(int, 1), default=None,
                   help="downsampling factor (default: the model's, 8 for SD v1)")
    p.add_argument("--shard", type=shard, default=None, metavar="I/N",
                   help="JSONL jobs: run every N-th batch from the I-th only (array jobs)")
    p.add_argument("--overwrite", action="store_true",
                   help="JSONL jobs: replace the images of another job in --outdir")
    cli.add_worker_arguments(p)
    cli.add_model_arguments(p)
    return p


def shard(text):
    from ldm.jobs import parse_shard
    try:
        return parse_shard(text)
    except ValueError as e:
        raise cli.argparse.ArgumentTypeError(str(e)) from None


def check(args, choice):
    """Everything that needs no weights, before the slow load: (height, width)."""
    cli.check_sampling(args, choice)
    g = choice.geometry
    if args.C is not None and g.channels is not None and args.C != g.channels:
        raise cli.UsageError(f"--C {args.C} does not match the model's {g.channels} latent channels")
    if args.f is not None and g.factor is not None and args.f != g.factor:
        raise cli.UsageError(f"--f {args.f} does not match the model's downsampling factor "
                             f"{g.factor}")
    height, width = args.H or g.native_size, args.W or g.native_size
    cli.check_size(g, height, width, args.n_samples, args.device, args.vae_tiling)
    return height, width


def run(args, job):
    from ldm.image_io import Outputs

    choice = cli.choose_model(args)  # the config is read and checked; no weights yet
    height, width = check(args, choice)
    cli.check_model_files(args)
    cli.draw_seed(args)
    if getattr(args, "threads", None):
        cli.import_torch()
        import torch
        torch.set_num_threads(args.threads)
    requests = cli.read_job(args)  # a JSONL prompt file, every line checked before the load
    manifest = shard = fabric = None
    if requests:
        from ldm import jobs
        sampling = cli.check_requests(args, choice, requests)
        images = jobs.plan(requests, args.seed)
        work = jobs.indexed_batches(images, args, args.n_samples)
        shard = args.shard
        Outputs(args.outdir).check()
        fabric = jobs.start_workers(args) if jobs.distributed_requested(args) else None
        manifest = jobs.Manifest(args.outdir, jobs.fingerprint(args.from_file, args),
                                 len(images), args.overwrite)
        if fabric is None:
            manifest.open()
        else:
            cli.become_worker(args, fabric)
            if fabric.global_rank == 0:
                manifest.open()
            fabric.barrier()
            if fabric.global_rank != 0:
                manifest.overwrite = False  # rank 0 started it afresh if asked
                manifest.open()
            work = work[fabric.global_rank::fabric.world_size] if shard is None else \
                work[shard[0]::shard[1]][fabric.global_rank::fabric.world_size]
            shard = None
    else:
        if args.shard or args.overwrite or args.devices is not None or args.num_nodes > 1:
            raise cli.UsageError("--shard, --overwrite, --devices and --num_nodes are for "
                                 "JSONL prompt files (--from-file prompts.jsonl)")
        work = cli.batches(args, cli.prompt_list(args))  # reads --from-file before the load
    out = job.track(Outputs(args.outdir).check())
    pipe = cli.load_pipeline(args, choice)  # the slow part
    height, width = height or pipe.native_size, width or pipe.native_size
    pipe.check_size(height, width)

    def make(prompts, seeds, callback, request=None):
        if request is None:
            return pipe.generate(prompts, seeds, args.negative_prompt, args.sampler,
                                 args.ddim_steps, args.scale, args.ddim_eta, height, width,
                                 progress=False, callback=callback, schedule=args.schedule)
        negative, _, steps, scale, h, w = jobs.settings(request, args)
        sampler, schedule, eta = sampling[request.line]
        return pipe.generate(prompts, seeds, negative, sampler, steps, scale, eta,
                             h or height, w or width, progress=False, callback=callback,
                             schedule=schedule)

    def steps(batch):
        if len(batch) == 2:
            return pipe.num_steps(args.ddim_steps, args.schedule)
        request = batch[2]
        return pipe.num_steps(jobs.settings(request, args)[2], sampling[request.line][1])
    if manifest is not None:
        try:
            cli.run_job(args, out, manifest, work, steps, make, shard, fabric)
        finally:
            manifest.close()
        return
    return cli.generate_batches(args, out, work, steps, make)


def main(argv=None):
    return cli.main(build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
