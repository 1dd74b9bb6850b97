"""How close each sampler gets, in how many steps: the distance of its result to a
1,000-step DDIM solution from the same noise and prompt.

    python scripts/sampler_study.py                        # the built-in model (minutes)
    python scripts/sampler_study.py --model sd-random --size 128 --steps 5,10,20,50 \\
        --schedules discrete,karras --seeds 1              # random SD-v1-sized weights

For every sampler, schedule and step count: the latents' relative RMS distance to the
reference (mean over the seeds) and, for the built-in model, the decoded image's PSNR to
the reference image; with ``--adherence N`` also the built-in model's prompt adherence
(held-out prompts, ldm.evaluation) at the steps given by ``--adherence_steps``. Ancestral
and SDE samplers converge to another sample of the distribution, not to the ODE's
solution, so their distance does not fall to 0: it says how far from the deterministic
image they land, not that they are inaccurate.

Results go to OUT/results.json (kept between runs: finished entries are not redone, so an
interrupted run resumes; the reference latents are kept in OUT/reference.pt), OUT/table.md
and OUT/plot.png.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = ["a big red circle on the left", "a small blue square at the top",
           "a green triangle in the middle and a yellow circle on the right",
           "a purple square at the bottom", "a big orange triangle on the right",
           "a small cyan circle at the top left", "a red square and a blue triangle",
           "a yellow square in the middle"]


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["builtin", "sd-random"], default="builtin")
    p.add_argument("--size", type=int, default=None, help="image side (default: the model's)")
    p.add_argument("--seeds", type=int, default=8, help="prompts/seeds per setting")
    p.add_argument("--steps", default="5,8,10,15,20,30,50")
    p.add_argument("--samplers", default="all", help="comma-separated ids, or all")
    p.add_argument("--schedules", default="discrete,karras,exponential")
    p.add_argument("--reference_steps", type=int, default=1000)
    p.add_argument("--scale", type=float, default=None, help="guidance (default: the model's)")
    p.add_argument("--adherence", type=int, default=0, metavar="N",
                   help="built-in model: also judge N held-out one-shape prompts (and N/2 "
                        "two-shape ones) per setting")
    p.add_argument("--adherence_steps", default="10,20")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="default: docs/sampler-study/<model>")
    return p


def load(args):
    import torch
    from ldm.pipeline import BUILTIN_DIR, Pipeline
    if args.model == "builtin":
        return Pipeline.load(BUILTIN_DIR / "model.safetensors", device="cpu", safety=False,
                             watermark=False)
    from ldm.compare import random_sd
    model, _ = random_sd()
    return Pipeline(model, torch.device("cpu"), "full", model_name="random SD v1 weights",
                    watermark=False)


def psnr(a, b):
    import numpy as np
    err = ((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2).mean()
    return 10 * math.log10(255 ** 2 / max(err, 1e-10))


def main(argv=None):
    args = build_parser().parse_args(argv)
    import torch
    from ldm.models.diffusion.sampling import SAMPLERS, sampler_label
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out or ROOT / "docs" / "sampler-study" / args.model)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    pipe = load(args)
    size = args.size or pipe.native_size
    prompts = (PROMPTS * (args.seeds // len(PROMPTS) + 1))[: args.seeds]
    seeds = list(range(args.seeds))
    common = dict(height=size, width=size, scale=args.scale, progress=False)
    decode = args.model == "builtin"
    results["setup"] = {"model": args.model, "size": size, "seeds": seeds, "prompts": prompts,
                        "scale": args.scale if args.scale is not None else pipe.info.default("scale"),
                        "reference": f"DDIM, {args.reference_steps} steps",
                        "threads": torch.get_num_threads()}

    def save():
        results_path.write_text(json.dumps(results, indent=1) + "\n")

    t0 = time.time()
    # the reference is the slow part: kept beside the results, for this setup only
    ref_path = out / "reference.pt"
    setup = json.dumps(results["setup"], sort_keys=True)
    ref = torch.load(ref_path, weights_only=True) if ref_path.exists() else {}
    if ref.get("setup") == setup:
        ref_z = ref["latents"]
    else:
        ref_z = pipe.latents(prompts, seeds, sampler="ddim", steps=args.reference_steps,
                             **common)
        torch.save({"setup": setup, "latents": ref_z}, ref_path)
    ref_images = pipe.decode(ref_z) if decode else None
    print(f"reference: {time.time() - t0:.0f} s", flush=True)
    names = list(SAMPLERS) if args.samplers == "all" else args.samplers.split(",")

    def settings(part, step_list):
        """(sampler, schedule, steps, results entry) not yet in ``results[part]``."""
        for name in names:
            for schedule in args.schedules.split(","):
                if SAMPLERS[name].timesteps and schedule != "discrete":
                    continue
                entry = results.setdefault(part, {}).setdefault(
                    sampler_label(name, schedule), {})
                for steps in [int(s) for s in step_list.split(",")]:
                    if str(steps) not in entry:
                        yield name, schedule, steps, entry

    for name, schedule, steps, entry in settings("distance", args.steps):
        t = time.time()
        z = pipe.latents(prompts, seeds, sampler=name, steps=steps, schedule=schedule,
                         **common)
        d = (z - ref_z).flatten(1).norm(dim=1) / ref_z.flatten(1).norm(dim=1)
        row = {"latent": float(d.mean()), "seconds": time.time() - t}
        if decode:
            images = pipe.decode(z)
            row["psnr"] = sum(psnr(a, b) for a, b in zip(images, ref_images)) / len(seeds)
        entry[str(steps)] = row
        save()
        print(f"{sampler_label(name, schedule):28s} {steps:3d} steps: latent "
              f"{row['latent']:.4f}" + (f"  image {row['psnr']:5.1f} dB" if decode else "")
              + f"  ({row['seconds']:.1f} s)", flush=True)
    if args.adherence and args.model == "builtin":
        from ldm.evaluation import evaluate
        for name, schedule, steps, entry in settings("adherence", args.adherence_steps):
            r = evaluate(pipe, args.adherence, args.adherence // 2, 0, progress=False,
                         sampler=name, steps=steps, schedule=schedule, scale=args.scale)
            entry[str(steps)] = row = {k: r[k]["accuracy"]["all"] for k in r}
            save()
            print(f"{sampler_label(name, schedule):28s} {steps:3d} steps: one shape "
                  f"{row['single']:.1%}  two {row['double']:.1%}", flush=True)
    write_table(results, out / "table.md")
    stochastic = {sampler_label(n, sch) for n, info in SAMPLERS.items() if info.stochastic
                  and n != "ddim" for sch in ("discrete", "karras", "exponential")}
    plot(results, out / "plot.png", lambda key: key not in stochastic,
         "deterministic samplers")
    plot(results, out / "plot-stochastic.png", lambda key: key in stochastic,
         "ancestral and SDE samplers (another sample, not the ODE's solution)")
    print(f"results in {out}")


def write_table(results, path):
    setup = results["setup"]
    dist = results.get("distance", {})
    steps = sorted({int(s) for e in dist.values() for s in e})
    lines = [f"Distance to {setup['reference']} from the same noise: latent relative RMS "
             f"(image PSNR, dB); {setup['model']}, {setup['size']} px, "
             f"{len(setup['seeds'])} seeds, guidance {setup['scale']}.", "",
             "| sampler | " + " | ".join(f"{s} steps" for s in steps) + " |",
             "|---|" + "---:|" * len(steps)]
    for key, entry in dist.items():
        cells = []
        for s in steps:
            row = entry.get(str(s))
            cells.append("" if row is None else f"{row['latent']:.3f}" + (
                f" ({row['psnr']:.1f})" if "psnr" in row else ""))
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    adherence = results.get("adherence")
    if adherence:
        steps = sorted({int(s) for e in adherence.values() for s in e})
        lines += ["", "Prompt adherence (held-out prompts, all attributes right): one shape / "
                  "two shapes", "", "| sampler | " + " | ".join(f"{s} steps" for s in steps)
                  + " |", "|---|" + "---:|" * len(steps)]
        for key, entry in adherence.items():
            lines.append(f"| {key} | " + " | ".join(
                f"{entry[str(s)]['single']:.0%} / {entry[str(s)]['double']:.0%}"
                if str(s) in entry else "" for s in steps) + " |")
    path.write_text("\n".join(lines) + "\n")


def plot(results, path, keep=lambda key: True, title="", width=900, height=560):
    """Latent distance against steps, log-log, one line per sampler and schedule whose name
    ``keep`` accepts (PIL only: no plotting library needed)."""
    from PIL import Image, ImageDraw
    dist = {k: v for k, v in results.get("distance", {}).items() if keep(k)}
    points = [(int(s), r["latent"]) for e in dist.values() for s, r in e.items()]
    if not points:
        return
    left, right, top, bottom = 70, 260, 20, 50
    xs = [math.log(p[0]) for p in points]
    ys = [math.log10(max(p[1], 1e-6)) for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), math.floor(min(ys)), math.ceil(max(ys))
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)

    def at(s, d):
        x = left + (math.log(s) - x0) / max(x1 - x0, 1e-9) * (width - left - right)
        y = top + (y1 - math.log10(max(d, 1e-6))) / max(y1 - y0, 1e-9) * (height - top - bottom)
        return x, y
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for s in sorted({p[0] for p in points}):
        x, _ = at(s, 1)
        draw.line([x, height - bottom, x, height - bottom + 5], fill="black")
        draw.text((x - 6, height - bottom + 8), str(s), fill="black")
    for e in range(y0, y1 + 1):
        _, y = at(1, 10 ** e)
        draw.line([left - 5, y, width - right, y], fill=(225, 225, 225))
        draw.text((8, y - 6), f"1e{e}", fill="black")
    draw.text((left + 150, height - 22), "steps (log)    y: latent distance to the reference (log)",
              fill="black")
    draw.text((left + 10, top + 4), title, fill="black")
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
               (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
               (0, 0, 0), (255, 187, 120), (152, 223, 138), (174, 199, 232)]
    for k, (key, entry) in enumerate(dist.items()):
        colour = colours[k % len(colours)]
        line = [at(int(s), r["latent"]) for s, r in sorted(entry.items(), key=lambda i: int(i[0]))]
        dash = k // len(colours)
        for a, b in zip(line, line[1:]):
            draw.line([a, b], fill=colour, width=2 if dash == 0 else 1)
        for x, y in line:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        ly = top + 4 + k * 12
        if ly < height - 12:
            draw.line([width - right + 10, ly + 5, width - right + 30, ly + 5], fill=colour,
                      width=2 if dash == 0 else 1)
            draw.text((width - right + 34, ly), key, fill="black")
    img.save(path)


if __name__ == "__main__":
    main()
