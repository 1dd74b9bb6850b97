"""Pixel upscalers (``ldm.modules.sr``, ``ldm.upscalers``): ESRGAN in its original and
BasicSR layouts and Real-ESRGAN's compact network against the outputs spandrel computed
on the same weights (recorded by tests/upscaler_reference.py), loaded from files through
the restricted loader, tiled, and as the hires fix's upscaler."""
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import ROOT
from ldm.errors import CheckpointError, UnsafeCheckpointError
from ldm.modules.sr import esrgan_keys, from_state_dict
from ldm.upscalers import PixelUpscaler, load_pixel_upscaler, load_upscaler

REFERENCE = load_file(ROOT / "tests" / "data" / "upscalers.safetensors")
CASES = sorted({k.split("/")[0] for k in REFERENCE})
SCALES = {"esrgan_original_x4": 4, "esrgan_original_x8": 8, "esrgan_basicsr_x2": 2,
          "compact_x4": 4, "compact_x2": 2}


def case(name):
    prefix = f"{name}/weights/"
    weights = {k[len(prefix):]: v for k, v in REFERENCE.items() if k.startswith(prefix)}
    return weights, REFERENCE[f"{name}/input"], REFERENCE[f"{name}/output"]


@pytest.mark.parametrize("name", CASES)
def test_equals_spandrel(name, tmp_path):
    """The network built from the published keys, loaded from a .pth and a .safetensors
    file, gives spandrel's output on the same float16-exact weights (float32 compute)."""
    weights, x, want = case(name)
    assert SCALES[name] == want.shape[-1] // x.shape[-1]
    torch.save(weights, tmp_path / "model.pth")
    save_file(weights, tmp_path / "model.safetensors")
    for path in (tmp_path / "model.pth", tmp_path / "model.safetensors"):
        up = load_pixel_upscaler(path)
        assert up.scale == SCALES[name]
        assert up.architecture == ("ESRGAN" if "esrgan" in name else "RealESRGAN Compact")
        with torch.no_grad():
            got = up.net(x)
        assert got.shape == want.shape
        assert (got - want).abs().max() < 1e-5 * max(1.0, float(want.abs().max()))


def test_the_two_esrgan_layouts_are_one_network():
    weights, x, _ = case("esrgan_original_x4")
    renamed = esrgan_keys(weights)
    assert {"conv_first.weight", "conv_body.weight", "conv_up1.weight", "conv_up2.weight",
            "conv_hr.weight", "conv_last.weight", "body.1.rdb3.conv5.bias"} <= set(renamed)
    a, _ = from_state_dict(weights)
    b, _ = from_state_dict(renamed)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    # BasicSR's training checkpoints keep the weights under params_ema
    wrapped = {"params_ema": dict(renamed)}
    assert set(esrgan_keys(wrapped)) == {"params_ema"}


def test_tiles_blend_to_the_whole():
    weights, x, _ = case("compact_x4")
    net, name = from_state_dict(weights)
    whole = PixelUpscaler(net, "c", name, tile=0)(x)
    tiled = PixelUpscaler(net, "c", name, tile=8, overlap=2)(x)
    assert tiled.shape == whole.shape == (1, 3, 48, 64)
    # a receptive field of 11 pixels: tiles differ from the whole near their edges only
    assert (tiled - whole).abs().mean() < 0.02
    weights, x, want = case("esrgan_basicsr_x2")
    net, name = from_state_dict(weights)
    odd = PixelUpscaler(net, "e", name, tile=7, overlap=2)(x)   # sides the unshuffle pads
    assert odd.shape == want.shape


def test_upscale_resizes_to_the_size_asked():
    weights, x, _ = case("compact_x2")
    up = PixelUpscaler(from_state_dict(weights)[0], "c", "RealESRGAN Compact", tile=0)
    image = Image.fromarray((x[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    out = up.upscale(image, 30, 20)
    assert out.size == (30, 20)
    exact = up.upscale(image, 32, 24)
    assert exact.size == (32, 24)


def test_refusals(tmp_path):
    save_file({"foo.weight": torch.zeros(3)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="other.safetensors: not an ESRGAN") as e:
        load_pixel_upscaler(tmp_path / "other.safetensors", flag="--hr_upscaler")
    assert "\n" not in str(e.value) and "SwinIR" in str(e.value)
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    torch.save({"conv_first.weight": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(UnsafeCheckpointError):
        load_pixel_upscaler(tmp_path / "evil.pth")
    assert not marker.exists()


def test_hires_fix_with_a_pixel_upscaler(tmp_path):
    """--hr_upscaler FILE of ESRGAN's: the first pass decoded, upscaled by it (then
    Lanczos to the size), encoded and refined."""
    from conftest import run_here
    from ldm.pipeline import BUILTIN_DIR, Pipeline
    weights, _, _ = case("compact_x2")
    torch.save(weights, tmp_path / "2x_compact.pth")
    pipe = Pipeline.load(BUILTIN_DIR / "model.safetensors", device="cpu", safety=False)
    up = load_upscaler(tmp_path / "2x_compact.pth", pipe, "--hr_upscaler")
    assert isinstance(up, PixelUpscaler) and up.scale == 2
    first = pipe.generate("a red circle", 4, steps=4, progress=False)[0].image
    n = int(2 / 0.5)
    expected = pipe.img2img("a red circle", 4, up.upscale(first, 128, 128), steps=n,
                            strength=2.5 / pipe.num_steps(n, "discrete", "ddim"),
                            progress=False)[0].image
    got = pipe.generate("a red circle", 4, steps=4, progress=False,
                        hires=dict(upscaler=up, steps=2, strength=0.5))[0]
    assert np.array_equal(np.asarray(got.image), np.asarray(expected))
    assert got.parameters["hr_upscaler"] == "2x_compact"
    r = run_here("txt2img.py", "--prompt", "a red circle", "--ddim_steps", "3", "--n_samples",
                 "1", "--n_iter", "1", "--hr_upscaler", tmp_path / "2x_compact.pth",
                 "--hr_steps", "2", "--outdir", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    image = Image.open(tmp_path / "out" / "samples" / "00000.png")
    assert image.size == (128, 128) and "Hires upscaler: 2x_compact" in image.info["parameters"]


def test_upscale_script_with_a_pixel_upscaler(tmp_path):
    from conftest import run_here
    from ldm.image_io import read_parameters
    weights, x, want = case("esrgan_original_x4")
    torch.save(weights, tmp_path / "4x_tiny.pth")
    image = Image.fromarray((x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    image.save(tmp_path / "in.png")
    r = run_here("upscale.py", "--upscaler", tmp_path / "4x_tiny.pth", "--image",
                 tmp_path / "in.png", "--tile", "8", "--tile_overlap", "2", "--outdir",
                 tmp_path / "out")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out" / "samples" / "00000.png"
    assert Image.open(out).size == (64, 48)
    p = read_parameters(out)
    assert (p["upscaler"], p["architecture"], p["scale"]) == ("4x_tiny", "ESRGAN", 4)
    r = run_here("upscale.py", "--upscaler", tmp_path / "4x_tiny.pth", "--ckpt", "x.ckpt",
                 "--image", tmp_path / "in.png", "--outdir", tmp_path / "out")
    assert r.returncode == 2 and "drop --ckpt" in r.stderr
