"""Stable Diffusion 2.x through the family seam: Stability's configs build our modules in
the official key layout (committed manifest, diffusers' converters as the referee), the
OpenCLIP text tower equals transformers' CLIPTextModel as diffusers converts it, and
text-to-image (eps and v) equals diffusers' pipeline on identical tiny SD-2-shaped weights."""
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT, diffusers_named_lora, network_outputs, randomize, rel_err
from ldm.pipeline import build_model

su = pytest.importorskip("diffusers.loaders.single_file_utils")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

SD2 = ROOT / "configs" / "stable-diffusion"
TINY_SD2 = ROOT / "configs" / "tiny" / "tiny-sd2-inference.yaml"
MANIFEST = ROOT / "tests" / "manifests" / "sd-v2.txt"
sys.path.insert(0, str(ROOT / "tests" / "models"))   # the SD 1.x cross-checks' helpers


@pytest.mark.parametrize("name", ["v2-inference", "v2-inference-v", "v2-inpainting-inference"])
def test_sd2_configs_build_the_committed_key_manifest(name):
    """One manifest for the three: the v model's keys are the eps model's, and the
    inpainting model differs in its first convolution's input channels only."""
    model = build_model(SD2 / f"{name}.yaml", meta=True)
    got = [f"{k} {list(v.shape)}" for k, v in model.state_dict().items()]
    want = MANIFEST.read_text().splitlines()
    if name == "v2-inpainting-inference":
        want = [line.replace("input_blocks.0.0.weight [320, 4, 3, 3]",
                             "input_blocks.0.0.weight [320, 9, 3, 3]") for line in want]
    assert got == want
    assert model.parameterization == ("v" if name.endswith("-v") else "eps")
    assert model.image_size * model.latent_downsampling_factor == (
        768 if name.endswith("-v") else 512)


def test_full_size_sd2_layout_is_what_diffusers_converters_expect():
    """diffusers' converters of the original layout accept our full-size SD 2 state_dict and
    give exactly the keys of its own models: the UNet's, the VAE's, and the text encoder's
    (a 23-layer CLIPTextModel: SD 2 conditions on the penultimate of OpenCLIP's 24)."""
    from ldm.compare import _text_encoder
    model = build_model(SD2 / "v2-inference-v.yaml", meta=True)
    sd = model.state_dict()
    original = OmegaConf.to_container(OmegaConf.load(SD2 / "v2-inference-v.yaml"))
    ucfg = su.create_unet_diffusers_config_from_ldm(original, sd)
    ucfg["attention_head_dim"] = [5, 10, 20, 20]   # 64-wide heads, as diffusers' SD 2 folders
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**ucfg)
    converted = su.convert_ldm_unet_checkpoint(sd, ucfg)
    assert set(converted) == set(unet.state_dict())
    assert all(converted[k].shape == v.shape for k, v in unet.state_dict().items())
    with torch.device("meta"):
        clip, clip_sd = _text_encoder(model.cond_stage_model, sd, transformers, su)
    assert clip.config.num_hidden_layers == 23 and clip.config.hidden_size == 1024
    own = {k.removeprefix("text_model.") for k in clip.state_dict() if "position_ids" not in k}
    assert {k.removeprefix("text_model.") for k in clip_sd} == own
    ignored = set(su.SD_2_TEXT_ENCODER_KEYS_TO_IGNORE)
    assert ignored <= set(sd)   # the keys diffusers drops are the official ones we hold


@pytest.fixture(scope="module")
def tiny_sd2():
    config = OmegaConf.load(TINY_SD2)
    from ldm.util import instantiate_from_config
    return randomize(instantiate_from_config(config.model), 11).eval(), config


