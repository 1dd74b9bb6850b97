"""A procedural, captioned data set of coloured shapes, for the built-in demo model.

Each scene holds one or two shapes (circle, square, triangle, star) in one of eight colours,
small or big, at one of nine positions, on a plain or gradient background, and an English
caption that names them in varied words. Everything is a function of ``(seed, index)``, so
the data is the same on every machine and never stored. A few colour/shape pairs
(``HELDOUT_PAIRS``, e.g. every purple triangle) never appear in the training split; the
``heldout`` split holds only scenes with such a pair, so generalisation can be measured.

Images are rendered at 4x and box-filtered down, so edges are antialiased.
"""
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (245, 215, 30),
    "green": (40, 165, 60),
    "blue": (40, 80, 220),
    "purple": (140, 50, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
BACKGROUNDS = dict(COLOURS, gray=(128, 128, 128))
# (row, column) on a 3x3 grid; row 0 is the top.
POSITIONS = {
    "top left": (0, 0), "top": (0, 1), "top right": (0, 2),
    "left": (1, 0), "centre": (1, 1), "right": (1, 2),
    "bottom left": (2, 0), "bottom": (2, 1), "bottom right": (2, 2),
}
SIZES = {"small": 7.0, "big": 12.0}   # the shape's nominal radius, in pixels of a 64px image
HELDOUT_PAIRS = frozenset({("purple", "triangle"), ("orange", "circle"),
                           ("blue", "star"), ("yellow", "square")})
BASE = 64      # sizes and positions above are for 64x64 images; other sizes scale them
JITTER = 1.5   # pixels of random offset around the grid position


@dataclass
class Shape:
    shape: str
    colour: str
    size: str
    position: str
    offset: tuple = (0.0, 0.0)   # jitter in pixels (at BASE), added to the grid position

    def centre(self, side=BASE):
        row, col = POSITIONS[self.position]
        k = side / BASE
        return ((16 + 16 * col + self.offset[0]) * k, (16 + 16 * row + self.offset[1]) * k)


@dataclass
class Scene:
    shapes: list
    background: str = "gray"
    gradient: int = 0   # 0 plain; 1..4: lighter-to-darker towards right, down, down-right, up-right
    caption_seed: int = 0
    extra: dict = field(default_factory=dict)


def _pairs(scene):
    return {(s.colour, s.shape) for s in scene.shapes}


def _separated(a, b):
    (ax, ay), (bx, by) = a.centre(), b.centre()
    return np.hypot(ax - bx, ay - by) >= SIZES[a.size] * 1.2 + SIZES[b.size] * 1.2 + 1


def sample_scene(rng, split="train", n_shapes=None):
    """A random scene. ``split`` "train" avoids HELDOUT_PAIRS, "heldout" contains one."""
    if n_shapes is None:
        n_shapes = 1 if rng.random() < 0.6 else 2
    while True:
        shapes = []
        for i in range(n_shapes):
            if split == "heldout" and i == 0:
                colour, shape = sorted(HELDOUT_PAIRS)[rng.integers(len(HELDOUT_PAIRS))]
            else:
                colour = list(COLOURS)[rng.integers(len(COLOURS))]
                shape = SHAPES[rng.integers(len(SHAPES))]
            size = "small" if n_shapes == 2 or rng.random() < 0.5 else "big"
            if n_shapes == 2 and rng.random() < 0.3:
                size = "big"
            position = list(POSITIONS)[rng.integers(len(POSITIONS))]
            offset = tuple(float(v) for v in rng.uniform(-JITTER, JITTER, 2))
            shapes.append(Shape(shape, colour, size, position, offset))
        if split == "train" and _pairs(Scene(shapes)) & HELDOUT_PAIRS:
            continue
        if n_shapes == 2 and (shapes[0].position == shapes[1].position
                              or shapes[0].colour == shapes[1].colour
                              or not _separated(*shapes)):
            continue
        used = {s.colour for s in shapes}
        backgrounds = [b for b in BACKGROUNDS if b not in used]
        background = backgrounds[rng.integers(len(backgrounds))]
        gradient = int(rng.integers(1, 5)) if rng.random() < 0.5 else 0
        return Scene(shapes, background, gradient, int(rng.integers(2**31)))


# ----------------------------------------------------------------------------- rendering

def _shade(rgb, amount):
    """Mix towards white (amount > 0) or black (amount < 0)."""
    rgb = np.asarray(rgb, np.float32)
    return rgb + (255 - rgb) * amount if amount > 0 else rgb * (1 + amount)


def background_array(scene, side):
    base = BACKGROUNDS[scene.background]
    if not scene.gradient:
        return np.broadcast_to(np.asarray(base, np.float32), (side, side, 3)).copy()
    u = (np.arange(side, dtype=np.float32) + 0.5) / side
    gx, gy = np.meshgrid(u, u)
    t = {1: gx, 2: gy, 3: (gx + gy) / 2, 4: (gx + 1 - gy) / 2}[scene.gradient][..., None]
    # light and dark ends stay within 25% of the named colour, so it remains that colour
    light, dark = _shade(base, 0.25), _shade(base, -0.25)
    return light * (1 - t) + dark * t


def shape_polygon(shape, cx, cy, r):
    """Vertices of a polygonal shape (upright), or None for a circle."""
    if shape == "circle":
        return None
    if shape == "square":
        h = 0.85 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        R = 1.15 * r
        angles = np.deg2rad([-90, 30, 150])
        return [(cx + R * np.cos(a), cy + R * np.sin(a) + 0.25 * R) for a in angles]
    if shape == "star":
        R, inner = 1.2 * r, 0.45 * 1.2 * r
        pts = []
        for k in range(10):
            a = np.deg2rad(-90 + 36 * k)
            rad = R if k % 2 == 0 else inner
            pts.append((cx + rad * np.cos(a), cy + rad * np.sin(a) + 0.1 * R))
        return pts
    raise ValueError(f"unknown shape {shape!r}")


def render(scene, size=64, supersample=4):
    """The scene as an H x W x 3 uint8 array."""
    side = size * supersample
    image = Image.fromarray(np.clip(background_array(scene, side) + 0.5, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    k = side / BASE
    for s in scene.shapes:
        cx, cy = s.centre(side)
        r = SIZES[s.size] * k
        colour = COLOURS[s.colour]
        poly = shape_polygon(s.shape, cx, cy, r)
        if poly is None:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        else:
            draw.polygon(poly, fill=colour)
    return np.asarray(image.resize((size, size), Image.BOX))


# ----------------------------------------------------------------------------- captions

_POSITION_WORDS = {
    "top left": ["in the top left corner", "at the top left", "in the upper left"],
    "top": ["at the top", "at the top centre", "near the top"],
    "top right": ["in the top right corner", "at the top right", "in the upper right"],
    "left": ["on the left", "on the left side", "at the left"],
    "centre": ["in the centre", "in the middle", "in the center"],
    "right": ["on the right", "on the right side", "at the right"],
    "bottom left": ["in the bottom left corner", "at the bottom left", "in the lower left"],
    "bottom": ["at the bottom", "at the bottom centre", "near the bottom"],
    "bottom right": ["in the bottom right corner", "at the bottom right", "in the lower right"],
}
_SIZE_WORDS = {"small": ["small", "little", "tiny"], "big": ["big", "large"]}
_COLOUR_WORDS = {"gray": ["gray", "grey"]}


def _pick(rng, options):
    return options[rng.integers(len(options))]


def describe(shape, rng, size=True, position=True):
    words = [_pick(rng, _SIZE_WORDS[shape.size])] if size else []
    text = " ".join(words + [shape.colour, shape.shape])
    text = ("an " if text[0] in "aeiou" else "a ") + text
    if position:
        text += " " + _pick(rng, _POSITION_WORDS[shape.position])
    return text


def caption(scene, rng=None):
    """A varied English caption; attributes are sometimes left out, never wrong."""
    rng = rng if rng is not None else np.random.default_rng(scene.caption_seed)
    size, position = rng.random() < 0.75, rng.random() < 0.8
    parts = [describe(s, rng, size, position) for s in scene.shapes]
    text = " and ".join(parts)
    roll = rng.random()
    bg = _pick(rng, _COLOUR_WORDS.get(scene.background, [scene.background]))
    if roll < 0.35:
        text += f", {bg} background"
    elif roll < 0.55:
        kind = "gradient" if scene.gradient else "background"
        text += f" on {'an' if bg[0] in 'aeiou' else 'a'} {bg} {kind}"
    return text


# ----------------------------------------------------------------------------- data set

class ShapesDataset:
    """``{"image": H x W x 3 float32 in [-1, 1], "caption": str}`` items, a function of
    ``(seed, index)``; ``length`` is nominal (scenes are drawn, never stored)."""

    def __init__(self, split="train", size=64, length=100_000, seed=0, n_shapes=None):
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
        self.split, self.size, self.length, self.seed = split, size, length, seed
        self.n_shapes = n_shapes

    def __len__(self):
        return self.length

    def scene(self, index):
        rng = np.random.default_rng([self.seed, index, self.split == "heldout"])
        return sample_scene(rng, self.split, self.n_shapes)

    def __getitem__(self, index):
        scene = self.scene(index)
        image = render(scene, self.size).astype(np.float32) / 127.5 - 1.0
        return {"image": image, "caption": caption(scene)}


def heldout_prompts(n=64, seed=0, n_shapes=1):
    """``n`` (prompt, scene) pairs for evaluation: every scene has a held-out colour/shape
    pair, and the prompt names every shape's colour, shape, size and position."""
    rng = np.random.default_rng([seed, 7])
    out = []
    for _ in range(n):
        scene = sample_scene(rng, "heldout", n_shapes)
        text = " and ".join(describe(s, rng) for s in scene.shapes)
        out.append((text, scene))
    return out
