"""The shapes data set (ldm/data/shapes.py) and the model-free analyser that scores it."""
import numpy as np
import pytest

from ldm.data import analyser
from ldm.data.shapes import (COLOURS, HELDOUT_PAIRS, POSITIONS, SHAPES, ShapesDataset,
                             _SIZE_WORDS, heldout_prompts, render,
                             sample_scene)


def test_deterministic_by_seed_and_index():
    a, b = ShapesDataset(seed=5), ShapesDataset(seed=5)
    for i in (0, 1, 977):
        x, y = a[i], b[i]
        assert x["caption"] == y["caption"] and np.array_equal(x["image"], y["image"])
    assert ShapesDataset(seed=6)[0]["caption"] != a[0]["caption"] or \
        not np.array_equal(ShapesDataset(seed=6)[0]["image"], a[0]["image"])


def test_item_format():
    item = ShapesDataset(size=64)[3]
    assert item["image"].shape == (64, 64, 3) and item["image"].dtype == np.float32
    assert -1.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert isinstance(item["caption"], str) and item["caption"]


def test_heldout_pairs_never_in_training_and_always_in_heldout():
    train, held = ShapesDataset("train", seed=0), ShapesDataset("heldout", seed=0)
    seen = set()
    for i in range(2000):
        pairs = {(s.colour, s.shape) for s in train.scene(i).shapes}
        assert not pairs & HELDOUT_PAIRS
        seen |= pairs
        assert {(s.colour, s.shape) for s in held.scene(i).shapes} & HELDOUT_PAIRS
    # every other colour/shape pair is trained on, and each colour and shape appears
    assert seen == {(c, s) for c in COLOURS for s in SHAPES} - HELDOUT_PAIRS


def test_captions_vary_and_name_the_shapes():
    ds = ShapesDataset(seed=0)
    captions = [ds[i]["caption"] for i in range(300)]
    assert len(set(captions)) > 250
    for i, text in enumerate(captions[:50]):
        for s in ds.scene(i).shapes:
            assert f"{s.colour} {s.shape}" in text
    assert any(" and " in c for c in captions) and any("background" in c for c in captions)
    assert any("corner" in c for c in captions) and any("gradient" in c for c in captions)


def test_heldout_prompts_name_every_attribute():
    for text, scene in heldout_prompts(20, seed=1):
        (s,) = scene.shapes
        assert (s.colour, s.shape) in HELDOUT_PAIRS
        assert s.colour in text and s.shape in text
        assert any(w in text.split() for w in _SIZE_WORDS[s.size])


@pytest.mark.parametrize("n_shapes", [1, 2])
def test_analyser_reads_ground_truth(n_shapes):
    """At least 99% of ground-truth renders fully right (every attribute of every shape)."""
    rng = np.random.default_rng(123 + n_shapes)
    judgements, counts = [], []
    for i in range(400):
        scene = sample_scene(rng, "train" if i % 2 else "heldout", n_shapes)
        found = analyser.analyse(render(scene))
        judgements.append(analyser.judge(scene, found))
        counts.append(len(found))
        if n_shapes == 1:
            assert len(found) == 1
    acc = analyser.accuracy(judgements, counts)
    assert acc["all"] >= 0.99 and acc["count"] >= 0.99, acc


def test_analyser_fails_on_wrong_images():
    """The analyser is not fooled: a blank image and a different shape are judged wrong."""
    rng = np.random.default_rng(0)
    scene = sample_scene(rng, "train", 1)
    blank = np.full((64, 64, 3), 128, np.uint8)
    assert analyser.analyse(blank) == []
    assert not any(analyser.judge(scene, [])[0].values())
    other = sample_scene(rng, "train", 1)
    other.shapes[0].shape = next(s for s in SHAPES if s != scene.shapes[0].shape)
    other.shapes[0].position = next(p for p in POSITIONS if p != scene.shapes[0].position)
    (result,) = analyser.judge(scene, analyser.analyse(render(other)))
    assert not result["shape"] and not result["position"]