@torch.no_grad()
def test_openclip_text_tower_matches_transformers(tiny_sd2):
    """Penultimate layer with the final norm (SD 2's conditioning), and clip skip 2 (one
    block less), against transformers' CLIPTextModel holding diffusers' conversion."""
    from ldm.compare import _text_encoder
    model, _ = tiny_sd2
    encoder = model.cond_stage_model
    ids = encoder.tokenize(["a red circle", "two blue squares &amp; a tree"], 77)
    for skip in (1, 2):
        encoder.clip_skip = skip
        clip, clip_sd = _text_encoder(encoder, model.state_dict(), transformers, su)
        if not any(k.startswith("text_model.") for k in clip.state_dict()):
            clip_sd = {k.removeprefix("text_model."): v for k, v in clip_sd.items()}
        clip.load_state_dict(clip_sd, strict=False)
        clip.eval()
        ours = encoder.encode_ids(ids)
        theirs = clip(input_ids=ids).last_hidden_state
        assert clip.config.num_hidden_layers == 3 - skip
        assert ours.abs().max() > 0.1 and rel_err(ours, theirs) < 1e-5
    encoder.clip_skip = 1


def test_openclip_tokens_pad_with_zero_and_unescape_html(tmp_path, tiny_sd2):
    """OpenCLIP's tokenisation (diffusers' SD 2 tokenizer pads with "!", id 0)."""
    from ldm.compare import write_clip_tokenizer_files
    model, _ = tiny_sd2
    write_clip_tokenizer_files(tmp_path)
    theirs = transformers.CLIPTokenizer(str(tmp_path / "vocab.json"),
                                        str(tmp_path / "merges.txt"), pad_token="!")
    prompts = ["a red circle", "a photo of an astronaut riding a horse on mars"]
    ids = model.cond_stage_model.tokenize(prompts, 77)
    want = theirs(prompts, padding="max_length", max_length=77, truncation=True).input_ids
    assert ids.tolist() == want and ids[0, 5:].eq(0).all() and ids[0, 4] == 49407
    escaped = model.cond_stage_model.tokenize(["cats &amp; dogs"], 77)
    assert escaped.tolist() == model.cond_stage_model.tokenize(["cats & dogs"], 77).tolist()


@torch.no_grad()
def test_a1111_syntax_of_a_plain_prompt_is_the_plain_encoding(tiny_sd2):
    """The weighted path pads its chunk as the plain one does (0 after the end token)."""
    model, _ = tiny_sd2
    encoder = model.cond_stage_model
    plain = encoder.encode(["a red circle"])
    encoder.syntax = "a1111"
    try:
        weighted = encoder.encode(["a red circle"])
    finally:
        encoder.syntax = "compvis"
    assert torch.equal(plain, weighted)


@torch.no_grad()
def test_a1111_long_prompts_on_openclip_are_chunks_padded_with_zero(tiny_sd2):
    """A 2-chunk prompt on SD 2: each chunk's 77 ids end in OpenCLIP's 0 padding, the
    encoding is the chunks' encodings side by side, and a weight changes it."""
    from ldm.modules.encoders.prompts import chunk_prompt, parse_attention, weight_chunks
    from ldm.modules.encoders.tokenizer import get_tokenizer
    model, _ = tiny_sd2
    enc = model.cond_stage_model
    tok = get_tokenizer()
    text = "red circle, " * 40 + "blue"
    chunks = chunk_prompt(parse_attention(text)[0], lambda t: tok.units(t), tok.bos_id,
                          tok.eos_id, tok.encoder[",</w>"], pad=enc.pad_id)
    assert len(chunks) == 2 and chunks[1].ids[-1] == 0 and tok.eos_id in chunks[1].ids
    enc.syntax = "a1111"
    try:
        z = enc.encode([text])
        want = weight_chunks(enc.encode_ids(torch.tensor([c.ids for c in chunks])),
                             [c.weights for c in chunks]).reshape(1, -1, 48)
        assert z.shape == (1, 154, 48) and torch.allclose(z, want, atol=1e-6)
        assert (enc.encode(["(red:1.5) circle"]) - enc.encode(["red circle"])).abs().max() > 1e-3
    finally:
        enc.syntax = "compvis"


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_tiny_sd2_txt2img_matches_diffusers_pipeline(tmp_path, parameterization):
    """Our Pipeline and diffusers' StableDiffusionPipeline on the same tiny SD 2 weights
    (OpenCLIP converted by diffusers' converter), the same noise: DDIM 10 steps, scale 9."""
    from ldm.compare import save_diffusers_pipeline
    from ldm.pipeline import Pipeline
    from ldm.util import instantiate_from_config
    config = OmegaConf.load(TINY_SD2)
    config.model.params.parameterization = parameterization
    model = randomize(instantiate_from_config(config.model), 12).eval()
    theirs = save_diffusers_pipeline(model, config, tmp_path / "pipe")
    theirs.set_progress_bar_config(disable=True)
    assert theirs.scheduler.config.prediction_type == (
        "v_prediction" if parameterization == "v" else "epsilon")
    ours = Pipeline(model, torch.device("cpu"), "full")
    prompts, seeds = ["a red circle", "two blue squares"], [7, 8]
    x, _ = ours.initial_noise(seeds, 32, 32)
    z_ours = ours.latents(prompts, seeds, sampler="ddim", steps=10, scale=9.0, height=32,
                          width=32, progress=False)
    z_theirs = theirs(prompts, num_inference_steps=10, guidance_scale=9.0, height=32,
                      width=32, latents=x.clone(), output_type="latent").images
    assert z_ours.abs().max() > 0.1
    assert rel_err(z_ours, z_theirs) < 1e-4


