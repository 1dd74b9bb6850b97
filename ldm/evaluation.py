"""Prompt adherence of a text-to-image model on the shapes data set, judged by the
model-free analyser (ldm/data/analyser.py): the heart of scripts/evaluate.py."""
from PIL import Image, ImageDraw

from ldm.data import analyser
from ldm.data.shapes import heldout_prompts


def generate_and_judge(pipe, cases, seed=0, batch_size=32, progress=True, **sampling):
    """Images for ``cases`` ([(prompt, scene)]), seeds seed, seed+1, ...; returns
    (images, judgements, found): per image one ``analyser.judge`` result and the number of
    objects the analyser found."""
    from tqdm import tqdm
    images, judgements, found = [], [], []
    starts = range(0, len(cases), batch_size)
    for start in tqdm(starts, desc="evaluating", disable=not progress or len(starts) < 2):
        chunk = cases[start:start + batch_size]
        samples = pipe.generate([p for p, _ in chunk],
                                [seed + start + i for i in range(len(chunk))],
                                progress=False, **sampling)
        for s, (_, scene) in zip(samples, chunk):
            judgement, count = analyser.judge_image(scene, s.image)
            images.append(s.image)
            judgements.append(judgement)
            found.append(count)
    return images, judgements, found


def evaluate(pipe, n_single=100, n_double=50, seed=0, batch_size=32, progress=True, **sampling):
    """{"single": accuracy, "double": accuracy} on held-out prompts, plus what made them:
    {"cases": ..., "images": ..., "judgements": ..., "found": ...} per kind."""
    out = {}
    for kind, n, n_shapes in (("single", n_single, 1), ("double", n_double, 2)):
        if n <= 0:
            continue
        cases = heldout_prompts(n, seed=seed + n_shapes, n_shapes=n_shapes)
        images, judgements, found = generate_and_judge(pipe, cases, seed, batch_size, progress,
                                                       **sampling)
        out[kind] = {"accuracy": analyser.accuracy(judgements, found), "cases": cases,
                     "images": images, "judgements": judgements, "found": found}
    return out


def reconstruction_accuracy(autoencoder, n=128, seed=9, batch_size=32, size=64):
    """How well the autoencoder alone keeps what the analyser judges: held-out renders
    encoded (posterior mode) and decoded, then judged against their scenes. The diffusion
    model's images can hardly be judged better than this. Returns (accuracy, mse, images)."""
    import numpy as np
    import torch

    from ldm.data.shapes import ShapesDataset
    from ldm.image_io import tensor_to_pil
    data = ShapesDataset("heldout", size=size, seed=seed)
    judgements, found, images, errors = [], [], [], []
    param = next(autoencoder.parameters())
    with torch.no_grad():
        for start in range(0, n, batch_size):
            idx = range(start, min(n, start + batch_size))
            x = torch.from_numpy(np.stack([data[i]["image"] for i in idx])).permute(0, 3, 1, 2)
            x = x.to(param.device, param.dtype)
            y = autoencoder.decode(autoencoder.encode(x).mode()).float().clamp(-1, 1)
            errors.append(float((y - x.float()).square().mean()) * len(idx))
            for i, image in zip(idx, tensor_to_pil(y)):
                judgement, count = analyser.judge_image(data.scene(i), image)
                images.append(image)
                judgements.append(judgement)
                found.append(count)
    return analyser.accuracy(judgements, found), sum(errors) / n, images


