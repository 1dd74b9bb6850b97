"""ldm.evaluation (scripts/evaluate.py's core) on stand-in models: one that draws exactly the
held-out scene it is asked for scores (nearly) 100%, one that draws nothing scores 0."""
import dataclasses

import numpy as np
from PIL import Image

from ldm.data.shapes import render
from ldm.evaluation import evaluate, labelled_grid
from ldm.pipeline import Sample


class Oracle:
    """generate() returns the ground-truth render of each prompt's scene."""

    def __init__(self, scenes_by_prompt, blank=False, twice=False):
        self.scenes, self.blank, self.twice = scenes_by_prompt, blank, twice
        self.calls = []

    def generate(self, prompts, seeds, progress=True, **sampling):
        self.calls.append((list(seeds), sampling))
        out = []
        for p in prompts:
            scene = self.scenes[p]
            if self.twice:   # every shape drawn again in the opposite corner, made small
                copies = [dataclasses.replace(s, size="small", position=_opposite(s.position))
                          for s in scene.shapes]
                scene = dataclasses.replace(scene, shapes=scene.shapes + copies)
            pixels = render(scene, 64)
            if self.blank:
                pixels = np.full_like(pixels, 128)
            out.append(Sample(Image.fromarray(pixels)))
        return out


def _opposite(position):
    from ldm.data.shapes import POSITIONS
    (r, c), names = POSITIONS[position], {v: k for k, v in POSITIONS.items()}
    return names[(2 - r if r != 1 else 0, 2 - c if c != 1 else 0)]


def _cases():
    from ldm.data.shapes import heldout_prompts
    return {p: s for n in (1, 2) for p, s in heldout_prompts(20, seed=n, n_shapes=n)}


def test_a_perfect_model_scores_full_marks_and_a_blank_one_zero():
    oracle = Oracle(_cases())
    perfect = evaluate(oracle, 20, 20, seed=0, batch_size=8, progress=False, steps=3)
    assert all(sampling == {"steps": 3} for _, sampling in oracle.calls)
    assert perfect["single"]["accuracy"]["all"] >= 0.95
    assert perfect["double"]["accuracy"]["colour"] >= 0.95
    assert perfect["single"]["accuracy"]["count"] >= 0.95
    assert perfect["double"]["accuracy"]["count"] >= 0.9
    blank = Oracle(_cases(), blank=True)
    nothing = evaluate(blank, 20, 0, seed=0, batch_size=8, progress=False)
    assert nothing["single"]["accuracy"]["all"] == 0 and "double" not in nothing
    assert nothing["single"]["accuracy"]["count"] == 0
    # seeds run on across batches
    assert [s for seeds, _ in blank.calls for s in seeds] == list(range(20))


def test_a_model_that_draws_each_shape_twice_is_caught_by_the_count():
    """The attributes alone would pass it: each wanted shape is matched to its best object."""
    twice = evaluate(Oracle(_cases(), twice=True), 20, 0, seed=0, progress=False)
    acc = twice["single"]["accuracy"]
    assert acc["colour"] >= 0.95 and acc["shape"] >= 0.95 and acc["position"] >= 0.95
    assert acc["count"] == 0
    assert set(twice["single"]["found"]) == {2}


def test_labelled_grid_writes_whole_prompts_and_verdicts():
    cases = list(_cases().items())
    short, long_ = min(cases, key=lambda c: len(c[0])), max(cases, key=lambda c: len(c[0]))
    image = Image.new("RGB", (64, 64), "gray")
    ok = [{"colour": True, "shape": True}]
    wrong = [{"colour": True, "shape": False}]
    g_short = labelled_grid([image], [short], [ok])
    g_long = labelled_grid([image], [long_], [wrong])
    assert g_long.height > g_short.height          # room for the whole long prompt
    px = np.asarray(g_long)
    red = (px[..., 0] > 150) & (px[..., 1] < 80) & (px[..., 2] < 80)
    green = (px[..., 1] > 100) & (px[..., 0] < 80) & (px[..., 2] < 80)
    assert red.any() and not green.any()            # "wrong: shape" in red
    px = np.asarray(g_short)
    assert ((px[..., 1] > 100) & (px[..., 0] < 80) & (px[..., 2] < 80)).any()   # "OK" in green
    px = np.asarray(labelled_grid([image], [short], [ok], found=[2]))   # "wrong: count"
    assert ((px[..., 0] > 150) & (px[..., 1] < 80) & (px[..., 2] < 80)).any()
    # a long verdict is wrapped to the cell, not written over the next one
    everything = [{"colour": False, "shape": False, "size": False, "position": False}]
    g_many = labelled_grid([image], [short], [everything], found=[2])
    assert g_many.height > labelled_grid([image], [short], [wrong]).height


class _Autoencoder:
    """encode/decode stand-ins: the identity, or one that loses everything (a gray image)."""

    def __init__(self, lossy=False):
        import torch
        self.lossy, self.param = lossy, torch.zeros(1)

    def parameters(self):
        return iter([self.param])

    def encode(self, x):
        from types import SimpleNamespace
        return SimpleNamespace(mode=lambda: x)

    def decode(self, z):
        return z * 0 if self.lossy else z


def test_reconstruction_accuracy_of_the_autoencoder_alone():
    from ldm.evaluation import reconstruction_accuracy
    acc, mse, images = reconstruction_accuracy(_Autoencoder(), n=40, batch_size=16)
    assert acc["all"] >= 0.95 and acc["count"] >= 0.95 and mse < 1e-4 and len(images) == 40
    acc, mse, _ = reconstruction_accuracy(_Autoencoder(lossy=True), n=20)
    assert acc["all"] == 0 and acc["count"] == 0 and mse > 0.01


