"""The SD x4 upscaler (LatentUpscaleDiffusion, x4-upscaling.yaml): its published layout is
what diffusers' converter reads, it equals diffusers' StableDiffusionUpscalePipeline on
identical tiny weights and noise, its tiles, scripts/upscale.py, and as a hires-fix
upscaler."""
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import ROOT, randomize, rel_err, run_here
from ldm.errors import CheckpointError, UsageError
from ldm.pipeline import Pipeline, build_model
from ldm.image_io import blend_weights, tile_boxes
from ldm.upscalers import load_upscaler
from ldm.util import instantiate_from_config

diffusers = pytest.importorskip("diffusers")
su = pytest.importorskip("diffusers.loaders.single_file_utils")
TINY = ROOT / "configs" / "tiny" / "tiny-x4-upscaler.yaml"
FULL = ROOT / "configs" / "stable-diffusion" / "x4-upscaling.yaml"


@pytest.fixture(scope="module")
def tiny():
    config = OmegaConf.load(TINY)
    return randomize(instantiate_from_config(config.model), 21).eval(), config


@pytest.fixture(scope="module")
def low_res():
    rng = np.random.RandomState(4)
    smooth = np.kron(rng.rand(6, 10, 3), np.ones((4, 4, 1)))   # 24 x 40, blocky
    return Image.fromarray((smooth * 255).astype(np.uint8))


def test_published_config_is_what_diffusers_converter_reads():
    """Stability's x4-upscaling.yaml builds (meta device) the keys diffusers' single-file
    converter turns into exactly its upscaler UNet's (only_cross_attention from
    disable_self_attentions, the noise level's class embedding) and its f4 VAE's."""
    model = build_model(FULL, meta=True)
    sd = model.state_dict()
    assert sd["model.diffusion_model.input_blocks.0.0.weight"].shape == (256, 7, 3, 3)
    assert sd["model.diffusion_model.label_emb.weight"].shape == (1000, 1024)
    original = OmegaConf.to_container(OmegaConf.load(FULL))
    ucfg = su.create_unet_diffusers_config_from_ldm(original, sd)
    assert ucfg["only_cross_attention"] == [True, True, True, False]
    assert ucfg["num_class_embeds"] == 1000 and ucfg["in_channels"] == 7
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**ucfg)
    converted = su.convert_ldm_unet_checkpoint(sd, ucfg)
    assert set(converted) == set(unet.state_dict())
    assert all(converted[k].shape == v.shape for k, v in unet.state_dict().items())
    vcfg = su.create_vae_diffusers_config_from_ldm(original, sd)
    with torch.device("meta"):
        vae = diffusers.AutoencoderKL(**vcfg)
    assert set(su.convert_ldm_vae_checkpoint(sd, vcfg)) == set(vae.state_dict())
    assert model.first_stage_model.downsampling_factor == 4 and model.scale_factor == 0.08333
    # the low-resolution schedule the checkpoint stores is derived, and set aside at load
    from ldm.checkpoint import IGNORED_KEYS
    assert IGNORED_KEYS.match("low_scale_model.sqrt_alphas_cumprod")


def test_detected_from_its_keys():
    from ldm import families
    sd = build_model(FULL, meta=True).state_dict()
    found = families.detect({k: tuple(v.shape) for k, v in sd.items()})
    assert (found.family.name, found.variant) == ("sd2", "x4-upscaler")
    assert found.config == FULL


def diffusers_upscaler(model, config, folder):
    from ldm.compare import diffusers_components
    parts = diffusers_components(model, config, folder)
    low_res_scheduler = diffusers.DDPMScheduler(
        beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear",
        num_train_timesteps=1000)   # diffusers' low_res_scheduler for x4-upscaler-ema
    pipe = diffusers.StableDiffusionUpscalePipeline(
        vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
        unet=parts["unet"], low_res_scheduler=low_res_scheduler,
        scheduler=parts["scheduler"], max_noise_level=350)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("noise_level", [20, 150])
