"""The OpenVINO backend (``ldm.backends.openvino``) against the torch path on the tiny
models, run by tests/test_openvino.py in a process of their own: the same latents and images for every task, the on-disk cache (converted once per
weights, reused by the next process, new weights converted anew), the options it cannot
run refused, and what ``auto`` chooses."""
import logging
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY_CONFIG, build_tiny, rel_err

pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One cache for the module: the tests' tiny models are the same weights, so after
    the first conversion the others read the IR (what a user's second run does)."""
    return tmp_path_factory.mktemp("ov-cache")


@pytest.fixture(autouse=True)
def cache(shared_cache, monkeypatch):
    monkeypatch.setenv("LDM_OPENVINO_CACHE", str(shared_cache))
    yield shared_cache
    # the networks' hooks point back at their backend: a cycle that keeps OpenVINO's
    # compiled models (and their threads) alive into later tests unless collected
    import gc
    gc.collect()


def pipeline(model=None, precision="full"):
    from ldm.pipeline import Pipeline
    return Pipeline(model if model is not None else build_tiny(0).eval(), torch.device("cpu"),
                    precision, watermark=False)


def both(pipe, **kw):
    """The same call on torch, then on OpenVINO (the pipeline left on OpenVINO)."""
    pipe.set_options(backend="torch")
    a = pipe.latents(**kw)
    pipe.set_options(backend="openvino")
    b = pipe.latents(**kw)
    return a, b


def conversions(caplog):
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("converting")]


def test_txt2img_equals_the_torch_path_for_every_kind_of_sampler():
    """A timestep sampler (DDIM), an ancestral one (fresh noise each step) and a multistep
    one (DPM++ 2M): samplers only call the denoiser, so one compiled UNet serves them all."""
    pipe = pipeline()
    for sampler in ("ddim", "euler_a", "dpmpp_2m"):
        a, b = both(pipe, prompts=["a red circle", "two blue squares"], seeds=[1, 2],
                    negative_prompts=["", "green"], sampler=sampler, steps=5, height=64,
                    width=48, progress=False)
        assert a.abs().max() > 0.1 and rel_err(b, a) < 1e-5, sampler
    images = [pipe.decode(z) for z in (a, b)]
    diff = max(np.abs(np.asarray(x, int) - np.asarray(y, int)).max()
               for x, y in zip(*images))
    assert diff <= 1
    assert pipe.options_record()["backend"] == "openvino"
    assert set(pipe._openvino.networks["unet"].compiled)   # it did run the UNet


