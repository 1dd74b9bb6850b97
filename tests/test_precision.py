"""--precision bf16: the weights cast to bfloat16 once (norms kept float32), the result
close to float32's, the guidance and sampler arithmetic in float32."""
import logging

import pytest
import torch

from conftest import build_tiny
from ldm import pipeline as pl
from ldm.pipeline import NORMS, Pipeline, cast_weights

CPU = torch.device("cpu")


def test_weights_are_cast_once_except_the_norms_and_the_schedule():
    model = build_tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    schedule = model.alphas_cumprod.clone()
    Pipeline(model, CPU, "bf16", watermark=False)
    norm_params = {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, NORMS)
                   for p, _ in m.named_parameters(recurse=False)}
    assert norm_params, "the tiny model has norms"
    for name, p in model.named_parameters():
        if name in norm_params:
            assert p.dtype == torch.float32 and torch.equal(p, before[name]), name
        else:
            assert p.dtype == torch.bfloat16, name
            assert torch.equal(p, before[name].to(torch.bfloat16)), name
    assert model.alphas_cumprod.dtype == torch.float32
    assert torch.equal(model.alphas_cumprod, schedule)


def test_full_and_cpu_autocast_leave_the_weights_alone():
    for precision in ("full", "autocast"):
        model = build_tiny()
        Pipeline(model, CPU, precision, watermark=False)
        assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_cast_weights_float32_is_a_no_op():
    model = build_tiny()
    ptrs = [p.data_ptr() for p in model.parameters()]
    cast_weights(model, torch.float32)
    assert ptrs == [p.data_ptr() for p in model.parameters()]


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_bf16_is_close_to_float32_and_its_update_is_float32(sampler):
    kw = dict(prompts=["a red circle", "a blue square"], seeds=[1, 2], sampler=sampler,
              steps=8, progress=False)
    full = Pipeline(build_tiny(), CPU, "full", watermark=False).latents(**kw)
    bf16 = Pipeline(build_tiny(), CPU, "bf16", watermark=False)
    outputs = []
    unet = bf16.model.model.diffusion_model
    handle = unet.register_forward_hook(lambda m, i, o: outputs.append(o.dtype))
    z = bf16.latents(**kw)
    handle.remove()
    assert set(outputs) == {torch.bfloat16}, "the UNet computes in bf16"
    assert z.dtype == torch.float32
    rel = ((z - full).norm() / full.norm()).item()
    assert 1e-4 < rel < 0.05, rel  # bf16 rounding, not another image


def test_bf16_images_decode_and_record_the_precision():
    pipe = Pipeline(build_tiny(), CPU, "bf16", watermark=False)
    s = pipe.generate("a red circle", seeds=3, sampler="ddim", steps=4, progress=False)[0]
    assert s.parameters["precision"] == "bf16"
    assert s.image.size == (pipe.native_size, pipe.native_size)


def test_emulated_bf16_is_announced(monkeypatch, caplog):
    monkeypatch.setattr(pl, "bf16_is_native", lambda device: False)
    with caplog.at_level(logging.WARNING):
        Pipeline(build_tiny(), CPU, "bf16", watermark=False)
    assert "no native bfloat16" in caplog.text and "slower than full" in caplog.text


def test_linear_runs_as_a_convolution_in_cpu_inference_with_the_same_values(monkeypatch):
    from ldm.modules.diffusionmodules import util
    torch.manual_seed(0)
    layer = util.Linear(64, 96)
    x = torch.randn(2, 300, 64)
    reference = torch.nn.functional.linear(x, layer.weight, layer.bias)
    calls = []
    conv2d = util.F.conv2d
    monkeypatch.setattr(util.F, "conv2d", lambda *a, **k: calls.append(1) or conv2d(*a, **k))
    with torch.no_grad():
        out = layer(x)
    assert calls and out.shape == (2, 300, 96)
    assert torch.allclose(out, reference, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        assert layer(x).dtype == torch.bfloat16
    calls.clear()
    with torch.no_grad():  # few rows: the plain matmul
        assert torch.equal(layer(x[:, :3]), torch.nn.functional.linear(x[:, :3], layer.weight, layer.bias))
    assert torch.equal(layer(x), reference)  # training (grad enabled): F.linear itself
    assert not calls
    assert list(dict(layer.named_parameters())) == ["weight", "bias"]