def labelled_grid(images, cases, judgements, found=None, per_row=8, scale=2):
    """Each image enlarged, with its whole prompt and the analyser's verdict written below
    ("count" among the wrong when ``found``, the objects found per image, is not one per
    wanted shape)."""
    import textwrap
    w, h = images[0].size
    tw, th = w * scale, h * scale
    found = found if found is not None else [len(v) for v in judgements]
    labels, verdicts = [], []
    for (prompt, _), verdict, n in zip(cases[:len(images)], judgements, found):
        wrong = sorted({a for shape in verdict for a, ok in shape.items() if not ok})
        wrong += ["count"] if n != len(verdict) else []
        labels.append(textwrap.wrap(prompt, 22))
        verdicts.append(textwrap.wrap("wrong: " + ", ".join(wrong), 24) if wrong else ["OK"])
    label_h = 12 * max(len(a) + len(b) for a, b in zip(labels, verdicts)) + 4
    rows = -(-len(images) // per_row)
    grid = Image.new("RGB", (per_row * (tw + 4) + 4, rows * (th + label_h + 4) + 4), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, lines, verdict) in enumerate(zip(images, labels, verdicts)):
        x = 4 + (i % per_row) * (tw + 4)
        y = 4 + (i // per_row) * (th + label_h + 4)
        grid.paste(image.resize((tw, th), Image.NEAREST), (x, y))
        colour = "green" if verdict == ["OK"] else "red"
        for k, (line, fill) in enumerate([(t, "black") for t in lines] +
                                         [(t, colour) for t in verdict]):
            draw.text((x, y + th + 1 + 12 * k), line, fill=fill)
    return grid


def first_step_placement(model, scale=7.5, steps=50, spacing="uniform", n_noises=4):
    """Where a model puts a shape from the words alone: for "a big <colour> <shape> <place>"
    prompts (3 colours x 3 shapes x 9 places, n_noises noises each), the guided x0 that the
    first sampling step predicts from pure noise, the place read off the centroid of its
    difference from the unconditional x0. Nothing here leaks a layout: this is the decision
    sampling makes first. Returns the share right for the place, its row and its column
    (chance: 1/9, 1/3, 1/3). Model-free of the analyser, so it works on blurry predictions."""
    import torch

    from ldm.data.shapes import _POSITION_WORDS, POSITIONS
    from ldm.models.diffusion.sampling import guided_eps
    from ldm.modules.diffusionmodules.util import TIMESTEP_SPACINGS
    cases = [(f"a big {c} {s} {words[0]}", POSITIONS[place])   # "in the top left corner", ...
             for c in ("red", "blue", "yellow") for s in ("circle", "square", "star")
             for place, words in _POSITION_WORDS.items()]
    t0 = int(TIMESTEP_SPACINGS[spacing](steps, model.num_timesteps)[-1])
    param = next(model.parameters())
    right = {"place": 0, "row": 0, "column": 0}
    with torch.no_grad():
        cond = model.get_learned_conditioning([p for p, _ in cases])
        uncond = model.get_learned_conditioning([""] * len(cases))
        guided, plain = guided_eps(model, cond, uncond, scale), guided_eps(model, uncond)
        a = model.alphas_cumprod[t0].to(param.device).float()
        h = w = model.image_size
        ys = (torch.arange(h, device=param.device) + 0.5) / h
        xs = (torch.arange(w, device=param.device) + 0.5) / w
        for k in range(n_noises):
            g = torch.Generator().manual_seed(k)
            x = torch.randn((len(cases), model.channels, h, w), generator=g).to(param)
            # x0 = (x - sqrt(1 - a) eps) / sqrt(a): the difference is in the eps only
            d = (guided(x, t0) - plain(x, t0)).float().square().sum(1) * (1 - a) / a
            d = d / d.sum((1, 2), keepdim=True)
            # the places' centres are at 1/4, 1/2, 3/4 of the side: split halfway between
            rows = torch.bucketize((d.sum(2) * ys).sum(1).cpu(), torch.tensor([0.375, 0.625]))
            cols = torch.bucketize((d.sum(1) * xs).sum(1).cpu(), torch.tensor([0.375, 0.625]))
            for (_, (r, c)), pr, pc in zip(cases, rows.tolist(), cols.tolist()):
                right["row"] += pr == r
                right["column"] += pc == c
                right["place"] += pr == r and pc == c
    return {k: v / (len(cases) * n_noises) for k, v in right.items()}


def word_gaps(model, n=192, t=950, seed=5):
    """How much a model relies on the place words where it could read the layout from its
    input: on training-split renders of one shape, noised to ``t``, the rise of the x0 error
    when the caption names a wrong row (or a wrong column) instead of the right one, and
    when it is empty. A model that ignores the row words shows a row gap near 0. Compare
    models on the same autoencoder only (the errors are in its latent space)."""
    import numpy as np
    import torch

    from ldm.data.shapes import POSITIONS, Shape, ShapesDataset, describe, render
    places = {v: k for k, v in POSITIONS.items()}
    rng = np.random.default_rng(seed)
    data = ShapesDataset("train", seed=seed, n_shapes=1)
    scenes = [data.scene(i) for i in range(n)]
    captions = {"right": [], "row": [], "column": [], "empty": [""] * n}
    for scene in scenes:
        s = scene.shapes[0]
        r, c = POSITIONS[s.position]
        for key, place in (("right", s.position),
                           ("row", places[((r + rng.integers(1, 3)) % 3, c)]),
                           ("column", places[(r, (c + rng.integers(1, 3)) % 3)])):
            shape = Shape(s.shape, s.colour, s.size, place)
            captions[key].append(describe(shape, np.random.default_rng(1)))
    param = next(model.parameters())
    x = torch.from_numpy(np.stack([render(s) for s in scenes])).float() / 127.5 - 1
    with torch.no_grad():
        z = model.get_first_stage_encoding(
            model.encode_first_stage(x.permute(0, 3, 1, 2).to(param)),
            generator=torch.Generator().manual_seed(seed))
        noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed)).to(z)
        tt = torch.full((n,), t, device=z.device, dtype=torch.long)
        x_t = model.q_sample(z, tt, noise)
        a = model.alphas_cumprod[t].float()
        errors = {}
        for key, caps in captions.items():
            eps = model.eps_from_output(x_t, tt, model.apply_model(
                x_t, tt, model.get_learned_conditioning(caps)))
            x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
            errors[key] = float((x0 - z).float().square().mean())
    return {"error": errors["right"],
            **{f"{k} gap": errors[k] - errors["right"] for k in ("row", "column", "empty")}}


