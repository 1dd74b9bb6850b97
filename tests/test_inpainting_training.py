"""Training an inpainting model from a text-to-image one (training.init_from, as RunwayML
made SD 1.5 inpainting from SD 1.2), on tiny configs; and the masked scenes it trains on."""
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import ROOT, TINY_CONFIG, official_layout

pytest.importorskip("pytorch_lightning")
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]
import main  # noqa: E402

TINY_INPAINTING = ROOT / "configs" / "tiny" / "tiny-inpainting-inference.yaml"
TRAIN = ROOT / "configs" / "tiny" / "train-tiny.yaml"


def test_masked_scenes_are_deterministic_varied_and_keep_the_held_out_pairs():
    from ldm.data.inpainting import InpaintingShapesDataset
    from ldm.data.shapes import HELDOUT_PAIRS
    data = InpaintingShapesDataset(size=64, seed=0, full_mask_fraction=0.2,
                                   empty_caption_fraction=0.1)
    items = [data[i] for i in range(200)]
    again = data[17]
    assert np.array_equal(again["mask"], items[17]["mask"]) and again["caption"] == items[17]["caption"]
    cover = np.array([it["mask"].mean() for it in items])
    assert 0.1 < (cover == 1).mean() < 0.3 and (cover > 0).all()  # full ones, none empty
    assert 0.02 < np.mean([it["caption"] == "" for it in items]) < 0.2
    partial = cover[(cover > 0) & (cover < 1)]
    assert partial.min() < 0.1 and partial.max() > 0.3  # small and large masks
    for it in items[:20]:
        m = it["mask"][..., None]
        assert np.allclose(it["masked_image"], it["image"] * (1 - m))
    for i in range(200):
        for s in data.scene(i).shapes:
            assert (s.colour, s.shape) not in HELDOUT_PAIRS


def test_mask_kinds_are_what_people_draw():
    from ldm.data.inpainting import MASK_KINDS, random_mask
    from ldm.data.shapes import Scene, Shape
    scene = Scene([Shape("star", "red", "big", "centre")])
    for kind in MASK_KINDS:
        m = random_mask(np.random.default_rng(0), scene, 64, kind)
        assert m.shape == (64, 64) and m.dtype == np.uint8 and 0 < (m > 0).mean() < 1, kind
    sil = random_mask(np.random.default_rng(0), scene, 64, "silhouette") > 0
    assert sil[32, 32]  # covers the shape's centre
    assert not sil[0, 0] and not sil[63, 63]
    box = random_mask(np.random.default_rng(0), scene, 64, "box") > 0
    rows, cols = np.nonzero(box.any(1))[0], np.nonzero(box.any(0))[0]
    assert box[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()   # a filled box
    assert 2 * (12 + 2) <= len(rows) <= 2 * (12 + 9) + 2 and rows[0] < 32 < rows[-1]


def test_init_from_widens_a_text_to_image_model_and_trains_it_to_inpaint(tmp_path):
    """The exported tiny text-to-image model becomes a 9-channel inpainting model: its first
    convolution widened (the 5 new input channels zero, so at step 0 it predicts exactly as
    the text-to-image model), then trained on masked scenes; the export inpaints."""
    from conftest import build_tiny
    t2i = build_tiny()  # a copy: the session's tiny model is not changed
    source = tmp_path / "t2i.safetensors"
    save_file({k: v.contiguous() for k, v in official_layout(t2i).items()}, source)
    (tmp_path / "config.yaml").write_text(TINY_CONFIG.read_text())  # as an export has it
    data = tmp_path / "data.yaml"
    data.write_text(f"""
training:
  init_from: {source}
  scale_by_std: true     # ignored with init_from: the model's scale_factor is kept
data:
  params:
    train:
      target: ldm.data.inpainting.InpaintingShapesDataset
      params: {{ split: train, size: 32, length: 100000, seed: 0 }}
""")
    from ldm.lightning import trainer_for
    from omegaconf import OmegaConf
    from ldm.util import instantiate_from_config
    config = OmegaConf.merge(OmegaConf.load(TINY_INPAINTING), OmegaConf.load(TRAIN),
                             OmegaConf.load(data))
    trainer = trainer_for(instantiate_from_config(config.model),
                          **OmegaConf.to_container(config.training))
    model = trainer.model
    w = model.model.diffusion_model.input_blocks[0][0].weight
    assert w.shape[1] == 9 and torch.equal(w[:, 4:], torch.zeros_like(w[:, 4:]))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([500, 20])
    cond = torch.randn(2, 77, 32)
    with torch.no_grad():
        before = t2i.apply_model(x, t, cond)
        after = model.apply_model(x, t, cond, torch.randn(2, 5, 8, 8))  # any mask, latents
    assert before.abs().max() > 0.1 and torch.allclose(before, after, atol=1e-5)
    assert float(trainer.scale_factor) == pytest.approx(t2i.scale_factor)
    ema = trainer.model_ema.state_dict()["diffusion_modelinput_blocks00weight"]
    assert torch.equal(ema, w.detach())  # the EMA starts from the widened weights

    args = ["--base", str(TINY_INPAINTING), str(TRAIN), str(data), "-t", "--logdir",
            str(tmp_path), "--name", "inp", "--max_steps", "30"]
    assert main.main(args) == 0
    import csv
    with open(tmp_path / "inp" / "metrics.csv") as f:
        values = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert sum(values[-10:]) / 10 < 0.8 * sum(values[:5]) / 5, values
    import export_model
    out = tmp_path / "export"
    export_model.main(["--run", str(tmp_path / "inp"), "--out", str(out)])
    from PIL import Image
    from ldm.pipeline import Pipeline
    pipe = Pipeline.load(out / "model.safetensors", device="cpu", safety=False, task="inpaint")
    assert pipe.is_inpainting_model
    image = Image.new("RGB", (32, 32), (120, 60, 200))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    s = pipe.inpaint("a red circle", [1], image, mask, steps=3, progress=False)[0]
    assert s.image.size == (32, 32) and s.parameters["inpainting_model"] is True
