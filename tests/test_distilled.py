"""Few-step distillates told by their file names (``ldm.families.distilled``): SDXL-Lightning
and Hyper-SD as LoRAs (``--lora``), UNets (``--unet``) and whole checkpoints, their
sampling against the authors' diffusers recipes on identical tiny SDXL weights; ``--unet``
in the original and diffusers layouts."""
import logging
import sys

import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT, randomize, rel_err
from ldm.families.distilled import find, of_name

diffusers = pytest.importorskip("diffusers")
TINY_XL = ROOT / "configs" / "tiny" / "tiny-sdxl-inference.yaml"
PROMPTS, SEEDS = ["a red circle", "two blue squares"], [7, 8]


@pytest.mark.parametrize("name,defaults", [
    ("sdxl_lightning_4step_lora.safetensors", ("euler", 4, 1.0)),
    ("sdxl_lightning_8step_unet.safetensors", ("euler", 8, 1.0)),
    ("SDXL-Lightning-2steps.safetensors", ("euler", 2, 1.0)),
    ("Hyper-SDXL-4steps-lora.safetensors", ("ddim", 4, 1.0)),
    ("Hyper-SDXL-1step-lora.safetensors", ("ddim", 1, 1.0)),
    ("Hyper-SDXL-8steps-CFG-lora.safetensors", ("ddim", 8, 5.0)),
    ("Hyper-SD15-12steps-CFG-lora.safetensors", ("ddim", 12, 5.0)),
    ("hyperrealism_v3.safetensors", None), ("lightning_bolts_style.safetensors", None),
    ("sd_xl_base_1.0.safetensors", None)])
def test_distillates_are_told_by_their_file_names(name, defaults):
    found = of_name(f"/models/{name}")
    if defaults is None:
        assert found is None
        return
    sampler, steps, scale = defaults
    assert found.defaults == {"sampler": sampler, "steps": steps, "scale": scale,
                              "timestep_spacing": "trailing"} and found.refusal is None
    assert found.file == name and f"{steps} step{'s' if steps > 1 else ''}," in found.phrase


@pytest.mark.parametrize("name,sampler", [
    ("lcm-lora-sdv1-5.safetensors", "lcm"), ("lcm_lora_sdxl.safetensors", "lcm"),
    ("LCM_LoRA_Weights_SD15.safetensors", "lcm"), ("LCM_Dreamshaper_v7.safetensors", "lcm"),
    ("TCD-SD15-LoRA.safetensors", "tcd"), ("tcd_sdxl_lora.safetensors", "tcd"),
    ("alcmist.safetensors", None), ("pytorch_lora_weights.safetensors", None),
    ("Hyper-SD15-4steps-lora.safetensors", "ddim")])
def test_consistency_distillates_are_told_by_their_file_names(name, sampler):
    found = of_name(name)
    if sampler is None:
        assert found is None
        return
    assert found.defaults["sampler"] == sampler and found.defaults["steps"] == 4
    assert found.defaults["scale"] == 1.0 and found.refusal is None
    if sampler != "ddim":
        assert "timestep_spacing" not in found.defaults and "own timesteps" in found.phrase


@pytest.mark.parametrize("name", ["sdxl_lightning_1step_unet_x0.safetensors",
                                  "Hyper-SDXL-1step-Unet.safetensors"])
def test_the_one_step_models_made_for_another_sampler_are_refused(name):
    found = find([None, "base.safetensors", name])
    assert found.refusal and name in found.refusal and "\n" not in found.refusal


def tiny_xl(seed):
    from ldm.util import instantiate_from_config
    config = OmegaConf.load(TINY_XL)
    return randomize(instantiate_from_config(config.model), seed).eval(), config