def test_img2img_and_both_inpainting_paths_equal_the_torch_path():
    """The encoder runs too (img2img); latent blending on a text-to-image model; the
    9-channel inpainting model (tiny SD 2 shape: OpenCLIP blocks)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from PIL import Image
    from test_sd2 import tiny_sd2_variant
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 8:40] = 255
    mask = Image.fromarray(mask)
    pipe = pipeline()
    kw = dict(prompts=["a red circle"], seeds=[3], sampler="ddim", steps=3, progress=False)
    pipe.set_options(backend="torch")
    init_torch = pipe.encode([image])
    pipe.set_options(backend="openvino")
    init_ov = pipe.encode([image])
    assert rel_err(init_ov, init_torch) < 1e-5
    a, b = both(pipe, init=init_torch, strength=0.6, **kw)
    assert rel_err(b, a) < 1e-5
    small, _ = pipe.latent_mask(mask)
    a, b = both(pipe, init=init_torch, mask=small, strength=1.0, **kw)
    assert rel_err(b, a) < 1e-5
    model, _ = tiny_sd2_variant(inpainting=True)
    pipe = pipeline(model)
    assert pipe.is_inpainting_model
    from ldm.image_io import pil_to_tensor
    small, full = pipe.latent_mask(mask)
    masked = model.encode_image(pil_to_tensor([image]) * (1 - full))
    a, b = both(pipe, init=pipe.encode([image]), mask=small, masked=masked, strength=1.0,
                height=64, width=64, **kw)
    assert a.abs().max() > 0.1 and rel_err(b, a) < 1e-5


def test_converted_once_then_read_from_the_cache_and_new_weights_convert_anew(
        tmp_path, caplog, monkeypatch):
    """A second pipeline (a new process would do the same) reads the IR; a new size
    compiles without converting; a LoRA is new weights (converted), and unmerged it is the
    old weights again (read from the cache)."""
    from safetensors.torch import save_file
    from test_toolbox import kohya_lora
    cache = tmp_path / "own-cache"
    monkeypatch.setenv("LDM_OPENVINO_CACHE", str(cache))
    caplog.set_level(logging.INFO)
    kw = dict(prompts=["a red circle"], seeds=[1], sampler="euler", steps=2, progress=False)
    pipe = pipeline()
    pipe.set_options(backend="openvino")
    first = pipe.latents(height=64, width=64, **kw)
    assert len(conversions(caplog)) == 2   # text encoder, UNet
    assert any(r.getMessage().startswith("converted in") for r in caplog.records)
    caplog.clear()
    again = pipeline()
    again.set_options(backend="openvino")
    assert torch.equal(again.latents(height=64, width=64, **kw), first)
    again.latents(height=32, width=96, **kw)
    assert conversions(caplog) == []
    save_file(kohya_lora(again.model), tmp_path / "style.safetensors")
    again.set_loras([(tmp_path / "style.safetensors", 0.8)])
    with_lora = again.latents(height=64, width=64, **kw)
    assert len(conversions(caplog)) == 2 and rel_err(with_lora, first) > 1e-3
    again.set_options(backend="torch")
    assert rel_err(again.latents(height=64, width=64, **kw), with_lora) < 1e-5
    again.set_options(backend="openvino")
    caplog.clear()
    again.set_loras([])
    assert torch.equal(again.latents(height=64, width=64, **kw), first)
    assert conversions(caplog) == []
    assert not list(cache.glob("*.partial-*"))


def test_clip_skip_embeddings_and_a1111_weighting_on_openvino(tmp_path, caplog):
    """Clip skip is another conversion of the text blocks; an embedding grows the token
    table, which stays in torch: no conversion, and the same encoding as torch."""
    from safetensors.torch import save_file
    caplog.set_level(logging.INFO)
    pipe = pipeline()
    enc = pipe.model.cond_stage_model
    prompts = ["a photo of zqwonder", "a (red:1.4) circle, " * 20]
    save_file({"emb_params": torch.randn(2, 32, generator=torch.Generator().manual_seed(4))},
              tmp_path / "zqwonder.safetensors")
    pipe.load_embedding(tmp_path / "zqwonder.safetensors")
    pipe.set_text_options(clip_skip=2, prompt_syntax="a1111")
    with torch.no_grad():
        want = enc.encode(prompts)
        pipe.set_options(backend="openvino")
        got = enc.encode(prompts)
        # OpenVINO reorders float32 arithmetic (fusions): ~1e-5, a little more through
        # the weighted chunks rescaled to their mean
        assert rel_err(got, want) < 2e-4 and got.shape[1] == 154
        caplog.clear()
        save_file({"emb_params": torch.randn(1, 32)}, tmp_path / "zqother.safetensors")
        pipe.load_embedding(tmp_path / "zqother.safetensors")
        enc.encode(["zqother zqwonder"])
    assert conversions(caplog) == []


def test_options_it_cannot_run_are_refused_and_auto_chooses(monkeypatch):
    from ldm import backends
    from ldm.errors import UsageError
    pipe = pipeline()
    for options, says in [({"compile": True}, "--compile works on the torch modules"),
                          ({"deepcache": 3}, "--deepcache works on the torch modules"),
                          ({"attention_slicing": 64}, "--attention_slicing")]:
        with pytest.raises(UsageError, match=says) as e:
            pipe.set_options(backend="openvino", **options)
        assert "\n" not in str(e.value)
    pipe.set_options(backend="auto")
    assert pipe.backend == "torch"     # a tiny model: the conversion would not pay
    monkeypatch.setattr(backends, "AUTO_MIN_PARAMS", 0)
    pipe.set_options(backend="auto")
    assert pipe.backend == "openvino"
    pipe.set_options(backend="auto", deepcache=3)
    assert pipe.backend == "torch"     # an option that needs torch keeps torch
    assert backends.choose("auto", "cuda", 10 ** 9) == "torch"
    with pytest.raises(ValueError, match="runs on the CPU, not on cuda"):
        backends.choose("openvino", "cuda", 10 ** 9)
    monkeypatch.setattr(backends, "openvino_installed", lambda: False)
    with pytest.raises(ValueError, match=r'pip install -e ".\[openvino\]"'):
        backends.choose("openvino", "cpu", 10 ** 9)
    assert backends.choose("auto", "cpu", 10 ** 9) == "torch"


def test_bf16_precision_converts_float32_weights_and_restores_the_model():
    """bf16 is OpenVINO's precision hint: the IR is made from float32 weights (the torch
    model is cast for the trace and cast back, bit for bit)."""
    pipe = pipeline(precision="bf16")
    before = {k: v.clone() for k, v in pipe.model.state_dict().items()}
    kw = dict(prompts=["a red circle"], seeds=[1], sampler="euler", steps=2, height=32,
              width=32, progress=False)
    a, b = both(pipe, **kw)
    assert pipe._openvino.precision == "bf16"
    assert rel_err(b, a) < 2e-2   # torch's bf16 against OpenVINO's (f32 where no bf16)
    after = pipe.model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


def test_the_scripts_take_backend_and_images_record_it(tmp_path, ckpts):
    import subprocess
    from ldm.image_io import read_parameters
    out = tmp_path / "out"
    env = {**__import__("os").environ}   # the module's cache (the autouse fixture)
    args = [sys.executable, str(ROOT / "scripts" / "txt2img.py"), "--prompt", "a red circle",
            "--ckpt", str(ckpts["ckpt"]), "--config", str(TINY_CONFIG), "--H", "64",
            "--W", "64", "--n_samples", "1", "--n_iter", "1", "--ddim_steps", "2",
            "--outdir", str(out), "--safety_checker", "none", "--skip_grid"]
    done = subprocess.run(args + ["--backend", "openvino"], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert read_parameters(out / "samples" / "00000.png")["backend"] == "openvino"
    bad = subprocess.run(args + ["--backend", "openvino", "--deepcache", "3"],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1
    assert "--deepcache works on the torch modules" in bad.stderr


INTERRUPT_IN_OPENVINO = """
import os, runpy, signal, sys, threading
import ldm.backends.openvino as ov
real, signum, calls = ov.Network.__call__, int(sys.argv[1]), []
def call(self, *args, **kwargs):
    calls.append(self.name)
    if calls.count("unet") == 2:   # compiled: from another thread, as a terminal's Ctrl-C
        threading.Timer(0.0, os.kill, (os.getpid(), signum)).start()
    return real(self, *args, **kwargs)