def train_tiny_sd2(parameterization, steps, seed=0):
    """A tiny SD-2-shaped model whose UNet learned to predict ``parameterization`` on
    latents drawn around four fixed patterns (what the probe needs: a model that has
    learned its target; random weights predict neither)."""
    import torch.nn.functional as F
    from ldm.util import instantiate_from_config
    torch.manual_seed(seed)
    config = OmegaConf.load(TINY_SD2)
    config.model.params.parameterization = parameterization
    model = instantiate_from_config(config.model)
    unet = model.model.diffusion_model.train().requires_grad_(True)
    patterns = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1)).sign() * 0.9
    with torch.no_grad():
        cond = {"crossattn": model.conditioning([""])["crossattn"].expand(8, -1, -1)}
    opt = torch.optim.Adam(unet.parameters(), lr=3e-3)
    for _ in range(steps):
        x0 = patterns[torch.randint(0, 4, (8,))] + 0.2 * torch.randn(8, 4, 8, 8)
        noise, t = torch.randn_like(x0), torch.randint(0, 1000, (8,))
        out = model.apply_model(model.q_sample(x0, t, noise), t, cond)
        loss = F.mse_loss(out, model.training_target(x0, noise, t))
        opt.zero_grad()
        loss.backward()
        opt.step()
    unet.eval().requires_grad_(False)
    return model.eval()


@pytest.fixture(scope="module")
def trained():
    return {"eps": train_tiny_sd2("eps", 60), "v": train_tiny_sd2("v", 120)}


def test_the_prediction_type_is_told_from_one_unet_call(trained):
    """SD 2's 512 (eps) and 768 (v) checkpoints have the same keys: ``fitting_prediction``
    tells models trained either way apart. (On random weights the cosine it measures is
    about 0 whatever the parameterisation: random weights cannot tell them apart.)"""
    from ldm.models.diffusion.noise_model import fitting_prediction
    for kind, model in trained.items():
        assert fitting_prediction(model) == kind
        model.parameterization = "v" if kind == "eps" else "eps"   # the config's claim
        assert fitting_prediction(model) == kind                   # reads the weights only
        model.parameterization = kind


def test_a_detected_sd2_file_that_predicts_v_is_switched_to_the_v_config(trained, caplog):
    """After loading, a file detected as SD 2's 512 model whose UNet predicts v gets the
    768-v config's prediction and size, in one line; one that predicts the noise keeps
    its choice; a config given (no variant detected) is never second-guessed."""
    import dataclasses
    import logging
    from ldm.config import ModelChoice, load_config
    from ldm.families import by_name
    from ldm.pipeline import settle_prediction
    sd2 = by_name("sd2")
    base = SD2 / "v2-inference.yaml"
    choice = ModelChoice(Path("v2-1_768.safetensors"), base, load_config(base),
                         "v2-1_768.safetensors", family=sd2, variant="txt2img")
    model = trained["v"]
    model.parameterization, size = "eps", model.image_size
    try:
        with caplog.at_level(logging.WARNING):
            settled = settle_prediction(choice, model)
        assert settled.variant == "v" and settled.config_path == SD2 / "v2-inference-v.yaml"
        assert model.parameterization == "v" and model.image_size == 96
        assert caplog.text.strip().endswith("v2-1_768.safetensors predicts v: using "
                                            "configs/stable-diffusion/v2-inference-v.yaml "
                                            "(give --config to choose)")
        assert settle_prediction(choice, trained["eps"]) is choice
        given = dataclasses.replace(choice, variant=None)
        model.parameterization = "eps"
        assert settle_prediction(given, model) is given and model.parameterization == "eps"
    finally:
        model.parameterization, model.image_size = "v", size


