"""Prompt adherence of a text-to-image model on the shapes data set, judged by the
model-free analyser (ldm/data/analyser.py): the heart of scripts/evaluate.py."""
from PIL import Image, ImageDraw

from ldm.data import analyser
from ldm.data.shapes import heldout_prompts


def generate_and_judge(pipe, cases, seed=0, batch_size=32, progress=True, **sampling):
    """Images for ``cases`` ([(prompt, scene)]), seeds seed, seed+1, ...; returns
    (images, judgements) with one ``analyser.judge`` result per image."""
    from tqdm import tqdm
    images, judgements = [], []
    starts = range(0, len(cases), batch_size)
    for start in tqdm(starts, desc="evaluating", disable=not progress or len(starts) < 2):
        chunk = cases[start:start + batch_size]
        samples = pipe.generate([p for p, _ in chunk],
                                [seed + start + i for i in range(len(chunk))],
                                progress=False, **sampling)
        for s, (_, scene) in zip(samples, chunk):
            images.append(s.image)
            judgements.append(analyser.judge(scene, analyser.analyse(s.image)))
    return images, judgements


def evaluate(pipe, n_single=100, n_double=50, seed=0, batch_size=32, progress=True, **sampling):
    """{"single": accuracy, "double": accuracy} on held-out prompts, plus what made them:
    {"cases": ..., "images": ..., "judgements": ...} per kind."""
    out = {}
    for kind, n, n_shapes in (("single", n_single, 1), ("double", n_double, 2)):
        if n <= 0:
            continue
        cases = heldout_prompts(n, seed=seed + n_shapes, n_shapes=n_shapes)
        images, judgements = generate_and_judge(pipe, cases, seed, batch_size, progress, **sampling)
        out[kind] = {"accuracy": analyser.accuracy(judgements), "cases": cases,
                     "images": images, "judgements": judgements}
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
    judgements, images, errors = [], [], []
    param = next(autoencoder.parameters())
    with torch.no_grad():
        for start in range(0, n, batch_size):
            idx = range(start, min(n, start + batch_size))
            x = torch.from_numpy(np.stack([data[i]["image"] for i in idx])).permute(0, 3, 1, 2)
            x = x.to(param.device, param.dtype)
            y = autoencoder.decode(autoencoder.encode(x).mode()).float().clamp(-1, 1)
            errors.append(float((y - x.float()).square().mean()) * len(idx))
            for i, image in zip(idx, tensor_to_pil(y)):
                images.append(image)
                judgements.append(analyser.judge(data.scene(i), analyser.analyse(image)))
    return analyser.accuracy(judgements), sum(errors) / n, images


def labelled_grid(images, cases, judgements, per_row=8, scale=2):
    """Each image enlarged, with its whole prompt and the analyser's verdict written below."""
    import textwrap
    w, h = images[0].size
    tw, th = w * scale, h * scale
    labels = [textwrap.wrap(prompt, 22) for prompt, _ in cases[:len(images)]]
    label_h = 12 * (max(map(len, labels)) + 1) + 4
    rows = -(-len(images) // per_row)
    grid = Image.new("RGB", (per_row * (tw + 4) + 4, rows * (th + label_h + 4) + 4), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, lines, verdict) in enumerate(zip(images, labels, judgements)):
        x = 4 + (i % per_row) * (tw + 4)
        y = 4 + (i // per_row) * (th + label_h + 4)
        grid.paste(image.resize((tw, th), Image.NEAREST), (x, y))
        wrong = sorted({a for shape in verdict for a, ok in shape.items() if not ok})
        verdict_line = "OK" if not wrong else "wrong: " + ",".join(wrong)
        for k, line in enumerate(lines + [verdict_line]):
            colour = "black" if k < len(lines) else "green" if not wrong else "red"
            draw.text((x, y + th + 1 + 12 * k), line, fill=colour)
    return grid
