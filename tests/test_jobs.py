"""JSONL prompt files (``ldm.jobs``): every line checked before the load, images numbered
and seeded by the prompt file alone, per-line settings applied."""
import json
import sys

import numpy as np
import pytest
from PIL import Image

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
    assert np.array_equal(np.asarray(Image.open(one)), np.asarray(Image.open(files[2])))
    assert [f.name for f in files] == ["000000.png", "000001.png", "000002.png"]
    assert [p["index"] for p in params] == [0, 1, 2]


def test_an_img2img_jsonl_job_applies_each_lines_settings(tmp_path, ckpts):
    """img2img takes JSONL jobs too (the init image's size; a line's H/W is refused); a
    line's image equals the same settings given as flags; a rerun skips it."""
    import img2img
    image = tmp_path / "i.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8)).save(image)
    prompts = write(tmp_path / "p.jsonl", {"prompt": "a red circle", "n": 2},
                    {"prompt": "a blue square", "seed": 9, "steps": 4, "sampler": "euler"})
    base = ["--ckpt", str(ckpts["ckpt"]), "--config", str(TINY_CONFIG), "--device", "cpu",
            "--init-img", str(image), "--ddim_steps", "3", "--n_samples", "2",
            "--safety_checker", "none", "--strength", "0.5"]
    assert img2img.main(base + ["--from-file", str(prompts), "--outdir", str(tmp_path / "job")]) == 0
    files = sorted((tmp_path / "job" / "samples").glob("*.png"))
    params = [read_parameters(f) for f in files]
    assert [(p["prompt"], p["seed"], p["steps"], p["sampler"]) for p in params] == [
        ("a red circle", 42, 3, "ddim"), ("a red circle", 43, 3, "ddim"),
        ("a blue square", 9, 4, "euler")]
    assert img2img.main(base + ["--from-file", str(prompts), "--outdir", str(tmp_path / "job")]) == 0
    assert sorted((tmp_path / "job" / "samples").glob("*.png")) == files
    assert img2img.main(base + ["--prompt", "a blue square", "--seed", "9", "--steps", "4",
                                "--sampler", "euler", "--n_samples", "1", "--outdir",
                                str(tmp_path / "one"), "--skip_grid"]) == 0
    one = next((tmp_path / "one" / "samples").glob("*.png"))
    assert np.array_equal(np.asarray(Image.open(one)), np.asarray(Image.open(files[2])))
    write(prompts, {"prompt": "a", "H": 64})
    assert img2img.main(base + ["--from-file", str(prompts), "--outdir", str(tmp_path / "x")]) == 3


def test_inpaint_refuses_a_jsonl_file_in_one_line(tmp_path, ckpts, capsys):
    import inpaint
    Image.new("RGB", (32, 32)).save(tmp_path / "i.png")
    Image.new("L", (32, 32), 255).save(tmp_path / "m.png")
    prompts = write(tmp_path / "p.jsonl", {"prompt": "fine"})
    code = inpaint.main(["--ckpt", str(ckpts["ckpt"]), "--config", str(TINY_CONFIG),
                         "--device", "cpu", "--from-file", str(prompts), "--image",
                         str(tmp_path / "i.png"), "--mask", str(tmp_path / "m.png"),
                         "--outdir", str(tmp_path / "out")])
    assert code == 2 and "JSONL" in capsys.readouterr().err


def job_args(ckpts, prompts, outdir, *extra):
    return [str(ROOT / "scripts" / "txt2img.py"), "--ckpt", str(ckpts["ckpt"]), "--config",
            str(TINY_CONFIG), "--device", "cpu", "--ddim_steps", "3", "--n_samples", "2",
            "--H", "32", "--W", "32", "--safety_checker", "none", "--from-file", str(prompts),
            "--outdir", str(outdir), *extra]


def contents(folder):
    """{file: bytes} of a job folder's images, and its manifest's entries as a set."""
    files = {p.name: p.read_bytes() for p in sorted((folder / "samples").glob("*.png"))}
    lines = (folder / "manifest.jsonl").read_text().splitlines()
    entries = {json.dumps(json.loads(x), sort_keys=True) for x in lines[1:]}
    return files, lines[0], entries


@pytest.fixture
def seven(tmp_path):
    """A job of 7 images, 5 lines: not a multiple of the batch size (2) or of 2 shards."""
    return write(tmp_path / "p.jsonl", {"prompt": "a red circle", "n": 2}, {"prompt": "a square"},
                 {"prompt": "two stars", "n": 3, "seed": 5}, {"prompt": "a ring"})


