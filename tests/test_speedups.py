"""The optional speed-ups and memory savers (``Pipeline.set_options``, the scripts' flags):
DeepCache, attention slicing, VAE tiling, model offload and torch.compile."""
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, build_tiny
from ldm.models.autoencoder import tile_starts, tiled
from ldm.modules.attention import CrossAttention, set_attention_slicing
from ldm.pipeline import BUILTIN_DIR, Pipeline

sys.path.insert(0, str(ROOT / "scripts"))

CPU = torch.device("cpu")
KW = dict(prompts=["a red circle", "a blue square"], seeds=[1, 2], progress=False)


def unet_inputs(model, side=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, side, side, generator=g)
    ctx = torch.randn(2, 77, 32, generator=g)
    return x, ctx


# ------------------------------------------------------------------------------ DeepCache

def test_a_cached_call_is_the_whole_unet_with_its_deep_features_replaced():
    """Independently of ``UNetModel.forward``'s cache path: hooks put the first call's
    deep features into a whole second call; the cached call gives the same output."""
    unet = build_tiny().model.diffusion_model
    x1, ctx = unet_inputs(unet)
    x2 = x1 + 0.3 * torch.randn(x1.shape, generator=torch.Generator().manual_seed(1))
    t1, t2 = torch.full((2,), 800), torch.full((2,), 700)
    keep = 2  # branch 1
    target = unet.output_blocks[len(unet.output_blocks) - keep]
    kept = {}
    # the features entering the target block are [h, skip] concatenated: keep h's channels
    skip_channels = {}
    hooks = [unet.input_blocks[keep - 1].register_forward_hook(
        lambda m, i, o: skip_channels.__setitem__("c", o.shape[1]))]
    with torch.no_grad():
        hooks.append(target.register_forward_pre_hook(
            lambda m, a: kept.__setitem__("h", a[0][:, :-skip_channels["c"]].clone())))
        unet(x1, t1, ctx)
        hooks[-1].remove()

        def swap(m, a):
            c = skip_channels["c"]
            return (torch.cat([kept["h"], a[0][:, -c:]], 1),) + a[1:]
        hooks.append(target.register_forward_pre_hook(swap))
        expected = unet(x2, t2, ctx)
        for h in hooks:
            h.remove()
        with unet.caching(2) as cache:
            first = unet(x1, t1, ctx)
            second = unet(x2, t2, ctx)
        plain = unet(x2, t2, ctx)
    assert torch.allclose(first, unet(x1, t1, ctx), atol=1e-6), "the first call is whole"
    assert cache.full == 1 and cache.calls == 2
    assert torch.allclose(second, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(second, plain, atol=1e-3), "the cached call is not the whole one"


def test_cache_schedule_and_batch_change():
    unet = build_tiny().model.diffusion_model
    x, ctx = unet_inputs(unet)
    t = torch.full((2,), 500)
    with torch.no_grad(), unet.caching(3) as cache:
        for _ in range(9):
            unet(x, t, ctx)
        assert cache.calls == 9 and cache.full == 3
        unet(x[:1], t[:1], ctx[:1])  # another batch size: the whole UNet
        assert cache.full == 4
    assert unet.feature_cache is None, "the cache ends with the block"
    with pytest.raises(ValueError, match="at least 1"):
        with unet.caching(0):
            pass


def test_a_cached_call_costs_a_fraction_of_the_flops():
    from torch.utils.flop_counter import FlopCounterMode
    unet = build_tiny().model.diffusion_model
    x, ctx = unet_inputs(unet, side=32)
    t = torch.full((2,), 500)

    def flops():
        with FlopCounterMode(display=False) as counter:
            unet(x, t, ctx)
        return counter.get_total_flops()
    with torch.no_grad():
        whole = flops()
        with unet.caching(2):
            assert flops() == whole  # the first call keeps the features
            cached = flops()
    # the tiny UNet has 4 blocks a side, of which 2 a side run: about half of its flops
    assert cached < 0.75 * whole


def test_pipeline_deepcache_is_close_to_the_uncached_image_and_recorded():
    full = Pipeline(build_tiny(), CPU, "full", watermark=False)
    z = full.latents(sampler="ddim", steps=12, **KW)
    same = Pipeline(build_tiny(), CPU, "full", watermark=False).set_options(deepcache=1)
    assert same.deepcache is None and torch.equal(same.latents(sampler="ddim", steps=12, **KW), z)
    cached = Pipeline(build_tiny(), CPU, "full", watermark=False).set_options(deepcache=3)
    zc = cached.latents(sampler="ddim", steps=12, **KW)
    rel = ((zc - z).norm() / z.norm()).item()
    assert 0 < rel < 0.25, rel
    sample = cached.generate("a red circle", 1, sampler="ddim", steps=4, progress=False)[0]
    assert sample.parameters["deepcache"] == 3
    from ldm.image_io import parameters_text
    assert "DeepCache interval: 3" in parameters_text(sample.parameters)


# ------------------------------------------------------------------------ attention slicing

def test_attention_slicing_is_exact_and_sliced(monkeypatch):
    model = build_tiny()
    unet = model.model.diffusion_model
    x, ctx = unet_inputs(unet, side=16)  # 256 queries at the top level
    t = torch.full((2,), 500)
    with torch.no_grad():
        whole = unet(x, t, ctx)
        calls = []
        real = F.scaled_dot_product_attention

        def counting(q, k, v, *a, **kw):
            calls.append(q.shape[2])
            return real(q, k, v, *a, **kw)
        monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
        set_attention_slicing(model, 100)
        sliced = unet(x, t, ctx)
    assert max(calls) == 100 and 56 in calls, "256 queries as 100 + 100 + 56"
    assert torch.allclose(sliced, whole, atol=1e-6, rtol=1e-5)
    assert all(m.slice_rows == 100 for m in model.modules() if isinstance(m, CrossAttention))
    set_attention_slicing(model, None)
    assert all(m.slice_rows is None for m in model.modules() if isinstance(m, CrossAttention))
    with pytest.raises(ValueError):
        set_attention_slicing(model, 0)


# ------------------------------------------------------------------------------ VAE tiling

@pytest.mark.parametrize("length,tile,overlap", [(64, 16, 4), (50, 16, 4), (17, 16, 4),
                                                 (16, 16, 4), (100, 32, 8), (33, 8, 2)])
def test_tiles_cover_with_overlap(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0 and min(starts[-1] + tile, length) == length
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))
    assert starts == sorted(set(starts))


