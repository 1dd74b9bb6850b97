"""The shared command-line layer (ldm/cli.py), through scripts/txt2img.py as real processes:
every bad invocation is one line and a non-zero exit with nothing written; Ctrl-C at every
moment; logs without escape codes; one bar on a terminal."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, TINY_CONFIG, V1_CONFIG
from ldm.image_io import read_parameters

SCRIPT = ROOT / "scripts" / "txt2img.py"


def as_from_a_terminal():
    """A child as a shell starts it in the foreground: SIGINT at its default. (A job started
    in the background of a non-interactive shell, as CI may run the tests, ignores SIGINT,
    and so would every process it starts.)"""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def environment(tmp_path):
    """No safety checker weights from this machine's Hugging Face cache, and no colours."""
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(tmp_path / "hf"),
               PYTHONWARNINGS="default")
    env.pop("FORCE_COLOR", None)
    return env


def snapshot(folder):
    """{relative path: bytes or None for folders} of everything under ``folder``."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def tiny(ckpts, *extra):
    return ["--ckpt", ckpts["ckpt"], "--config", TINY_CONFIG, "--device", "cpu",
            "--ddim_steps", "2", "--n_iter", "1", "--n_samples", "1", *extra]


def bad_files(tmp_path, ckpts):
    """Inputs that are wrong in every way a user manages to make them."""
    f = tmp_path / "inputs"
    f.mkdir()
    (f / "notes.txt").write_text("these are my notes\n")
    (f / "page.ckpt").write_text("<!DOCTYPE html><html><body>Sign in to download</body></html>\n")
    (f / "lfs.ckpt").write_text("version https://git-lfs.github.com/spec/v1\n"
                                "oid sha256:" + "0" * 64 + "\nsize 4265380512\n")
    (f / "empty.safetensors").write_bytes(b"")
    (f / "cut.ckpt").write_bytes(ckpts["ckpt"].read_bytes()[:5000])
    (f / "diffusers" / "unet").mkdir(parents=True)
    (f / "diffusers" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (f / "diffusers-no-index" / "unet").mkdir(parents=True)
    (f / "folder").mkdir()
    (f / "folder" / "v1-5.safetensors").write_bytes(b"x")
    (f / "bad.yaml").write_text("model:\n  target: [unclosed\n")
    (f / "empty.yaml").write_text("")
    (f / "list.yaml").write_text("- a\n- b\n")
    (f / "nomodel.yaml").write_text("data:\n  target: x.Y\n")
    tiny_text = TINY_CONFIG.read_text()
    (f / "nomodule.yaml").write_text(tiny_text.replace("ldm.models.autoencoder.AutoencoderKL",
                                                       "ldm.models.no_such_module.AutoencoderKL"))
    (f / "noclass.yaml").write_text(tiny_text.replace("ldm.models.autoencoder.AutoencoderKL",
                                                      "ldm.models.autoencoder.NoSuchClass"))
    (f / "badparam.yaml").write_text(tiny_text.replace("num_res_blocks: 1\n        channel_mult",
                                                       "num_res_blocks: 1\n        bogus: 3\n        channel_mult"))
    (f / "badsampling.yaml").write_text(tiny_text + "\nsampling:\n  scale: .nan\n")
    (f / "empty.txt").write_text("\n  \n")
    (f / "binary.txt").write_bytes(b"\xff\xfe\x00b\x00a\x00d")
    (f / "blocker").write_text("a file where a folder should be")
    import pickle

    class Exploit:
        def __reduce__(self):
            return (os.system, ("touch pwned",))
    (f / "evil.ckpt").write_bytes(pickle.dumps({"state_dict": Exploit()}))
    return f


# (id, argv builder, what the one line must say). {f}: the bad inputs, {ck}: the tiny ckpts
BAD = [
    ("prompt-no-value", lambda f, ck: ["--prompt"], "--prompt: expected one argument"),
    ("outdir-no-value", lambda f, ck: ["--outdir"], "--outdir: expected one argument"),
    ("unknown-flag", lambda f, ck: ["--bogus"], "unrecognized arguments: --bogus"),
    ("scale-nan", lambda f, ck: tiny(ck, "--scale", "nan"), "--scale: nan is not a finite"),
    ("scale-inf", lambda f, ck: tiny(ck, "--scale", "inf"), "not a finite number"),
    ("scale-negative", lambda f, ck: tiny(ck, "--scale", "-1"), "out of range"),
    ("scale-word", lambda f, ck: tiny(ck, "--scale", "high"), "not a number"),
    ("eta-nan", lambda f, ck: tiny(ck, "--ddim_eta", "nan"), "--ddim_eta: nan"),
    ("eta-negative", lambda f, ck: tiny(ck, "--ddim_eta", "-0.5"), "must be in [0, 1]"),
    ("eta-above-1", lambda f, ck: tiny(ck, "--ddim_eta", "1.5"), "must be in [0, 1]"),
    ("seed-beyond-64-bits", lambda f, ck: tiny(ck, "--seed", str(2 ** 64)), "2**64 - 1"),
    ("seed-negative", lambda f, ck: tiny(ck, "--seed", "-2"), "or -1 for a random one"),
    ("seed-span", lambda f, ck: tiny(ck, "--seed", str(2 ** 64 - 1), "--n_iter", "2"),
     "too large for 2 images"),
    ("steps-0", lambda f, ck: tiny(ck, "--ddim_steps", "0"), "must be in [1, 1000]"),
    ("steps-1001", lambda f, ck: tiny(ck, "--ddim_steps", "1001"), "must be in [1, 1000]"),
    ("n_samples-0", lambda f, ck: tiny(ck, "--n_samples", "0"), "--n_samples: 0 is out of range"),
    ("n_iter-0", lambda f, ck: tiny(ck, "--n_iter", "0"), "--n_iter: 0 is out of range"),
    ("n_rows-negative", lambda f, ck: tiny(ck, "--n_rows", "-1"), "--n_rows"),
    ("height-not-multiple", lambda f, ck: tiny(ck, "--H", "30"), "multiples of 4"),
    ("width-0", lambda f, ck: tiny(ck, "--W", "0"), "--W: 0 is out of range"),
    ("size-beyond-memory", lambda f, ck: tiny(ck, "--H", "16384", "--W", "16384"),
     "lower --H/--W"),
    ("latent-channels", lambda f, ck: tiny(ck, "--C", "3"), "--C 3 does not match"),
    ("factor", lambda f, ck: tiny(ck, "--f", "8"), "--f 8 does not match"),
    ("nothing-to-write", lambda f, ck: tiny(ck, "--skip_save", "--skip_grid"), "write nothing"),
    ("negative-at-scale-1", lambda f, ck: tiny(ck, "--negative-prompt", "fog", "--scale", "1"),
     "no effect at --scale 1"),
    ("plms-with-eta", lambda f, ck: tiny(ck, "--plms", "--ddim_eta", "0.3"), "PLMS is deterministic"),
    ("sampler-unknown", lambda f, ck: tiny(ck, "--sampler", "dpm fast"), "unknown sampler 'dpm fast'"),
    ("sampler-and-plms", lambda f, ck: tiny(ck, "--plms", "--sampler", "euler"),
     "--plms and --sampler 'euler' disagree"),
    ("sampler-schedule-clash", lambda f, ck: tiny(ck, "--sampler", "DPM++ 2M Karras",
                                                   "--schedule", "exponential"), "says schedule 'karras'"),
    ("schedule-for-ddim", lambda f, ck: tiny(ck, "--schedule", "karras"), "own timesteps"),
    ("schedule-unknown", lambda f, ck: tiny(ck, "--schedule", "cosine"), "invalid choice: 'cosine'"),
    ("eta-deterministic", lambda f, ck: tiny(ck, "--sampler", "dpmpp_2m", "--ddim_eta", "0.5"),
     "DPM++ 2M is deterministic: drop --ddim_eta"),
    ("device-unknown", lambda f, ck: tiny(ck, "--device", "tpu7"), "--device"),
    ("device-cuda", lambda f, ck: tiny(ck, "--device", "cuda"), "no CUDA GPU"),
    ("precision", lambda f, ck: tiny(ck, "--precision", "fp8"), "invalid choice: 'fp8'"),
    ("ckpt-missing", lambda f, ck: ["--ckpt", f / "nope.ckpt"], "checkpoint not found"),
    ("ckpt-folder", lambda f, ck: ["--ckpt", f / "folder"], "is a folder: give the checkpoint file"),
    ("ckpt-diffusers-incomplete", lambda f, ck: ["--ckpt", f / "diffusers"],
     "the diffusers folder is incomplete"),
    ("ckpt-diffusers-no-index", lambda f, ck: ["--ckpt", f / "diffusers-no-index"],
     "without its model_index.json"),
    ("ckpt-text", lambda f, ck: ["--ckpt", f / "notes.txt"], "is not a checkpoint: it is a text file"),
    ("ckpt-web-page", lambda f, ck: ["--ckpt", f / "page.ckpt"], "a web page"),
    ("ckpt-lfs-pointer", lambda f, ck: ["--ckpt", f / "lfs.ckpt"], "Git LFS pointer"),
    ("ckpt-empty", lambda f, ck: ["--ckpt", f / "empty.safetensors"], "is empty"),
    ("ckpt-truncated", lambda f, ck: ["--ckpt", f / "cut.ckpt", "--config", TINY_CONFIG,
                                      "--device", "cpu"], "truncated"),
    ("ckpt-runs-code", lambda f, ck: ["--ckpt", f / "evil.ckpt", "--config", TINY_CONFIG,
                                      "--device", "cpu"], "could run code"),
    ("ckpt-other-architecture", lambda f, ck: ["--ckpt", ck["safetensors"], "--config", V1_CONFIG,
                                               "--device", "cpu"], "does not match the config"),
    ("config-missing", lambda f, ck: tiny(ck, "--config", f / "nope.yaml"), "config not found"),
    ("config-not-yaml", lambda f, ck: tiny(ck, "--config", f / "bad.yaml"), "not valid YAML"),
    ("config-empty", lambda f, ck: tiny(ck, "--config", f / "empty.yaml"), "is empty"),
    ("config-list", lambda f, ck: tiny(ck, "--config", f / "list.yaml"), "a list, not a mapping"),
    ("config-no-model", lambda f, ck: tiny(ck, "--config", f / "nomodel.yaml"), "no 'model:'"),
    ("config-no-module", lambda f, ck: tiny(ck, "--config", f / "nomodule.yaml"),
     "no module 'ldm.models.no_such_module'"),
    ("config-no-class", lambda f, ck: tiny(ck, "--config", f / "noclass.yaml"),
     "names a class that does not exist"),
    ("config-bad-parameter", lambda f, ck: tiny(ck, "--config", f / "badparam.yaml"),
     "does not build"),
    ("config-bad-sampling", lambda f, ck: tiny(ck, "--config", f / "badsampling.yaml"),
     "sampling scale: nan is not a finite number"),
    ("config-without-ckpt", lambda f, ck: ["--config", V1_CONFIG], "pass it with --ckpt"),
    ("prompts-missing", lambda f, ck: tiny(ck, "--from-file", f / "nope.txt"), "prompt file not found"),
    ("prompts-empty", lambda f, ck: tiny(ck, "--from-file", f / "empty.txt"), "has no prompts"),
    ("prompts-binary", lambda f, ck: tiny(ck, "--from-file", f / "binary.txt"), "UTF-8"),
    ("prompts-folder", lambda f, ck: tiny(ck, "--from-file", f), "is a folder"),
    ("safety-checker-missing", lambda f, ck: tiny(ck, "--safety_checker", f / "nope"),
     "--safety_checker"),
]


def run_script(args, env, timeout=240, cwd=None):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=cwd)


def test_every_bad_invocation_is_one_line_and_writes_nothing(tmp_path, ckpts):
    """Exit status != 0, exactly one line on stderr (no traceback), nothing new in the
    output folder and the files already there untouched; and fast: none needs the model
    loaded to be refused, but for the checkpoints that only reading can tell apart."""
    if torch.cuda.is_available():
        pytest.skip("the --device cuda case needs a machine without CUDA")
    f = bad_files(tmp_path, ckpts)
    env = environment(tmp_path)
    cases = []
    for name, argv, needle in BAD:
        out = tmp_path / "out" / name
        (out / "samples").mkdir(parents=True)
        (out / "samples" / "00003.png").write_bytes(b"an earlier image")
        (out / "grid-0000.png").write_bytes(b"an earlier grid")
        cases.append((name, [*argv(f, ckpts), "--outdir", out], needle, out, snapshot(out)))
    with ThreadPoolExecutor(2) as pool:  # two cores: two processes at a time
        results = list(pool.map(lambda c: run_script(c[1], env, cwd=tmp_path), cases))
    failures = []
    for (name, argv, needle, out, before), r in zip(cases, results):
        lines = r.stderr.strip().splitlines()
        ok = (r.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: ")
              and needle in lines[0] and "Traceback" not in r.stderr
              and snapshot(out) == before)
        if not ok:
            failures.append(f"{name}: rc={r.returncode} stderr={r.stderr[-600:]!r} "
                            f"changed={snapshot(out) != before}")
    assert not failures, "\n".join(failures)
    assert not (tmp_path / "pwned").exists()  # the pickle's command never ran
    assert not (tmp_path / "outputs").exists()  # nothing fell back to the default --outdir


def test_unwritable_outdir_is_one_line_and_creates_nothing(tmp_path, ckpts):
    (tmp_path / "blocker").write_text("a file where a folder should be")
    r = run_script(tiny(ckpts, "--outdir", tmp_path / "blocker" / "out"), environment(tmp_path))
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "--outdir" in r.stderr
    assert (tmp_path / "blocker").read_text() == "a file where a folder should be"


def test_main_py_without_lightning_says_what_to_install(tmp_path):
    code = ("import sys, runpy; sys.modules['pytorch_lightning'] = None; "
            f"sys.argv = ['main.py', '--base', {str(ROOT / 'configs/tiny/train-tiny.yaml')!r}, '-t']; "
            f"runpy.run_path({str(ROOT / 'main.py')!r}, run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        'error: training needs PyTorch Lightning, which is not installed: pip install -e ".[train]"']
    assert not (tmp_path / "logs").exists()


# --------------------------------------------------------------------------------- Ctrl-C

# Runs txt2img with SIGINT sent to itself at a chosen moment: as the first import of torch
# starts, as the checkpoint is read, at the first sampling step, or while the first PNG is
# written. The signal arrives exactly there, as a Ctrl-C would.
INTERRUPTER = textwrap.dedent("""
    import importlib, os, runpy, signal, sys
    moment, script = sys.argv[1], sys.argv[2]
    def interrupt():
        os.kill(os.getpid(), signal.SIGINT)
    if moment == "imports":
        class Hook:
            def find_spec(self, name, path=None, target=None):
                if name == "torch":
                    interrupt()
                return None
        sys.meta_path.insert(0, Hook())
    else:
        module, name = {"load": ("ldm.checkpoint", "load_state_dict_file"),
                        "sampling": ("ldm.models.diffusion.sampling", "ddim_step"),
                        "saving": ("ldm.image_io", "_pnginfo")}[moment]
        module = importlib.import_module(module)
        real = getattr(module, name)
        def wrapped(*args, **kwargs):
            interrupt()
            return real(*args, **kwargs)
        setattr(module, name, wrapped)
    sys.argv = [script] + sys.argv[3:]
    runpy.run_path(script, run_name="__main__")
