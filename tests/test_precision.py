"""--precision bf16: the weights cast to bfloat16 once (norms kept float32), the result
close to float32's, the guidance and sampler arithmetic in float32."""
import logging

import pytest
import torch

from conftest import build_tiny, rel_err
from ldm import devices
from ldm.errors import UsageError
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
    monkeypatch.setattr(devices, "bf16_is_native", lambda device: False)
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


mkldnn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                            reason="weight packing needs oneDNN (mkldnn)")
# oneDNN reorders bf16 weights only on a CPU with bf16 support (AVX512-BF16/AMX, or
# AVX-NE-CONVERT); on an AVX2-only CPU bf16 is emulated and the pipeline never packs
bf16_cpu = pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                              reason="this CPU has no bf16 support for oneDNN to reorder for")


def _reference_conv(layer, x):
    return torch.nn.functional.conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding)


@mkldnn
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=bf16_cpu)])
@pytest.mark.parametrize("stride", [1, 2])
def test_packed_convolution_equals_the_plain_one(dtype, stride):
    from ldm.modules.diffusionmodules import util
    torch.manual_seed(0)
    layer = util.Conv2d(32, 48, 3, stride=stride, padding=1).to(dtype)
    x = torch.randn(2, 32, 12, 12).to(dtype)
    with torch.no_grad():
        reference = _reference_conv(layer, x).float()
        util.set_weight_packing(layer, True)
        out = layer(x)
    assert "_packed" in layer.__dict__, "the packed path ran"
    assert out.dtype == dtype and out.shape == reference.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel_err(out.float(), reference) < tol


@mkldnn
@bf16_cpu
def test_packed_linear_equals_the_plain_one_and_few_rows_stay_plain():
    from ldm.modules.diffusionmodules import util
    torch.manual_seed(0)
    layer = util.set_weight_packing(util.Linear(64, 96).to(torch.bfloat16), True)
    x = torch.randn(2, 300, 64).to(torch.bfloat16)
    with torch.no_grad():
        reference = torch.nn.functional.linear(x, layer.weight, layer.bias).float()
        assert rel_err(layer(x).float(), reference) < 2e-2
        assert "_packed" in layer.__dict__
        few = x[:, :3]
        assert torch.equal(layer(few), torch.nn.functional.linear(few, layer.weight, layer.bias))


@mkldnn
def test_packed_weights_follow_weight_changes_and_training_takes_the_plain_path():
    """An in-place write (load_state_dict) and a new tensor (a LoRA merge, param.data = ...)
    both reach the next call; with grad enabled the layer is the plain nn.Conv2d."""
    from ldm.modules.diffusionmodules import util
    torch.manual_seed(0)
    layer = util.set_weight_packing(util.Conv2d(8, 8, 3, padding=1), True)
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        layer(x)
        first = layer.__dict__["_packed"]
        layer(x)
        assert layer.__dict__["_packed"] is first, "reordered once, not on every call"
        layer.load_state_dict({"weight": torch.randn(8, 8, 3, 3), "bias": torch.randn(8)})
        assert rel_err(layer(x), _reference_conv(layer, x)) < 1e-5
        for _ in range(3):  # new tensors, old ones freed: never a stale copy
            layer.weight.data = layer.weight.data + 1
            assert rel_err(layer(x), _reference_conv(layer, x)) < 1e-5
    out = layer(x)
    assert out.requires_grad and torch.equal(out, _reference_conv(layer, x))
    util.set_weight_packing(layer, False)
    assert "_packed" not in layer.__dict__


@mkldnn
def test_a_packed_model_copies_and_pickles_without_its_packed_weights():
    import copy
    import io
    from ldm.modules.diffusionmodules import util
    layer = util.set_weight_packing(util.Conv2d(8, 8, 3, padding=1), True)
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        layer(x)
    twin = copy.deepcopy(layer)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    assert "_packed" not in twin.__dict__ and twin.packed
    assert list(layer.state_dict()) == ["weight", "bias"]
    with torch.no_grad():
        assert torch.equal(twin(x), layer(x))