def place_stub(rows_heard=True, cols_heard=True):
    """The tiny model with its text encoder and UNet replaced by stand-ins: the caption's
    place is read from the data set's own words, and the "UNet" draws a bump there (in the
    eps, signed so the x0 gets it) at high noise, for the axes it is told to hear."""
    import torch

    from conftest import build_tiny
    from ldm.data.shapes import _POSITION_WORDS, POSITIONS
    model = build_tiny()
    phrases = sorted(((w, POSITIONS[p]) for p, ws in _POSITION_WORDS.items() for w in ws),
                     key=lambda x: -len(x[0]))

    def conditioning(captions):
        out = torch.full((len(captions), 1, 2), -1.0)
        for i, c in enumerate(captions):
            place = next((rc for w, rc in phrases if w in c), None)
            if place is not None:
                out[i, 0] = torch.tensor(place, dtype=torch.float32)
        return out

    def unet(x, t, cond):
        cond = cond["crossattn"] if isinstance(cond, dict) else cond  # a conditioning dict
        h, w = x.shape[-2:]
        ys = (torch.arange(h) + 0.5) / h * 3 - 0.5   # the grid's row/column at each pixel
        xs = (torch.arange(w) + 0.5) / w * 3 - 0.5
        out = 0.5 * x
        for i, (r, c) in enumerate(cond[:, 0].tolist()):
            if r < 0:
                continue
            r = r if rows_heard else 1.0
            c = c if cols_heard else 1.0
            bump = torch.exp(-((ys[:, None] - r) ** 2 + (xs[None, :] - c) ** 2) / 0.1)
            out[i] = out[i] - bump
        return out
    model.get_learned_conditioning = conditioning
    model.apply_model = unet
    return model


def test_first_step_placement_reads_the_place_a_model_draws_from_the_words():
    from ldm.evaluation import first_step_placement
    assert first_step_placement(place_stub(), n_noises=1) == {
        "place": 1.0, "row": 1.0, "column": 1.0}
    deaf = first_step_placement(place_stub(rows_heard=False), n_noises=1)
    assert deaf["column"] == 1.0 and abs(deaf["row"] - 1 / 3) < 1e-9    # all in the middle row
    assert abs(deaf["place"] - 1 / 3) < 1e-9


def test_word_gaps_show_which_place_words_a_model_uses():
    from ldm.evaluation import word_gaps
    # (the stand-in draws the same bump wherever it is told, so a wrong place costs it more or
    # less than the right one at random: only whether a gap is there is checked)
    both = word_gaps(place_stub(), n=24)
    assert abs(both["row gap"]) > 0.01 and abs(both["column gap"]) > 0.01
    assert abs(both["empty gap"]) > 0.01
    no_rows = word_gaps(place_stub(rows_heard=False), n=24)
    assert no_rows["row gap"] == 0 and abs(no_rows["column gap"]) > 0.01


class EditingOracle:
    """inpaint()/img2img() return the ground-truth render of the case's target scene (or,
    with ``lazy``, the input unchanged)."""

    is_inpainting_model = False

    def __init__(self, task, lazy=False):
        from ldm.evaluation import editing_cases
        self.targets = {p: t for p, _, _, t in editing_cases(task, 20, seed=0)}
        self.lazy, self.calls = lazy, []

    def _answer(self, prompt, image):
        self.calls.append(prompt)
        if self.lazy:
            return [Sample(image)]
        return [Sample(Image.fromarray(render(self.targets[prompt], 64)))]

    def inpaint(self, prompt, seeds, image, mask, strength=1.0, progress=True, **sampling):
        assert np.asarray(mask).max() == 255
        return self._answer(prompt, image)

    def img2img(self, prompt, seeds, image, strength=0.75, progress=True, **sampling):
        return self._answer(prompt, image)


def test_editing_evaluation_scores_a_perfect_editor_high_and_a_lazy_one_low():
    from ldm.evaluation import editing_cases, evaluate_editing
    for task in ("replace", "add", "recolour"):
        cases = editing_cases(task, 20, seed=0)
        again = editing_cases(task, 20, seed=0)  # deterministic
        assert [(c[0], c[3]) for c in cases] == [(c[0], c[3]) for c in again]
        assert all(np.array_equal(a[2], b[2]) for a, b in zip(cases, again) if a[2] is not None)
        for prompt, scene, mask, target in cases:
            if task == "recolour":
                assert mask is None and target.shapes[0].colour != scene.shapes[0].colour
            else:  # the mask covers the edited shape's centre, not the kept one's
                cx, cy = target.shapes[-1].centre(64)
                assert mask[int(cy), int(cx)] == 255
                if task == "add":
                    kx, ky = scene.shapes[0].centre(64)
                    assert mask[int(ky), int(kx)] == 0
        perfect, *_ = evaluate_editing(EditingOracle(task), task, 20, seed=0, batch_size=7)
        lazy, *_ = evaluate_editing(EditingOracle(task, lazy=True), task, 20, seed=0)
        assert perfect["new: all"] >= 0.9 and perfect["count"] >= 0.9, (task, perfect)
        assert lazy["new: all"] <= 0.1, (task, lazy)
        if task == "add":
            assert perfect["old: all"] >= 0.9 and lazy["count"] <= 0.1
