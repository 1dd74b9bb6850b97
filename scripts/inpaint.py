"""Inpainting: repaint the white part of a mask.

    python scripts/inpaint.py --image photo.png --mask mask.png --prompt "a red door"
    python scripts/inpaint.py --indir inputs/ --outdir outputs/inpainting-results --steps 50

Works with a dedicated inpainting checkpoint (9-channel UNet, as sd-v1-5-inpainting; its
config is chosen from the checkpoint) and with any text-to-image checkpoint. The known part
is blended back into the latents after every step, for both (--no-latent-blend: not for an
inpainting model, as diffusers). The mask is white where to repaint
(binarised at 0.5 for the model); the pixels outside it, feathered by --mask-blur, are the
input's own. With --image: OUTDIR/samples/NNNNN.png and a grid, as txt2img. With --indir (the
CompVis form): every NAME.png with a NAME_mask.png beside it becomes OUTDIR/NAME.png.
Outpainting: --image photo.png --outpaint left=128,down=64 extends the picture and paints
the new part (OUTDIR defaults to outputs/outpainting-samples).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from ldm import cli  # noqa: E402  (standard library only: nothing slow before main)
from ldm.request import FILLS  # noqa: E402


def build_parser():
    p = cli.ArgumentParser(description="Repaint the masked part of an image with Stable Diffusion.")
    p.add_argument("--image", type=cli.nonempty, help="the image to repaint")
    p.add_argument("--mask", type=cli.nonempty,
                   help="the mask: white = repaint, black = keep (any image mode)")
    p.add_argument("--indir", type=cli.nonempty,
                   help="a folder of NAME.png + NAME_mask.png pairs (the CompVis batch form); "
                        "results go to OUTDIR/NAME.png")
    p.add_argument("--prompt", type=str, default="", help="what to paint in the mask")
    p.add_argument("--strength", type=cli.field("strength"), default=1.0,
                   help="how much to change the masked part, in [0, 1] (1: from pure noise)")
    p.add_argument("--mask-blur", "--mask_blur", dest="mask_blur", type=cli.field("mask_blur"),
                   default=4, help="feather the paste-back inwards by this many pixels "
                                   "(outside the mask every pixel stays the input's; the "
                                   "model sees the hard mask)")
    p.add_argument("--invert-mask", "--invert_mask", dest="invert_mask", action="store_true",
                   help="repaint the black part instead")
    p.add_argument("--no-paste-back", "--no_paste_back", dest="paste_back",
                   action="store_false", help="write the raw decode (the unmasked part is "
                                              "then the autoencoder's, not the input's)")
    p.add_argument("--no-latent-blend", "--no_latent_blend", dest="latent_blend",
                   action="store_false",
                   help="an inpainting model only: do not blend the known latents back after "
                        "each step (diffusers' behaviour; by default they are, as in "
                        "ComfyUI)")
    p.add_argument("--outpaint", type=outpaint_spec, default=None,
                   metavar="left=N,right=N,up=N,down=N",
                   help="extend --image by so many pixels on those sides and paint the new "
                        "part (no --mask: the mask is the new part and a seam of 2 x "
                        "--mask-blur pixels into the image; every pixel further in stays "
                        "the input's)")
    p.add_argument("--fill", choices=FILLS, default=None,
                   help="what the masked part starts from (A1111's masked content; it "
                        "matters below --strength 1): fill (the colours around it; "
                        "outpainting's default), original (inpainting's default), "
                        "latent-noise, latent-nothing")
    cli.add_sampling_arguments(p, outdir=None, n_samples=2, n_iter=1)
    cli.add_image_size_arguments(p)
    cli.add_model_arguments(p)
    return p


def outpaint_spec(text):
    """An argparse type: "left=128,right=128,up=0,down=64" (any of the four; top and bottom
    are up and down) -> {side: pixels}."""
    from ldm.image_io import OUTPAINT_SIDES
    sides = {}
    for part in text.split(","):
        key, eq, value = part.strip().partition("=")
        key = {"top": "up", "bottom": "down"}.get(key.strip().lower(), key.strip().lower())
        if not eq or key not in OUTPAINT_SIDES:
            raise cli.argparse.ArgumentTypeError(
                f"{part.strip()!r}: give SIDE=PIXELS for sides of left, right, up, down "
                "(e.g. left=128,down=64)")
        try:
            sides[key] = cli.number(int, 0, 8192)(value.strip())
        except cli.argparse.ArgumentTypeError as e:
            raise cli.argparse.ArgumentTypeError(f"{key}: {e}") from None
    if not any(sides.values()):
        raise cli.argparse.ArgumentTypeError("extend at least one side (e.g. left=128)")
    return sides


def read_mask(path, args, size):
    """The mask at the image's ``size`` (inverted with --invert-mask); InputError when it
    is empty (nothing to repaint). The pipeline says when it covers the whole image."""
    from PIL import ImageOps
    from ldm.image_io import fit_mask, load_mask
    mask = load_mask(path)
    if args.invert_mask:
        mask = ImageOps.invert(mask)
    fitted, note = fit_mask(mask, size)
    if note:
        cli.log.warning(note)
    if fitted.point(lambda v: 255 if v >= 128 else 0).getextrema() == (0, 0):
        raise cli.InputError(f"the mask {path} is empty (all black"
                             f"{' once inverted' if args.invert_mask else ''}): nothing to "
                             "repaint; paint the part to change in white")
    return fitted


def pairs(indir):
    """[(image path, mask path)] of an --indir folder, sorted; one line for a broken pair."""
    folder = Path(indir)
    if not folder.is_dir():
        raise cli.InputError(f"--indir {indir} is not a folder")
    names = {p.name: p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")}
    masks = {n for n in names if Path(n).stem.endswith("_mask")}
    images = sorted(n for n in names if n not in masks)
    for m in sorted(masks):
        stem, suffix = Path(m).stem[:-len("_mask")], Path(m).suffix
        if not any(Path(n).stem == stem for n in images):
            raise cli.InputError(f"{folder / m} has no image beside it ({stem}{suffix})")
    stems = [Path(n).stem for n in images]
    twice = sorted({st for st in stems if stems.count(st) > 1})
    if twice:
        raise cli.InputError(f"{folder} has several images named {twice[0]}.* (each becomes "
                             f"OUTDIR/{twice[0]}.png): keep one")
    out = []
    for n in images:
        stem = Path(n).stem
        found = [m for m in masks if Path(m).stem == stem + "_mask"]
        if not found:
            raise cli.InputError(f"{folder / n} has no mask beside it ({stem}_mask.png)")
        out.append((names[n], names[sorted(found)[0]]))
    if not out:
        raise cli.InputError(f"--indir {indir} holds no NAME.png + NAME_mask.png pairs")
    return out


def check_form(args):
    if args.outpaint:
        if args.indir or args.mask:
            raise cli.UsageError("--outpaint makes its own mask: give --image alone (no "
                                 "--mask, no --indir)")
        if not args.image:
            raise cli.UsageError("--outpaint needs --image, the picture to extend")
        if args.invert_mask:
            raise cli.UsageError("--invert-mask is for a --mask; --outpaint paints the new "
                                 "part")
        if args.outdir is None:
            args.outdir = "outputs/outpainting-samples"
        return
    if args.indir:
        if args.image or args.mask:
            raise cli.UsageError("give --indir, or --image with --mask, not both")
        if args.from_file:
            raise cli.UsageError("--from-file does not go with --indir (one --prompt for all)")
    elif not (args.image and args.mask):
        raise cli.UsageError("give --image and --mask (or --indir with NAME.png + "
                             "NAME_mask.png pairs)")
    if args.outdir is None:
        args.outdir = "outputs/inpainting-results" if args.indir else "outputs/inpainting-samples"


def run(args, job):
    from ldm.checkpoint import file_hash
    from ldm.request import ModelInfo

    check_form(args)
    choice = cli.choose_model(args, task="inpaint")  # no weights yet
    cli.check_sampling(args, choice, "inpaint")
    g = choice.geometry
    if not args.latent_blend and not g.is_inpainting:
        raise cli.UsageError(f"--no-latent-blend is for an inpainting model; {choice.name} is "
                             f"a text-to-image model, which inpaints by latent blending only")
    info = ModelInfo.of_choice(choice)
    jobs = []  # (name, image, mask, image hash, mask hash)
    fill = args.fill or ("fill" if args.outpaint else "original")
    for image_path, mask_path in (pairs(args.indir) if args.indir else
                                  [(Path(args.image), None if args.outpaint else
                                    Path(args.mask))]):
        if args.outpaint:   # the canvas and its mask, made from the image
            from ldm.image_io import image_sha256, outpaint_canvas
            made = {}

            def extend(image):
                made["canvas"], made["mask"] = outpaint_canvas(
                    image, **args.outpaint, blur=args.mask_blur)
                return made["canvas"]
            image, (width, height) = cli.read_image(image_path, args, info, change=extend)
            cli.check_size(g, height, width, args.n_samples, args.device, args.vae_tiling)
            jobs.append((image_path.stem, image, made["mask"], file_hash(image_path, chars=64),
                         image_sha256(made["mask"])))
            continue
        image, (width, height) = cli.read_image(image_path, args, info)
        try:
            mask = read_mask(mask_path, args, image.size)
        except cli.InputError as e:
            if not args.indir:
                raise
            cli.log.warning("%s: skipped", e)  # one bad pair does not stop the others
            continue
        cli.check_size(g, height, width, 1 if args.indir else args.n_samples, args.device,
                       args.vae_tiling)
        jobs.append((image_path.stem, image, mask, file_hash(image_path, chars=64),
                     file_hash(mask_path, chars=64)))
    if not jobs:
        raise cli.InputError(f"--indir {args.indir}: no pair has a mask to repaint")
    cli.check_model_files(args)
    cli.draw_seed(args)
    out = job.outdir(args.outdir)
    if args.indir:
        todo = [(k, j) for k, j in enumerate(jobs) if not (out.root / f"{j[0]}.png").exists()]
        if len(todo) < len(jobs):
            cli.log.warning("%d of %d already in %s, kept and skipped", len(jobs) - len(todo),
                            len(jobs), out.root)
        if not todo:
            return []
        work = None
    else:
        work = cli.batches(args, cli.prompt_list(args))
    pipe = cli.load_pipeline(args, choice)  # the slow part

    def request(item, prompts, seeds):
        _, image, mask, image_hash, mask_hash = item
        return cli.build_request(args, pipe.info, "inpaint", prompts, seeds, image=image,
                                 mask=mask, mask_blur=args.mask_blur,
                                 paste_back=args.paste_back, latent_blend=args.latent_blend,
                                 image_hash=image_hash, mask_hash=mask_hash, fill=fill)

    def record(samples):
        if args.outpaint:
            for s in samples:
                s.parameters["outpaint"] = {k: args.outpaint.get(k, 0) for k in
                                            ("left", "right", "up", "down")}
        return samples

    def maker(item):
        def make(prompts, seeds, callback):
            return record(pipe.run(request(item, prompts, seeds), progress=False,
                                   callback=callback))
        return make
    if work is not None:
        steps = pipe.steps_run(request(jobs[0], *work[0]))
        return cli.generate_batches(args, out, work, steps, maker(jobs[0]), pipe)

    # the CompVis batch form: one image per pair, seed --seed + its index among all pairs
    from ldm.progress import progress
    done = []
    total = sum(pipe.steps_run(request(item, [args.prompt], [args.seed + k]))
                for k, item in todo)
    preview = cli.preview_file(args, pipe, out)
    try:
        with progress(total, "sampling") as bar:
            for k, item in todo:
                s = maker(item)([args.prompt], [args.seed + k], cli.stepper(bar, preview))[0]
                out.save(s.image, f"{item[0]}.png", s.parameters)
                done.append(s)
                bar.set_postfix_str(f"{len(done)} image{'s' * (len(done) != 1)}")
    finally:
        if preview is not None:
            preview.close()
    print(f"Your inpainted images are in {out.root}")
    return done


def main(argv=None):
    return cli.main(build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