def test_tiled_equals_whole_for_a_local_map():
    """A map with no context (nearest upsampling, and its inverse) is the same tiled: the
    blending weights sum to one everywhere."""
    z = torch.randn(2, 4, 37, 50)
    up = lambda t: F.interpolate(t, scale_factor=8, mode="nearest")  # noqa: E731
    assert torch.allclose(tiled(up, z, 16, 1, 8), up(z), atol=1e-6)
    x = torch.randn(1, 3, 128, 200)
    down = lambda t: F.avg_pool2d(t, 8)  # noqa: E731
    assert torch.allclose(tiled(down, x, 8, 8, 1, overlap=3), down(x), atol=1e-6)
    with pytest.raises(ValueError, match="overlap"):
        tiled(up, z, 16, 1, 8, overlap=16)


@pytest.fixture(scope="module")
def builtin():
    return Pipeline.load(BUILTIN_DIR / "model.safetensors", device="cpu", safety=False,
                         watermark=False, precision="full")


def shapes_image(side=256, seed=3):
    from ldm.data.shapes import render, sample_scene
    from PIL import Image
    return Image.fromarray(render(sample_scene(np.random.default_rng(seed), n_shapes=2), size=side))


def seam_error(a, b, axis, edges, reach=8):
    """The worst line (column for axis 1, row for axis 0) within ``reach`` pixels of a tile
    edge (``edges``, in pixels): the mean error, in grey levels, of a's neighbour
    differences against b's. A tile edge that shows is a spike in it."""
    da = np.diff(np.asarray(a, np.float64), axis=axis)
    db = np.diff(np.asarray(b, np.float64), axis=axis)
    err = np.abs(da - db).mean(axis=(1 - axis, 2))
    near = sorted({e + d for e in edges for d in range(-reach, reach) if 0 <= e + d < len(err)})
    return err[near].max()


