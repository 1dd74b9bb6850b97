"""ControlNet (``ldm.modules.diffusionmodules.controlnet``) in lllyasviel's ``control_model.*``
layout against diffusers' ``ControlNetModel`` on identical random weights, converted by
diffusers' own converter of that layout; and the UNet taking its residuals against diffusers'
UNet given them."""
import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT, TINY_CONFIG, randomize, rel_err

diffusers = pytest.importorskip("diffusers")


def tiny_controlnet(seed=3):
    """A ControlNet for the tiny SD-1-shaped model: its UNet's parameters and a 3-channel
    hint, random weights (the zero convolutions too, or the check would be vacuous)."""
    from ldm.modules.diffusionmodules.controlnet import ControlNet
    config = OmegaConf.load(TINY_CONFIG)
    params = OmegaConf.to_container(config.model.params.unet_config.params)
    config.model.params.control_stage_config = {
        "target": "cldm.cldm.ControlNet", "params": {**params, "hint_channels": 3}}
    return randomize(ControlNet(hint_channels=3, **params), seed).eval(), config


def their_controlnet(ours, config):
    """diffusers' ControlNetModel holding our weights, through diffusers' converter."""
    from ldm.compare import to_diffusers_controlnet
    return to_diffusers_controlnet(ours, config)[0]


@pytest.mark.parametrize("name,heads", [("cldm_v15.yaml", [8] * 4), ("cldm_v21.yaml", None)])
def test_the_published_cldm_configs_build_the_keys_diffusers_reads(name, heads):
    """configs/controlnet/cldm_v15.yaml and cldm_v21.yaml (lllyasviel's) build, on the meta
    device, a ControlNet whose every ``control_model.*`` key diffusers' converter reads
    into a ControlNetModel of SD 1.5's (2.1's) shapes, none left over or missing."""
    from ldm.util import instantiate_from_config
    config = OmegaConf.load(ROOT / "configs" / "controlnet" / name)
    with torch.device("meta"):
        ours = instantiate_from_config(config.model.params.control_stage_config)
    assert len(ours.zero_convs) == 12 and ours.input_hint_block[0].in_channels == 3
    from ldm.compare import to_diffusers_controlnet
    with torch.device("meta"):
        theirs, cfg, converted = to_diffusers_controlnet(ours, config)
    assert cfg["cross_attention_dim"] == (768 if heads else 1024)
    want = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == want
    assert len(ours.state_dict()) == len(want)


@torch.no_grad()
def test_controlnet_and_the_controlled_unet_equal_diffusers():
    """Every residual (one per input block and the middle block's) equals diffusers'
    ControlNetModel's down and mid residuals, and the UNet adding them equals diffusers'
    UNet given them as down_block_additional_residuals / mid_block_additional_residual; the
    residuals change the UNet's output."""
    from conftest import build_tiny
    from ldm.compare import to_diffusers
    ours, config = tiny_controlnet()
    theirs = their_controlnet(ours, config)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    hint = torch.rand(2, 3, 64, 64, generator=g)
    t = torch.tensor([901, 21])
    context = torch.randn(2, 77, 32, generator=g)
    res = ours(x, hint, t, context)
    down, mid = theirs(x, t, encoder_hidden_states=context, controlnet_cond=hint,
                       return_dict=False)
    assert len(res) == len(down) + 1
    for a, b in zip(res, [*down, mid]):
        assert a.abs().max() > 1e-3 and rel_err(a, b) < 1e-5
    model = build_tiny(5)
    unet = model.model.diffusion_model
    their_unet, _, _ = to_diffusers(model, OmegaConf.load(TINY_CONFIG))
    plain = unet(x, t, context=context)
    controlled = unet(x, t, context=context, control=res)
    want = their_unet(x, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                      mid_block_additional_residual=mid).sample
    assert rel_err(controlled, want) < 1e-5 and rel_err(controlled, plain) > 1e-2
    with unet.caching(2), pytest.raises(ValueError, match="DeepCache"):
        unet(x, t, context=context, control=res)


@pytest.mark.parametrize("layout", ["cldm-file", "cldm-whole-model", "diffusers-folder",
                                    "diffusers-file"])
