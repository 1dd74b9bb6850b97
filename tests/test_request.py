"""One request, validated once (``ldm.request``): the library as strict as the command line,
one place for defaults, images as people hold them, big and odd-sized inputs."""
import math
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, TINY_CONFIG
from ldm.errors import LdmError, UsageError, WrongType

sys.path.insert(0, str(ROOT / "scripts"))
import img2img  # noqa: E402
import txt2img  # noqa: E402


@pytest.fixture(scope="module")
def pipe(tiny_model):
    from ldm.pipeline import Pipeline
    return Pipeline(tiny_model, device=None, precision="full", watermark=False)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("photo") / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
    return path


# (task, field, the command line's value, the library's value, what both messages say).
# The command line names the field by its flag (ldm.request.FLAGS), the library by its
# keyword; the rest of the message is the same.
BAD_VALUES = [
    ("txt2img", "scale", "nan", math.nan, "nan is not a finite number"),
    ("txt2img", "scale", "inf", math.inf, "inf is not a finite number"),
    ("txt2img", "scale", "-5", -5, "-5 is out of range: must be in [0, 100]"),
    ("txt2img", "scale", "101", 101, "101 is out of range: must be in [0, 100]"),
    ("txt2img", "eta", "5", 5, "5 is out of range: must be in [0, 1]"),
    ("txt2img", "eta", "nan", math.nan, "nan is not a finite number"),
    ("txt2img", "rescale", "1.5", 1.5, "1.5 is out of range: must be in [0, 1]"),
    ("txt2img", "rescale", "nan", math.nan, "nan is not a finite number"),
    ("txt2img", "steps", "0", 0, "0 is out of range: must be in [1, 1000]"),
    ("txt2img", "steps", "1001", 1001, "1001 is out of range: must be in [1, 1000]"),
    ("txt2img", "steps", "2.5", 2.5, "2.5 is not an integer"),
    ("txt2img", "seeds", "1.5", [1.5], "1.5 is not an integer"),
    ("txt2img", "seeds", str(2 ** 64), [2 ** 64], "out of range: seeds are 0 to 2**64 - 1"),
    ("txt2img", "seeds", "-2", [-2], "(or -1 for a random one)"),
    ("txt2img", "height", "30", 30, "multiples of 4"),
    ("txt2img", "width", "0", 0, "0 is out of range: must be at least 1"),
    ("txt2img", "sampler", "dpm fast", "dpm fast", "unknown sampler 'dpm fast'"),
    ("img2img", "strength", "1.5", 1.5, "1.5 is out of range: must be in [0, 1]"),
    ("img2img", "strength", "-0.1", -0.1, "-0.1 is out of range: must be in [0, 1]"),
]


def cli_args(task, flag, value, photo, ckpts, tmp_path):
    argv = ["--ckpt", str(ckpts["ckpt"]), "--config", str(TINY_CONFIG), "--device", "cpu",
            "--ddim_steps", "2", "--n_samples", "1", "--n_iter", "1",
            "--outdir", str(tmp_path / "o"), f"{flag}={value}"]
    return argv + (["--init-img", str(photo)] if task == "img2img" else [])


@pytest.mark.parametrize("task,field,text,value,needle", BAD_VALUES,
                         ids=[f"{r[1]}={r[2]}" for r in BAD_VALUES])
def test_a_bad_value_is_the_same_error_in_the_library_and_on_the_command_line(
        tmp_path, capsys, pipe, photo, ckpts, task, field, text, value, needle):
    from ldm.request import FLAGS
    script = txt2img if task == "txt2img" else img2img
    rc = script.main(cli_args(task, FLAGS[field], text, photo, ckpts, tmp_path))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert FLAGS[field] in err or field == "sampler"
    assert not (tmp_path / "o").exists()
    kwargs = {"prompts": "a red circle", "seeds": [1], "steps": 2, "progress": False}
    kwargs["seeds" if field == "seeds" else field] = value
    call = pipe.generate if task == "txt2img" else (
        lambda **kw: pipe.img2img(image=str(photo), **kw))
    with pytest.raises(LdmError) as e:
        call(**kwargs)
    assert isinstance(e.value, (ValueError, TypeError)) and needle in str(e.value)
    assert f"{field}" in str(e.value) or field == "sampler"
    assert "--" not in str(e.value).replace("2**64 - 1", ""), "library words, not flags"