def test_tiled_decode_is_seamless_against_the_whole_one(builtin):
    """The built-in autoencoder (f4): a 256x256 shapes image's latents (64x64) decoded in
    tiles of 16 (64 px) is close to the whole decode, with no line next to a tile edge
    more than a few grey levels off; tiles side by side without blending show their
    edges to the same check."""
    from ldm.image_io import tensor_to_pil
    from sampler_study import psnr
    model = builtin.model
    z = builtin.encode([shapes_image()])
    assert z.shape[-1] == 64
    with torch.no_grad():
        whole = tensor_to_pil(model.decode_first_stage(z))[0]
        blended = tensor_to_pil(model.decode_first_stage(z, 16))[0]
        rows = [torch.cat([model.decode_first_stage(z[..., y:y + 16, x:x + 16])
                           for x in range(0, 64, 16)], -1) for y in range(0, 64, 16)]
        cut = tensor_to_pil(torch.cat(rows, -2))[0]
    assert psnr(blended, whole) > 35, psnr(blended, whole)
    starts, f = tile_starts(64, 16, 4), builtin.factor
    edges = {s * f for s in starts[1:]} | {(s + 16) * f for s in starts[:-1]}
    for axis in (0, 1):
        seams = seam_error(blended, whole, axis, edges)
        cut_edges = seam_error(cut, whole, axis, [64, 128, 192])
        assert seams < 4 and seams < 0.3 * cut_edges, (axis, seams, cut_edges)


def test_pipeline_vae_tiling_decodes_and_encodes_in_tiles(builtin):
    from ldm.image_io import tensor_to_pil
    from sampler_study import psnr
    image = shapes_image()
    kw = dict(prompts="a red circle", seeds=7, sampler="ddim", steps=6, height=128,
              width=128, progress=False)
    z = builtin.latents(**kw)
    try:
        whole_z = builtin.encode([image])
        builtin.set_options(vae_tiling=16)
        tiled_z = builtin.encode([image])
        sample = builtin.generate(**kw)[0]
    finally:
        builtin.set_options()
    assert builtin.vae_tile is None
    with torch.no_grad():
        expected = tensor_to_pil(builtin.model.decode_first_stage(z, 16))[0]
    assert np.array_equal(np.asarray(sample.image), np.asarray(expected))
    assert sample.parameters["vae_tiling"] == 16
    rel = ((tiled_z - whole_z).norm() / whole_z.norm()).item()
    assert 0 < rel < 0.1, rel  # 64-px tiles: the encoder's statistics are a tile's
    assert psnr(builtin.decode(tiled_z)[0], builtin.decode(whole_z)[0]) > 38


# ------------------------------------------------------------------------------- offload

def test_offload_moves_one_submodel_at_a_time(monkeypatch):
    """On a CPU-only machine "the device" is the CPU too: what is checked is which
    submodel is sent where, and when (the text encoder, then the UNet, then the
    autoencoder, each back to the CPU after its work)."""
    pipe = Pipeline(build_tiny(), CPU, "full", watermark=False).offload_to(CPU)
    parts = {id(getattr(pipe.model, n)): n for n in ("cond_stage_model", "model",
                                                     "first_stage_model")}
    moves = []
    real = torch.nn.Module.to

    def to(self, *args, **kw):
        if id(self) in parts:
            moves.append((parts[id(self)], str(args[0] if args else kw.get("device"))))
        return real(self, *args, **kw)
    monkeypatch.setattr(torch.nn.Module, "to", to)
    pipe.generate("a red circle", 1, sampler="ddim", steps=2, progress=False)
    assert moves == [("cond_stage_model", "cpu"), ("cond_stage_model", "cpu"),
                     ("model", "cpu"), ("model", "cpu"),
                     ("first_stage_model", "cpu"), ("first_stage_model", "cpu")]
    assert pipe.options_record() == {"offload": True}


def test_offload_needs_a_gpu_in_the_scripts(tmp_path, ckpts):
    import txt2img
    code = txt2img.main(["--ckpt", str(ckpts["ckpt"]), "--offload", "--device", "cpu",
                         "--outdir", str(tmp_path / "out")])
    assert code == 2 and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ the flags