def test_a_controlnet_loads_from_each_published_layout(tmp_path, layout):
    """lllyasviel's file (``control_model.*``; ControlNet 1.0's also holding a whole model),
    diffusers' ControlNetModel folder and its weights file: each loads for the model it was
    made for into the same weights, as a copy of that model's UNet encoder."""
    from safetensors.torch import save_file
    from ldm.controlnet import build_controlnet, load_controlnet
    model, _ = f8_model(2)
    ours = randomize(build_controlnet(model), 7).eval()
    want = ours.state_dict()
    if layout.startswith("cldm"):
        sd = {"control_model." + k: v.contiguous() for k, v in want.items()}
        if layout == "cldm-whole-model":
            sd.update({k: v.contiguous() for k, v in model.state_dict().items()})
        path = tmp_path / "control_sd15_tiny.safetensors"
        save_file(sd, path)
    else:
        their_controlnet(ours, OmegaConf.load(TINY_CONFIG)).save_pretrained(tmp_path / "cn")
        path = tmp_path / "cn" if layout == "diffusers-folder" else \
            tmp_path / "cn" / "diffusion_pytorch_model.safetensors"
    got = load_controlnet(path, model)
    assert set(got.state_dict()) == set(want)
    for k, v in got.state_dict().items():
        assert torch.equal(v, want[k]), k


def test_a_controlnet_for_another_model_or_no_controlnet_is_one_line(tmp_path):
    from safetensors.torch import save_file
    from conftest import build_tiny
    from ldm.checkpoint import CheckpointError
    from ldm.controlnet import build_controlnet, load_controlnet
    from ldm.modules.diffusionmodules.controlnet import ControlNet
    model, _ = f8_model(2)
    params = dict(build_controlnet(model).params, context_dim=64)
    other = ControlNet(hint_channels=3, **params)
    save_file({"control_model." + k: v.contiguous() for k, v in other.state_dict().items()},
              tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match=r"made for a model of 64-wide text; this model "
                                              r"attends to 32-wide text") as e:
        load_controlnet(tmp_path / "other.safetensors", model)
    assert "\n" not in str(e.value)
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, tmp_path / "lora.safetensors")
    with pytest.raises(CheckpointError, match="is not a ControlNet"):
        load_controlnet(tmp_path / "lora.safetensors", model)
    with pytest.raises(CheckpointError, match="latents of 8x8 pixels and this model's are 4x4"):
        load_controlnet(tmp_path / "other.safetensors", build_tiny())   # the built-in's f4
    save_file({"lora_controlnet": torch.zeros(1), "input_blocks.1.0.in_layers.2.up":
               torch.zeros(4, 2)}, tmp_path / "control-lora-canny-rank128.safetensors")
    with pytest.raises(CheckpointError, match="is a control-LoRA .* not run here yet"):
        load_controlnet(tmp_path / "control-lora-canny-rank128.safetensors", model)
    save_file({"task_embedding": torch.zeros(8, 32), "controlnet_cond_embedding.conv_in.weight":
               torch.zeros(16, 3, 3, 3)}, tmp_path / "controlnet-union.safetensors")
    with pytest.raises(CheckpointError, match="is a \"union\" ControlNet") as e:
        load_controlnet(tmp_path / "controlnet-union.safetensors", model)
    assert "\n" not in str(e.value)


def f8_model(seed=1):
    """The tiny SD-1-shaped model with an f8 autoencoder: a ControlNet's hint encoder takes
    its image down 8x, to the latents' size."""
    from ldm.util import instantiate_from_config
    config = OmegaConf.load(TINY_CONFIG)
    config.model.params.first_stage_config.params.ddconfig.ch_mult = [1, 2, 2, 2]
    return randomize(instantiate_from_config(config.model), seed).eval(), config