# ------------------------------------------------------------- image-to-image, inpainting

def _box(shape, size=64, margin=4):
    """A square mask over ``shape`` (its nominal radius plus ``margin`` pixels each way; 255
    = repaint)."""
    import numpy as np
    from ldm.data.shapes import SIZES
    cx, cy = shape.centre(size)
    r = (SIZES[shape.size] + margin) * size / 64
    m = np.zeros((size, size), np.uint8)
    m[max(0, int(cy - r)):int(cy + r) + 1, max(0, int(cx - r)):int(cx + r) + 1] = 255
    return m


def editing_cases(task, n, seed=0):
    """Held-out editing cases: [(prompt, input scene, mask as uint8 array or None, target
    scene)]. "replace": a one-shape scene, the shape's cell masked, the prompt naming another
    colour and shape at the same place and size. "add": a one-shape scene, an empty cell
    masked, the prompt naming both shapes. "recolour": the whole scene, the prompt naming the
    same shape in another colour (image-to-image)."""
    import numpy as np
    from ldm.data.shapes import COLOURS, POSITIONS, SHAPES, Scene, Shape, describe
    rng = np.random.default_rng([seed, 13, {"replace": 1, "add": 2, "recolour": 3}.get(task, 0)])
    cases = []
    for prompt, scene in heldout_prompts(n, seed=seed + 31, n_shapes=1):
        old = scene.shapes[0]
        colours = [c for c in COLOURS if c not in (old.colour, scene.background)]
        colour = colours[rng.integers(len(colours))]
        if task == "recolour":
            new = Shape(old.shape, colour, old.size, old.position, old.offset)
            cases.append((describe(new, rng), scene, None,
                          Scene([new], scene.background, scene.gradient)))
            continue
        if task == "replace":
            shape = [s for s in SHAPES if s != old.shape][rng.integers(len(SHAPES) - 1)]
            new = Shape(shape, colour, old.size, old.position)
            cases.append((describe(new, rng), scene, _box(old),
                          Scene([new], scene.background, scene.gradient)))
            continue
        if task != "add":
            raise ValueError(f"unknown editing task {task!r}")
        r, c = POSITIONS[old.position]
        free = [p for p, (pr, pc) in POSITIONS.items() if abs(pr - r) + abs(pc - c) >= 2]
        new = Shape(SHAPES[rng.integers(len(SHAPES))], colour, "small",
                    free[rng.integers(len(free))])
        target = Scene([old, new], scene.background, scene.gradient)
        cases.append((describe(old, rng) + " and " + describe(new, rng), scene, _box(new),
                      target))
    return cases