""")


@pytest.mark.parametrize("moment", ["imports", "load", "sampling", "saving"])
def test_ctrl_c_at_every_moment(tmp_path, ckpts, moment):
    out = tmp_path / "out"
    (out / "samples").mkdir(parents=True)
    (out / "samples" / "00000.png").write_bytes(b"an earlier image")
    before = snapshot(out)
    r = subprocess.run([sys.executable, "-c", INTERRUPTER, moment, str(SCRIPT),
                        *map(str, tiny(ckpts, "--outdir", out))], capture_output=True,
                       text=True, timeout=240, env=environment(tmp_path),
                       preexec_fn=as_from_a_terminal)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 130 and "Traceback" not in r.stderr, r.stderr
    assert lines[-1].startswith("interrupted: ")
    if moment in ("imports", "load"):
        assert lines == ["interrupted: nothing was written"]
    after = snapshot(out)
    assert not [p for p in after if "/." in "/" + p]  # no temp file left
    if moment == "saving":  # the PNG being written is finished, kept and counted
        assert lines[-1] == f"interrupted: 1 finished file kept in {out / 'samples'}"
        new = out / "samples" / "00001.png"
        assert set(after) - set(before) == {"samples/00001.png"}
        assert read_parameters(new)["seed"] == 42
    else:
        assert after == before


def test_ctrl_c_from_the_terminal_during_start_up(tmp_path, ckpts):
    """A real SIGINT from outside, early in the run (imports or the load)."""
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, str(SCRIPT), *map(str, tiny(ckpts, "--outdir", out))],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=environment(tmp_path), preexec_fn=as_from_a_terminal)
    time.sleep(0.6)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode in (130, -signal.SIGINT) and "Traceback" not in err, err
    assert not out.exists()


# ----------------------------------------------------------------------------- messages

def test_a_log_gets_plain_lines_once_each(tmp_path, ckpts):
    """stderr to a file: no escape codes or carriage returns, the bar as plain lines, the
    truncation warning and the safety-checker note once each (the note says how to
    silence it), even over several batches."""
    prompt = " ".join(f"word{i:02d}" for i in range(40))
    r = run_script(tiny(ckpts, "--outdir", tmp_path / "o", "--n_iter", "3", "--prompt", prompt),
                   environment(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stderr and "\r" not in r.stderr
    lines = r.stderr.splitlines()
    assert sum("prompt is longer" in line for line in lines) == 1
    safety = [line for line in lines if "safety checker" in line]
    assert len(safety) == 1 and "--safety_checker none" in safety[0]
    progress = [line for line in lines if line.startswith("sampling: ")]
    assert progress[-1].startswith("sampling: 6/6 steps (100%)")
    r = run_script(tiny(ckpts, "--outdir", tmp_path / "o2", "--safety_checker", "none"),
                   environment(tmp_path))
    assert r.returncode == 0 and "safety" not in r.stderr, r.stderr
    assert read_parameters(tmp_path / "o2" / "samples" / "00000.png")["safety"] == \
        "not checked (turned off)"


@pytest.mark.parametrize("rows,columns", [(30, 100), (0, 0)])
def test_a_terminal_gets_one_bar_with_messages_above_it(tmp_path, ckpts, rows, columns):
    """On a terminal: one tqdm bar (no nested bars moving the cursor up), the warning on a
    line of its own; a terminal that reports no size (0 x 0: some containers, `script`)
    gets the bar too, 80 columns wide."""
    import fcntl
    import pty
    import struct
    import termios
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    prompt = " ".join(f"word{i:02d}" for i in range(40))
    p = subprocess.Popen([sys.executable, str(SCRIPT),
                          *map(str, tiny(ckpts, "--outdir", tmp_path / "o", "--n_iter", "2",
                                         "--prompt", prompt))],
                         stdin=slave, stdout=slave, stderr=slave, env=environment(tmp_path),
                         close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the child closed its end
            break
        if not data:
            break
        chunks.append(data)
    assert p.wait(timeout=120) == 0
    os.close(master)
    text = b"".join(chunks).decode("utf-8", "replace")
    assert "\x1b[A" not in text  # no second bar drawn above the first
    assert "sampling: 100%" in text and "4/4" in text
    warning = [line for line in text.replace("\r", "\n").split("\n") if "prompt is longer" in line]
    assert len(warning) == 1 and warning[0].startswith("warning: prompt is longer")


def test_random_seed_is_said_and_recorded(tmp_path, ckpts):
    r = run_script(tiny(ckpts, "--outdir", tmp_path / "o", "--seed", "-1", "--n_samples", "2",
                        "--skip_grid"), environment(tmp_path))
    assert r.returncode == 0, r.stderr
    said = [line for line in r.stderr.splitlines() if line.startswith("seed: ")]
    assert len(said) == 1
    drawn = int(said[0].split()[1])
    seeds = [read_parameters(tmp_path / "o" / "samples" / f"0000{i}.png")["seed"] for i in range(2)]
    assert seeds == [drawn, drawn + 1] and 0 <= drawn < 2 ** 32


def test_the_end_says_where_the_samples_are_only_when_they_were_written(tmp_path, ckpts):
    r = run_script(tiny(ckpts, "--outdir", tmp_path / "o", "--skip_save"), environment(tmp_path))
    assert r.returncode == 0 and "ready and waiting" in r.stdout
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["grid-0000.png"]


# ------------------------------------------------------- big photos and long single calls

IMG2IMG = ROOT / "scripts" / "img2img.py"


def photo_file(path, width, height):
    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (height // 50 + 1, width // 50 + 1, 3), dtype=np.uint8)
    Image.fromarray(small).resize((width, height), Image.BICUBIC).save(path, quality=90)
    return path


def test_a_big_photo_is_sampled_at_the_model_area_with_one_line(tmp_path):
    """A 12-megapixel phone photo on the built-in model (64x64): sampled at 72x56 (its
    aspect, the model's area), said once, in seconds."""
    photo = photo_file(tmp_path / "photo.jpg", 4000, 3000)
    out = tmp_path / "out"
    start = time.perf_counter()
    r = subprocess.run([sys.executable, str(IMG2IMG), "--init-img", str(photo),
                        "--ddim_steps", "4", "--n_samples", "1", "--outdir", str(out),
                        "--safety_checker", "none"], capture_output=True, text=True,
                       timeout=240, env=environment(tmp_path))
    assert r.returncode == 0, r.stderr
    assert time.perf_counter() - start < 60
    said = [line for line in r.stderr.splitlines() if "4000x3000" in line]
    assert said == ["warning: the 4000x3000 image is 2930x the model's 64x64 area: sampling "
                    "at 72x56 (--H/--W choose the size, --full-size keeps 4000x3000)"]
    assert Image.open(out / "samples" / "00000.png").size == (72, 56)


def start_long_encode(tmp_path):
    """img2img with --full-size on a 2000x1500 photo: the autoencoder's attention over
    187,500 latent pixels is one call into C++ that runs for a minute or more. Returns the
    process once that call has started, and the lines it wrote so far."""
    import threading
    photo = photo_file(tmp_path / "photo.jpg", 2000, 1500)
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, str(IMG2IMG), "--init-img", str(photo),
                          "--full-size", "--ddim_steps", "2", "--n_samples", "1",
                          "--outdir", str(out), "--safety_checker", "none"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=environment(tmp_path), preexec_fn=as_from_a_terminal)
    lines, loaded = [], threading.Event()

    def read():
        for line in p.stderr:
            lines.append(line.rstrip("\n"))
            if line.startswith("using "):
                loaded.set()
    threading.Thread(target=read, daemon=True).start()
    assert loaded.wait(120), lines
    time.sleep(8)  # the full-size convolutions done, well into the attention
    assert p.poll() is None, lines
    return p, lines, out