def test_equals_diffusers_upscale_pipeline(tmp_path, tiny, low_res, noise_level):
    """Identical weights and noise (the start noise, then the low-resolution image's
    noise, from each seed's generator): the same latents and images, DDIM 5 steps, v."""
    model, config = tiny
    theirs = diffusers_upscaler(model, config, tmp_path / "tok")
    assert theirs.scheduler.config.prediction_type == "v_prediction"
    ours = Pipeline(model, torch.device("cpu"), "full")
    prompts, seeds = ["a red circle", "two blue squares"], [7, 8]
    finals = []
    samples = ours.upscale(prompts, seeds, low_res, steps=5, scale=9.0, tile=0,
                           noise_level=noise_level, progress=False,
                           callback=lambda i, x, x0: finals.append(x.clone()))
    x, gens = ours.initial_noise(seeds, 96, 160)
    assert x.shape == (2, 4, 24, 40)   # latents the low-resolution image's size
    out = theirs(prompts, image=[low_res] * 2, num_inference_steps=5, guidance_scale=9.0,
                 noise_level=noise_level, latents=x.clone(), generator=gens,
                 output_type="latent").images
    assert finals[-1].abs().max() > 0.1 and len(finals) == 5
    assert rel_err(finals[-1], out) < 1e-4
    x, gens = ours.initial_noise(seeds, 96, 160)
    images = theirs(prompts, image=[low_res] * 2, num_inference_steps=5, guidance_scale=9.0,
                    noise_level=noise_level, latents=x.clone(), generator=gens).images
    for s, im in zip(samples, images):
        assert s.image.size == im.size == (160, 96)
        diff = np.abs(np.asarray(s.image, np.int16) - np.asarray(im, np.int16))
        assert diff.max() <= 1, diff.max()
    p = samples[0].parameters
    assert (p["task"], p["noise_level"], p["input_size"], p["width"]) == (
        "upscale", noise_level, "40x24", 160)


def test_a_diffusers_folder_loads(tmp_path, tiny, low_res):
    """StableDiffusionUpscalePipeline.save_pretrained's folder as --ckpt (the tiny config in
    it): the same image; a full-size folder's JSON files are told the x4 upscaler."""
    from ldm import families
    model, config = tiny
    folder = tmp_path / "x4-folder"
    diffusers_upscaler(model, config, tmp_path / "tok").save_pretrained(folder)
    (folder / "config.yaml").write_text(TINY.read_text())
    loaded = Pipeline.load(folder, device="cpu", safety=False)
    ours = Pipeline(model, torch.device("cpu"), "full")
    a = loaded.upscale("x", 2, low_res, steps=3, scale=9.0, tile=0, progress=False)[0].image
    b = ours.upscale("x", 2, low_res, steps=3, scale=9.0, tile=0, progress=False)[0].image
    assert np.array_equal(np.asarray(a), np.asarray(b))
    found = families.detect_folder(
        {"_class_name": "StableDiffusionUpscalePipeline", "text_encoder": ["transformers", "x"]},
        {"in_channels": 7, "num_class_embeds": 1000, "cross_attention_dim": 1024},
        {"prediction_type": "v_prediction"})
    assert (found.family.name, found.variant) == ("sd2", "x4-upscaler")


def test_tiles():
    assert tile_boxes(100, 60, 0, 0) == [(0, 0, 100, 60)]
    assert tile_boxes(100, 60, 128, 32) == [(0, 0, 100, 60)]
    boxes = tile_boxes(512, 200, 128, 32)
    tops = sorted({b[0] for b in boxes})
    lefts = sorted({b[1] for b in boxes})
    assert tops == [0, 96, 192, 288, 384] and lefts == [0, 72]
    assert all(b[2] == b[3] == 128 for b in boxes)
    cover = torch.zeros(512, 200)
    total = torch.zeros(512, 200)
    for top, left, h, w in boxes:
        cover[top:top + h, left:left + w] += 1
        total[top:top + h, left:left + w] += blend_weights(h, w, top, left, 512, 200, 32)[0, 0]
    assert cover.min() >= 1 and total.min() > 0
    w = blend_weights(128, 128, 96, 0, 512, 200, 32)[0, 0]
    assert w[0, 0] == pytest.approx(0.5 / 32) and w[64, 0] == 1   # ramps on shared edges only
    assert w[64, 127] < 1 and w[127, 64] < 1


def test_tiled_runs(tiny, low_res):
    ours = Pipeline(tiny[0], torch.device("cpu"), "full")
    whole = ours.upscale("x", 3, low_res, steps=3, tile=0, progress=False)[0]
    one_tile = ours.upscale("x", 3, low_res, steps=3, tile=40, tile_overlap=8,
                            progress=False)[0]
    assert np.array_equal(np.asarray(whole.image), np.asarray(one_tile.image))
    seen = []
    tiled = ours.upscale("x", 3, low_res, steps=3, tile=16, tile_overlap=4, progress=False,
                         callback=lambda i, x, x0: seen.append(tuple(x.shape[-2:])))[0]
    assert tiled.parameters["tiles"] == 6 and len(seen) == 6 * 3
    assert set(seen) == {(16, 16)}
    assert tiled.image.size == whole.image.size
    request = ours.request("upscale", "x", 3, image=low_res, steps=3, tile=16, tile_overlap=4)
    assert ours.steps_run(request) == 6 * ours.num_steps(3)