def tiny_sd2_variant(parameterization="eps", inpainting=False, seed=13):
    """(model, config): the tiny SD 2 config as the v model or the 9-channel inpainting
    model (the changes Stability's v2-inference-v / v2-inpainting-inference make)."""
    from ldm.util import instantiate_from_config
    config = OmegaConf.load(TINY_SD2)
    params = config.model.params
    params.parameterization = parameterization
    if inpainting:
        config.model.target = "ldm.models.diffusion.ddpm.LatentInpaintDiffusion"
        params.conditioning_key = "hybrid"
        params.unet_config.params.in_channels = 9
    return randomize(instantiate_from_config(config.model), seed).eval(), config


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_tiny_sd2_img2img_matches_diffusers_step_by_step(tmp_path, parameterization, sampler):
    """StableDiffusionImg2ImgPipeline on the same tiny SD 2 weights: every step and the
    result (strength 0.6)."""
    from test_crosscheck_diffusers import _both, _image_and_mask
    from ldm.pipeline import Pipeline
    model, config = tiny_sd2_variant(parameterization)
    ours = Pipeline(model, torch.device("cpu"), "full")
    image, _ = _image_and_mask()
    init = ours.encode([image])
    z_ours, z_theirs, a, b = _both(ours, diffusers.StableDiffusionImg2ImgPipeline, model,
                                   config, tmp_path, {"init": init}, 0.6, sampler,
                                   image=init.expand(2, -1, -1, -1).clone())
    assert max((rel_err(x, y) for x, y in zip(a, b)), default=0) < 1e-5
    assert z_ours.abs().max() > 0.1 and rel_err(z_ours, z_theirs) < 1e-5


@pytest.mark.parametrize("strength", [0.7, 1.0])
def test_tiny_sd2_nine_channel_inpainting_matches_diffusers_step_by_step(tmp_path, strength):
    """SD 2's inpainting model (UNet input [x, mask, masked-image latents]) against
    StableDiffusionInpaintPipeline on the same tiny weights, DDIM."""
    from test_crosscheck_diffusers import _both, nine_channel_task
    from ldm.pipeline import Pipeline
    model, config = tiny_sd2_variant(inpainting=True)
    ours = Pipeline(model, torch.device("cpu"), "full")
    assert ours.is_inpainting_model
    task, theirs = nine_channel_task(ours, model, strength)
    z_ours, z_theirs, a, b = _both(
        ours, diffusers.StableDiffusionInpaintPipeline, model, config, tmp_path, task, strength,
        "ddim", **theirs)
    assert max((rel_err(x, y) for x, y in zip(a, b)), default=0) < 1e-5
    assert rel_err(z_ours, z_theirs) < 1e-5


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_guidance_rescale_matches_diffusers(tmp_path, sampler):
    """``rescale`` (diffusers' ``guidance_rescale``, 0.7) on the tiny SD 2 v model: the
    same latents as diffusers' pipeline, and not those without it."""
    from test_crosscheck_diffusers import EDIT_SAMPLERS
    from ldm.compare import save_diffusers_pipeline
    from ldm.pipeline import Pipeline
    model, config = tiny_sd2_variant("v", seed=14)
    theirs = save_diffusers_pipeline(model, config, tmp_path / "pipe")
    theirs.scheduler = getattr(diffusers, EDIT_SAMPLERS[sampler]).from_config(
        theirs.scheduler.config)
    theirs.set_progress_bar_config(disable=True)
    ours = Pipeline(model, torch.device("cpu"), "full")
    prompts, seeds = ["a red circle", "two blue squares"], [7, 8]
    x, _ = ours.initial_noise(seeds, 32, 32)
    kw = dict(sampler=sampler, steps=8, scale=9.0, height=32, width=32, progress=False)
    z_ours = ours.latents(prompts, seeds, rescale=0.7, **kw)
    z_plain = ours.latents(prompts, seeds, **kw)
    z_theirs = theirs(prompts, num_inference_steps=8, guidance_scale=9.0, height=32, width=32,
                      guidance_rescale=0.7, latents=x.clone(),
                      output_type="latent").images
    err = rel_err(z_ours, z_theirs)
    assert err < 1e-4 and rel_err(z_plain, z_theirs) > 100 * err


