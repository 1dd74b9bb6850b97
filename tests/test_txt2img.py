"""scripts/txt2img.py end to end on a tiny random checkpoint in the official key layout."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import ROOT, TINY_CONFIG, V1_CONFIG, official_layout
from ldm.checkpoint import file_hash
from ldm.image_io import read_parameters

SCRIPT = ROOT / "scripts" / "txt2img.py"
sys.path.insert(0, str(SCRIPT.parent))
import txt2img  # noqa: E402


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tiny_model):
    folder = tmp_path_factory.mktemp("ckpt")
    sd = official_layout(tiny_model)
    ckpt = folder / "tiny.ckpt"
    torch.save({"state_dict": sd, "global_step": 7, "epoch": 1}, ckpt)
    st = folder / "tiny.safetensors"
    save_file({k: v.half().contiguous() if v.is_floating_point() else v.contiguous()
               for k, v in sd.items()}, st)
    return {"ckpt": ckpt, "safetensors": st}


def run(capsys, *args):
    rc = txt2img.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def base_args(ckpt, outdir, *extra):
    return ["--ckpt", ckpt, "--config", TINY_CONFIG, "--outdir", outdir, "--ddim_steps", 3,
            "--device", "cpu", *extra]


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), np.int16)


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_files_metadata_and_numbering(tmp_path, capsys, ckpts, fmt):
    out = tmp_path / "out"
    rc, _, err = run(capsys, *base_args(ckpts[fmt], out, "--plms", "--n_samples", 2,
                                        "--n_iter", 2, "--prompt", "a red circle",
                                        "--negative-prompt", "blue"))
    assert rc == 0, err
    names = sorted(p.name for p in (out / "samples").iterdir())
    assert names == ["00000.png", "00001.png", "00002.png", "00003.png"]
    assert sorted(p.name for p in out.glob("grid-*.png")) == ["grid-0000.png"]
    for k, name in enumerate(names):
        p = read_parameters(out / "samples" / name)
        assert p["seed"] == 42 + k and p["prompt"] == "a red circle"
        assert p["negative_prompt"] == "blue" and p["sampler"] == "plms"
        assert (p["steps"], p["scale"], p["eta"], p["width"], p["height"]) == (3, 7.5, 0.0, 32, 32)
        assert p["checkpoint_hash"] == file_hash(ckpts[fmt])
        assert p["watermark"].startswith("none")  # 32x32 cannot carry the mark
        assert Image.open(out / "samples" / name).size == (32, 32)
    assert Image.open(out / "grid-0000.png").size == (2 * 34 + 2, 2 * 34 + 2)
    # a second run continues the numbering and leaves the first run's files alone
    first = (out / "samples" / "00000.png").read_bytes()
    rc, _, err = run(capsys, *base_args(ckpts[fmt], out, "--n_samples", 1, "--n_iter", 1))
    assert rc == 0, err
    assert sorted(p.name for p in (out / "samples").iterdir())[-1] == "00004.png"
    assert (out / "grid-0001.png").exists() and (out / "samples" / "00000.png").read_bytes() == first


@pytest.mark.parametrize("sampler_args", [["--plms"], ["--ddim_eta", "0.5"]])
def test_image_k_regenerates_alone(tmp_path, capsys, ckpts, sampler_args):
    """Reproducibility contract: --seed S+k --n_samples 1 --n_iter 1 remakes image k."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(capsys, *base_args(ckpts["ckpt"], a, *sampler_args, "--n_samples", 2,
                                  "--n_iter", 2, "--skip_grid"))[0] == 0
    assert run(capsys, *base_args(ckpts["ckpt"], b, *sampler_args, "--seed", 45,
                                  "--n_samples", 1, "--n_iter", 1, "--skip_grid"))[0] == 0
    k3, alone = pixels(a / "samples" / "00003.png"), pixels(b / "samples" / "00000.png")
    assert np.abs(k3 - alone).max() <= 1
    assert np.abs(pixels(a / "samples" / "00002.png") - alone).max() > 10  # seeds matter