def _control_image(seed, size=64):
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.mark.parametrize("two", [False, True], ids=["one", "two-with-step-ranges"])
def test_txt2img_with_controlnets_equals_diffusers_controlnet_pipeline(tmp_path, two):
    """Text-to-image with one ControlNet (weight 0.7), and with two at once (weights 0.7 and
    1.2, the second acting in the middle half of the steps only): the latents of
    StableDiffusionControlNetPipeline (MultiControlNetModel for two) on the same weights,
    noise and control images; without the ControlNets the image differs."""
    from ldm.compare import diffusers_components
    from ldm.controlnet import ControlUnit, build_controlnet
    from ldm.pipeline import Pipeline
    model, config = f8_model(7)
    nets = [randomize(build_controlnet(model), s).eval() for s in (11, 12)[:1 + two]]
    images = [_control_image(s) for s in (1, 2)[:1 + two]]
    weights, starts, ends = [0.7, 1.2][:1 + two], [0.0, 0.25][:1 + two], [1.0, 0.75][:1 + two]
    ours = Pipeline(model, torch.device("cpu"), "full", watermark=False)
    prompts, seeds = ["a red circle", "two blue squares"], [3, 4]
    plain = ours.latents(prompts, seeds, sampler="ddim", steps=4, height=64, width=64,
                         progress=False)
    ours.set_controls([ControlUnit(n, im, w, s, e) for n, im, w, s, e in
                       zip(nets, images, weights, starts, ends)])
    z_ours = ours.latents(prompts, seeds, sampler="ddim", steps=4, height=64, width=64,
                          progress=False)
    parts = diffusers_components(model, config, tmp_path / "tok")
    theirs_nets = [their_controlnet(n, config) for n in nets]
    pipe = diffusers.StableDiffusionControlNetPipeline(
        **parts, controlnet=theirs_nets if two else theirs_nets[0])
    pipe.set_progress_bar_config(disable=True)
    x, _ = ours.initial_noise(seeds, 64, 64)
    z_theirs = pipe(prompts, image=images if two else images[0], num_inference_steps=4,
                    guidance_scale=7.5, height=64, width=64, latents=x.clone(),
                    controlnet_conditioning_scale=weights if two else weights[0],
                    control_guidance_start=starts if two else starts[0],
                    control_guidance_end=ends if two else ends[0],
                    output_type="latent").images
    match = rel_err(z_ours, z_theirs)
    assert z_ours.abs().max() > 0.1 and match < 1e-5
    assert rel_err(plain, z_ours) > 100 * match
    ours.set_controls([])
    assert torch.equal(ours.latents(prompts, seeds, sampler="ddim", steps=4, height=64,
                                    width=64, progress=False), plain)