@pytest.mark.parametrize("script", ["txt2img", "img2img", "inpaint"])
def test_every_script_takes_the_flags_and_records_them(tmp_path, ckpts, script):
    import importlib

    from PIL import Image

    from conftest import TINY_CONFIG
    from ldm.image_io import read_parameters
    image, mask = tmp_path / "image.png", tmp_path / "mask.png"
    Image.fromarray(np.full((128, 128, 3), 120, np.uint8)).save(image)
    m = np.zeros((128, 128), np.uint8)
    m[32:96, 32:96] = 255
    Image.fromarray(m).save(mask)
    task = {"txt2img": ["--H", "128", "--W", "128"], "img2img": ["--init-img", str(image)],
            "inpaint": ["--image", str(image), "--mask", str(mask)]}[script]
    args = ["--ckpt", str(ckpts["ckpt"]), "--config", str(TINY_CONFIG), "--device", "cpu",
            "--ddim_steps", "4", "--n_samples", "1", "--n_iter", "1", "--outdir",
            str(tmp_path / "out"), "--deepcache", "2", "--vae_tiling", "16",
            "--attention_slicing", *task]
    assert importlib.import_module(script).main(args) == 0
    params = read_parameters(next((tmp_path / "out").rglob("0000*.png")))
    assert params["deepcache"] == 2 and params["vae_tiling"] == 16
    assert params["attention_slicing"] == 1024


def test_compile_without_a_compiler_is_one_line_before_the_load(tmp_path, ckpts, capsys,
                                                               monkeypatch):
    import shutil

    import txt2img
    from ldm import pipeline
    monkeypatch.setattr(shutil, "which", lambda name: None)
    loads = []
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: loads.append(a))
    code = txt2img.main(["--ckpt", str(ckpts["ckpt"]), "--compile", "--device", "cpu",
                         "--outdir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code != 0 and not loads and err.count("\n") == 1
    assert "--compile needs a C++ compiler" in err


# ------------------------------------------------------------------------------- compile

def test_compile_matches_eager_keeps_the_keys_and_returns_to_eager():
    """torch.compile of the tiny UNet (inductor, about a minute and a half on 2 cores):
    the same latents as eager to float rounding, recorded, the state dict's keys as before;
    turned off, eager again, and on again without a second compilation."""
    import time
    pipe = Pipeline(build_tiny(), CPU, "full", watermark=False)
    kw = dict(KW, sampler="ddim", steps=3)
    keys = list(pipe.model.state_dict())
    eager = pipe.latents(**kw)
    compiled = pipe.set_options(compile=True).latents(**kw)
    assert pipe.compiled and list(pipe.model.state_dict()) == keys
    assert torch.allclose(compiled, eager, atol=1e-4, rtol=1e-4)
    assert pipe.options_record() == {"compile": True}
    unet = pipe.model.model.diffusion_model
    assert unet._compiled_call_impl is not None
    pipe.set_options()
    assert unet._compiled_call_impl is None and torch.equal(pipe.latents(**kw), eager)
    start = time.perf_counter()
    again = pipe.set_options(compile=True).latents(**kw)
    assert time.perf_counter() - start < 10, "no second compilation"
    assert torch.equal(again, compiled)


def test_a_size_only_a_tiled_decode_fits_says_so(monkeypatch):
    """SD v1 at 4096x4096: the decoder's activations (a floor of 48 GiB) do not fit in 24
    GiB; tiled, the UNet's (10 GiB) set the floor, and the run may go ahead."""
    from ldm import cli, request
    from ldm.config import SD_CONFIG, geometry, load_config
    from ldm.errors import ResourceError
    g = geometry(load_config(SD_CONFIG))
    monkeypatch.setattr(request, "available_memory", lambda device="auto": 24 * 2**30)
    with pytest.raises(ResourceError, match="or add --vae_tiling$"):
        cli.check_size(g, 4096, 4096, 1, "cpu")
    cli.check_size(g, 4096, 4096, 1, "cpu", vae_tile=64)
    with pytest.raises(ResourceError, match="--n_samples$"):  # the UNet's part: no hint
        cli.check_size(g, 4096, 4096, 4, "cpu", vae_tile=64)