@pytest.mark.parametrize("signals", [[signal.SIGINT], [signal.SIGINT, signal.SIGINT],
                                     [signal.SIGTERM]], ids=["ctrl-c", "ctrl-c-twice", "term"])
def test_an_interrupt_ends_a_long_single_call_within_seconds(tmp_path, signals):
    p, lines, out = start_long_encode(tmp_path)
    start = time.perf_counter()
    for s in signals:
        p.send_signal(s)
        time.sleep(0.2)
    p.wait(timeout=60)
    took = time.perf_counter() - start
    time.sleep(0.2)  # the reader takes the last line
    assert took < (1.5 if len(signals) > 1 else 6), f"{took:.1f} s"
    terminated = signals[0] == signal.SIGTERM
    assert p.returncode == (143 if terminated else 130)
    assert lines[-1] == f"{'terminated' if terminated else 'interrupted'}: nothing was written"
    assert not any("Traceback" in line for line in lines)
    assert not out.exists()


def test_the_small_things_a_new_user_hit(tmp_path, ckpts, capsys):
    """A LoRA's weight that is not a number, a LoRA given as the model, an output folder
    named like a file, and the --from-file help."""
    from safetensors.torch import save_file
    sys.path.insert(0, str(ROOT / "scripts"))
    import txt2img
    from conftest import build_tiny
    from test_toolbox import kohya_lora
    lora = tmp_path / "style.safetensors"
    save_file(kohya_lora(build_tiny()), lora)

    def one_line(*argv):
        rc = txt2img.main([str(a) for a in argv])
        err = capsys.readouterr().err.strip()
        assert rc != 0 and len(err.splitlines()) == 1, err
        return err
    assert one_line(*tiny(ckpts, "--lora", f"{lora}:abc")) == (
        f"error: argument --lora: {lora}:abc: the weight 'abc' is not a number (FILE:WEIGHT, "
        f"e.g. {lora}:0.8) (see --help)")
    err = one_line("--ckpt", lora, "--config", TINY_CONFIG, "--outdir", tmp_path / "o")
    assert err.startswith(f"error: {lora} is a LoRA (") and err.endswith(
        " LoRA weights), not a model: pass it with --lora (and a model with --ckpt)")
    rc = txt2img.main([str(a) for a in tiny(ckpts, "--outdir", tmp_path / "out.png")])
    assert rc == 0 and (tmp_path / "out.png" / "samples").is_dir()
    assert ("warning: --outdir " + str(tmp_path / "out.png") + " names a folder (the images "
            "go inside it), though it looks like a file name") in capsys.readouterr().err
    assert "JSONL" in txt2img.build_parser().format_help()
