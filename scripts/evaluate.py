"""Prompt adherence of a model on held-out shapes prompts, judged without any model.

    python scripts/evaluate.py                       # the built-in model, default settings
    python scripts/evaluate.py --n_single 200 --plms --ddim_steps 20
    python scripts/evaluate.py --n_single 0 --n_double 0 --probe   # placement probes only
    python scripts/evaluate.py --task inpaint        # replace / add a shape: both models
    python scripts/evaluate.py --task img2img        # recolour at strength 0.5 and 0.75

Held-out prompts name colour/shape pairs the model never saw in training (e.g. every purple
triangle). The analyser (ldm/data/analyser.py) segments each image, names the colour, the
shape from its contour geometry and the position from its centroid; per-attribute accuracy
is printed and a labelled grid saved.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm import cli  # noqa: E402
from ldm.cli import number  # noqa: E402


def build_parser():
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default=None, help="checkpoint (default: the built-in model)")
    p.add_argument("--config", default=None, help="config (default: config.yaml beside the checkpoint)")
    p.add_argument("--n_single", type=number(int, 0), default=100, help="one-shape prompts")
    p.add_argument("--n_double", type=number(int, 0), default=50, help="two-shape prompts")
    p.add_argument("--seed", type=cli.seed, default=0)
    p.add_argument("--ddim_steps", type=number(int, 1, 1000), default=50)
    p.add_argument("--plms", action="store_true", help="= --sampler plms")
    p.add_argument("--sampler", default=None, help="any name txt2img.py takes (default: ddim)")
    p.add_argument("--schedule", choices=cli.SCHEDULES, default=None)
    p.add_argument("--scale", type=number(float, 0, 100), default=None,
                   help="guidance scale (default: the model's, as txt2img.py)")
    p.add_argument("--batch_size", type=number(int, 1), default=50)
    p.add_argument("--device", default="auto")
    p.add_argument("--outdir", default="outputs/evaluate")
    p.add_argument("--reconstruct", type=number(int, 0), default=0, metavar="N",
                   help="also judge N held-out renders passed through the model's autoencoder "
                        "alone (encode, decode): the ceiling for its generated images")
    p.add_argument("--task", choices=["txt2img", "inpaint", "img2img"], default="txt2img",
                   help="inpaint: replace a shape / add one in a masked region; img2img: "
                        "recolour a scene. Both compare the dedicated inpainting model "
                        "(--ckpt, default models/ldm/shapes-inpainting) with the shipped "
                        "text-to-image model (--base_ckpt) inpainting by latent blending")
    p.add_argument("--n_edit", type=number(int, 1), default=50, help="cases per editing task")
    p.add_argument("--edits", default=None,
                   help="inpaint: the editing tasks to run, of replace,add (default both)")
    p.add_argument("--dedicated_only", action="store_true",
                   help="inpaint / img2img: only the dedicated model as the scripts run it "
                        "(not the rows without latent blending and of the text-to-image "
                        "model)")
    p.add_argument("--base_ckpt", default=None,
                   help="the text-to-image model to compare with (default: the built-in one)")
    p.add_argument("--probe", action="store_true",
                   help="also probe how the model places things from the words: the place "
                        "its first sampling step picks from pure noise (row, column), and the "
                        "x0 error a wrong row / column word adds at t=950")
    return p


INPAINTING_DIR = Path(__file__).resolve().parents[1] / "models" / "ldm" / "shapes-inpainting"


def sampling_choice(args):
    """(sampler id, schedule) from --sampler / --plms / --schedule, as txt2img.py reads them."""
    args.ddim_eta = None
    cli.resolve_sampling(args)
    return args.sampler, args.schedule


def run_editing(args, job):
    """--task inpaint / img2img: each editing task for the dedicated inpainting model and
    the text-to-image model side by side, a labelled grid of each."""
    from ldm.evaluation import evaluate_editing, labelled_grid
    from ldm.pipeline import BUILTIN_DIR, Pipeline, choose_model
    out = job.outdir(args.outdir)
    dedicated = args.ckpt or INPAINTING_DIR / "model.safetensors"
    runs = ([("replace", None), ("add", None)] if args.task == "inpaint" else
            [("recolour", 0.5), ("recolour", 0.75)])
    if args.edits:
        asked = [e.strip() for e in args.edits.split(",") if e.strip()]
        if args.task != "inpaint" or not asked or set(asked) - {"replace", "add"}:
            raise cli.InputError("--edits: a comma-separated list of replace, add (with "
                                 "--task inpaint)")
        runs = [r for r in runs if r[0] in asked]
    models = [("inpainting model", dedicated, {}),
              ("text-to-image model", args.base_ckpt or BUILTIN_DIR / "model.safetensors", {})]
    if args.task == "inpaint":   # what the latent blending does for the dedicated model
        models.insert(1, ("inpainting model, no latent blend", dedicated,
                          {"latent_blend": False}))
    if args.dedicated_only:
        models = models[:1]
    sampler, schedule = sampling_choice(args)
    summary = {"task": args.task, "n": args.n_edit, "seed": args.seed, "sampler": sampler,
               "schedule": schedule, "steps": args.ddim_steps}
    pipes = {}
    for name, ckpt, options in models:
        if not Path(ckpt).is_file():
            raise cli.InputError(f"no {name} at {ckpt}: pass --ckpt / --base_ckpt")
        if ckpt not in pipes:
            pipes[ckpt] = Pipeline.load(choose_model(ckpt, None, "inpaint"), device=args.device,
                                        safety=False, watermark=False)
        pipe = pipes[ckpt]
        for task, strength in runs:
            label = task if strength is None else f"{task} {strength}"
            acc, images, cases, judgements, found = evaluate_editing(
                pipe, task, args.n_edit, args.seed, strength, sampler=sampler,
                schedule=schedule, steps=args.ddim_steps, scale=args.scale, **options)
            summary.setdefault(label, {})[name] = acc
            print(f"{label:14s} {name:34s} " + "  ".join(
                f"{k} {v:.1f}" if k.endswith("(dB)") else f"{k} {v:6.1%}"
                for k, v in acc.items()))
            grid = labelled_grid(images[:32], [(c[0], c[3]) for c in cases[:32]],
                                 judgements[:32], found[:32])
            slug = (label + " " + name).replace(",", "").replace(" ", "-")
            out.save_numbered(grid, f"{slug}-{{:04}}.png", {k: summary[k] for k in
                                                            ("task", "n", "seed")})
    out.root.mkdir(parents=True, exist_ok=True)
    (out.root / f"results-{args.task}.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def run(args, job):
    if args.task != "txt2img":
        return run_editing(args, job)
    from ldm.evaluation import evaluate, labelled_grid
    from ldm.pipeline import BUILTIN_DIR, Pipeline, choose_model

    cli.draw_seed(args)
    out = job.outdir(args.outdir)
    ckpt = args.ckpt or next(iter(sorted(BUILTIN_DIR.glob("*.safetensors"))), None)
    if ckpt is None:
        raise cli.InputError(f"no built-in model in {BUILTIN_DIR}; pass --ckpt")
    pipe = Pipeline.load(choose_model(ckpt, args.config), device=args.device, safety=False,
                         watermark=False)
    sampler, schedule = sampling_choice(args)
    results = evaluate(pipe, args.n_single, args.n_double, args.seed, args.batch_size,
                       sampler=sampler, schedule=schedule, steps=args.ddim_steps,
                       scale=args.scale)
    summary = {"checkpoint": str(ckpt), "sampler": sampler, "schedule": schedule,
               "steps": args.ddim_steps,
               "scale": pipe.info.default("scale") if args.scale is None else args.scale,
               "seed": args.seed}
    for kind, r in results.items():
        acc = r["accuracy"]
        summary[kind] = {"n": len(r["cases"]), **acc}
        print(f"{kind:6s} n={len(r['cases']):4d}  " +
              "  ".join(f"{k} {v:6.1%}" for k, v in acc.items()))
        grid = labelled_grid(r["images"][:64], r["cases"][:64], r["judgements"][:64],
                             r["found"][:64])
        path = out.save_numbered(grid, f"{kind}-{{:04}}.png", summary)
        print(f"  grid: {path}")
    if args.reconstruct > 0:
        from ldm.evaluation import reconstruction_accuracy
        acc, mse, _ = reconstruction_accuracy(pipe.model.first_stage_model, args.reconstruct,
                                              size=pipe.native_size)
        summary["reconstruction"] = {"n": args.reconstruct, **acc, "mse": mse}
        print(f"autoencoder alone n={args.reconstruct:4d}  " +
              "  ".join(f"{k} {v:6.1%}" for k, v in acc.items()) + f"  mse {mse:.4f}")
    if args.probe:
        from ldm.evaluation import first_step_placement, word_gaps
        scale = pipe.info.default("scale") if args.scale is None else args.scale
        spacing = pipe.defaults.get("timestep_spacing", "uniform")
        first = first_step_placement(pipe.model, scale, args.ddim_steps, spacing)
        gaps = word_gaps(pipe.model)
        summary["probe"] = {"first_step": first, "word_gaps": gaps}
        print("first step from noise  " + "  ".join(f"{k} {v:6.1%}" for k, v in first.items()))
        print(f"x0 error at t=950 {gaps['error']:.4f}; added by a wrong row "
              f"{gaps['row gap']:+.4f}, column {gaps['column gap']:+.4f}, "
              f"empty caption {gaps['empty gap']:+.4f}")
    out.root.mkdir(parents=True, exist_ok=True)
    (out.root / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv=None):
    return cli.main(build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
