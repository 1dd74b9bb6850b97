"""Reads shapes back out of an image, without any model: for measuring prompt adherence.

1. Background: a plane (per colour channel) fitted to the border pixels, so plain and linear
   gradient backgrounds are both modelled; pixels far from it are foreground.
2. Objects: connected components of the foreground, small specks dropped, holes filled.
3. Colour: the median colour of a component's interior, nearest of ``shapes.COLOURS``.
4. Shape: contour geometry, from two numbers: extent (area / bounding-box area: square ~1,
   circle ~pi/4, triangle ~1/2) and solidity (area / convex-hull area: a star's is ~0.6,
   every convex shape's ~1).
5. Position: the centroid's cell in a 3x3 grid; size: the larger bounding-box side.
"""
import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull

from ldm.data.shapes import COLOURS, POSITIONS

FOREGROUND_DISTANCE = 48.0   # RGB distance from the fitted background
MIN_AREA = 12                # pixels, at 64x64
BIG_EXTENT = 18.0            # larger bounding-box side, at 64x64, above which a shape is "big"
ATTRIBUTES = ("colour", "shape", "size", "position")


def fit_background(image, border=2):
    """The plane a + b x + c y per channel that best fits the border pixels (H x W x 3)."""
    h, w, _ = image.shape
    ys, xs = np.mgrid[0:h, 0:w]
    mask = np.zeros((h, w), bool)
    mask[:border], mask[-border:], mask[:, :border], mask[:, -border:] = True, True, True, True
    design = np.stack([np.ones(mask.sum()), xs[mask], ys[mask]], 1)
    coef, *_ = np.linalg.lstsq(design, image[mask].astype(np.float64), rcond=None)
    full = np.stack([np.ones(h * w), xs.ravel(), ys.ravel()], 1)
    return (full @ coef).reshape(h, w, 3)


def classify_shape(extent, solidity):
    if solidity < 0.75:
        return "star"
    if extent > 0.835:
        return "square"
    if extent > 0.685:
        return "circle"
    return "triangle"


def nearest_colour(rgb):
    names = list(COLOURS)
    table = np.array([COLOURS[n] for n in names], np.float64)
    return names[int(np.argmin(((table - np.asarray(rgb, np.float64)) ** 2).sum(1)))]


def position_name(cx, cy, side):
    cuts = np.array([24.0, 40.0]) * side / 64
    col, row = int(np.searchsorted(cuts, cx)), int(np.searchsorted(cuts, cy))
    return {v: k for k, v in POSITIONS.items()}[(row, col)]


def _hull_area(mask):
    ys, xs = np.nonzero(mask)
    corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    try:
        return ConvexHull(corners).volume
    except Exception:  # degenerate (a line of pixels)
        return float(mask.sum())


def analyse(image):
    """Objects found in an H x W x 3 uint8 image, largest first: dicts with colour, shape,
    size, position, area, centroid, extent and solidity."""
    image = np.asarray(image)
    h, w, _ = image.shape
    scale = (h * w) / 64**2
    distance = np.linalg.norm(image.astype(np.float64) - fit_background(image), axis=2)
    foreground = ndimage.binary_opening(distance > FOREGROUND_DISTANCE)
    labels, n = ndimage.label(foreground)
    objects = []
    for index in range(1, n + 1):
        mask = ndimage.binary_fill_holes(labels == index)
        if mask.sum() < MIN_AREA * scale:
            continue
        # refine: the edge is where the colour is half-way between background and shape
        core = ndimage.binary_erosion(mask, iterations=1)
        contrast = np.median(distance[core if core.any() else mask])
        near = ndimage.binary_dilation(mask, iterations=2)
        refined = ndimage.binary_fill_holes(near & (distance > contrast / 2))
        mask = refined if refined.any() else mask
        area = int(mask.sum())
        ys, xs = np.nonzero(mask)
        bw, bh = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
        interior = ndimage.binary_erosion(mask, iterations=1)
        pixels = image[interior] if interior.sum() >= 4 else image[mask]
        extent, solidity = area / float(bw * bh), area / _hull_area(mask)
        cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
        objects.append(dict(
            colour=nearest_colour(np.median(pixels, 0)),
            shape=classify_shape(extent, solidity),
            size="big" if max(bw, bh) * 64 / w > BIG_EXTENT else "small",
            position=position_name(cx, cy, w),
            area=area, centroid=(float(cx), float(cy)),
            extent=float(extent), solidity=float(solidity)))
    return sorted(objects, key=lambda o: -o["area"])


def judge(scene, objects):
    """Per wanted shape of ``scene``, which attributes the image got right.

    Each wanted shape is matched to the found object agreeing with it on most attributes
    (each object used once); a shape with no object left gets every attribute wrong.
    Returns a list (one per wanted shape) of ``{attribute: bool}``.
    """
    left = list(objects)
    results = []
    for want in scene.shapes:
        target = {a: getattr(want, a) for a in ATTRIBUTES}
        if not left:
            results.append({a: False for a in ATTRIBUTES})
            continue
        best = max(left, key=lambda o: sum(o[a] == target[a] for a in ATTRIBUTES))
        left.remove(best)
        results.append({a: best[a] == target[a] for a in ATTRIBUTES})
    return results


def judge_image(scene, image):
    """``judge(scene, analyse(image))`` and the number of objects found (for "count")."""
    objects = analyse(image)
    return judge(scene, objects), len(objects)


def accuracy(judgements, found=None):
    """Fraction correct per attribute, plus "all" (every attribute of every shape right),
    over a list of ``judge`` results (one per image). With ``found`` (the number of objects
    ``analyse`` found in each image), also "count": the share of images with exactly one
    object per wanted shape, so a model that draws a shape twice cannot pass unseen."""
    flat = [r for image in judgements for r in image]
    out = {a: float(np.mean([r[a] for r in flat])) for a in ATTRIBUTES}
    out["all"] = float(np.mean([all(all(r.values()) for r in image) for image in judgements]))
    if found is not None:
        out["count"] = float(np.mean([n == len(image) for n, image in zip(found, judgements)]))
    return out