# ------------------------------------------------------------------ diffusers folders

def test_full_size_sd2_map_covers_every_weight_as_diffusers_folders_name_it():
    """On SD 2's own shapes (meta tensors): our map gives every weight diffusers' name, the
    text encoder's as a 23-layer CLIPTextModel holds it (q/k/v apart, no projection); what
    the map leaves out is the unused last block, text_projection and logit_scale."""
    from ldm import convert
    from ldm.compare import _text_encoder
    model = build_model(SD2 / "v2-inference-v.yaml", meta=True)
    sd = model.state_dict()
    original = OmegaConf.to_container(OmegaConf.load(SD2 / "v2-inference-v.yaml"))
    ucfg = su.create_unet_diffusers_config_from_ldm(original, sd)
    vcfg = su.create_vae_diffusers_config_from_ldm(original, sd)
    with torch.device("meta"):
        clip, clip_sd = _text_encoder(model.cond_stage_model, sd, transformers, su)
    ours = convert.to_diffusers(model)
    want = {"unet": su.convert_ldm_unet_checkpoint(sd, ucfg),
            "vae": su.convert_ldm_vae_checkpoint(sd, vcfg),
            "text_encoder": {k if k.startswith("text_model.") else "text_model." + k: v
                             for k, v in clip_sd.items()}}
    for part, theirs in want.items():
        assert set(ours[part]) == set(theirs), part
        assert all(ours[part][k].shape == v.shape
                   for k, v in theirs.items()), part
    unused = set(convert.unused_openclip(model))
    assert len(unused) == 12 + 2 and {"cond_stage_model.model.text_projection"} < unused
    assert all(".resblocks.23." in k for k in unused - {"cond_stage_model.model.text_projection",
                                                         "cond_stage_model.model.logit_scale"})


@pytest.mark.parametrize("variant", ["fp32", "fp16"])
def test_an_sd2_diffusers_folder_loads_to_the_same_model(tmp_path, variant):
    """A folder diffusers' save_pretrained wrote from tiny SD 2 weights (its text encoder a
    CLIPTextModel of the 2 blocks run, of 3) loads, given as --ckpt, to exactly those
    weights; the block never run comes back as zeros, and the text encoder, the UNet and a
    whole image are as before. fp16: the weights rounded to fp16."""
    from ldm.compare import save_diffusers_pipeline
    from ldm.config import choose_model
    from ldm.convert import unused_openclip
    from ldm.pipeline import Pipeline, load_model
    model, config = tiny_sd2_variant("v", seed=15)
    folder = tmp_path / "pipe"
    pipe = save_diffusers_pipeline(model, config, folder)
    if variant == "fp16":
        import shutil
        shutil.rmtree(folder)
        pipe.to(torch.float16).save_pretrained(folder, variant="fp16")
    assert transformers.CLIPTextConfig.from_pretrained(folder / "text_encoder").num_hidden_layers == 2
    config_path = tmp_path / "tiny-sd2-v.yaml"
    OmegaConf.save(config, config_path)
    choice = choose_model(folder, config_path)
    loaded = load_model(choice.ckpt, choice.config)
    want, got = model.state_dict(), loaded.state_dict()
    unused = set(unused_openclip(model))
    assert unused and all(not got[k].any() for k in unused)
    for k, v in want.items():
        if k not in unused:
            expected = v.half().float() if variant == "fp16" and v.is_floating_point() else v
            if k.endswith("alphas_cumprod") or "sqrt" in k or "posterior" in k or k.endswith(
                    ("betas", "alphas_cumprod_prev")):
                expected = v
            assert torch.equal(got[k], expected), k
    if variant == "fp32":
        prompts, seeds = ["a red circle"], [3]
        kw = dict(sampler="ddim", steps=4, scale=9.0, height=32, width=32, progress=False)
        a = Pipeline(model, torch.device("cpu"), "full").latents(prompts, seeds, **kw)
        b = Pipeline(loaded, torch.device("cpu"), "full").latents(prompts, seeds, **kw)
        assert a.abs().max() > 0.1 and torch.equal(a, b)
        loaded.cond_stage_model.layer_idx = 0   # layer: last, through the zero block
        assert torch.equal(loaded.cond_stage_model.encode(prompts),
                           model.cond_stage_model.encode(prompts))