def test_refusals(tiny, low_res):
    ours = Pipeline(tiny[0], torch.device("cpu"), "full")
    with pytest.raises(UsageError, match="this is the SD x4 upscaler"):
        ours.generate("x", 1)
    with pytest.raises(UsageError, match="noise_level: 400 is out of range"):
        ours.upscale("x", 1, low_res, noise_level=400)
    with pytest.raises(UsageError, match="tile 100 is not a multiple of 8"):
        ours.upscale("x", 1, low_res, tile=100)
    with pytest.raises(UsageError, match="tile_overlap 64 must be less than half"):
        ours.upscale("x", 1, low_res, tile=128, tile_overlap=64)
    sd1 = Pipeline.load(ROOT / "models" / "ldm" / "shapes" / "model.safetensors",
                        device="cpu", safety=False)
    with pytest.raises(UsageError, match="upscaling needs the SD x4 upscaler"):
        sd1.upscale("x", 1, low_res)
    with pytest.raises(UsageError, match="noise_level is for the SD x4 upscaler"):
        sd1.generate("x", 1, noise_level=20)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory, tiny):
    """The tiny upscaler as a checkpoint file with its config beside it."""
    from safetensors.torch import save_file
    folder = tmp_path_factory.mktemp("x4")
    save_file({k: v.contiguous() for k, v in tiny[0].state_dict().items()},
              folder / "x4-tiny.safetensors")
    (folder / "config.yaml").write_text(TINY.read_text())
    return folder / "x4-tiny.safetensors"


def test_script(tmp_path, tiny_file, low_res):
    low_res.save(tmp_path / "low.png")
    out = tmp_path / "out"
    r = run_here("upscale.py", "--ckpt", tiny_file, "--image", tmp_path / "low.png",
                 "--prompt", "a cat", "--ddim_steps", "3", "--noise_level", "30", "--tile",
                 "16", "--tile_overlap", "4", "--n_samples", "2", "--outdir", out)
    assert r.returncode == 0, r.stderr
    files = sorted((out / "samples").glob("*.png"))
    assert len(files) == 2 and Image.open(files[0]).size == (160, 96)
    text = Image.open(files[1]).info["parameters"]
    assert "Seed: 43" in text and "Noise level: 30" in text, text
    r = run_here("upscale.py", "--image", tmp_path / "low.png", "--outdir", out)
    assert r.returncode == 2 and "upscaling needs the SD x4 upscaler" in r.stderr, r.stderr
    r = run_here("upscale.py", "--ckpt", tiny_file, "--image", tmp_path / "missing.png",
                 "--outdir", out)
    assert r.returncode == 3 and r.stderr.count("\n") == 1, r.stderr


def test_as_hires_upscaler(tiny_file, tmp_path):
    """The hires fix with the x4 upscaler: each first-pass image upscaled with its prompt
    and seed, then Lanczos to the size; a file of another kind refused in one line."""
    pipe = Pipeline.load(ROOT / "models" / "ldm" / "shapes" / "model.safetensors",
                         device="cpu", safety=False)
    up = load_upscaler(tiny_file, pipe, "--hr_upscaler")
    up.values.update(steps=2)
    first = pipe.generate("a red circle", 5, steps=4, progress=False)[0].image
    expected = up.pipe.upscale("a red circle", 5, first, steps=2, progress=False)[0].image
    assert expected.size == (256, 256)
    got = up.upscale(first, 128, 128, prompt="a red circle", seed=5)
    assert np.array_equal(np.asarray(got), np.asarray(expected.resize((128, 128),
                                                                      Image.LANCZOS)))
    samples = pipe.generate("a red circle", 5, steps=4, progress=False,
                            hires=dict(upscaler=up, steps=2))
    assert samples[0].image.size == (128, 128)
    assert samples[0].parameters["hr_upscaler"] == "x4-tiny"
    with pytest.raises(CheckpointError, match="not an upscaler this project runs .*spandrel"):
        load_upscaler(ROOT / "models" / "ldm" / "shapes" / "model.safetensors", pipe,
                      "--hr_upscaler")
    torch.save({"conv_first.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "esrgan.pth")
    with pytest.raises(CheckpointError, match="esrgan.pth: not an ESRGAN") as e:
        load_upscaler(tmp_path / "esrgan.pth", pipe, "--hr_upscaler")
    assert "\n" not in str(e.value)