def test_a_rerun_skips_what_is_done_and_a_changed_job_is_refused(tmp_path, ckpts, seven):
    import txt2img
    args = job_args(ckpts, seven, tmp_path / "job")[1:]
    assert txt2img.main(args) == 0
    first = contents(tmp_path / "job")
    assert len(first[0]) == 7 and len(first[2]) == 7
    assert txt2img.main(args) == 0  # nothing to do
    assert contents(tmp_path / "job") == first
    seven.write_text(seven.read_text().replace("a ring", "a cross"))
    assert txt2img.main(args) == 3
    assert txt2img.main(args + ["--overwrite"]) == 0
    files, _, entries = contents(tmp_path / "job")
    assert files["000006.png"] != first[0]["000006.png"] and len(entries) == 7


def test_two_shards_make_the_same_files_and_manifest_as_the_whole_job(tmp_path, ckpts, seven):
    import txt2img
    assert txt2img.main(job_args(ckpts, seven, tmp_path / "whole")[1:]) == 0
    for i in (0, 1):
        assert txt2img.main(job_args(ckpts, seven, tmp_path / "split", "--shard", f"{i}/2")[1:]) == 0
    assert contents(tmp_path / "split") == contents(tmp_path / "whole")


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_a_job_killed_mid_way_resumes_to_the_uninterrupted_result(tmp_path, ckpts, seven, sig):
    """Killed once 2 images are recorded: no half-written file remains, and the rerun
    finishes with the files and manifest of a run never interrupted."""
    import signal
    import subprocess
    import time
    import txt2img
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, *job_args(ckpts, seven, out, "--ddim_steps", "40")],
                            stderr=subprocess.PIPE, text=True)
    manifest = out / "manifest.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not manifest.exists()
                                      or len(manifest.read_text().splitlines()) < 3):
        time.sleep(0.05)
    proc.send_signal(getattr(signal, sig))
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode != 0
    if sig == "SIGTERM":
        assert proc.returncode == 143 and err.strip().splitlines()[-1].startswith("terminated:")
    done = contents(out)
    assert 2 <= len(done[2]) < 7 and set(done[0]) == {json.loads(e)["file"][8:] for e in done[2]}
    for p in (out / "samples").iterdir():  # every image there is whole; SIGKILL may
        if p.name.startswith("."):          # leave a hidden temp file, never a PNG
            assert sig == "SIGKILL" and p.name.endswith(".png.tmp")
        else:
            Image.open(p).verify()
    assert txt2img.main(job_args(ckpts, seven, out, "--ddim_steps", "40")[1:]) == 0
    whole40 = tmp_path / "whole40"
    assert txt2img.main(job_args(ckpts, seven, whole40, "--ddim_steps", "40")[1:]) == 0
    assert contents(out) == contents(whole40)


