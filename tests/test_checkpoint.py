"""Checkpoint reading: formats, extras real checkpoints carry, refusal of code, clear errors."""
import os
import pickle
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from ldm.checkpoint import (CheckpointError, UnsafeCheckpointError, load_model_weights,
                            load_state_dict_file)
from ldm.pipeline import build_model
from conftest import ROOT, TINY_CONFIG, official_layout


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k].to(sa[k].dtype), rtol=0, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_safetensors_loads_strictly(tmp_path, tiny_model, dtype):
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in official_layout(tiny_model, dtype).items()}, path)
    model = load_model_weights(build_model(TINY_CONFIG, meta=True), load_state_dict_file(path))
    assert next(model.parameters()).dtype == torch.float32
    assert_same_weights(tiny_model, model)


def test_lightning_ckpt_with_training_objects_loads_without_importing_them(tmp_path, tiny_model):
    from pytorch_lightning.callbacks import ModelCheckpoint
    from omegaconf import OmegaConf
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": official_layout(tiny_model, torch.float16), "epoch": 3,
                "global_step": 1000,
                # PyTorch Lightning 1.x keyed callback states by the callback class itself
                "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.1),
                                                "dirpath": "/logs/checkpoints"}},
                "hyper_parameters": OmegaConf.create({"lr": 1e-4})}, path)
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / 'tests')!r})\n"
            "from ldm.checkpoint import load_state_dict_file\n"
            f"sd = load_state_dict_file({str(path)!r})\n"
            "assert 'model.diffusion_model.out.2.weight' in sd\n"
            "assert 'pytorch_lightning' not in sys.modules and 'omegaconf' not in sys.modules\n"
            "print(len(sd))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    sd = load_state_dict_file(path)
    assert_same_weights(tiny_model, load_model_weights(build_model(TINY_CONFIG), sd))


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    target = tmp_path / "pwned"
    exploit = _Exploit()
    exploit.target = target
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": exploit}, path)
    with pytest.raises(UnsafeCheckpointError, match="system"):
        load_state_dict_file(path)
    assert not target.exists()
    raw = tmp_path / "evil.pkl"  # a bare (non-zip) pickle too
    raw.write_bytes(pickle.dumps(exploit))
    with pytest.raises(UnsafeCheckpointError):
        load_state_dict_file(raw)
    assert not target.exists()


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_truncated_checkpoint_gives_clear_error(tmp_path, tiny_model, suffix):
    path = tmp_path / f"m{suffix}"
    sd = {k: v.contiguous() for k, v in tiny_model.state_dict().items()}
    torch.save({"state_dict": sd}, path) if suffix == ".ckpt" else save_file(sd, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_state_dict_file(path)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_state_dict_file(tmp_path / "nope.ckpt")


def test_transformers5_clip_layout_loads(tiny_model):
    sd = {k.replace("transformer.text_model.", "transformer."): v
          for k, v in tiny_model.state_dict().items()}
    assert not any("text_model" in k for k in sd)
    assert_same_weights(tiny_model, load_model_weights(build_model(TINY_CONFIG), sd))


def test_wrong_architecture_is_named(tiny_model):
    sd = dict(tiny_model.state_dict())
    w = sd["model.diffusion_model.input_blocks.0.0.weight"]
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(w.shape[0], 9, 3, 3)
    with pytest.raises(CheckpointError, match="inpainting"):
        load_model_weights(build_model(TINY_CONFIG), sd)
    sd = {k: v for k, v in tiny_model.state_dict().items() if not k.startswith("cond_stage_model")}
    sd["cond_stage_model.model.token_embedding.weight"] = torch.zeros(10, 1024)
    with pytest.raises(CheckpointError, match="SD 2.x"):
        load_model_weights(build_model(TINY_CONFIG), sd)


def test_tiny_checkpoint_given_v1_config_names_the_mismatch(tiny_model):
    from conftest import V1_CONFIG
    with pytest.raises(CheckpointError, match="base channels") as e:
        load_model_weights(build_model(V1_CONFIG, meta=True), tiny_model.state_dict())
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["ckpt", "safetensors"])
def test_weights_cast_while_read_equal_a_float32_load_cast_after(ckpts, kind, dtype):
    """``load_model(..., dtype)`` casts each tensor as it is read (no float32 copy of the
    model: half the peak for a bfloat16 SDXL), to exactly what loading in float32 and then
    ``cast_weights`` gives: the normalisation layers' weights float32, the rest ``dtype``,
    bit for bit, from an fp32 .ckpt and an fp16 .safetensors."""
    from ldm.devices import cast_weights
    from ldm.pipeline import load_model
    direct = load_model(ckpts[kind], TINY_CONFIG, dtype=dtype).state_dict()
    after = cast_weights(load_model(ckpts[kind], TINY_CONFIG), dtype).state_dict()
    assert direct.keys() == after.keys()
    kinds = {v.dtype for v in direct.values()}
    assert dtype in kinds and torch.float32 in kinds
    for k, v in after.items():
        assert direct[k].dtype == v.dtype and torch.equal(direct[k], v), k


def test_a_model_too_large_for_the_free_memory_is_refused_before_reading(ckpts, monkeypatch,
                                                                        tmp_path, capsys):
    """Less memory free than the weights need (or the file, read whole before each tensor
    is cast): refused in one line before any weight is read, with what to change; the
    script exits with the resource status and writes nothing."""
    from ldm import checkpoint, pipeline
    from ldm.errors import ResourceError
    model_bytes = sum(p.numel() for p in build_model(TINY_CONFIG, meta=True).parameters()) * 4

    def never(*a, **k):
        raise AssertionError("weights were read")
    monkeypatch.setattr(checkpoint, "load_state_dict_file", never)
    monkeypatch.setattr(pipeline, "available_memory", lambda device="cpu": model_bytes // 3)
    with pytest.raises(ResourceError, match=r"tiny.ckpt needs about .* GiB to load \(0.00 "
                                            r"billion parameters in float32\) and this machine "
                                            r"has .* GiB free: close other programs or use "
                                            r"--precision bf16 \(half the memory\)$"):
        pipeline.load_model(ckpts["ckpt"], TINY_CONFIG)
    monkeypatch.setattr(pipeline, "available_memory", lambda device="cpu": model_bytes // 2 + 4096)
    with pytest.raises(ResourceError):   # bfloat16 weights fit, the fp32 file read whole not
        pipeline.load_model(ckpts["ckpt"], TINY_CONFIG, dtype=torch.bfloat16)
    sys.path.insert(0, str(ROOT / "scripts"))
    import txt2img
    out = tmp_path / "out"
    rc = txt2img.main(["--prompt", "x", "--ckpt", str(ckpts["ckpt"]), "--config",
                       str(TINY_CONFIG), "--outdir", str(out), "--safety_checker", "none"])
    err = capsys.readouterr().err.strip()
    assert rc == ResourceError.exit_status and len(err.splitlines()) == 1, err
    assert "close other programs" in err and not out.exists()
