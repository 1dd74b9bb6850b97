"""Masked shapes scenes for training an inpainting model, with masks as people draw them.

Each item is a shapes scene (``ldm.data.shapes``) with a mask: a rectangle, an ellipse,
free brush strokes, one shape's silhouette dilated, a box drawn around one shape, or (a
share ``full_mask_fraction``) the whole image, so that the model also works as
text-to-image. The caption describes the whole target scene (what the image shows, masked part included); a share
``empty_caption_fraction`` of captions are empty, on top of the trainer's own ``p_uncond``.
Items are a function of ``(seed, index)``; the held-out colour/shape pairs stay held out
(the scenes come from ``sample_scene`` with the split given).
"""
import numpy as np
from PIL import Image, ImageDraw

from ldm.data.shapes import ShapesDataset, SIZES, render, shape_polygon

MASK_KINDS = ("rectangle", "ellipse", "strokes", "silhouette", "box")


def random_mask(rng, scene, size, kind=None):
    """A uint8 H x W mask (255 = repaint) of one of ``MASK_KINDS`` (drawn if None)."""
    kind = kind or MASK_KINDS[rng.integers(len(MASK_KINDS))]
    im = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(im)
    k = size / 64
    if kind == "box" and scene.shapes:  # a square around one shape, as a person boxes it
        s = scene.shapes[rng.integers(len(scene.shapes))]
        cx, cy = np.array(s.centre(size)) + rng.uniform(-2, 2, 2) * k
        r = (SIZES[s.size] + rng.uniform(2, 9)) * k
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=255)
        return np.asarray(im)
    if kind == "silhouette" and scene.shapes:
        s = scene.shapes[rng.integers(len(scene.shapes))]
        cx, cy = s.centre(size)
        r = SIZES[s.size] * k
        poly = shape_polygon(s.shape, cx, cy, r)
        if poly is None:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        else:
            draw.polygon([tuple(p) for p in poly], fill=255)
        grow = int(rng.integers(2, 7) * k)  # dilated, as a person paints over a shape
        im = Image.fromarray(_dilate(np.asarray(im) > 0, grow).astype(np.uint8) * 255)
        return np.asarray(im)
    if kind in ("rectangle", "ellipse", "silhouette", "box"):  # (the last two: no shape)
        w, h = (rng.uniform(0.2, 0.7, 2) * size).astype(int)
        x0, y0 = rng.integers(0, size - w + 1), rng.integers(0, size - h + 1)
        box = (int(x0), int(y0), int(x0 + w), int(y0 + h))
        (draw.ellipse if kind == "ellipse" else draw.rectangle)(box, fill=255)
        return np.asarray(im)
    for _ in range(rng.integers(1, 4)):  # strokes: a few thick random polylines
        points = [tuple(rng.uniform(0, size, 2)) for _ in range(rng.integers(2, 6))]
        draw.line(points, fill=255, width=int(rng.integers(4, 12) * k), joint="curve")
    return np.asarray(im)


def _dilate(mask, n):
    from scipy import ndimage
    return ndimage.binary_dilation(mask, iterations=max(1, n))


class InpaintingShapesDataset(ShapesDataset):
    """``{"image", "caption", "mask", "masked_image"}``: the target scene (H x W x 3 float32
    in [-1, 1]), its caption, the mask (H x W float32, 1 = repaint) and the scene with the
    masked pixels set to 0, as ``LatentInpaintDiffusion`` is fed (RunwayML's convention)."""

    def __init__(self, split="train", size=64, length=100_000, seed=0, n_shapes=None,
                 full_mask_fraction=0.1, empty_caption_fraction=0.05):
        super().__init__(split, size, length, seed, n_shapes)
        self.full_mask_fraction = full_mask_fraction
        self.empty_caption_fraction = empty_caption_fraction

    def __getitem__(self, index):
        item = super().__getitem__(index)
        rng = np.random.default_rng([self.seed, index, self.split == "heldout", 11])
        if rng.random() < self.full_mask_fraction:
            mask = np.ones((self.size, self.size), np.float32)
        else:
            mask = (random_mask(rng, self.scene(index), self.size) >= 128).astype(np.float32)
        if rng.random() < self.empty_caption_fraction:
            item["caption"] = ""
        item["mask"] = mask
        item["masked_image"] = item["image"] * (1.0 - mask[..., None])
        return item


def render_scene(scene, size=64):
    """A scene as a PIL image (for evaluation)."""
    return Image.fromarray(render(scene, size))
