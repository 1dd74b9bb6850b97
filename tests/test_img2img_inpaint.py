"""Image-to-image and inpainting through the library and scripts/img2img.py, inpaint.py on
tiny random checkpoints: the strength contract, paste-back, every sampler in every task,
reproducibility by seed, the three ways into inpaint.py, inputs as people bring them and
every bad input. (Numerics against diffusers: tests/models/test_crosscheck_diffusers.py.)"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from safetensors.torch import save_file

from conftest import ROOT, TINY_CONFIG, official_layout, randomize, run_here
from ldm.image_io import read_parameters

TINY_INPAINTING = ROOT / "configs" / "tiny" / "tiny-inpainting-inference.yaml"
SCRIPTS = ROOT / "scripts"


def scene(size=32, seed=0):
    rng = np.random.default_rng(seed)
    a = np.zeros((size, size, 3), np.uint8) + rng.integers(40, 200, 3, dtype=np.uint8)
    a[size // 4: size // 2, size // 4: size // 2] = (220, 30, 30)
    return Image.fromarray(a)


def box_mask(size=32):
    m = np.zeros((size, size), np.uint8)
    m[size // 2:, size * 3 // 8: size * 7 // 8] = 255  # 32: rows 16-31, columns 12-27
    return Image.fromarray(m)


@pytest.fixture(scope="module")
def pipe(tiny_model):
    from ldm.pipeline import Pipeline
    return Pipeline(tiny_model, torch.device("cpu"), "full")


@pytest.fixture(scope="module")
def inpainting_ckpt(tmp_path_factory):
    """A tiny 9-channel inpainting model saved without a config beside it (the config
    must be found from the checkpoint)."""
    from omegaconf import OmegaConf
    from ldm.util import instantiate_from_config
    model = randomize(instantiate_from_config(OmegaConf.load(TINY_INPAINTING).model), 3).eval()
    path = tmp_path_factory.mktemp("inpainting") / "tiny-inpainting.safetensors"
    save_file({k: v.contiguous() for k, v in official_layout(model).items()}, path)
    return path, model


# ------------------------------------------------------------------------ the library

def test_strength_0_is_the_autoencoder_round_trip(pipe):
    image = scene()
    z = pipe.latents("x", [1], steps=10, init=pipe.encode([image]), strength=0.0, progress=False)
    assert torch.equal(z, pipe.encode([image]))
    out = pipe.img2img("x", [1], image, strength=0.0, steps=10, progress=False)[0]
    assert out.image == pipe.decode(pipe.encode([image]))[0]
    assert out.parameters["strength"] == 0.0 and out.parameters["task"] == "img2img"


@pytest.mark.parametrize("strength,steps_run", [(1.0, 10), (0.75, 7), (0.5, 5), (0.05, 1), (0.0, 0)])
def test_strength_runs_that_share_of_the_steps(pipe, strength, steps_run):
    seen = []
    pipe.img2img("x", [1], scene(), strength=strength, sampler="ddim", steps=10,
                 progress=False, callback=lambda i, x, x0: seen.append(i))
    assert len(seen) == steps_run


SAMPLER_RUNS = [("ddim", 0.0, None), ("ddim", 0.5, None), ("plms", None, None),
                ("ddpm", None, None), ("euler", None, None), ("euler_a", None, "karras"),
                ("heun", None, None), ("dpm_2", None, "karras"), ("dpm_2_a", 0.5, None),
                ("dpmpp_2s_a", None, None), ("dpmpp_2m", None, "karras"),
                ("dpmpp_sde", None, "exponential"), ("dpmpp_2m_sde", None, "karras"),
                ("lms", None, None), ("unipc", None, "karras")]


@pytest.mark.parametrize("sampler,eta,schedule", SAMPLER_RUNS)
@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_every_sampler_in_every_task_is_reproducible_by_seed(pipe, sampler, eta, schedule,
                                                             task):
    """Image k of a batch is the image made alone with its seed, for each sampler (the
    ancestral and SDE ones draw their noise from each image's own generator)."""
    def run(seeds):
        kw = dict(sampler=sampler, eta=eta, steps=6, progress=False, schedule=schedule)
        if task == "img2img":
            return pipe.img2img("a red square", seeds, scene(), strength=0.8, **kw)
        return pipe.inpaint("a red square", seeds, scene(), box_mask(), **kw)
    batch, alone = run([3, 4]), run([4])
    a = np.asarray(batch[1].image, np.int16)
    assert np.abs(a - np.asarray(alone[0].image, np.int16)).max() <= 1
    assert np.abs(a - np.asarray(batch[0].image, np.int16)).max() > 0


def test_paste_back_keeps_every_unmasked_pixel(pipe):
    image, mask = scene(), box_mask()
    out = pipe.inpaint("a blue circle", [5], image, mask, steps=6, mask_blur=2,
                       progress=False)[0].image
    keep = np.asarray(mask) < 128                       # every pixel outside the mask
    a, b = np.asarray(out), np.asarray(image)
    assert keep.sum() > 300 and (a[keep] == b[keep]).all()
    inside = np.asarray(mask) == 255
    assert (a[inside] != b[inside]).any()
    hard = pipe.inpaint("a blue circle", [5], image, mask, steps=6, mask_blur=0,
                        progress=False)[0].image
    edge = inside & ~(np.asarray(mask.filter(ImageFilter.MinFilter(5))) == 255)  # the seam
    assert (np.asarray(hard)[edge] != a[edge]).any()    # feathered inwards there
    raw = pipe.inpaint("a blue circle", [5], image, mask, steps=6, paste_back=False,
                       progress=False)[0]
    assert (np.asarray(raw.image)[keep] != b[keep]).any()  # the raw decode differs there
    assert raw.parameters["paste_back"] is False and raw.parameters["task"] == "inpaint"


def test_empty_and_full_masks(pipe, caplog):
    from ldm.errors import UsageError
    black = Image.new("L", (32, 32), 0)
    with pytest.raises(UsageError, match="empty"):
        pipe.inpaint("x", [1], scene(), black, steps=2, progress=False)
    pipe.inpaint("x", [1], scene(), Image.new("L", (32, 32), 255), steps=2, progress=False)
    assert "covers the whole image" in caplog.text


def test_inputs_as_people_bring_them(tmp_path):
    """RGBA flattened on white, 16-bit greyscale scaled, palette, EXIF orientation; sides
    down to multiples of the factor; --H/--W in the three resize modes."""
    from ldm.image_io import fit_image, load_image, load_mask
    rgba = Image.new("RGBA", (10, 6), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    rgba.save(tmp_path / "a.png")
    im = load_image(tmp_path / "a.png")
    assert im.mode == "RGB" and im.getpixel((0, 0)) == (0, 0, 255) and im.getpixel((5, 5)) == (255, 255, 255)
    Image.fromarray(np.full((4, 4), 65535, np.uint16)).save(tmp_path / "g16.png")
    assert load_image(tmp_path / "g16.png").getpixel((1, 1)) == (255, 255, 255)
    Image.new("P", (4, 4), 3).save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png").mode == "RGB"
    tall = Image.new("RGB", (8, 4), (0, 0, 0))
    tall.putpixel((7, 0), (255, 255, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: displayed 4 wide, 8 high
    tall.save(tmp_path / "r.jpg", exif=exif, quality=100)
    assert load_image(tmp_path / "r.jpg").size == (4, 8)
    mask = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    mask.putpixel((1, 1), (255, 255, 255, 255))
    mask.save(tmp_path / "m.png")
    m = load_mask(tmp_path / "m.png")
    assert m.mode == "L" and m.getpixel((1, 1)) == 255 and m.getpixel((0, 0)) == 0
    fitted, note = fit_image(Image.new("RGB", (37, 21)), 8)
    assert fitted.size == (32, 16) and "32x16" in note
    for mode in ("resize", "crop", "fill"):
        assert fit_image(Image.new("RGB", (40, 20)), 8, 32, 32, mode)[0].size == (32, 32)


def test_nine_channel_config_is_chosen_from_the_checkpoint(inpainting_ckpt):
    from ldm.config import SD_INPAINTING_CONFIG, choose_model, unet_in_channels
    path, _ = inpainting_ckpt
    assert unet_in_channels(path) == 9
    assert choose_model(path).config_path == SD_INPAINTING_CONFIG


def test_an_inpainting_model_is_blended_too_unless_asked_not_to(inpainting_ckpt):
    """latent_blend (default): the 9-channel model's final latents outside the mask are the
    image's own, as for a text-to-image model; latent_blend=False leaves them to the model
    (diffusers' StableDiffusionInpaintPipeline, cross-checked in test_crosscheck_diffusers)."""
    import torch
    from ldm.pipeline import Pipeline
    _, model = inpainting_ckpt
    pipe = Pipeline(model, torch.device("cpu"), "full")
    image, mask = scene(), box_mask()
    seen = {}
    for blend in (True, False):
        s = pipe.inpaint("a red square", [3], image, mask, steps=4, progress=False,
                         latent_blend=blend, paste_back=False,
                         callback=lambda i, x, x0: seen.__setitem__(blend, x))[0]
        assert s.parameters["latent_blend"] is blend
    small, _ = pipe.latent_mask(mask)
    keep = (small == 0).expand_as(seen[True])
    init = pipe.encode([image])
    assert torch.allclose(seen[True][keep], init.expand_as(seen[True])[keep], atol=1e-6)
    assert not torch.allclose(seen[False][keep], init.expand_as(seen[False])[keep], atol=1e-2)


# ------------------------------------------------------------------------ the scripts

def run_process(name, *args, cwd=None):
    env = dict(os.environ, HF_HOME=str(cwd or "/nonexistent"), HF_HUB_CACHE=str(cwd or "/nonexistent"))
    return subprocess.run([sys.executable, str(SCRIPTS / name), *map(str, args)],
                          capture_output=True, text=True, timeout=240, env=env, cwd=cwd)


# the scripts' main() in this process (seconds less a call); a real process where the
# process itself is what a test is about
run_script = run_here


def tiny_args(ckpt, config=TINY_CONFIG):
    return ["--ckpt", ckpt, "--config", config, "--device", "cpu", "--ddim_steps", "4"]


def test_img2img_script_writes_numbered_samples_with_their_parameters(tmp_path, ckpts):
    scene(40).save(tmp_path / "init.png")  # a multiple of the tiny model's factor 4
    out = tmp_path / "out"
    r = run_process("img2img.py", *tiny_args(ckpts["ckpt"]), "--init-img", tmp_path / "init.png",
                   "--prompt", "a blue square", "--strength", "0.5", "--outdir", out,
                   "--plms", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in (out / "samples").iterdir())
    assert names == ["00000.png", "00001.png"] and (out / "grid-0000.png").exists()
    p = read_parameters(out / "samples" / "00001.png")
    from ldm.checkpoint import file_hash
    assert p["seed"] == 43 and p["strength"] == 0.5 and p["sampler"] == "plms"
    assert p["init_image_sha256"] == file_hash(tmp_path / "init.png", chars=64)
    assert p["scale"] == 5.0 and p["task"] == "img2img"
    assert Image.open(out / "samples" / "00000.png").size == (40, 40)


def test_inpaint_script_three_ways_in(tmp_path, ckpts, inpainting_ckpt):
    image, mask = tmp_path / "img.png", tmp_path / "mask.png"
    scene().save(image)
    box_mask().save(mask)
    # 1. a text-to-image checkpoint: latent blending, numbered samples and a grid
    r = run_script("inpaint.py", *tiny_args(ckpts["ckpt"]), "--image", image, "--mask", mask,
                   "--prompt", "a circle", "--outdir", tmp_path / "a", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    p = read_parameters(tmp_path / "a" / "samples" / "00000.png")
    assert p["task"] == "inpaint" and p["inpainting_model"] is False and p["mask_blur"] == 4
    assert (tmp_path / "a" / "grid-0000.png").exists()
    # 2. a dedicated 9-channel checkpoint, its config found from its weights
    path, _ = inpainting_ckpt
    r = run_script("inpaint.py", "--ckpt", path, "--device", "cpu", "--ddim_steps", "3",
                   "--image", image, "--mask", mask, "--outdir", tmp_path / "b", cwd=tmp_path)
    # the SD inpainting config is SD-sized: this tiny checkpoint does not fit it
    assert r.returncode != 0 and "does not match" in r.stderr
    r = run_script("inpaint.py", "--ckpt", path, "--config", TINY_INPAINTING, "--device", "cpu",
                   "--ddim_steps", "3", "--image", image, "--mask", mask, "--outdir",
                   tmp_path / "b", "--n_samples", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert read_parameters(tmp_path / "b" / "samples" / "00000.png")["inpainting_model"] is True
    # 3. the CompVis batch form: NAME.png + NAME_mask.png -> OUTDIR/NAME.png
    indir = tmp_path / "in"
    indir.mkdir()
    for name in ("one", "two"):
        scene(seed=len(name)).save(indir / f"{name}.png")
        box_mask().save(indir / f"{name}_mask.png")
    r = run_script("inpaint.py", *tiny_args(ckpts["ckpt"]), "--indir", indir, "--outdir",
                   tmp_path / "c", "--steps", "3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["one.png", "two.png"]
    first = (tmp_path / "c" / "one.png").read_bytes()
    r = run_script("inpaint.py", *tiny_args(ckpts["ckpt"]), "--indir", indir, "--outdir",
                   tmp_path / "c", cwd=tmp_path)  # again: what is done is kept, not redone
    assert r.returncode == 0 and "already in" in r.stderr
    assert (tmp_path / "c" / "one.png").read_bytes() == first


def test_txt2img_and_img2img_refuse_an_inpainting_model(tmp_path, inpainting_ckpt):
    path, _ = inpainting_ckpt
    scene().save(tmp_path / "i.png")
    for script, extra in (("txt2img.py", []), ("img2img.py", ["--init-img", tmp_path / "i.png"])):
        for config in (["--config", TINY_INPAINTING], []):  # given, or found from the weights
            r = run_script(script, "--ckpt", path, *config, "--outdir", tmp_path / "o", *extra,
                           cwd=tmp_path)
            assert r.returncode != 0 and r.stderr.count("\n") == 1, r.stderr
            assert "use scripts/inpaint.py" in r.stderr
    assert not (tmp_path / "o").exists()


def bad_inputs(tmp_path):
    f = tmp_path / "in"
    f.mkdir()
    scene().save(f / "img.png")
    box_mask().save(f / "mask.png")
    Image.new("L", (32, 32), 0).save(f / "black.png")
    Image.new("RGB", (3, 3)).save(f / "tiny.png")  # the tiny model's factor is 4
    (f / "text.png").write_text("not an image")
    (f / "empty").mkdir()
    (f / "nomask").mkdir()
    scene().save(f / "nomask" / "a.png")
    (f / "noimage").mkdir()
    box_mask().save(f / "noimage" / "a_mask.png")
    (f / "twice").mkdir()
    scene().save(f / "twice" / "a.png")
    scene().save(f / "twice" / "a.jpg")
    box_mask().save(f / "twice" / "a_mask.png")
    return f


@pytest.mark.parametrize("script,args,needle", [
    ("img2img.py", [], "the following arguments are required: --init-img"),
    ("img2img.py", ["--init-img", "{f}/nope.png"], "init image not found"),
    ("img2img.py", ["--init-img", "{f}/text.png"], "cannot read"),
    ("img2img.py", ["--init-img", "{f}"], "is a folder"),
    ("img2img.py", ["--init-img", "{f}/tiny.png"], "too small"),
    ("img2img.py", ["--init-img", "{f}/img.png", "--strength", "1.5"], "must be in [0, 1]"),
    ("img2img.py", ["--init-img", "{f}/img.png", "--strength", "nan"], "not a finite"),
    ("img2img.py", ["--init-img", "{f}/img.png", "--H", "30"], "not a multiple of 4"),
    ("inpaint.py", ["--image", "{f}/img.png"], "give --image and --mask"),
    ("inpaint.py", ["--image", "{f}/img.png", "--mask", "{f}/black.png"], "is empty"),
    ("inpaint.py", ["--image", "{f}/img.png", "--mask", "{f}/nope.png"], "mask not found"),
    ("inpaint.py", ["--image", "{f}/text.png", "--mask", "{f}/mask.png"], "cannot read"),
    ("inpaint.py", ["--image", "{f}/img.png", "--mask", "{f}/mask.png", "--strength", "-1"],
     "must be in [0, 1]"),
    ("inpaint.py", ["--image", "{f}/img.png", "--mask", "{f}/mask.png", "--no-latent-blend"],
     "--no-latent-blend is for an inpainting model"),
    ("inpaint.py", ["--indir", "{f}/empty"], "holds no NAME.png"),
    ("inpaint.py", ["--indir", "{f}/nomask"], "has no mask beside it"),
    ("inpaint.py", ["--indir", "{f}/noimage"], "has no image beside it"),
    ("inpaint.py", ["--indir", "{f}/nope"], "is not a folder"),
    ("inpaint.py", ["--indir", "{f}/twice"], "several images named a.*"),
    ("inpaint.py", ["--indir", "{f}/twice", "--image", "{f}/img.png"], "not both"),
])
def test_bad_inputs_are_one_line_and_write_nothing(tmp_path, ckpts, script, args, needle):
    f = bad_inputs(tmp_path)
    out = tmp_path / "out"
    run = run_process if needle.startswith("the following") or "twice" in str(args) else run_script
    r = run(script, *tiny_args(ckpts["ckpt"]), *[a.format(f=f) for a in args],
            "--outdir", out, cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
    assert not out.exists()


def test_inpainting_looks_for_sd_inpainting_first(tmp_path, monkeypatch, inpainting_ckpt):
    import shutil
    import ldm.config as config
    path, _ = inpainting_ckpt
    sd_inpainting, sd = tmp_path / "inpainting.ckpt", tmp_path / "model.ckpt"
    monkeypatch.setattr(config, "SD_INPAINTING_CKPT", sd_inpainting)
    monkeypatch.setattr(config, "SD_CKPT", sd)
    monkeypatch.setattr(config, "BUILTIN_INPAINTING_DIR", tmp_path / "builtin-inpainting")
    assert config.choose_model(task="inpaint").ckpt.parent == config.BUILTIN_DIR  # neither
    shutil.copy(path, sd)
    assert config.choose_model(task="inpaint").ckpt == sd
    (tmp_path / "builtin-inpainting").mkdir()
    shutil.copy(path, tmp_path / "builtin-inpainting" / "model.safetensors")
    (tmp_path / "builtin-inpainting" / "config.yaml").write_text(TINY_INPAINTING.read_text())
    choice = config.choose_model(task="inpaint")  # the built-in inpainting model before SD's
    assert choice.builtin and choice.ckpt.parent == tmp_path / "builtin-inpainting"  # text-to-image
    shutil.copy(path, sd_inpainting)
    choice = config.choose_model(task="inpaint")
    assert choice.ckpt == sd_inpainting and choice.config_path == config.SD_INPAINTING_CONFIG
    assert config.choose_model().ckpt == sd  # txt2img keeps SD's text-to-image model


def test_a_mask_of_another_size_is_resized_with_one_line(tmp_path, ckpts):
    scene().save(tmp_path / "img.png")
    box_mask(16).save(tmp_path / "mask.png")
    r = run_script("inpaint.py", *tiny_args(ckpts["ckpt"]), "--image", tmp_path / "img.png",
                   "--mask", tmp_path / "mask.png", "--outdir", tmp_path / "o", "--n_samples",
                   "1", "--skip_grid", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "warning: resized the 16x16 mask to the image's 32x32" in r.stderr.splitlines()
    assert Image.open(tmp_path / "o" / "samples" / "00000.png").size == (32, 32)


def test_indir_skips_a_pair_whose_mask_is_empty_and_says_things_once(tmp_path, ckpts):
    """One empty mask among the pairs is skipped with a line (as an orphan image would not
    stop the batch); a full mask is warned about once; the progress is labelled as with
    --image."""
    indir = tmp_path / "in"
    indir.mkdir()
    masks = {"a": box_mask(), "b": Image.new("L", (32, 32), 0), "c": Image.new("L", (32, 32), 255)}
    for name, mask in masks.items():
        scene(seed=ord(name)).save(indir / f"{name}.png")
        mask.save(indir / f"{name}_mask.png")
    r = run_script("inpaint.py", *tiny_args(ckpts["ckpt"]), "--indir", indir, "--outdir",
                   tmp_path / "out", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "c.png"]
    lines = r.stderr.splitlines()
    assert [line for line in lines if "b_mask" in line] == [
        f"warning: the mask {indir / 'b_mask.png'} is empty (all black): nothing to repaint; "
        "paint the part to change in white: skipped"]
    assert sum("covers the whole image" in line for line in lines) == 1
    assert any(line.startswith("sampling: ") for line in lines), lines
    image = tmp_path / "c.png"
    scene().save(image)
    r = run_script("inpaint.py", *tiny_args(ckpts["ckpt"]), "--image", image, "--mask",
                   indir / "c_mask.png", "--n_iter", "2", "--outdir", tmp_path / "o2",
                   cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("covers the whole image") == 1
    assert any(line.startswith("sampling: ") for line in r.stderr.splitlines())