def test_an_sd2_folder_missing_a_block_it_runs_is_refused_in_one_line(tmp_path):
    from ldm.checkpoint import CheckpointError
    from ldm.convert import from_diffusers, to_diffusers
    model, _ = tiny_sd2_variant("eps", seed=16)
    parts = to_diffusers(model)
    parts["text_encoder"] = {k: v for k, v in parts["text_encoder"].items()
                             if ".layers.1." not in k}
    with pytest.raises(CheckpointError, match=r"missing \(cond_stage_model.model.transformer"
                                              r".resblocks.1"):
        from_diffusers(model, parts)


# ------------------------------------------------------------------ LoRA and embeddings

def test_kohya_sd2_lora_matches_diffusers_load_lora_weights(tmp_path):
    """A kohya LoRA for SD 2 (UNet with LoCon convolutions; OpenCLIP's text tower in
    CLIPTextModel names: our q/k/v updates land in thirds of in_proj_weight), merged by us
    at 0.7, against diffusers' load_lora_weights on identical base weights; unmerged, the
    weights are back bit for bit."""
    from safetensors.torch import save_file
    from ldm.compare import diffusers_components
    from ldm.pipeline import Pipeline
    model, config = tiny_sd2_variant("v", seed=17)
    pipe = diffusers.StableDiffusionPipeline(**diffusers_components(model, config, tmp_path / "tok"))
    lora = diffusers_named_lora([("lora_unet_", "unet.", pipe.unet, ""),
                                 ("lora_te_", "text_encoder.", pipe.text_encoder, "text_model.")])
    assert any("self_attn_q_proj" in k for k in lora)
    path = tmp_path / "sd2style.safetensors"
    save_file(lora, path)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    pipe.load_lora_weights(str(path), adapter_name="x")
    pipe.set_adapters(["x"], adapter_weights=[0.7])
    (u0, t0), _ = network_outputs(model, pipe)
    ours = Pipeline(model, torch.device("cpu"), "full", watermark=False)
    ours.set_loras([(path, 0.7)])
    (u, t), (du, dt) = network_outputs(model, pipe)
    assert rel_err(u, du) < 1e-4 and rel_err(t, dt) < 1e-4
    assert rel_err(u, u0) > 1e-2 and rel_err(t, t0) > 1e-2   # it changed both
    qkv = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
    assert not torch.equal(model.state_dict()[qkv], base[qkv])
    ours.set_loras([])
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())


def test_an_sd1_lora_on_an_sd2_model_is_refused_in_one_line(tmp_path):
    from safetensors.torch import save_file
    from ldm.lora import LoraError
    from ldm.pipeline import Pipeline
    model, _ = tiny_sd2_variant("eps", seed=18)
    path = tmp_path / "v1.safetensors"
    save_file({"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight":
               torch.zeros(4, 768),
               "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight":
               torch.zeros(768, 4)}, path)
    with pytest.raises(LoraError, match=r"is for Stable Diffusion 1.x \(768-wide text\); this "
                                        r"model is a model of 48-wide text"):
        Pipeline(model, torch.device("cpu"), "full", watermark=False).set_loras([(path, 1.0)])