@pytest.mark.parametrize("kwargs,kind,needle", [
    ({"seeds": ["7"]}, WrongType, "seeds: '7' is not an integer"),
    ({"seeds": [True]}, WrongType, "seeds: True is not an integer"),
    ({"seeds": []}, UsageError, "seeds is empty"),
    ({"scale": "7"}, WrongType, "scale: '7' is not a number"),
    ({"prompts": None}, WrongType, "prompts must be a string or a list of strings"),
    ({"prompts": ["a", 3]}, WrongType, "prompts must be strings, got int 3"),
    ({"negative_prompts": ["a", "b"]}, UsageError, "one negative_prompts per prompt"),
    ({"sampler": 3}, WrongType, "sampler must be a sampler's name"),
    ({"sampler": "plms", "eta": 0.5}, UsageError, "PLMS is deterministic"),
    ({"sampler": "ddim", "schedule": "karras"}, UsageError, "runs on the model's own timesteps"),
])
def test_library_only_mistakes_are_its_own_error_kinds(pipe, kwargs, kind, needle):
    call = {"prompts": "a red circle", "seeds": [1], "steps": 2, "progress": False, **kwargs}
    with pytest.raises(kind, match=needle.replace("(", r"\(").replace(")", r"\)")):
        pipe.generate(**call)


def test_images_as_a_path_a_numpy_array_and_pil_make_the_same_image(pipe, photo):
    kw = dict(strength=0.5, steps=4, progress=False)
    from_pil = pipe.img2img("a red circle", [3], Image.open(photo), **kw)[0].image
    from_path = pipe.img2img("a red circle", [3], str(photo), **kw)[0].image
    array = np.asarray(Image.open(photo))
    from_uint8 = pipe.img2img("a red circle", [3], array, **kw)[0].image
    from_float = pipe.img2img("a red circle", [3], array / 255.0, **kw)[0].image
    assert from_pil.tobytes() == from_path.tobytes() == from_uint8.tobytes()
    assert from_float.tobytes() == from_uint8.tobytes()
    mask = np.zeros((32, 32), bool)
    mask[8:24, 8:24] = True
    s = pipe.inpaint("a red circle", [3], array, mask, steps=2, progress=False)[0]
    assert s.image.size == (32, 32)
    for bad, kind, needle in [(None, WrongType, "image is missing"),
                              (5, WrongType, "must be a PIL image, a path or a numpy array"),
                              (np.zeros((4, 4, 2), np.uint8), UsageError, "H x W or H x W x 3"),
                              (np.full((8, 8), 2.0), UsageError, "values in [0, 1]"),
                              ("no/such/photo.png", LdmError, "not found")]:
        with pytest.raises(kind, match=needle.replace("[", r"\[").replace("]", r"\]")):
            pipe.img2img("x", [1], bad, steps=2, progress=False)


def test_a_random_seed_is_drawn_recorded_and_makes_the_image_again(pipe, caplog):
    caplog.set_level("INFO")
    s = pipe.generate("a red circle", [-1], steps=2, progress=False)[0]
    seed = s.parameters["seed"]
    assert 0 <= seed < 2 ** 32 and f"seed: {seed}" in caplog.text
    again = pipe.generate("a red circle", [seed], steps=2, progress=False)[0]
    assert again.image.tobytes() == s.image.tobytes()