@mkldnn
@bf16_cpu
def test_bf16_on_an_amx_cpu_packs_the_weights_and_full_precision_does_not(monkeypatch):
    """Packing pays on AMX (a SD step 0.8x the time), costs on AVX512-BF16 alone (Zen 4:
    1.5x): only an AMX CPU packs."""
    from ldm.modules.diffusionmodules import util
    monkeypatch.setattr(devices, "bf16_is_native", lambda device: True)
    monkeypatch.setattr(devices, "has_amx", lambda: False)
    zen4 = Pipeline(build_tiny(), CPU, "bf16", watermark=False)
    assert not any(m.packed for m in zen4.model.modules() if isinstance(m, util.Conv2d))
    monkeypatch.setattr(devices, "has_amx", lambda: True)
    packed = Pipeline(build_tiny(), CPU, "bf16", watermark=False)
    layers = [m for m in packed.model.modules() if isinstance(m, (util.Conv2d, util.Linear))]
    assert layers and all(m.packed for m in layers)
    full = Pipeline(build_tiny(), CPU, "full", watermark=False)
    assert not any(m.packed for m in full.model.modules() if isinstance(m, util.Conv2d))
    monkeypatch.setattr(devices, "bf16_is_native", lambda device: False)
    emulated = Pipeline(build_tiny(), CPU, "bf16", watermark=False)
    assert not any(m.packed for m in emulated.model.modules() if isinstance(m, util.Conv2d))
    # the packed model makes the image the plain bf16 model makes, up to bf16 rounding
    kw = dict(prompts=["a red circle"], seeds=[1], sampler="ddim", steps=6, progress=False)
    a, b = packed.latents(**kw), emulated.latents(**kw)
    assert rel_err(a, b) < 0.05


def test_float32_on_a_cpu_holds_the_autoencoder_channels_last_with_the_same_images():
    def channels_last(module):
        convs = [m.weight for m in module.modules()  # 1x1 kernels are both layouts at once
                 if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1]
        return convs and all(w.is_contiguous(memory_format=torch.channels_last)
                             and not w.is_contiguous() for w in convs)
    full = Pipeline(build_tiny(), CPU, "full", watermark=False)
    assert channels_last(full.model.first_stage_model)
    assert not channels_last(full.model.model)  # the UNet gained nothing from it
    assert not channels_last(Pipeline(build_tiny(), CPU, "bf16", watermark=False)
                             .model.first_stage_model)
    plain = build_tiny()  # the same weights (build_tiny is seeded), default layout
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        assert rel_err(full.model.decode_first_stage(z), plain.decode_first_stage(z)) < 1e-5
        assert rel_err(full.model.first_stage_model.encode(image).mean,
                       plain.first_stage_model.encode(image).mean) < 1e-5


def test_a_network_that_overflows_is_one_line_saying_what_to_change(tmp_path, ckpts,
                                                                  monkeypatch):
    """An autoencoder (or UNet) whose output is NaN, as SDXL's autoencoder and SD 2.x's
    UNet give in float16 without their float32 parts: one line naming the part, the dtype
    and what to change, not a black image; nothing written."""
    from conftest import TINY_CONFIG, run_here
    from ldm.models.diffusion.ddpm import LatentDiffusion
    real = LatentDiffusion.decode_first_stage
    monkeypatch.setattr(LatentDiffusion, "decode_first_stage",
                        lambda self, z, *a, **k: real(self, z, *a, **k) * float("nan"))
    r = run_here("txt2img.py", "--prompt", "x", "--ckpt", ckpts["ckpt"], "--config",
                 TINY_CONFIG, "--ddim_steps", "2", "--safety_checker", "none", "--outdir",
                 tmp_path / "o", cwd=tmp_path)
    lines = [line for line in r.stderr.strip().splitlines() if "error" in line.lower()]
    assert r.returncode != 0 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0] == ("error: the autoencoder's output is not finite (NaN or infinity) in "
                        "float32: the weights may be damaged: check the checkpoint and --vae")
    assert not list((tmp_path / "o").rglob("*.png"))
    pipe = Pipeline(build_tiny(), torch.device("cpu"), "full")
    pipe.dtype = torch.float16   # what a CUDA GPU computes in; the message changes with it
    with pytest.raises(UsageError, match=r"^the autoencoder's output is not finite \(NaN or "
                                         r"infinity\) in float16: run with --precision full or "
                                         r"bf16, or an autoencoder fixed for float16 \(--vae\)$"):
        pipe.check_finite(torch.tensor([1.0, float("inf")]), "the autoencoder's")
    pipe.check_finite(torch.ones(3), "the UNet's")