def test_the_scripts_take_controlnets_and_refuse_bad_ones_in_one_line(tmp_path):
    """txt2img.py --control FILE --control_image IMG (twice, the second with a weight and a
    step range): the image changes, its PNG records both; the same run again is the same
    image. Mismatched counts, an empty step range, a missing file and a ControlNet for
    another model: one line each, nothing written."""
    from safetensors.torch import save_file
    from conftest import run_here
    from ldm.controlnet import build_controlnet
    from ldm.image_io import read_parameters
    model, config = f8_model(9)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              tmp_path / "m.safetensors")
    OmegaConf.save(config, tmp_path / "m.yaml")
    for i, seed in enumerate((21, 22)):
        net = randomize(build_controlnet(model), seed)
        save_file({"control_model." + k: v.contiguous() for k, v in net.state_dict().items()},
                  tmp_path / f"control_{i}.safetensors")
        _control_image(seed).save(tmp_path / f"map_{i}.png")
    common = ["--prompt", "a red circle", "--ckpt", tmp_path / "m.safetensors", "--config",
              tmp_path / "m.yaml", "--ddim_steps", 4, "--n_samples", 1, "--n_iter", 1,
              "--H", 64, "--W", 64, "--safety_checker", "none", "--skip_grid"]
    controls = ["--control", tmp_path / "control_0.safetensors", "--control_image",
                tmp_path / "map_0.png", "--control", tmp_path / "control_1.safetensors",
                "--control_image", tmp_path / "map_1.png", "--control_weight", 1.0,
                "--control_weight", 0.5, "--control_start", 0, "--control_start", 0.25,
                "--control_mode", "balanced", "--control_mode", "control"]
    runs = {}
    for name, extra in (("plain", []), ("a", controls), ("b", controls)):
        done = run_here("txt2img.py", *common, *extra, "--outdir", tmp_path / name)
        assert done.returncode == 0, done.stderr
        runs[name] = tmp_path / name / "samples" / "00000.png"
    from PIL import Image
    pixels = {k: Image.open(v).tobytes() for k, v in runs.items()}
    assert pixels["a"] == pixels["b"] != pixels["plain"]
    record = read_parameters(runs["a"])["controlnets"]
    assert [(c["model"], c["weight"], c["start"], c["end"], c["mode"]) for c in record] == [
        ("control_0.safetensors", 1.0, 0.0, 1.0, "balanced"),
        ("control_1.safetensors", 0.5, 0.25, 1.0, "control")]
    # --control_preprocess canny = the edges map given as the image
    from ldm.controlnet import preprocess
    preprocess(Image.open(tmp_path / "map_0.png"), "canny").save(tmp_path / "edges_0.png")
    for name, extra in (("c", ["--control_image", tmp_path / "map_0.png",
                               "--control_preprocess", "canny"]),
                        ("d", ["--control_image", tmp_path / "edges_0.png"])):
        done = run_here("txt2img.py", *common, "--control", tmp_path / "control_0.safetensors",
                        *extra, "--outdir", tmp_path / name)
        assert done.returncode == 0, done.stderr
    c, d = (tmp_path / n / "samples" / "00000.png" for n in "cd")
    assert Image.open(c).tobytes() == Image.open(d).tobytes()
    assert read_parameters(c)["controlnets"][0]["preprocess"] == "canny"
    # inpaint.py takes them too: outside the mask every pixel stays the input's
    import numpy as np
    _control_image(30).save(tmp_path / "scene.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    done = run_here("inpaint.py", *common, *controls[:4], "--image", tmp_path / "scene.png",
                    "--mask", tmp_path / "mask.png", "--outdir", tmp_path / "inp")
    assert done.returncode == 0, done.stderr
    got = np.asarray(Image.open(tmp_path / "inp" / "samples" / "00000.png"))
    keep = mask == 0
    keep[12:52, 12:52] = False   # the feathered seam
    assert (got[keep] == np.asarray(Image.open(tmp_path / "scene.png"))[keep]).all()
    other = dict(build_controlnet(model).params, context_dim=64)
    from ldm.modules.diffusionmodules.controlnet import ControlNet
    save_file({"control_model." + k: v.contiguous() for k, v in
               ControlNet(hint_channels=3, **other).state_dict().items()},
              tmp_path / "control_sd21.safetensors")
    bad = [(["--control", tmp_path / "control_0.safetensors"], "1 --control and 0 "
                                                              "--control_image"),
           (controls[:4] + ["--control_start", 0.6, "--control_end", 0.5],
            "--control_start 0.6 is not before --control_end 0.5"),
           (["--control", tmp_path / "nope.safetensors", "--control_image",
             tmp_path / "map_0.png"], "nope.safetensors: not found"),
           (["--control", tmp_path / "control_sd21.safetensors", "--control_image",
             tmp_path / "map_0.png"], "made for a model of 64-wide text"),
           (["--control", tmp_path / "control_0.safetensors", "--control_image",
             tmp_path / "m.yaml"], "--control_image")]
    for i, (extra, words) in enumerate(bad):
        done = run_here("txt2img.py", *common, *extra, "--outdir", tmp_path / f"bad{i}")
        errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
        assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
        assert len(errors) == 1 and words in errors[0], done.stderr
        assert not (tmp_path / f"bad{i}").exists()