def twin(model, config, folder, scheduler, **options):
    """diffusers' SDXL pipeline on ``model``'s weights with the authors' scheduler."""
    from ldm.compare import diffusers_components
    parts = diffusers_components(model, config, folder)
    parts["scheduler"] = getattr(diffusers, scheduler).from_config(
        parts["scheduler"].config, timestep_spacing="trailing", **options)
    pipe = diffusers.StableDiffusionXLPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def their_start(pipe, x, steps):
    """diffusers starts a trailing Euler schedule at sigma_max * noise, we (and Stability's
    sgm) at sqrt(1 + sigma_max^2) * noise (see test_sd2's Turbo test): the same start."""
    pipe.scheduler.set_timesteps(steps)
    top = float(pipe.scheduler.sigmas[0])
    return x * (1 + top ** 2) ** 0.5 / pipe.scheduler.init_noise_sigma


@pytest.mark.parametrize("name,scheduler,guidance", [
    ("sdxl_lightning_4step_lora.safetensors", "EulerDiscreteScheduler", 0.0),
    ("Hyper-SDXL-8steps-CFG-lora.safetensors", "DDIMScheduler", 5.0)])
def test_a_distillate_lora_brings_its_sampling_as_the_authors_diffusers_recipe(
        tmp_path, caplog, name, scheduler, guidance):
    """A LoRA named as SDXL-Lightning's 4-step (or Hyper-SD's 8-step CFG) LoRA, merged by
    ``set_loras``: with nothing asked, the image is the authors' diffusers recipe on the
    same weights (load_lora_weights + fuse, their scheduler on trailing timesteps, their
    steps and guidance), said in one line; removing the LoRA restores the model's own
    defaults, and explicit steps still win."""
    from safetensors.torch import save_file
    from test_sdxl import kohya_sdxl_lora
    from ldm.pipeline import Pipeline
    model, config = tiny_xl(31)
    theirs = twin(model, config, tmp_path / "tok", scheduler,
                  **({"steps_offset": 1} if scheduler == "EulerDiscreteScheduler" else {}))
    path = tmp_path / name
    save_file(kohya_sdxl_lora(theirs), path)
    ours = Pipeline(model, torch.device("cpu"), "full", watermark=False)
    with caplog.at_level(logging.INFO, logger="ldm"):
        ours.set_loras([(path, 1.0)])
    steps = of_name(name).defaults["steps"]
    assert ours.defaults["timestep_spacing"] == "trailing"
    assert any(name in r.message and f"{steps} steps" in r.message for r in caplog.records)
    z_ours = ours.latents(PROMPTS, SEEDS, height=32, width=32, progress=False)
    theirs.load_lora_weights(str(path))
    theirs.fuse_lora(lora_scale=1.0)
    x, _ = ours.initial_noise(SEEDS, 32, 32)
    start = their_start(theirs, x, steps) if scheduler == "EulerDiscreteScheduler" else x
    z_theirs = theirs(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, height=32,
                      width=32, latents=start, output_type="latent").images
    assert z_ours.abs().max() > 0.1 and rel_err(z_ours, z_theirs) < 1e-4
    assert ours.steps_run(ours.request("txt2img", PROMPTS[:1], SEEDS[:1], height=32,
                                       width=32)) == steps
    assert ours.request("txt2img", PROMPTS[:1], SEEDS[:1], steps=3).steps == 3
    ours.set_loras([])
    assert ours.defaults == {} and ours.request("txt2img", PROMPTS[:1], SEEDS[:1]).steps == 50


