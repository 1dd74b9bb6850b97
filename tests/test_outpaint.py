"""Outpainting (``Pipeline.outpaint``, ``inpaint.py --outpaint``) and what the masked part
starts from (``fill``, A1111's inpainting_fill): the canvas and mask as documented, every
pixel outside the mask the input's own."""
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_here
from ldm.errors import UsageError
from ldm.image_io import fill_masked, outpaint_canvas
from ldm.pipeline import BUILTIN_DIR, BUILTIN_INPAINTING_DIR, Pipeline


@pytest.fixture(scope="module")
def picture():
    pipe = Pipeline.load(BUILTIN_DIR / "model.safetensors", device="cpu", safety=False)
    return pipe.generate("a red circle", 3, steps=8, progress=False)[0].image


@pytest.fixture(scope="module")
def inpainter():
    return Pipeline.load(BUILTIN_INPAINTING_DIR / "model.safetensors", device="cpu",
                         safety=False)


def test_canvas_and_mask(picture):
    canvas, mask = outpaint_canvas(picture, left=32, right=0, up=8, down=16, blur=4)
    assert canvas.size == mask.size == (96, 88)
    c, m = np.asarray(canvas), np.asarray(mask)
    assert np.array_equal(c[8:72, 32:96], np.asarray(picture))   # the image where it was
    assert (c[:, :32] == 0).all() and (c[:8] == 0).all()         # on black ("original")
    assert (m[:, :32 + 8] == 255).all() and (m[:8 + 8] == 255).all()   # new part + 2 x blur
    assert (m[72 - 8:] == 255).all()
    assert (m[16:64, 40:96] == 0).all()   # the rest: kept (no seam on the right: not extended)
    with pytest.raises(UsageError, match="at least one side"):
        outpaint_canvas(picture)
    with pytest.raises(UsageError, match="outpaint left: -4 is out of range"):
        outpaint_canvas(picture, left=-4)
    with pytest.raises(UsageError, match="outpaint up: 2.5 is not a whole number"):
        outpaint_canvas(picture, up=2.5)
    with pytest.raises(UsageError, match="too small for a seam"):
        outpaint_canvas(picture, left=8, right=8, blur=20)


def test_fill_spreads_the_colours_around(picture):
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    image.paste((30, 30, 200), (32, 0, 64, 64))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (40, 0, 64, 64))
    out = np.asarray(fill_masked(image, mask)).astype(int)
    keep = np.asarray(mask) < 128
    assert np.array_equal(out[keep], np.asarray(image).astype(int)[keep])
    filled = out[:, 40:]
    assert (np.abs(out[:, 40:48] - [30, 30, 200]).max(-1) < 40).all()   # blue beside blue
    blue, red = (np.abs(filled - c).sum(-1) for c in ([30, 30, 200], [200, 30, 30]))
    assert (blue < red).all()   # the nearest colour wins all the way


@pytest.mark.parametrize("model", ["inpainting", "txt2img"])
def test_outpaint_keeps_every_pixel_outside_the_mask(picture, inpainter, model):
    pipe = inpainter if model == "inpainting" else Pipeline.load(
        BUILTIN_DIR / "model.safetensors", device="cpu", safety=False)
    samples = pipe.outpaint(["a red circle"] * 2, [5, 6], picture, left=32, down=16,
                            steps=8, progress=False)
    canvas, mask = outpaint_canvas(picture, left=32, down=16)
    keep = np.asarray(mask) < 128
    for s in samples:
        out = np.asarray(s.image)
        assert s.image.size == (96, 80)
        assert np.array_equal(out[keep], np.asarray(canvas)[keep])
        assert out[:, :24].std() > 0 and out[:, :24].mean() > 20   # painted, not black
        p = s.parameters
        assert p["outpaint"] == {"left": 32, "right": 0, "up": 0, "down": 16}
        assert p["fill"] == "fill" and p["inpainting_model"] == (model == "inpainting")


def test_latent_fills_start_from_noise_or_zeros(picture, inpainter):
    """latent-noise / latent-nothing: the masked part of the init latents is the seed's
    noise / zeros, the rest the image's; the outside pixels stay the input's."""
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    seen = {}
    real = inpainter._denoise

    def spy(request, h, w, init=None, **kw):
        seen[request.fill] = init.clone()
        return real(request, h, w, init=init, **kw)
    inpainter._denoise = spy
    try:
        out = {fill: inpainter.inpaint("a blue square", 9, picture, mask, steps=6,
                                       strength=0.7, fill=fill, progress=False)[0]
               for fill in ("original", "latent-noise", "latent-nothing", "fill")}
    finally:
        del inpainter._denoise
    small, _ = inpainter.latent_mask(mask)
    inside = small.bool().expand_as(seen["original"])
    noise = inpainter.initial_noise([9], 64, 64)[0]
    assert torch.equal(seen["latent-noise"][inside], noise[inside])
    assert (seen["latent-nothing"][inside] == 0).all()
    for fill in ("latent-noise", "latent-nothing"):
        assert torch.equal(seen[fill][~inside], seen["original"][~inside])
    assert not torch.equal(seen["fill"], seen["original"])
    keep = np.asarray(mask) < 128
    for fill, s in out.items():
        assert np.array_equal(np.asarray(s.image)[keep], np.asarray(picture)[keep]), fill
    assert out["latent-noise"].parameters["fill"] == "latent-noise"
    assert "fill" not in out["original"].parameters
    with pytest.raises(UsageError, match="fill latent-noise is for inpainting"):
        inpainter.request("img2img", "x", 1, image=picture, fill="latent-noise")


def test_script(tmp_path, picture):
    picture.save(tmp_path / "in.png")
    out = tmp_path / "out"
    r = run_here("inpaint.py", "--image", tmp_path / "in.png", "--outpaint",
                 "left=16,bottom=8", "--ddim_steps", "4", "--n_samples", "1", "--outdir", out,
                 "--fill", "latent-noise", "--strength", "0.9")
    assert r.returncode == 0, r.stderr
    image = Image.open(out / "samples" / "00000.png")
    assert image.size == (80, 72)
    assert np.array_equal(np.asarray(image)[:56, 24:], np.asarray(picture)[:56, 8:])
    for argv, message in ((["--outpaint", "left=x"], "left: 'x' is not an integer"),
                          (["--outpaint", "side=8"], "give SIDE=PIXELS"),
                          (["--outpaint", "left=8", "--mask", tmp_path / "in.png"],
                           "--outpaint makes its own mask"),
                          (["--outpaint", "left=8", "--invert-mask"], "--invert-mask is for")):
        r = run_here("inpaint.py", "--image", tmp_path / "in.png", "--outdir", out, *argv)
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1, r.stderr