def test_two_worker_processes_write_the_files_of_one(tmp_path, ckpts, seven):
    """--devices 2 --accelerator cpu (Lightning Fabric, gloo): the same files, byte for
    byte, and manifest entries as one process, at the same threads per process (the
    thread count changes float rounding: here 1 of the 21,504 values moved by one level)."""
    import subprocess
    one = subprocess.run([sys.executable, *job_args(ckpts, seven, tmp_path / "one",
                                                    "--threads", "1")],
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, *job_args(ckpts, seven, tmp_path / "two", "--threads",
                                                    "1", "--devices", "2", "--accelerator",
                                                    "cpu", "--strategy", "ddp")],
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    assert contents(tmp_path / "two") == contents(tmp_path / "one")
    assert "7 new images (0 done before)" in two.stdout and "with 2 workers" in two.stdout
    assert two.stdout.count("new images") == 1  # rank 0 speaks for the job
    # one bar for the whole job, rank 0's, counting the other worker's images too
    bar = [line for line in two.stderr.splitlines() if line.startswith("images: ")]
    assert bar and bar[-1].startswith("images: 7/7 images (100%)"), two.stderr
    assert len(bar) == len(set(bar)) <= 10, two.stderr


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_processes_started_by_torchrun_or_srun_join_one_job(tmp_path, ckpts, seven):
    """Lightning's cluster environments: processes that torchrun starts (WORLD_SIZE, RANK,
    ...) or that srun starts (SLURM_NTASKS, SLURM_PROCID, ...; here two on this machine, as
    ``srun`` on one node would) join one job, and write the files of one process."""
    import os
    import subprocess
    flags = ["--threads", "1", "--devices", "2", "--accelerator", "cpu", "--strategy", "ddp"]
    one = subprocess.run([sys.executable, *job_args(ckpts, seven, tmp_path / "one",
                                                    "--threads", "1")],
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    torchrun = subprocess.run([sys.executable, "-m", "torch.distributed.run",
                               "--nproc_per_node", "2", "--master_port", str(free_port()),
                               *job_args(ckpts, seven, tmp_path / "torchrun", *flags)],
                              capture_output=True, text=True, timeout=300)
    assert torchrun.returncode == 0, torchrun.stderr
    assert contents(tmp_path / "torchrun") == contents(tmp_path / "one")
    assert "with 2 workers" in torchrun.stdout
    port = str(free_port())
    tasks = [subprocess.Popen(
        [sys.executable, *job_args(ckpts, seven, tmp_path / "srun", *flags)],
        env=dict(os.environ, SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2",
                 SLURM_PROCID=str(i), SLURM_LOCALID=str(i), SLURM_NODEID="0",
                 SLURM_JOB_ID="77", SLURM_JOB_NAME="sd-txt2img", SLURM_NODELIST="localhost",
                 MASTER_PORT=port),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    outs = [t.communicate(timeout=300) for t in tasks]
    assert [t.returncode for t in tasks] == [0, 0], outs
    assert contents(tmp_path / "srun") == contents(tmp_path / "one")
    assert "7 new images (0 done before)" in outs[0][0] and "with 2 workers" in outs[0][0]
    assert outs[1][0] == ""  # rank 1 is quiet


def test_a_torn_manifest_line_is_ended_not_cut_and_never_glued_to_the_next(tmp_path):
    """A crash mid-write can leave a line cut short at the end of the manifest: the next
    open ends it with a newline (cutting the file could drop a line another shard is
    appending), and reading skips it."""
    from ldm.jobs import Manifest
    folder = tmp_path / "job"
    m = Manifest(folder, "abc", 3).open()
    (folder / "samples").mkdir()
    for k in (0, 1):
        (folder / "samples" / f"{k:06}.png").write_bytes(b"png %d" % k)
    m.record(0, "samples/000000.png", 10, "a")
    m.close()
    with open(m.path, "ab") as f:
        f.write(b'{"k": 1, "file": "samples/0000')  # the crash
    again = Manifest(folder, "abc", 3).open()
    assert set(again.done) == {0}
    again.record(1, "samples/000001.png", 11, "b")
    again.close()
    lines = m.path.read_text().splitlines()
    assert lines[2] == '{"k": 1, "file": "samples/0000' and json.loads(lines[3])["k"] == 1
    assert set(Manifest(folder, "abc", 3).read().done) == {0, 1}


def test_processes_opening_one_manifest_lose_no_line(tmp_path):
    """Shards of an array job open one folder's manifest at any moment: the first starts
    it, the others append to it, and each sees the others' lines on refresh."""
    from ldm.jobs import Manifest
    folder = tmp_path / "job"
    a = Manifest(folder, "abc", 3).read()
    b = Manifest(folder, "abc", 3).read()  # both read before either started the manifest
    a.open()
    (folder / "samples").mkdir()
    for k in range(3):
        (folder / "samples" / f"{k:06}.png").write_bytes(b"png %d" % k)
    a.record(0, "samples/000000.png", 1, "x")
    b.open()  # finds a's manifest: no second start, nothing cut
    a.record(1, "samples/000001.png", 2, "y")
    b.record(2, "samples/000002.png", 3, "z")
    assert b.refresh() == 1 and set(b.done) == {0, 1, 2}
    a.close(), b.close()
    assert set(Manifest(folder, "abc", 3).read().done) == {0, 1, 2}


def test_two_shards_running_at_once_into_one_folder_make_the_whole_job(tmp_path, ckpts, seven):
    import subprocess
    shards = [subprocess.Popen([sys.executable, *job_args(ckpts, seven, tmp_path / "split",
                                                          "--shard", f"{i}/2", "--threads", "1")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for i in (0, 1)]
    outs = [t.communicate(timeout=300) for t in shards]
    assert [t.returncode for t in shards] == [0, 0], outs
    whole = subprocess.run([sys.executable, *job_args(ckpts, seven, tmp_path / "whole",
                                                      "--threads", "1")],
                           capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr
    assert contents(tmp_path / "split") == contents(tmp_path / "whole")


def test_a_failed_load_leaves_no_trace_of_the_job(tmp_path, ckpts, seven, monkeypatch, capsys):
    """The folder is checked before the load, but the manifest is written after it."""
    import txt2img
    from ldm import pipeline
    from ldm.errors import InputError

    def fail(*a, **k):
        raise InputError("cannot read model.ckpt: it is cut short")
    monkeypatch.setattr(pipeline, "load_model", fail)
    out = tmp_path / "job"
    assert txt2img.main(job_args(ckpts, seven, out)[1:]) != 0
    assert "cut short" in capsys.readouterr().err
    assert not out.exists()


def test_the_job_bar_counts_images_done_before(tmp_path, ckpts, seven, capsys):
    """Batches of 2 over 7 images: shard 0/2 makes images 0, 1, 4, 5; the rerun's bar
    starts at 4/7 (not counted in its rate) and prints at 6/7 and 7/7."""
    import txt2img
    out = tmp_path / "job"
    assert txt2img.main(job_args(ckpts, seven, out, "--shard", "0/2")[1:]) == 0
    first = capsys.readouterr()
    assert "4 new images (0 done before)" in first.out
    assert [x for x in first.err.splitlines() if x.startswith("images: ")][-1].startswith(
        "images: 4/4 images (100%)")  # a shard's bar counts the shard's images
    assert txt2img.main(job_args(ckpts, seven, out)[1:]) == 0
    again = capsys.readouterr()
    bar = [x.split(",")[0] for x in again.err.splitlines() if x.startswith("images: ")]
    assert bar == ["images: 6/7 images (85%)", "images: 7/7 images (100%)"], again.err
    assert "3 new images (4 done before)" in again.out


@pytest.mark.parametrize("flag", [["--shard", "0/2"], ["--overwrite"], ["--devices", "2"]])
def test_job_flags_without_a_jsonl_file_are_one_line(tmp_path, ckpts, capsys, flag):
    import txt2img
    code = txt2img.main(["--ckpt", str(ckpts["ckpt"]), "--config", str(TINY_CONFIG),
                         "--device", "cpu", "--outdir", str(tmp_path / "out"), *flag])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "are for JSONL prompt files" in err


def test_a_plain_text_prompt_file_with_job_flags_is_told_how_to_convert(tmp_path, ckpts,
                                                                        capsys):
    import txt2img
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n\na blue square\n")
    code = txt2img.main(["--ckpt", str(ckpts["ckpt"]), "--config", str(TINY_CONFIG),
                         "--device", "cpu", "--outdir", str(tmp_path / "out"), "--from-file",
                         str(prompts), "--shard", "0/2"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    command = f"jq -Rc 'select(test(\"\\\\S\")) | {{prompt: .}}' {prompts} > {tmp_path / 'p.jsonl'}"
    assert command in err, err


def test_a_changed_job_is_refused_naming_what_changed(tmp_path, ckpts, seven, capsys):
    import txt2img
    args = job_args(ckpts, seven, tmp_path / "job")[1:]
    assert txt2img.main(args) == 0
    capsys.readouterr()
    assert txt2img.main(args + ["--ddim_steps", "4"]) == 3
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {tmp_path / 'job'} holds another job's images (--ddim_steps was "
                   "3, now 4): use another --outdir, or --overwrite to replace them")
    seven.write_text(seven.read_text().replace("a ring", "a cross"))
    assert txt2img.main(args) == 3
    assert "(the prompt file changed)" in capsys.readouterr().err


def test_an_interrupted_job_says_its_manifest_was_started(tmp_path, ckpts, capsys,
                                                          monkeypatch):
    import txt2img
    from ldm.pipeline import Pipeline

    def run(self, *args, **kwargs):
        raise KeyboardInterrupt
    one = write(tmp_path / "one.jsonl", {"prompt": "a red circle"})
    assert txt2img.main(job_args(ckpts, one, tmp_path / "a")[1:]) == 0
    assert "1 new image (0 done before)" in capsys.readouterr().out
    monkeypatch.setattr(Pipeline, "run", run)
    assert txt2img.main(job_args(ckpts, one, tmp_path / "b")[1:]) == 130
    manifest = tmp_path / "b" / "manifest.jsonl"
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"interrupted: no image was finished ({manifest} started: a rerun resumes the job)")