ov.Network.__call__ = call
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_ctrl_c_while_openvino_runs_ends_in_one_line(tmp_path, ckpts, signum=2):
    """SIGINT while the UNet runs on OpenVINO (its runtime's threads alive): the run ends
    at once with the scripts' one line and exit code, nothing written, no crash (SIGTERM
    takes the same way out: tests/test_cli.py)."""
    import os
    import subprocess
    out = tmp_path / "out"
    args = [str(ROOT / "scripts" / "txt2img.py"), "--prompt", "a red circle",
            "--ckpt", str(ckpts["ckpt"]), "--config", str(TINY_CONFIG), "--H", "64",
            "--W", "64", "--n_samples", "1", "--n_iter", "1", "--ddim_steps", "2",
            "--outdir", str(out), "--safety_checker", "none", "--backend", "openvino"]
    done = subprocess.run([sys.executable, "-c", INTERRUPT_IN_OPENVINO, str(signum), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env=dict(os.environ),
                          preexec_fn=lambda: __import__("signal").signal(2, 0))
    word = "interrupted" if signum == 2 else "terminated"
    assert done.returncode == 128 + signum, done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"{word}: nothing was written", done.stderr
    assert "Traceback" not in done.stderr and not out.exists()


def test_sdxl_runs_on_openvino_through_the_same_backend():
    """SDXL through the family seam: its UNet (with the vector y), both text encoders'
    blocks (bigG's in two calls: to the penultimate layer, then the last, for the pooled
    embedding) and the autoencoder on OpenVINO give the torch path's latents."""
    from omegaconf import OmegaConf
    from ldm.backends.openvino import networks
    from ldm.util import instantiate_from_config
    from conftest import randomize
    config = OmegaConf.load(ROOT / "configs" / "tiny" / "tiny-sdxl-inference.yaml")
    model = randomize(instantiate_from_config(config.model), 3).eval()
    assert set(networks(model)) == {"unet", "vae_encoder", "vae_decoder", "text", "text2"}
    pipe = pipeline(model)
    a, b = both(pipe, prompts=["a red circle", "two blue squares"], seeds=[1, 2],
                negative_prompts=["", "green"], sampler="euler", steps=4, height=32,
                width=48, progress=False)
    assert a.abs().max() > 0.1 and rel_err(b, a) < 1e-5