def evaluate_editing(pipe, task, n=50, seed=0, strength=None, batch_size=25, **sampling):
    """Accuracy of an editing task (``editing_cases``) for a loaded pipeline: the edited
    shape's attributes ("new: colour", ...), the object count (exactly the target's), and
    for "add" whether the old shape is still right ("old: all") and for "recolour" whether
    shape and place are kept. Inpainting models run "recolour" as inpainting with a full
    mask. With a mask, the raw decode (before paste-back) is compared with the input outside
    the mask: "raw PSNR outside (dB)", the mean and the worst case. Returns (accuracy,
    images, cases, judgements, found)."""
    import numpy as np
    from PIL import Image

    from ldm.data.inpainting import render_scene
    from ldm.image_io import paste_back
    cases = editing_cases(task, n, seed)
    images, judgements, found, psnr = [], [], [], []
    for start in range(0, n, batch_size):
        for k, (prompt, scene, mask, target) in enumerate(cases[start:start + batch_size]):
            seeds = [seed + start + k]
            image = render_scene(scene)
            if task == "recolour" and not pipe.is_inpainting_model:
                s = pipe.img2img(prompt, seeds, image, strength=strength or 0.75,
                                 progress=False, **sampling)[0]
            else:
                m = Image.fromarray(mask if mask is not None else
                                    np.full((image.height, image.width), 255, np.uint8))
                s = pipe.inpaint(prompt, seeds, image, m, strength=strength or 1.0,
                                 progress=False, paste_back=False, **sampling)[0]
                if mask is not None:  # the raw decode against the input, outside the mask
                    keep = mask < 128
                    err = (np.asarray(s.image, np.float64)[keep]
                           - np.asarray(image, np.float64)[keep]) ** 2
                    psnr.append(10 * np.log10(255 ** 2 / max(err.mean(), 1e-10)))
                s.image = paste_back(s.image, image, m)   # what inpaint() returns by default
            judgement, count = analyser.judge_image(target, s.image)
            images.append(s.image)
            judgements.append(judgement)
            found.append(count)
    acc = {}
    new = [j[-1] for j in judgements]  # the target's last shape is the edited one
    for attribute in analyser.ATTRIBUTES:
        acc[f"new: {attribute}"] = float(np.mean([j[attribute] for j in new]))
    acc["new: colour and shape"] = float(np.mean([j["colour"] and j["shape"] for j in new]))
    acc["new: all"] = float(np.mean([all(j.values()) for j in new]))
    acc["count"] = float(np.mean([f == len(c[3].shapes) for f, c in zip(found, cases)]))
    if task == "add":
        acc["old: all"] = float(np.mean([all(j[0].values()) for j in judgements]))
    if psnr:
        acc["raw PSNR outside (dB)"] = float(np.mean(psnr))
        acc["raw PSNR outside, worst (dB)"] = float(np.min(psnr))
    return acc, images, cases, judgements, found
