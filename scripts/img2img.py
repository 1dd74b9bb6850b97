"""Image to image, with the CompVis flags:
python scripts/img2img.py --init-img photo.png --prompt "..." --strength 0.75

The init image is encoded, noised part-way (--strength: 0 keeps it, 1 almost replaces it)
and denoised with the prompt. Samples go to OUTDIR/samples/NNNNN.png and a grid to
OUTDIR/grid-NNNN.png, numbered after what is there; each PNG carries its parameters (with
the init image's SHA-256 and the strength). Image k of a run has seed --seed + k.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from ldm import cli  # noqa: E402  (standard library only: nothing slow before main)


def build_parser():
    p = cli.ArgumentParser(description="Turn an image into another with Stable Diffusion.")
    p.add_argument("--prompt", type=str, default="a painting of a virus monster playing guitar",
                   help="the prompt to render")
    p.add_argument("--init-img", "--init_img", dest="init_img", type=cli.nonempty,
                   required=True, help="the image to start from (any format Pillow reads)")
    p.add_argument("--strength", type=cli.field("strength"), default=0.75,
                   help="how much to change the image, in [0, 1]: the share of the sampling "
                        "steps run, at least one above 0 (0: the image itself, 1: all steps)")
    cli.add_sampling_arguments(p, outdir="outputs/img2img-samples", n_samples=2, n_iter=1,
                               scale=5.0, jsonl=True)
    cli.add_image_size_arguments(p)
    cli.add_job_arguments(p)
    cli.add_model_arguments(p)
    return p


def run(args, job):
    from ldm.checkpoint import file_hash
    from ldm.request import ModelInfo

    choice = cli.choose_model(args)  # the config is read and checked; no weights yet
    cli.check_sampling(args, choice, "img2img")
    image, (width, height) = cli.read_image(args.init_img, args, ModelInfo.of_choice(choice),
                                            "init image")
    cli.check_size(choice.geometry, height, width, args.n_samples, args.device,
                   args.vae_tiling)
    cli.check_model_files(args)
    cli.draw_seed(args)
    image_hash = file_hash(args.init_img, chars=64)
    # a JSONL --from-file: a job (every line checked, workers started) before the load
    job_run = cli.prepare_job(args, choice, image_hash, (height, width))
    work = cli.batches(args, cli.prompt_list(args)) if job_run is None else job_run.work
    out = job.outdir(args.outdir)
    pipe = cli.load_pipeline(args, choice)  # the slow part
    from ldm import jobs

    def request(prompts, seeds, line=None):
        """The request of a batch: the flags', or a JSONL line's settings over them."""
        values = {}
        if line is not None:
            negative, _, steps, scale, _, _ = jobs.settings(line, args)
            sampler, schedule, eta = job_run.sampling[line.line]
            values = dict(negative_prompts=negative, sampler=sampler, schedule=schedule,
                          eta=eta, steps=steps, scale=scale)
        return cli.build_request(args, pipe.info, "img2img", prompts, seeds, image=image,
                                 image_hash=image_hash, **values)

    def make(prompts, seeds, callback, line=None):
        samples = pipe.run(request(prompts, seeds, line), progress=False, callback=callback)
        for s in samples:
            s.parameters["init_image"] = str(args.init_img)
        return samples

    def steps(batch):
        return pipe.steps_run(request(*batch[:2], batch[2] if len(batch) > 2 else None))
    if job_run is not None:
        return job_run.run(out, steps, make)
    return cli.generate_batches(args, out, work, steps, make, pipe)


def main(argv=None):
    return cli.main(build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