def test_img2img_with_a_controlnet_equals_diffusers_controlnet_img2img(tmp_path):
    """Image-to-image at strength 0.6 with a ControlNet acting in the first 80% of the steps
    run: StableDiffusionControlNetImg2ImgPipeline's latents, fed our init latents."""
    from ldm.compare import diffusers_components
    from ldm.controlnet import ControlUnit, build_controlnet
    from ldm.pipeline import Pipeline
    model, config = f8_model(8)
    net = randomize(build_controlnet(model), 13).eval()
    hint = _control_image(5)
    ours = Pipeline(model, torch.device("cpu"), "full", watermark=False)
    ours.set_controls([ControlUnit(net, hint, 0.9, 0.0, 0.8)])
    init = ours.encode([_control_image(6)])
    prompts, seeds = ["a red circle", "a blue square"], [7, 8]
    z_ours = ours.latents(prompts, seeds, sampler="ddim", steps=10, scale=7.5, strength=0.6,
                          height=64, width=64, init=init, progress=False)
    parts = diffusers_components(model, config, tmp_path / "tok")
    pipe = diffusers.StableDiffusionControlNetImg2ImgPipeline(
        **parts, controlnet=their_controlnet(net, config))
    pipe.set_progress_bar_config(disable=True)
    z_theirs = pipe(prompts, image=init.expand(2, -1, -1, -1).clone(), control_image=hint,
                    strength=0.6, num_inference_steps=10, guidance_scale=7.5,
                    controlnet_conditioning_scale=0.9, control_guidance_end=0.8,
                    generator=[torch.Generator().manual_seed(s) for s in seeds],
                    output_type="latent").images
    assert z_ours.abs().max() > 0.1 and rel_err(z_ours, z_theirs) < 1e-5


def test_preprocessors_make_the_maps_opencv_makes_and_bad_specs_are_one_line(tmp_path):
    """canny = OpenCV's Canny on the greyscale image (white edges, RGB); scribble holds every
    Canny edge, thickened; threshold and invert as named; a bad name, count or value is one
    line. scripts/control_map.py writes the same map and never over a file."""
    import cv2
    import numpy as np
    from PIL import Image
    from conftest import run_here
    from ldm.controlnet import parse_preprocess, preprocess
    from ldm.errors import UsageError
    rng = np.random.default_rng(0)
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[16:48, 20:40] = (200, 40, 90)
    pixels += rng.integers(0, 20, pixels.shape, dtype=np.uint8)
    image = Image.fromarray(pixels)
    grey = np.asarray(image.convert("L"))
    canny = np.asarray(preprocess(image, "canny:50:150"))
    assert canny.shape == (64, 64, 3) and (canny[..., 0] == cv2.Canny(grey, 50, 150)).all()
    assert canny.any() and (canny[..., 0] == canny[..., 2]).all()
    scribble = np.asarray(preprocess(image, "scribble:50:150"))[..., 0]
    assert (scribble[canny[..., 0] > 0] == 255).all() and (scribble > 0).sum() > (
        canny[..., 0] > 0).sum()
    assert (np.asarray(preprocess(image, "threshold:100"))[..., 1] == np.where(
        grey > 100, 255, 0)).all()
    assert (np.asarray(preprocess(image, "invert")) == 255 - pixels).all()
    assert parse_preprocess("canny") == ("canny", {"low": 100, "high": 200})
    for spec, words in (("blur", "unknown; one of none, canny"),
                        ("canny:1:2:3", "canny takes 2 number(s) (low:high)"),
                        ("threshold:300", "level must be from 0 to 255"),
                        ("canny:x", "low must be a whole number"),
                        ("canny:200:100", "low threshold is above the high one"),
                        ("invert:3", "invert takes 0 number(s)")):
        with pytest.raises(UsageError, match=__import__("re").escape(words)) as e:
            parse_preprocess(spec)
        assert "\n" not in str(e.value)
    image.save(tmp_path / "in.png")
    done = run_here("control_map.py", "--image", tmp_path / "in.png", "--preprocess",
                    "canny:50:150", "--out", tmp_path / "maps" / "edges.png")
    assert done.returncode == 0, done.stderr
    assert (np.asarray(Image.open(tmp_path / "maps" / "edges.png")) == canny).all()
    again = run_here("control_map.py", "--image", tmp_path / "in.png", "--out",
                     tmp_path / "maps" / "edges.png")
    assert again.returncode != 0 and "exists" in again.stderr and "Traceback" not in again.stderr


