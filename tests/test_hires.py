"""A1111's hires fix (ldm.hires): its sizes as A1111's calculate_target_resolution makes
them, and the second pass bit for bit our img2img on the upscaled first pass."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import run_here
from ldm.errors import UsageError, WrongType
from ldm.hires import Hires, crop_latents, upscaler_key
from ldm.image_io import parameters_text
from ldm.pipeline import BUILTIN_DIR, Pipeline


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load(BUILTIN_DIR / "model.safetensors", device="cpu", safety=False)


def a1111_target(width, height, scale, rx, ry, f=8):
    """A1111's processing.py, written out: (latent width, latent height) after the crop."""
    if rx == 0 and ry == 0:
        up_x, up_y = int(width * scale), int(height * scale)
        tx = ty = 0
    else:
        if ry == 0:
            up_x, up_y = rx, rx * height // width
        elif rx == 0:
            up_x, up_y = ry * width // height, ry
        else:
            if width / height < rx / ry:
                up_x, up_y = rx, rx * height // width
            else:
                up_x, up_y = ry * width // height, ry
        target_w, target_h = rx or up_x, ry or up_y
        tx, ty = (up_x - target_w) // f, (up_y - target_h) // f
    lx, ly = up_x // f, up_y // f
    return lx - (tx // 2 + (tx + 1) // 2), ly - (ty // 2 + (ty + 1) // 2)


@pytest.mark.parametrize("size,scale,resize", [
    ((512, 512), 2.0, (0, 0)), ((512, 768), 1.5, (0, 0)), ((640, 448), 1.75, (0, 0)),
    ((512, 512), 2.0, (1000, 0)), ((512, 768), 2.0, (0, 1100)),
    ((512, 512), 2.0, (1024, 768)), ((512, 768), 2.0, (1200, 1000)),
    ((768, 512), 2.0, (1003, 996)), ((520, 512), 2.0, (1024, 1024))])
def test_sizes_are_a1111s(size, scale, resize):
    hr = Hires.build(scale=scale, resize_x=resize[0], resize_y=resize[1])
    up, final = hr.sizes(*size, 8)
    assert (final[0] // 8, final[1] // 8) == a1111_target(*size, scale, *resize)
    assert all(u % 8 == 0 and t % 8 == 0 and t <= u for u, t in zip(up, final))
    if resize == (0, 0):
        assert up == final == (int(size[0] * scale) // 8 * 8, int(size[1] * scale) // 8 * 8)


def test_steps_and_names():
    # A1111's hires pass: exactly hr_steps run, of a schedule int(steps / strength) long
    assert Hires.build(steps=20, strength=0.7).schedule_steps(30) == (28, 20)
    assert Hires.build(strength=0.5).schedule_steps(30) == (60, 30)
    assert Hires.build(strength=1.0).schedule_steps(10) == (10, 10)   # min(s, 0.999)
    assert Hires.build(strength=0.0).schedule_steps(10) == (10, 0)
    assert upscaler_key("Latent (nearest-exact)") == "latent-nearest-exact"
    assert upscaler_key("Latent (bicubic antialiased)") == "latent-bicubic-antialiased"
    assert upscaler_key("LANCZOS") == "lanczos" and upscaler_key("ESRGAN_4x") is None
    assert Hires.build(upscaler="Latent (antialiased)").label == "Latent (antialiased)"
    with pytest.raises(UsageError, match="'bogus' is not an upscaler: give one of latent"):
        Hires.build(upscaler="bogus")
    with pytest.raises(UsageError, match="hr_scale: 0.5 is out of range"):
        Hires.build(scale=0.5)
    with pytest.raises(UsageError, match="hr_strength: nan is not a finite"):
        Hires.build(strength=float("nan"))
    with pytest.raises(WrongType, match="hr_upscaler must be an upscaler"):
        Hires.build(upscaler=3)


def test_a1111_metadata():
    record = {"prompt": "p", "steps": 20, "width": 512, "height": 512,
              **Hires.build(scale=2, steps=10, strength=0.55).record()}
    text = parameters_text(record).splitlines()[-1]
    assert ("Size: 512x512, Denoising strength: 0.55, Hires upscale: 2.0, Hires steps: 10, "
            "Hires upscaler: Latent") in text
    record = {"prompt": "p", **Hires.build(resize_x=1024, resize_y=768,
                                           upscaler="lanczos").record()}
    assert "Hires resize: 1024x768, Hires upscaler: Lanczos" in parameters_text(record)


def strength_for(pipe, run, steps, sampler):
    """A strength at which our img2img runs ``run`` of the denoising steps of ``steps``
    sampling steps (which can be one more on the model's own timesteps: 12 -> 13)."""
    return (run + 0.5) / pipe.num_steps(steps, "discrete", sampler)


@pytest.mark.parametrize("mode,resize", [("latent", None), ("latent-nearest-exact", (96, 64)),
                                         ("latent-bicubic-antialiased", None)])
def test_latent_second_pass_is_our_img2img(pipe, mode, resize):
    kwargs = dict(steps=8, sampler="euler_a")
    hr = dict(upscaler=mode, steps=5, strength=0.6,
              **({"resize_x": resize[0], "resize_y": resize[1]} if resize else {}))
    seen = []
    samples = pipe.generate(["a red circle", "a blue square"], [3, 4], progress=False,
                            callback=lambda i, x, x0: seen.append(x.shape[-1]), hires=hr,
                            **kwargs)
    assert seen == [16] * 8 + [(resize or (128,))[0] // 4] * 5   # both passes, counted
    first = pipe.latents(["a red circle", "a blue square"], [3, 4], progress=False, **kwargs)
    how, aa = {"latent": ("bilinear", False), "latent-nearest-exact": ("nearest-exact", False),
               "latent-bicubic-antialiased": ("bicubic", True)}[mode]
    side = 32 if resize is None else 24   # 96x96 covers 96x64, then the crop
    up = F.interpolate(first, size=(side, side), mode=how, antialias=aa)
    if resize:
        up = crop_latents(up, (16, 24))
        assert up.shape[-2:] == (16, 24)
    n = int(5 / 0.6)
    z = pipe.latents(["a red circle", "a blue square"], [3, 4], init=up, progress=False,
                     strength=strength_for(pipe, 5, n, "euler_a"), sampler="euler_a", steps=n)
    expected, _ = pipe.finish(pipe.decode(z))
    for s, e in zip(samples, expected):
        assert s.image.size == e.size == ((resize or (128, 128))[0], (resize or (128, 128))[1])
        assert np.array_equal(np.asarray(s.image), np.asarray(e))
    p = samples[0].parameters
    assert (p["width"], p["height"], p["strength"], p["hr_steps"]) == (64, 64, 0.6, 5)
    assert p["output_size"] == f"{s.image.width}x{s.image.height}"


def test_pixel_second_pass_is_our_img2img(pipe):
    """Lanczos: the first pass decoded, resized, then exactly our img2img on that image."""
    samples = pipe.generate("a green triangle", 7, steps=6, progress=False,
                            hires=dict(upscaler="lanczos", scale=1.5, strength=0.5))
    first = pipe.generate("a green triangle", 7, steps=6, progress=False)[0].image
    up = first.resize((96, 96), Image.LANCZOS)
    n = int(6 / 0.5)
    assert pipe.num_steps(n, "discrete", "ddim") == 13   # of which 6 run, as A1111
    expected = pipe.img2img("a green triangle", 7, up, steps=n,
                            strength=strength_for(pipe, 6, n, "ddim"), progress=False)[0].image
    assert samples[0].image.size == (96, 96)
    assert np.array_equal(np.asarray(samples[0].image), np.asarray(expected))
    assert samples[0].parameters["hr_upscaler"] == "Lanczos"
    assert pipe.steps_run(pipe.request("txt2img", "x", 1, steps=6, hires=dict(
        strength=0.5))) == pipe.num_steps(6, "discrete", "ddim") + 6 == 7 + 6


def test_upscaler_object_is_called(pipe):
    """A loaded upscaler gets each first-pass image with its prompt and seed."""
    calls = []

    class Doubler:
        name = "doubler"

        def upscale(self, image, width, height, prompt="", seed=0):
            calls.append((image.size, width, height, prompt, seed))
            return image.resize((width, height), Image.NEAREST)

    samples = pipe.generate(["a red circle", "a blue square"], [1, 2], steps=4,
                            progress=False, hires=dict(upscaler=Doubler(), steps=2))
    assert calls == [((64, 64), 128, 128, "a red circle", 1),
                     ((64, 64), 128, 128, "a blue square", 2)]
    assert samples[1].parameters["hr_upscaler"] == "doubler"


def test_refused(pipe):
    with pytest.raises(UsageError, match="hires fix is for text-to-image"):
        pipe.request("img2img", "x", 1, image=Image.new("RGB", (64, 64)), hires={})
    with pytest.raises(WrongType, match="hires must be"):
        pipe.request("txt2img", "x", 1, hires=2)


def test_script(tmp_path):
    out = tmp_path / "out"
    r = run_here("txt2img.py", "--prompt", "a red circle", "--n_samples", "1", "--n_iter",
                 "1", "--ddim_steps", "4", "--hr_resize_x", "96", "--hr_steps", "2",
                 "--hr_upscaler", "Latent (nearest)", "--outdir", out)
    assert r.returncode == 0, r.stderr
    image = Image.open(out / "samples" / "00000.png")
    assert image.size == (96, 96)
    assert "Hires resize: 96x0, Hires steps: 2, Hires upscaler: Latent (nearest)" in \
        image.info["parameters"]
    r = run_here("txt2img.py", "--hr_upscaler", "nothing-here.pth", "--outdir", out)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(
        "error: --hr_upscaler 'nothing-here.pth' is not an upscaler"), r.stderr
    r = run_here("txt2img.py", "--denoising_strength", "1.5", "--outdir", out)
    assert r.returncode == 2 and "--denoising_strength: 1.5 is out of range" in r.stderr