def test_fixed_code_gives_every_image_image_0s_noise(tmp_path, capsys, ckpts):
    out = tmp_path / "o"
    assert run(capsys, *base_args(ckpts["ckpt"], out, "--fixed_code", "--n_samples", 2,
                                  "--n_iter", 1, "--skip_grid"))[0] == 0
    a, b = (pixels(out / "samples" / f"0000{i}.png") for i in range(2))
    assert np.abs(a - b).max() <= 1
    assert read_parameters(out / "samples" / "00001.png")["fixed_code"] is True


def test_prompt_file_with_bom_crlf_and_blank_lines(tmp_path, capsys, ckpts):
    f = tmp_path / "prompts.txt"
    f.write_bytes("\ufeffa red circle\r\n\r\n   \r\na blue square\r\nun carré vert\r\n".encode("utf-8"))
    out = tmp_path / "o"
    rc, _, err = run(capsys, *base_args(ckpts["ckpt"], out, "--from-file", f, "--n_samples", 2,
                                        "--n_iter", 1))
    assert rc == 0, err
    got = [read_parameters(p) for p in sorted((out / "samples").iterdir())]
    assert [(g["prompt"], g["seed"]) for g in got] == [
        ("a red circle", 42), ("a blue square", 43), ("un carré vert", 44)]


def test_overlong_prompt_warns_where_it_is_cut(tmp_path, capsys, caplog, ckpts):
    prompt = " ".join(f"word{i:02d}" for i in range(40))  # 120 tokens
    rc, _, err = run(capsys, *base_args(ckpts["ckpt"], tmp_path / "o", "--prompt", prompt,
                                        "--n_samples", 1, "--n_iter", 1))
    assert rc == 0
    text = caplog.text
    assert "cut" in text and "word25 word26" in text and "word24" not in text.split("dropped")[1]


# ----------------------------------------------------------------------------- bad input

def one_line_error(rc, err, *needles):
    lines = [l for l in err.strip().splitlines() if l.startswith("error:")]
    assert rc != 0 and len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


def test_missing_checkpoint(tmp_path, capsys):
    rc, _, err = run(capsys, "--ckpt", tmp_path / "nope.ckpt", "--outdir", tmp_path / "o")
    one_line_error(rc, err, "not found", "nope.ckpt")


def test_truncated_checkpoint(tmp_path, capsys, ckpts):
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(ckpts["ckpt"].read_bytes()[:5000])
    rc, _, err = run(capsys, *base_args(cut, tmp_path / "o"))
    one_line_error(rc, err, "cut.ckpt")
    assert not (tmp_path / "o" / "samples").exists() or not any((tmp_path / "o" / "samples").iterdir())


def test_wrong_architecture_names_the_config(tmp_path, capsys, ckpts):
    rc, _, err = run(capsys, "--ckpt", ckpts["safetensors"], "--config", V1_CONFIG,
                     "--outdir", tmp_path / "o", "--device", "cpu")
    one_line_error(rc, err, "does not match")


@pytest.mark.parametrize("size", [["--H", "30"], ["--W", "0"]])
def test_sizes_the_model_cannot_take(tmp_path, capsys, ckpts, size):
    rc, _, err = run(capsys, *base_args(ckpts["ckpt"], tmp_path / "o", *size))
    one_line_error(rc, err, "multiples of 4")


@pytest.mark.parametrize("content,needle", [(b"\n \r\n", "no prompts"),
                                            (b"\xff\xfe\x00bad", "UTF-8"), (None, "not found")])
def test_bad_prompt_files(tmp_path, capsys, ckpts, content, needle):
    f = tmp_path / "p.txt"
    if content is not None:
        f.write_bytes(content)
    rc, _, err = run(capsys, *base_args(ckpts["ckpt"], tmp_path / "o", "--from-file", f))
    one_line_error(rc, err, needle)


def test_unwritable_outdir(tmp_path, capsys, ckpts):
    (tmp_path / "blocker").write_text("a file, not a folder")
    rc, _, err = run(capsys, *base_args(ckpts["ckpt"], tmp_path / "blocker" / "out"))
    one_line_error(rc, err, "--outdir")