def _seeded_after_start(seeds, shape):
    """Generators seeded as ours are, having drawn the start noise (ours draws the start
    then each step's fresh noise from one generator per image): diffusers given these
    draws the same step noise."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    for g in gens:
        torch.randn(shape, generator=g)
    return gens


@pytest.mark.parametrize("name,scheduler,steps", [
    ("lcm-lora-sdv1-5.safetensors", "LCMScheduler", 4),
    ("TCD-SD15-LoRA.safetensors", "TCDScheduler", 4)])
def test_lcm_and_tcd_loras_by_lora_equal_diffusers_load_lora_weights_and_their_scheduler(
        tmp_path, caplog, tiny_config, name, scheduler, steps):
    """An SD 1.5 LCM-LoRA (or TCD LoRA), UNet only as published, given by ``--lora``'s
    path (``set_loras``): the run takes the LCM (TCD) sampler, 4 steps and no guidance,
    says so in one line, and its latents equal diffusers' pipeline with
    ``load_lora_weights`` + ``fuse_lora`` and ``LCMScheduler`` (``TCDScheduler``, eta 0.3)
    at guidance 1, the same noise re-injected at every step."""
    from safetensors.torch import save_file
    from conftest import build_tiny
    from test_toolbox import diffusers_twin, kohya_lora
    from ldm.pipeline import Pipeline
    model = build_tiny(5).requires_grad_(False)
    theirs = diffusers_twin(model, tiny_config, tmp_path / "tok")
    theirs.scheduler = getattr(diffusers, scheduler).from_config(theirs.scheduler.config)
    path = tmp_path / name
    save_file(kohya_lora(model, te=False, seed=4), path)
    ours = Pipeline(model, torch.device("cpu"), "full", watermark=False)
    with caplog.at_level(logging.INFO, logger="ldm"):
        ours.set_loras([(path, 1.0)])
    assert any(name in r.message and "4 steps, no guidance" in r.message
               for r in caplog.records)
    request = ours.request("txt2img", PROMPTS[:1], SEEDS[:1], height=32, width=32)
    assert (request.sampler, request.steps, request.scale) == (scheduler[:3].lower(), 4, 1.0)
    z_ours = ours.latents(PROMPTS, SEEDS, height=32, width=32, progress=False)
    theirs.load_lora_weights(str(path))
    theirs.fuse_lora(lora_scale=1.0)
    x, _ = ours.initial_noise(SEEDS, 32, 32)
    extra = {"eta": 0.3} if scheduler == "TCDScheduler" else {}
    z_theirs = theirs(PROMPTS, num_inference_steps=steps, guidance_scale=1.0, height=32,
                      width=32, latents=x.clone(), output_type="latent",
                      generator=_seeded_after_start(SEEDS, x.shape[1:]), **extra).images
    assert z_ours.abs().max() > 0.1 and rel_err(z_ours, z_theirs) < 1e-4
    # without the LoRA's noise re-injection the result differs: the noise was checked too
    z_other = theirs(PROMPTS, num_inference_steps=steps, guidance_scale=1.0, height=32,
                     width=32, latents=x.clone(), output_type="latent",
                     generator=[torch.Generator().manual_seed(99) for _ in SEEDS],
                     **extra).images
    assert rel_err(z_other, z_theirs) > 1e-2


@pytest.fixture(scope="module")
def tiny_lcm(tmp_path_factory):
    """A tiny SD-1-shaped latent consistency model with a 16-wide guidance embedding,
    random weights, saved in the single-file layout with the LCM config's defaults."""
    from conftest import TINY_CONFIG
    from ldm.util import instantiate_from_config
    config = OmegaConf.load(TINY_CONFIG)
    config.model.params.unet_config.params.time_cond_proj_dim = 16
    config.sampling = OmegaConf.load(
        ROOT / "configs" / "stable-diffusion" / "v1-lcm-inference.yaml").sampling
    model = randomize(instantiate_from_config(config.model), 12).eval()
    with torch.no_grad():   # a guidance embedding that weighs as much as the timestep's
        model.model.diffusion_model.time_embedding.cond_proj.weight.mul_(30)
    folder = tmp_path_factory.mktemp("lcm")
    OmegaConf.save(config, folder / "tiny-lcm.yaml")
    return model, config, save_checkpoint(model, folder / "tiny-lcm.safetensors")


