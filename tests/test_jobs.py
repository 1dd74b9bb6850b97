"""JSONL prompt files (``ldm.jobs``): every line checked before the load, images numbered
and seeded by the prompt file alone, per-line settings applied."""
import json
import sys

import pytest

from conftest import ROOT, TINY_CONFIG
from ldm.image_io import read_parameters

sys.path.insert(0, str(ROOT / "scripts"))


def write(path, *lines):
    path.write_text("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in lines)
                    + "\n", "utf-8")
    return path


@pytest.mark.parametrize("line,says", [
    ('{"prompt": "a", ', "line 2 is not JSON"),
    ('["a red circle"]', "line 2 is a JSON list"),
    ({"prompt": "a", "stpes": 20}, "line 2: unknown key 'stpes'"),
    ({"prompt": "a", "steps": "20"}, 'line 2: steps must be an integer in [1, 1000], got "20"'),
    ({"prompt": "a", "n": -1}, "line 2: n must be an integer in [1, 100000], got -1"),
    ({"prompt": "a", "scale": 1e9}, "line 2: scale must be a number in [0, 100]"),
    ({"prompt": "a", "seed": True}, "line 2: seed must be an integer"),
    ({"negative_prompt": "b"}, 'line 2 has no "prompt"'),
    ({"prompt": "  "}, "line 2: the prompt is empty"),
    ({"prompt": "a", "sampler": "dpm fast"}, "line 2: unknown sampler 'dpm fast'"),
    ({"prompt": "a", "H": 30}, "line 2: --H and --W must be positive multiples of 4"),
    ({"prompt": "a", "steps": 1001}, "steps must be an integer in [1, 1000]"),
])
def test_a_bad_jsonl_line_is_one_line_naming_it_before_the_load(tmp_path, ckpts, capsys,
                                                                 monkeypatch, line, says):
    import txt2img
    from ldm import pipeline
    loads = []
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: loads.append(a))
    prompts = write(tmp_path / "p.jsonl", {"prompt": "fine"}, line)
    code = txt2img.main(["--ckpt", str(ckpts["ckpt"]), "--config", str(TINY_CONFIG),
                         "--device", "cpu", "--from-file", str(prompts),
                         "--outdir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 3 and not loads and err.count("\n") == 1, err
    assert says in err and str(prompts) in err
    assert not (tmp_path / "out").exists()


def test_images_are_numbered_and_seeded_by_the_prompt_file_alone():
    from ldm.jobs import parse_jsonl, plan
    requests = parse_jsonl("\n".join([json.dumps({"prompt": "a", "n": 2}), "",
                                      json.dumps({"prompt": "b", "seed": 100, "n": 3}),
                                      json.dumps({"prompt": "c"})]), "p.jsonl")
    images = plan(requests, seed=42)
    assert [(i.k, i.request.prompt, i.j, i.seed) for i in images] == [
        (0, "a", 0, 42), (1, "a", 1, 43), (2, "b", 0, 100), (3, "b", 1, 101), (4, "b", 2, 102),
        (5, "c", 0, 47)]
    assert [r.line for r in requests] == [1, 3, 4]


def test_a_jsonl_run_applies_each_lines_settings_and_reproduces(tmp_path, ckpts):
    """Per-line sampler, steps, scale, size, seed and n; a line's image equals the same
    settings given as flags."""
    import txt2img
    prompts = write(tmp_path / "p.jsonl",
                    {"prompt": "a red circle", "n": 2},
                    {"prompt": "a blue square", "negative_prompt": "green", "seed": 9,
                     "steps": 3, "scale": 5.0, "sampler": "DPM++ 2M Karras", "H": 32, "W": 48})
    base = ["--ckpt", str(ckpts["ckpt"]), "--config", str(TINY_CONFIG), "--device", "cpu",
            "--ddim_steps", "2", "--n_samples", "2", "--n_iter", "1", "--H", "32", "--W", "32",
            "--safety_checker", "none"]
    assert txt2img.main(base + ["--from-file", str(prompts), "--outdir", str(tmp_path / "job")]) == 0
    files = sorted((tmp_path / "job" / "samples").glob("*.png"))
    params = [read_parameters(f) for f in files]
    assert [(p["prompt"], p["seed"], p["steps"], p["width"]) for p in params] == [
        ("a red circle", 42, 2, 32), ("a red circle", 43, 2, 32), ("a blue square", 9, 3, 48)]
    assert params[2]["sampler_name"] == "DPM++ 2M Karras" and params[2]["scale"] == 5.0
    assert params[2]["negative_prompt"] == "green"
    assert not list((tmp_path / "job").glob("grid-*.png"))  # sizes differ: no grid
    assert txt2img.main(base[:-10] + [
        "--n_samples", "1", "--n_iter", "1", "--safety_checker", "none", "--prompt",
        "a blue square", "--negative-prompt", "green", "--seed", "9", "--steps", "3",
        "--scale", "5", "--sampler", "DPM++ 2M Karras", "--H", "32", "--W", "48",
        "--outdir", str(tmp_path / "one"), "--skip_grid"]) == 0
    one = next((tmp_path / "one" / "samples").glob("*.png"))
    assert one.read_bytes() == files[2].read_bytes()


def test_img2img_refuses_a_jsonl_file_in_one_line(tmp_path, ckpts, capsys):
    import img2img
    from PIL import Image
    Image.new("RGB", (32, 32)).save(tmp_path / "i.png")
    prompts = write(tmp_path / "p.jsonl", {"prompt": "fine"})
    code = img2img.main(["--ckpt", str(ckpts["ckpt"]), "--config", str(TINY_CONFIG),
                         "--device", "cpu", "--from-file", str(prompts), "--init-img",
                         str(tmp_path / "i.png"), "--outdir", str(tmp_path / "out")])
    assert code == 2 and "JSONL" in capsys.readouterr().err