def test_pickle_that_runs_code_is_refused(tmp_path, capsys):
    import pickle

    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))
    bad = tmp_path / "evil.ckpt"
    bad.write_bytes(pickle.dumps({"state_dict": Exploit()}))
    rc, out, err = run(capsys, "--ckpt", bad, "--config", TINY_CONFIG, "--outdir", tmp_path / "o")
    one_line_error(rc, err, "evil.ckpt")
    assert "pwned" not in out


def test_ctrl_c_keeps_finished_images(tmp_path, capsys, ckpts, monkeypatch):
    from ldm.pipeline import Txt2Img
    real, calls = Txt2Img.generate, []

    def generate(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *a, **k)
    monkeypatch.setattr(Txt2Img, "generate", generate)
    out = tmp_path / "o"
    rc, _, err = run(capsys, *base_args(ckpts["ckpt"], out, "--n_samples", 1, "--n_iter", 3))
    assert rc == 130 and "interrupted" in err and "Traceback" not in err
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["00000.png"]
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temp files left


def test_no_model_at_all_says_where_to_put_weights(tmp_path, capsys, monkeypatch):
    import ldm.pipeline as pipeline
    monkeypatch.setattr(pipeline, "SD_CKPT", tmp_path / "sd" / "model.ckpt")
    monkeypatch.setattr(pipeline, "BUILTIN_DIR", tmp_path / "builtin")
    rc, _, err = run(capsys, "--outdir", tmp_path / "o")
    one_line_error(rc, err, "models/ldm/stable-diffusion-v1/model.ckpt")


def test_command_line_error_has_no_traceback(tmp_path):
    """As a real process: exit status and stderr of a bad run."""
    r = subprocess.run([sys.executable, str(SCRIPT), "--ckpt", str(tmp_path / "x.ckpt"),
                        "--outdir", str(tmp_path / "o")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: checkpoint not found")


def test_512_sample_carries_the_watermark(ckpts):
    """A 512x512 decoded sample of the tiny model goes through finish() and reads back."""
    from ldm.pipeline import Txt2Img
    from ldm.watermark import WATERMARK, read_watermark
    pipe = Txt2Img.load(ckpts["ckpt"], TINY_CONFIG, device="cpu", safety=False)
    z = torch.randn(1, 4, 128, 128, generator=torch.Generator().manual_seed(0)) * 0.3
    images, notes = pipe.finish(pipe.decode(z))
    assert images[0].size == (512, 512)
    assert notes[0]["watermark"] == WATERMARK and read_watermark(images[0]) == WATERMARK


def test_model_config_sampling_defaults(tmp_path, capsys, ckpts):
    """A config's `sampling: scale:` is the default guidance; --scale still wins; the images
    differ, and each PNG records the scale that made it."""
    config = tmp_path / "with-defaults.yaml"
    config.write_text(TINY_CONFIG.read_text() + "\nsampling:\n  scale: 3.0\n")
    runs = {}
    for name, extra in [("default", []), ("flag", ["--scale", "7.5"])]:
        out = tmp_path / name
        args = base_args(ckpts["ckpt"], out, "--n_samples", 1, "--n_iter", 1, "--skip_grid", *extra)
        args[args.index("--config") + 1] = config
        rc, _, err = run(capsys, *args)
        assert rc == 0, err
        runs[name] = out / "samples" / "00000.png"
    assert read_parameters(runs["default"])["scale"] == 3.0
    assert read_parameters(runs["flag"])["scale"] == 7.5
    assert np.abs(pixels(runs["default"]) - pixels(runs["flag"])).max() > 0
    config.write_text(TINY_CONFIG.read_text() + "\nsampling:\n  steps: 3\n")
    with pytest.raises(ValueError, match="unknown sampling defaults"):
        from ldm.pipeline import sampling_defaults
        sampling_defaults(config)
    config.write_text(TINY_CONFIG.read_text() + "\nsampling:\n  timestep_spacing: leading\n")
    with pytest.raises(ValueError, match="timestep_spacing must be one of"):
        sampling_defaults(config)
