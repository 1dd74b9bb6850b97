"""ldm.evaluation (scripts/evaluate.py's core) on stand-in models: one that draws exactly the
held-out scene it is asked for scores (nearly) 100%, one that draws nothing scores 0."""
import numpy as np
from PIL import Image

from ldm.data.shapes import render
from ldm.evaluation import evaluate, labelled_grid
from ldm.pipeline import Sample


class Oracle:
    """generate() returns the ground-truth render of each prompt's scene."""

    def __init__(self, scenes_by_prompt, blank=False):
        self.scenes, self.blank = scenes_by_prompt, blank
        self.calls = []

    def generate(self, prompts, seeds, progress=True, **sampling):
        self.calls.append((list(seeds), sampling))
        out = []
        for p in prompts:
            pixels = render(self.scenes[p], 64)
            if self.blank:
                pixels = np.full_like(pixels, 128)
            out.append(Sample(Image.fromarray(pixels)))
        return out


def _cases():
    from ldm.data.shapes import heldout_prompts
    return {p: s for n in (1, 2) for p, s in heldout_prompts(20, seed=n, n_shapes=n)}


def test_a_perfect_model_scores_full_marks_and_a_blank_one_zero():
    oracle = Oracle(_cases())
    perfect = evaluate(oracle, 20, 20, seed=0, batch_size=8, progress=False, steps=3)
    assert all(sampling == {"steps": 3} for _, sampling in oracle.calls)
    assert perfect["single"]["accuracy"]["all"] >= 0.95
    assert perfect["double"]["accuracy"]["colour"] >= 0.95
    blank = Oracle(_cases(), blank=True)
    nothing = evaluate(blank, 20, 0, seed=0, batch_size=8, progress=False)
    assert nothing["single"]["accuracy"]["all"] == 0 and "double" not in nothing
    # seeds run on across batches
    assert [s for seeds, _ in blank.calls for s in seeds] == list(range(20))


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
    assert acc["all"] >= 0.95 and mse < 1e-4 and len(images) == 40
    acc, mse, _ = reconstruction_accuracy(_Autoencoder(lossy=True), n=20)
    assert acc["all"] == 0 and mse > 0.01