@pytest.mark.parametrize("layout", ["a1111-pt", "a1111-safetensors"])
def test_an_sd2_embedding_encodes_as_diffusers_load_textual_inversion(tmp_path, layout):
    """A textual-inversion embedding as wide as OpenCLIP's tokens (1,024 for SD 2; 48 on
    the tiny model) against diffusers' load_textual_inversion on the SD 2 twin; one of
    SD 1.x's width is refused in one line."""
    from safetensors.torch import save_file
    from ldm.compare import diffusers_components
    from ldm.embeddings import EmbeddingError
    from ldm.pipeline import Pipeline
    model, config = tiny_sd2_variant("eps", seed=19)
    vectors = torch.randn(2, 48, generator=torch.Generator().manual_seed(4))
    path = tmp_path / ("zqwonder.pt" if layout == "a1111-pt" else "zqwonder.safetensors")
    if layout == "a1111-pt":
        torch.save({"string_to_token": {"*": 265}, "name": "zqwonder", "step": 100,
                    "string_to_param": {"*": torch.nn.Parameter(vectors.clone())}}, path)
    else:
        save_file({"emb_params": vectors.clone()}, path)
    pipe = diffusers.StableDiffusionPipeline(**diffusers_components(model, config, tmp_path / "tok"))
    pipe.load_textual_inversion(str(path), token="zqwonder")
    ours = Pipeline(model, torch.device("cpu"), "full", watermark=False)
    assert ours.load_embedding(path) == "zqwonder"
    prompts = ["a photo of zqwonder on a table", "zqwonder", "no token here"]
    with torch.no_grad():
        got = model.cond_stage_model.encode(prompts)
        want = torch.cat([pipe.encode_prompt(p, "cpu", 1, False)[0] for p in prompts])
    assert rel_err(got, want) < 1e-5
    assert not torch.equal(got[0], model.cond_stage_model.encode(["a photo of on a table"])[0])
    save_file({"emb_params": torch.zeros(1, 768)}, tmp_path / "zqv1.safetensors")
    with pytest.raises(EmbeddingError, match="768") as e:
        ours.load_embedding(tmp_path / "zqv1.safetensors")
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------ SD-Turbo, zero-terminal SNR

def tiny_with_sampling_of(config_name, parameterization="eps", seed=20):
    """(model, config, defaults): the tiny SD 2 model with the ``sampling:`` section and
    schedule of one of Stability-layout configs here (SD-Turbo's, the zero-SNR one's)."""
    from ldm.config import sampling_defaults
    from ldm.util import instantiate_from_config
    full = OmegaConf.load(SD2 / config_name)
    config = OmegaConf.load(TINY_SD2)
    config.model.params.parameterization = parameterization
    config.model.params.zero_terminal_snr = bool(full.model.params.get("zero_terminal_snr"))
    config.sampling = full.sampling
    model = randomize(instantiate_from_config(config.model), seed).eval()
    return model, config, sampling_defaults(config)


@pytest.mark.parametrize("steps", [None, 4])
def test_sd_turbo_defaults_match_diffusers_turbo_pipeline(tmp_path, steps):
    """SD-Turbo's config: with nothing asked, 1 Euler step from t = 999 without guidance;
    equal to diffusers' StableDiffusionPipeline as SD-Turbo's folder sets it up
    (EulerDiscreteScheduler, timestep_spacing="trailing", guidance_scale=0.0), and at 4
    steps too."""
    from ldm.compare import diffusers_components
    from ldm.pipeline import Pipeline
    model, config, defaults = tiny_with_sampling_of("sd-turbo.yaml")
    assert defaults == {"sampler": "euler", "steps": 1, "scale": 1.0,
                        "timestep_spacing": "trailing"}
    parts = diffusers_components(model, config, tmp_path / "tok")
    parts["scheduler"] = diffusers.EulerDiscreteScheduler.from_config(
        parts["scheduler"].config, timestep_spacing="trailing", steps_offset=1)
    theirs = diffusers.StableDiffusionPipeline(**parts)
    theirs.set_progress_bar_config(disable=True)
    ours = Pipeline(model, torch.device("cpu"), "full", watermark=False, defaults=defaults)
    request = ours.request("txt2img", ["a red circle", "two blue squares"], [7, 8],
                           height=32, width=32, steps=steps)
    assert (request.sampler, request.steps, request.scale) == ("euler", steps or 1, 1.0)
    x, _ = ours.initial_noise([7, 8], 32, 32)
    z_ours = ours.latents(["a red circle", "two blue squares"], [7, 8], height=32, width=32,
                          steps=steps, progress=False)
    # diffusers starts a trailing Euler schedule at sigma_max * noise; Stability's sgm
    # (SD-Turbo's own sampler) and we at sqrt(1 + sigma_max^2) * noise, the DDPM latents
    # at t = 999: 0.23% apart, so diffusers gets the noise scaled to start where we do
    theirs.scheduler.set_timesteps(steps or 1)
    top = float(theirs.scheduler.sigmas[0])
    start = x * (1 + top ** 2) ** 0.5 / theirs.scheduler.init_noise_sigma
    z_theirs = theirs(["a red circle", "two blue squares"], num_inference_steps=steps or 1,
                      guidance_scale=0.0, height=32, width=32, latents=start,
                      output_type="latent").images
    assert int(theirs.scheduler.timesteps[0]) == 999
    assert z_ours.abs().max() > 0.1 and rel_err(z_ours, z_theirs) < 1e-4