def test_guess_mode_equals_diffusers_guess_mode(tmp_path):
    """--control_mode guess: diffusers' guess mode (the ControlNet on the conditional half
    alone, its residuals scaled from 0.1 to 1 on a log scale), weight 0.8: the latents of
    StableDiffusionControlNetPipeline(guess_mode=True)."""
    from ldm.compare import diffusers_components
    from ldm.controlnet import ControlUnit, build_controlnet
    from ldm.pipeline import Pipeline
    model, config = f8_model(7)
    net = randomize(build_controlnet(model), 11).eval()
    image = _control_image(1)
    ours = Pipeline(model, torch.device("cpu"), "full", watermark=False)
    ours.set_controls([ControlUnit(net, image, 0.8, guess=True)])
    prompts, seeds = ["a red circle", "two blue squares"], [3, 4]
    z_ours = ours.latents(prompts, seeds, sampler="ddim", steps=4, height=64, width=64,
                          progress=False)
    pipe = diffusers.StableDiffusionControlNetPipeline(
        **diffusers_components(model, config, tmp_path / "tok"),
        controlnet=their_controlnet(net, config))
    pipe.set_progress_bar_config(disable=True)
    x, _ = ours.initial_noise(seeds, 64, 64)
    z_theirs = pipe(prompts, image=image, num_inference_steps=4, guidance_scale=7.5,
                    height=64, width=64, latents=x.clone(), guess_mode=True,
                    controlnet_conditioning_scale=0.8, output_type="latent").images
    assert z_ours.abs().max() > 0.1 and rel_err(z_ours, z_theirs) < 1e-5


@torch.no_grad()
def test_a1111_control_modes_scale_and_place_the_residuals_as_documented():
    """A1111's modes on a guided batch (unconditional half first): "balanced" adds the
    residuals times the weight to both halves; "prompt" (my prompt is more important)
    scales residual i of 13 by 0.825 ** (12 - i) in both; "control" (ControlNet is more
    important) does so in the conditional half only, the unconditional half unchanged."""
    from ldm.controlnet import ControlUnit
    from ldm.modules.diffusionmodules.controlnet import control_residuals
    net, _ = tiny_controlnet(4)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([500] * 4)
    cond = {"crossattn": torch.randn(4, 77, 32, generator=g),
            "hint": torch.rand(4, 3, 64, 64, generator=g),
            "cond_mark": torch.tensor([0.0, 0.0, 1.0, 1.0])}
    plain = net(x, cond["hint"], t, cond["crossattn"])
    assert len(plain) == len(net.zero_convs) + 1 == 5
    for mode in ("balanced", "prompt", "control"):
        got = control_residuals([ControlUnit(net, None, 0.5, mode=mode)], None, x, t, cond)
        for i, (a, b) in enumerate(zip(got, plain)):
            soft = 1.0 if mode == "balanced" else 0.825 ** (len(plain) - 1 - i)
            assert torch.allclose(a[2:], b[2:] * 0.5 * soft, rtol=1e-6, atol=1e-7)
            if mode == "control":
                assert not a[:2].any()
            else:
                assert torch.allclose(a[:2], b[:2] * 0.5 * soft, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="control mode 'loud'"):
        ControlUnit(net, None, mode="loud")