def test_an_lcm_checkpoint_equals_diffusers_latent_consistency_pipeline(tmp_path, tiny_lcm):
    """An LCM with a guidance embedding, loaded from its file: the defaults are the
    pipeline's (LCM, 4 steps, guidance 8.5 as an embedding, no unconditional pass), and
    the latents equal diffusers' LatentConsistencyModelPipeline on the same weights and
    noise; another scale changes the image (the embedding is used); a negative prompt
    is refused in one line."""
    from ldm.compare import diffusers_components
    from ldm.errors import UsageError
    from ldm.pipeline import Pipeline
    model, config, path = tiny_lcm
    ours = Pipeline.load(path, path.with_suffix(".yaml"), device="cpu", precision="full",
                         safety=False, watermark=False)
    request = ours.request("txt2img", PROMPTS[:1], SEEDS[:1], height=32, width=32)
    assert (request.sampler, request.steps, request.scale) == ("lcm", 4, 8.5)
    calls = []
    unet = ours.model.model.diffusion_model
    hook = unet.register_forward_hook(lambda m, a, out: calls.append(a[0].shape[0]))
    z_ours = ours.latents(PROMPTS, SEEDS, height=32, width=32, progress=False)
    hook.remove()
    assert calls == [2] * 4      # one pass per step for both images: no unconditional half
    parts = diffusers_components(model, config, tmp_path / "tok")
    parts["scheduler"] = diffusers.LCMScheduler.from_config(parts["scheduler"].config)
    parts.pop("requires_safety_checker")
    theirs = diffusers.LatentConsistencyModelPipeline(**parts, requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    x, _ = ours.initial_noise(SEEDS, 32, 32)
    z_theirs = theirs(PROMPTS, num_inference_steps=4, guidance_scale=8.5, height=32,
                      width=32, latents=x.clone(), output_type="latent",
                      generator=_seeded_after_start(SEEDS, x.shape[1:])).images
    match = rel_err(z_ours, z_theirs)
    assert z_ours.abs().max() > 0.1 and match < 1e-5
    z_low = ours.latents(PROMPTS, SEEDS, height=32, width=32, scale=2.0, progress=False)
    assert rel_err(z_low, z_ours) > 20 * match
    with pytest.raises(UsageError, match="negative prompt has no effect on this consistency"):
        ours.request("txt2img", PROMPTS[:1], SEEDS[:1], negative_prompts="blurry")
    # the same model as the diffusers folder diffusers saves: the same latents
    theirs.save_pretrained(tmp_path / "folder")
    folder = Pipeline.load(tmp_path / "folder", path.with_suffix(".yaml"), device="cpu",
                           precision="full", safety=False, watermark=False)
    assert torch.equal(folder.latents(PROMPTS, SEEDS, height=32, width=32, progress=False),
                       z_ours)


def save_checkpoint(model, path):
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


@pytest.fixture(scope="module")
def base_file(tmp_path_factory):
    model, _ = tiny_xl(3)
    return save_checkpoint(model, tmp_path_factory.mktemp("base") / "tiny-xl.safetensors")


@pytest.mark.parametrize("layout", ["diffusers", "comfyui"])
def test_unet_replaces_the_checkpoints_unet_in_either_layout(tmp_path, base_file, layout,
                                                             caplog):
    """``Pipeline.load(unet=...)``: SDXL-Lightning's UNet files are diffusers' layout,
    ComfyUI's UNet files the original one with its prefix: either replaces the UNet bit
    for bit (the rest stays the checkpoint's), and the file's name sets the sampling."""
    from safetensors.torch import save_file
    from ldm.convert import UNET, to_diffusers
    from ldm.pipeline import Pipeline
    other, _ = tiny_xl(41)
    path = tmp_path / "sdxl_lightning_2step_unet.safetensors"
    if layout == "diffusers":
        sd = to_diffusers(other)["unet"]
    else:
        sd = {k: v for k, v in other.state_dict().items() if k.startswith(UNET)}
    save_file({k: v.half().contiguous() for k, v in sd.items()}, path)  # as published: fp16
    with caplog.at_level(logging.INFO, logger="ldm"):
        pipe = Pipeline.load(base_file, TINY_XL, device="cpu", precision="full", safety=False,
                             unet=path, backend="torch")
    own = pipe.model.state_dict()
    base, _ = tiny_xl(3)
    for k, v in own.items():
        want = other.state_dict()[k].half().float() if k.startswith(UNET) else base.state_dict()[k]
        assert torch.equal(v, want), k
    assert pipe.defaults == {"sampler": "euler", "steps": 2, "scale": 1.0,
                             "timestep_spacing": "trailing"}
    assert pipe.options_record()["unet"] == path.name
    assert sum(path.name in r.message for r in caplog.records) == 1


def test_an_lcm_unet_with_a_guidance_embedding_by_unet_equals_diffusers(tmp_path, base_file,
                                                                        caplog):
    """LCM-SDXL as published (a diffusers UNet with ``time_cond_proj_dim``, no name that
    tells) given by ``--unet`` to the SDXL checkpoint it was distilled from: the UNet gains
    its guidance projection, the defaults become the LCM config's (LCM, 4 steps, guidance 8
    as an embedding), said in one line, and the latents equal diffusers'
    StableDiffusionXLPipeline with that UNet and LCMScheduler on the same weights."""
    from safetensors.torch import save_file
    from ldm.compare import diffusers_components
    from ldm.convert import to_diffusers
    from ldm.pipeline import Pipeline
    from ldm.util import instantiate_from_config
    config = OmegaConf.load(TINY_XL)
    config.model.params.network_config.params.time_cond_proj_dim = 16
    lcm = randomize(instantiate_from_config(config.model), 5).eval()
    base, _ = tiny_xl(3)
    with torch.no_grad():   # the rest of the model is the checkpoint's; the guidance weighs
        for k, v in lcm.state_dict().items():
            if not k.startswith("model.diffusion_model."):
                v.copy_(base.state_dict()[k])
        lcm.model.diffusion_model.time_embedding.cond_proj.weight.mul_(30)
    folder = tmp_path / "lcm-sdxl" / "unet"
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in to_diffusers(lcm)["unet"].items()},
              folder / "diffusion_pytorch_model.safetensors")
    with caplog.at_level(logging.INFO, logger="ldm"):
        ours = Pipeline.load(base_file, TINY_XL, device="cpu", precision="full", safety=False,
                             watermark=False, unet=folder / "diffusion_pytorch_model.safetensors",
                             backend="torch")
    assert ours.model.guidance_embedded
    request = ours.request("txt2img", PROMPTS[:1], SEEDS[:1], height=32, width=32)
    assert (request.sampler, request.steps, request.scale) == ("lcm", 4, 8.0)
    said = [r.message for r in caplog.records if "guidance embedded" in r.message]
    assert len(said) == 1 and "LCM on its own timesteps, 4 steps, guidance 8" in said[0]
    z_ours = ours.latents(PROMPTS, SEEDS, height=32, width=32, progress=False)
    parts = diffusers_components(lcm, config, tmp_path / "tok")
    parts["scheduler"] = diffusers.LCMScheduler.from_config(parts["scheduler"].config)
    theirs = diffusers.StableDiffusionXLPipeline(**parts)
    theirs.set_progress_bar_config(disable=True)
    x, _ = ours.initial_noise(SEEDS, 32, 32)
    z_theirs = theirs(PROMPTS, num_inference_steps=4, guidance_scale=8.0, height=32,
                      width=32, latents=x.clone(), output_type="latent",
                      generator=_seeded_after_start(SEEDS, x.shape[1:])).images
    match = rel_err(z_ours, z_theirs)
    assert z_ours.abs().max() > 0.1 and match < 1e-4
    z_low = ours.latents(PROMPTS, SEEDS, height=32, width=32, scale=2.0, progress=False)
    assert rel_err(z_low, z_ours) > 20 * match