def test_zero_snr_config_matches_diffusers_rescaled_betas_trailing_and_guidance_rescale(tmp_path):
    """SD 2.1-v zero-terminal-SNR fine-tunes' config: betas rescaled to zero terminal SNR,
    trailing timesteps, guidance rescale 0.7 by default; equal to diffusers' pipeline with
    rescale_betas_zero_snr=True, timestep_spacing="trailing", guidance_rescale=0.7."""
    from ldm.compare import save_diffusers_pipeline
    from ldm.pipeline import Pipeline
    model, config, defaults = tiny_with_sampling_of("v2-inference-v-zero-snr.yaml", "v")
    assert defaults == {"timestep_spacing": "trailing", "rescale": 0.7}
    assert float(model.alphas_cumprod[-1]) < 1e-6   # t = 999 is pure noise
    theirs = save_diffusers_pipeline(model, config, tmp_path / "pipe")
    assert theirs.scheduler.config.rescale_betas_zero_snr
    assert theirs.scheduler.config.timestep_spacing == "trailing"
    theirs.set_progress_bar_config(disable=True)
    ours = Pipeline(model, torch.device("cpu"), "full", watermark=False, defaults=defaults)
    prompts, seeds = ["a red circle", "two blue squares"], [7, 8]
    x, _ = ours.initial_noise(seeds, 32, 32)
    z_ours = ours.latents(prompts, seeds, sampler="ddim", steps=8, scale=9.0, height=32,
                          width=32, progress=False)
    z_theirs = theirs(prompts, num_inference_steps=8, guidance_scale=9.0, height=32, width=32,
                      guidance_rescale=0.7, latents=x.clone(), output_type="latent").images
    assert z_ours.abs().max() > 0.1 and rel_err(z_ours, z_theirs) < 1e-4


def test_a_file_named_turbo_is_sd_turbo_and_sampling_sections_are_checked(tmp_path, caplog):
    from safetensors.torch import save_file
    from ldm.config import choose_model, sampling_defaults
    from ldm.errors import ConfigError
    shapes = {"cond_stage_model.model.token_embedding.weight": (49408, 1024),
              "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
              "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight":
              (320, 1024)}
    for name in ("sd_turbo.safetensors", "v2-1_512-ema-pruned.safetensors"):
        save_file({k: torch.zeros(v, dtype=torch.bool) for k, v in shapes.items()},
                  tmp_path / name)
    with caplog.at_level("WARNING"):
        turbo = choose_model(tmp_path / "sd_turbo.safetensors")
    assert (turbo.variant, turbo.config_path.name) == ("turbo", "sd-turbo.yaml")
    assert turbo.defaults == {"sampler": "euler", "steps": 1, "scale": 1.0,
                              "timestep_spacing": "trailing"}
    assert "its name says it is a Stable Diffusion 2.x Turbo checkpoint" in caplog.text
    base = choose_model(tmp_path / "v2-1_512-ema-pruned.safetensors")
    assert (base.variant, base.defaults) == ("txt2img", {"scale": 9.0})
    for bad, says in [({"steps": 0}, r"sampling steps: 0 is out of range: must be in \[1, 1000\]"),
                      ({"rescale": 1.5}, "sampling rescale"),
                      ({"scale": "high"}, "sampling scale"),
                      ({"sampler": "warp drive"}, "unknown sampler 'warp drive'"),
                      ({"colour": 1}, "unknown sampling defaults")]:
        config = OmegaConf.create({"sampling": bad})
        with pytest.raises(ConfigError, match=says):
            sampling_defaults(config, "x.yaml")