def test_an_sdxl_controlnet_from_diffusers_equals_diffusers_sdxl_controlnet_pipeline(tmp_path):
    """An SDXL ControlNet as diffusers publishes them (a ControlNetModel folder, the size
    and pooled-text embedding included), loaded for a tiny SDXL model: text-to-image equals
    StableDiffusionXLControlNetPipeline on the same weights, noise and control image."""
    from ldm.compare import diffusers_components
    from ldm.controlnet import ControlUnit, load_controlnet
    from ldm.pipeline import Pipeline
    from ldm.util import instantiate_from_config
    config = OmegaConf.load(ROOT / "configs" / "tiny" / "tiny-sdxl-inference.yaml")
    config.model.params.first_stage_config.params.ddconfig.ch_mult = [1, 2, 2, 2]   # f8
    model = randomize(instantiate_from_config(config.model), 31).eval()
    parts = diffusers_components(model, config, tmp_path / "tok")
    torch.manual_seed(0)
    theirs = randomize(diffusers.ControlNetModel.from_unet(parts["unet"]), 17).eval()
    theirs.save_pretrained(tmp_path / "controlnet-sdxl")
    net = load_controlnet(tmp_path / "controlnet-sdxl", model)
    assert net.adm_in_channels    # the size and pooled-text vector, as the UNet's
    image = _control_image(3)
    ours = Pipeline(model, torch.device("cpu"), "full", watermark=False)
    ours.set_controls([ControlUnit(net, image, 0.8)])
    prompts, seeds = ["a red circle", "two blue squares"], [5, 6]
    z_ours = ours.latents(prompts, seeds, sampler="ddim", steps=4, scale=5.0, height=64,
                          width=64, progress=False)
    pipe = diffusers.StableDiffusionXLControlNetPipeline(**parts, controlnet=theirs)
    pipe.set_progress_bar_config(disable=True)
    x, _ = ours.initial_noise(seeds, 64, 64)
    z_theirs = pipe(prompts, image=image, num_inference_steps=4, guidance_scale=5.0,
                    height=64, width=64, latents=x.clone(), controlnet_conditioning_scale=0.8,
                    output_type="latent").images
    assert z_ours.abs().max() > 0.1 and rel_err(z_ours, z_theirs) < 1e-4


@pytest.mark.parametrize("strength", [0.7, 1.0])
def test_inpainting_with_a_controlnet_equals_diffusers_controlnet_inpaint(tmp_path, strength):
    """A text-to-image model inpainting by latent blending with a ControlNet: the latents of
    StableDiffusionControlNetInpaintPipeline, its autoencoder's encoding given our init
    latents (it samples the posterior where we take its mean)."""
    import numpy as np
    from PIL import Image
    from ldm.compare import diffusers_components
    from ldm.controlnet import ControlUnit, build_controlnet
    from ldm.pipeline import Pipeline
    model, config = f8_model(6)
    net = randomize(build_controlnet(model), 14).eval()
    hint = _control_image(8)
    ours = Pipeline(model, torch.device("cpu"), "full", watermark=False)
    ours.set_controls([ControlUnit(net, hint, 1.1)])
    picture = _control_image(9)
    init = ours.encode([picture])
    m = np.zeros((64, 64), np.uint8)
    m[8:40, 16:56] = 255
    small, _ = ours.latent_mask(Image.fromarray(m))
    prompts, seeds = ["a red circle", "a blue square"], [7, 8]
    z_ours = ours.latents(prompts, seeds, sampler="ddim", steps=10, scale=7.5,
                          strength=strength, height=64, width=64, init=init, mask=small,
                          progress=False)
    pipe = diffusers.StableDiffusionControlNetInpaintPipeline(
        **diffusers_components(model, config, tmp_path / "tok"),
        controlnet=their_controlnet(net, config))
    pipe.set_progress_bar_config(disable=True)
    pipe._encode_vae_image = lambda image, generator: init.expand(image.shape[0], -1, -1,
                                                                   -1).clone()
    z_theirs = pipe(prompts, image=picture, mask_image=Image.fromarray(m), control_image=hint,
                    strength=strength, num_inference_steps=10, guidance_scale=7.5,
                    height=64, width=64, controlnet_conditioning_scale=1.1,
                    generator=[torch.Generator().manual_seed(s) for s in seeds],
                    output_type="latent").images
    assert z_ours.abs().max() > 0.1 and rel_err(z_ours, z_theirs) < 1e-5


def test_a_control_image_of_another_size_is_resized_and_said_once(caplog):
    from PIL import Image
    from ldm.controlnet import ControlUnit, control_hints
    unit = ControlUnit(None, Image.new("RGB", (40, 24), (255, 0, 0)), name="edges")
    with caplog.at_level("WARNING"):
        for _ in range(3):   # every step asks; the run says it once
            hint = control_hints([unit], 32, 48, 2, "cpu", torch.float32)
    assert hint.shape == (2, 3, 32, 48) and torch.allclose(hint[:, 0], torch.ones(1))
    said = [r.message for r in caplog.records if "control image" in r.message]
    assert said == ["the control image of edges is 40x24: resized to 48x32, the image's size"]