def test_a_unet_of_another_model_is_refused_in_one_line(tmp_path, base_file):
    from ldm.checkpoint import CheckpointError
    from ldm.convert import UNET
    from ldm.pipeline import Pipeline
    from conftest import build_tiny
    from safetensors.torch import save_file
    path = tmp_path / "sd1-unet.safetensors"
    save_file({k: v.contiguous() for k, v in build_tiny().state_dict().items()
               if k.startswith(UNET)}, path)
    with pytest.raises(CheckpointError, match=r"^--unet .*sd1-unet.safetensors does not fit "
                                              r"this model's UNet: ") as e:
        Pipeline.load(base_file, TINY_XL, device="cpu", safety=False, unet=path,
                      backend="torch")
    assert "\n" not in str(e.value)


def test_txt2img_with_a_lightning_unet_and_a_refused_one(tmp_path, base_file, capsys):
    """The script: ``--unet sdxl_lightning_4step_unet...`` runs 4 Euler steps without
    guidance, its PNG saying so and naming the UNet as A1111 names a model ("name
    [hash]"); ``--ddim_steps 3`` still wins; the 1-step x0 model is refused in one line
    before any weights are read, nothing written."""
    from safetensors.torch import save_file
    from ldm.convert import UNET
    from ldm.image_io import read_parameters
    sys.path.insert(0, str(ROOT / "scripts"))
    import txt2img
    model, _ = tiny_xl(41)
    unet = tmp_path / "sdxl_lightning_4step_unet.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k.startswith(UNET)},
              unet)
    common = ["--prompt", "a red circle", "--ckpt", str(base_file), "--config", str(TINY_XL),
              "--H", "32", "--W", "32", "--n_samples", "1", "--n_iter", "1", "--skip_grid",
              "--safety_checker", "none", "--backend", "torch", "--precision", "full"]
    for extra, steps in (([], 4), (["--ddim_steps", "3"], 3)):
        out = tmp_path / f"out{steps}"
        assert txt2img.main([*common, "--unet", str(unet), "--outdir", str(out), *extra]) == 0
        png, = (out / "samples").glob("*.png")
        p = read_parameters(png)
        assert (p["steps"], p["sampler"], p["scale"], p["unet"]) == (4 if not extra else 3,
                                                                     "euler", 1.0, unet.name)
        from PIL import Image
        text = Image.open(png).text["parameters"]
        assert f"UNet: {unet.stem} [{p['unet_hash']}]" in text and "Sampler: Euler," in text
    capsys.readouterr()
    x0 = tmp_path / "sdxl_lightning_1step_unet_x0.safetensors"
    x0.write_bytes(unet.read_bytes())
    rc = txt2img.main([*common, "--unet", str(x0), "--outdir", str(tmp_path / "refused")])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1 and "predicts the clean image" in err, err
    assert not (tmp_path / "refused").exists()


def test_a1111_text_names_the_refiner_as_a1111_does():
    from ldm.image_io import parameters_text
    text = parameters_text({"prompt": "a cat", "steps": 40, "sampler": "euler", "seed": 1,
                            "width": 1024, "height": 1024, "model": "sd_xl_base_1.0",
                            "checkpoint_hash": "31e35c80fc",
                            "refiner": "models/sd_xl_refiner_1.0.safetensors",
                            "refiner_hash": "7440042bbd", "refiner_switch": 0.8})
    assert text.splitlines()[1] == (
        "Steps: 40, Sampler: Euler, Seed: 1, Size: 1024x1024, Model hash: 31e35c80fc, "
        "Model: sd_xl_base_1.0, Refiner: sd_xl_refiner_1.0 [7440042bbd], "
        "Refiner switch at: 0.8")