def test_the_same_call_makes_the_same_image_in_the_library_and_the_scripts(tmp_path, photo):
    """No sampler, steps or scale given: the built-in model's defaults in both (DDIM 50,
    its own guidance 4.0, for image-to-image too)."""
    from ldm.pipeline import Pipeline
    builtin = Pipeline.load(safety=False, device="cpu")
    assert builtin.info.default("scale", "img2img") == 4.0
    lib = builtin.generate("a red circle", [5], progress=False)[0]
    assert (lib.parameters["sampler"], lib.parameters["steps"], lib.parameters["scale"]) == \
        ("ddim", 50, 4.0)
    assert txt2img.main(["--prompt", "a red circle", "--seed", "5", "--n_samples", "1",
                         "--n_iter", "1", "--outdir", str(tmp_path / "t"), "--skip_grid",
                         "--safety_checker", "none", "--device", "cpu"]) == 0
    cli = Image.open(tmp_path / "t" / "samples" / "00000.png")
    lib_i2i = builtin.img2img("a red circle", [5], str(photo), progress=False)[0]
    assert lib_i2i.parameters["scale"] == 4.0 and lib_i2i.parameters["strength"] == 0.75
    assert img2img.main(["--prompt", "a red circle", "--seed", "5", "--n_samples", "1",
                         "--init-img", str(photo), "--outdir", str(tmp_path / "i"),
                         "--skip_grid", "--safety_checker", "none", "--device", "cpu"]) == 0
    cli_i2i = Image.open(tmp_path / "i" / "samples" / "00000.png")
    # the library's images carry no watermark by default either way at 64x64
    assert np.array_equal(np.asarray(cli.convert("RGB")), np.asarray(lib.image))
    assert np.array_equal(np.asarray(cli_i2i.convert("RGB")), np.asarray(lib_i2i.image))


def test_sd_defaults_follow_compvis(monkeypatch):
    from ldm.request import ModelInfo
    sd = ModelInfo(8, 512)
    assert [sd.default(k) for k in ("sampler", "steps", "scale")] == ["ddim", 50, 7.5]
    assert sd.default("scale", "img2img") == 5.0 and sd.default("strength", "img2img") == 0.75
    own = ModelInfo(4, 64, defaults={"scale": 4.0})
    assert own.default("scale", "img2img") == own.default("scale") == 4.0


def test_inpainting_returns_the_input_size_with_every_unmasked_pixel_exact(pipe):
    """A 34x33 photo on a model of factor 4: sampled at 32x32, returned at 34x33."""
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 255, (33, 34, 3), dtype=np.uint8))
    mask = np.zeros((33, 34), np.uint8)
    mask[8:25, 6:22] = 255
    for blur in (0, 4):
        s = pipe.inpaint("a red circle", [2], image, mask, steps=2, mask_blur=blur,
                         progress=False)[0]
        assert s.image.size == (34, 33)
        out, inp = np.asarray(s.image), np.asarray(image)
        assert np.array_equal(out[mask == 0], inp[mask == 0])
        assert not np.array_equal(out[mask == 255], inp[mask == 255])
        assert (s.parameters["width"], s.parameters["height"]) == (32, 32)
        assert s.parameters["output_size"] == "34x33"


def test_a_big_input_is_sampled_at_the_model_area_unless_asked(caplog):
    from ldm.request import working_size
    size, note = working_size((4000, 3000), 8, 512)
    assert size == (592, 440) and "4000x3000 image is 46x the model's 512x512 area" in note
    assert "--full-size" not in note and "full_size=True keeps 4000x3000" in note
    assert working_size((4000, 3000), 8, 512, full_size=True) == ((4000, 3000), None)
    assert working_size((1024, 1024), 8, 512) == ((1024, 1024), None)  # 4x: kept
    assert working_size((4000, 3000), 8, 512, height=512, width=768) == ((768, 512), None)
    assert working_size((66, 65), 8, 512)[0] == (64, 64)


def test_the_batch_size_is_recorded(pipe):
    samples = pipe.generate("a red circle", [1, 2], steps=2, progress=False)
    assert [s.parameters["batch_size"] for s in samples] == [2, 2]


def test_a_long_autoencoder_attention_is_said_with_what_splits_it():
    from ldm.config import SD_CONFIG, geometry, load_config
    from ldm.request import FLAGS, check_work
    sd = geometry(load_config(SD_CONFIG))
    assert check_work(sd, 2048, 2048) is None  # 16x the area of 512x512: said from past it
    line = check_work(sd, 3000, 4000, names=FLAGS)
    assert line.startswith("the autoencoder attends over all 187,500 latent pixels of a "
                           "4000x3000 image at once, 2,095x the work at the model's own size")
    assert line.endswith("--vae_tiling splits it into tiles")
    assert check_work(sd, 3000, 4000, vae_tile=64) is None
