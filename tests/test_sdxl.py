"""Stable Diffusion XL through the family seam: Stability's generative-models configs build
our modules in the official key layout (committed manifests, diffusers' converters as the
referee at full size), both text encoders equal transformers' CLIPTextModel and
CLIPTextModelWithProjection, the UNet with its size conditioning equals diffusers', and
text-to-image equals diffusers' StableDiffusionXLPipeline on identical tiny weights."""
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT, diffusers_named_lora, randomize, rel_err
from ldm.pipeline import build_model

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

XL = ROOT / "configs" / "stable-diffusion"
TINY_XL = ROOT / "configs" / "tiny" / "tiny-sdxl-inference.yaml"
MANIFESTS = ROOT / "tests" / "manifests"


@pytest.mark.parametrize("name,manifest", [("sd_xl_base", "sdxl-base"),
                                           ("sd_xl_inpainting", "sdxl-base"),
                                           ("sd_xl_refiner", "sdxl-refiner")])
def test_sdxl_configs_build_the_committed_key_manifest(name, manifest):
    """The inpainting model's keys are the base's, its first convolution 9 channels wide."""
    model = build_model(XL / f"{name}.yaml", meta=True)
    got = [f"{k} {list(v.shape)}" for k, v in model.state_dict().items()]
    want = (MANIFESTS / f"{manifest}.txt").read_text().splitlines()
    if name == "sd_xl_inpainting":
        want = [line.replace("input_blocks.0.0.weight [320, 4, 3, 3]",
                             "input_blocks.0.0.weight [320, 9, 3, 3]") for line in want]
    assert got == want
    assert model.scale_factor == 0.13025 and model.parameterization == "eps"
    assert model.image_size * model.latent_downsampling_factor == 1024


@pytest.mark.parametrize("name", ["sd_xl_base", "sd_xl_refiner"])
def test_full_size_sdxl_layout_is_what_diffusers_converters_expect(name):
    """diffusers' converters of the single-file layout take our full-size state dict into
    its own SDXL models, strictly (on the meta device): the UNet with its text_time
    embedding, the VAE, CLIP ViT-L and OpenCLIP ViT-bigG with its projection; the
    parameter counts are SDXL's."""
    from ldm.compare import to_diffusers_xl
    model = build_model(XL / f"{name}.yaml", meta=True)
    with torch.device("meta"):
        parts = to_diffusers_xl(model, OmegaConf.load(XL / f"{name}.yaml"))
    counts = {k: sum(p.numel() for p in v.parameters()) for k, v in parts.items()}
    unet = parts["unet"].config
    assert counts["text_encoder_2"] == 694_659_840 and counts["vae"] == 83_653_863
    if name == "sd_xl_base":
        assert counts["unet"] == 2_567_463_684 and counts["text_encoder"] == 123_060_480
        assert list(unet.transformer_layers_per_block) == [1, 2, 10]
        assert unet.projection_class_embeddings_input_dim == 2816
    else:
        assert counts["unet"] == 2_259_526_660 and "text_encoder" not in parts
        assert unet.projection_class_embeddings_input_dim == 2560


@pytest.fixture(scope="module")
def tiny_xl():
    config = OmegaConf.load(TINY_XL)
    from ldm.util import instantiate_from_config
    return randomize(instantiate_from_config(config.model), 3).eval(), config


@pytest.fixture(scope="module")
def twin(tiny_xl, tmp_path_factory):
    """diffusers' StableDiffusionXLPipeline holding the tiny model's weights."""
    from ldm.compare import diffusers_components
    model, config = tiny_xl
    pipe = diffusers.StableDiffusionXLPipeline(
        **diffusers_components(model, config, tmp_path_factory.mktemp("tok")))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def test_both_text_encoders_match_transformers(tiny_xl, twin):
    """CLIP ViT-L's hidden state after layer ``layer_idx`` without the final norm, and
    OpenCLIP bigG's penultimate without ln_final plus the pooled projection: diffusers'
    hidden_states[-2] and text_embeds; clip skip 2 one layer earlier on both
    (hidden_states[-3], diffusers' clip_skip=1), the pooled embedding unchanged."""
    model, _ = tiny_xl
    clip_l, big_g = model.conditioner.text_embedders
    texts = ["a red circle", "two blue squares &amp; a tree"]
    ids_l, ids_g = clip_l.tokenize(texts, 77), big_g.tokenize(texts, 77)
    assert (ids_g == 0).any() and not (ids_l == 0).any()   # OpenCLIP pads with 0
    out_l = twin.text_encoder(ids_l, output_hidden_states=True)
    out_g = twin.text_encoder_2(ids_g, output_hidden_states=True)
    try:
        for skip in (1, 2):
            model.conditioner.clip_skip = skip
            z_l = clip_l.encode_ids(ids_l)
            z_g, pooled = big_g.encode_ids_pooled(ids_g)
            assert rel_err(z_l, out_l.hidden_states[-1 - skip]) < 1e-5
            assert rel_err(z_g, out_g.hidden_states[-1 - skip]) < 1e-5
            assert rel_err(pooled, out_g.text_embeds) < 1e-5
    finally:
        model.conditioner.clip_skip = 1
    assert model.conditioner.layers == 2   # 3 layers, the config's layer one from the end


@torch.no_grad()
def test_the_unet_with_size_conditioning_matches_diffusers(tiny_xl, twin):
    """Our vector (pooled embedding, then the Fourier features of the original size, crop
    and target size, cos first) through label_emb equals diffusers' text_time addition
    embedding of text_embeds and time_ids."""
    model, _ = tiny_xl
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 12, generator=g), torch.tensor([901, 11])
    values = model.size_values(32, 48, original=(128, 100), crop=(3, 5))
    cond = model.conditioning(["a red circle", "b"], values)
    assert cond["crossattn"].shape == (2, 77, 80) and cond["vector"].shape == (2, 96)
    ours = model.apply_model(x, t, cond)
    time_ids = torch.tensor([[128.0, 100.0, 3.0, 5.0, 32.0, 48.0]] * 2)
    theirs = twin.unet(x, t, encoder_hidden_states=cond["crossattn"], added_cond_kwargs={
        "text_embeds": cond["vector"][:, :48], "time_ids": time_ids}).sample
    assert ours.abs().max() > 0.01 and rel_err(ours, theirs) < 1e-5
    with pytest.raises(ValueError, match="96-wide vector"):
        model.apply_model(x, t, {"crossattn": cond["crossattn"]})


@pytest.mark.parametrize("negative", [None, "green"], ids=["zeroed-negative", "negative"])
def test_tiny_sdxl_txt2img_matches_diffusers_pipeline(tiny_xl, twin, negative):
    """The same latents as StableDiffusionXLPipeline from the same noise: DDIM 10 steps,
    guidance 5, a non-square size (its original and target size), with no negative
    prompt (the base conditions on zeros, diffusers' force_zeros_for_empty_prompt) and
    with one."""
    from ldm.pipeline import Pipeline
    model, _ = tiny_xl
    ours = Pipeline(model, torch.device("cpu"), "full", watermark=False)
    prompts, seeds = ["a red circle", "two blue squares"], [7, 8]
    x, _ = ours.initial_noise(seeds, 32, 48)
    z_ours = ours.latents(prompts, seeds, sampler="ddim", steps=10, scale=5.0, height=32,
                          width=48, negative_prompts=negative, progress=False)
    z_theirs = twin(prompts, num_inference_steps=10, guidance_scale=5.0, height=32, width=48,
                    latents=x.clone(), output_type="latent",
                    negative_prompt=None if negative is None else [negative] * 2).images
    assert z_ours.abs().max() > 0.1 and rel_err(z_ours, z_theirs) < 1e-5


def test_sdxl_checkpoints_are_detected_by_their_keys():
    from ldm.families import detect, shapes_of
    for name, variant in (("sd_xl_base", "txt2img"), ("sd_xl_refiner", "refiner"),
                          ("sd_xl_inpainting", "inpainting")):
        found = detect(shapes_of(build_model(XL / f"{name}.yaml", meta=True).state_dict()))
        assert (found.family.name, found.variant) == ("sdxl", variant)
        assert Path(found.config).name == f"{name}.yaml"


TINY_REFINER = ROOT / "configs" / "tiny" / "tiny-sdxl-refiner.yaml"


def tiny(config_path, seed):
    from ldm.util import instantiate_from_config
    config = OmegaConf.load(config_path)
    return randomize(instantiate_from_config(config.model), seed).eval(), config


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_tiny_refiner_img2img_matches_diffusers_step_by_step(tmp_path, sampler):
    """The refiner (OpenCLIP bigG alone, aesthetic score 6 and 2.5 for the negative) as
    StableDiffusionXLImg2ImgPipeline runs it on the same tiny weights: every step and
    the result (strength 0.6); an empty negative prompt is encoded, not zeros."""
    import sys
    sys.path.insert(0, str(ROOT / "tests" / "models"))
    from test_crosscheck_diffusers import _both, _image_and_mask
    from ldm.pipeline import Pipeline
    model, config = tiny(TINY_REFINER, 5)
    assert not model.force_zeros_for_empty_prompt
    ours = Pipeline(model, torch.device("cpu"), "full")
    image, _ = _image_and_mask()
    init = ours.encode([image])
    z_ours, z_theirs, a, b = _both(ours, diffusers.StableDiffusionXLImg2ImgPipeline, model,
                                   config, tmp_path, {"init": init}, 0.6, sampler,
                                   image=init.expand(2, -1, -1, -1).clone())
    assert max((rel_err(x, y) for x, y in zip(a, b)), default=0) < 1e-5
    assert z_ours.abs().max() > 0.1 and rel_err(z_ours, z_theirs) < 1e-5


@pytest.mark.parametrize("name,cls,variant", [
    ("tiny-sdxl-inference", "StableDiffusionXLPipeline", "txt2img"),
    ("tiny-sdxl-refiner", "StableDiffusionXLImg2ImgPipeline", "refiner")])
def test_an_sdxl_diffusers_folder_loads_to_the_same_model(tmp_path, name, cls, variant):
    """A folder diffusers' save_pretrained wrote from tiny SDXL weights (two text encoders,
    or the refiner's second alone; bigG as CLIPTextModelWithProjection, all its blocks)
    is found by its JSON files and loads, given as --ckpt, to exactly those weights (the
    unused logit_scale as zero)."""
    from ldm.compare import diffusers_components
    from ldm.config import choose_model
    from ldm.families import detect_folder
    from ldm.pipeline import load_model
    from ldm.source import folder_configs
    model, config = tiny(ROOT / "configs" / "tiny" / f"{name}.yaml", 9)
    folder = tmp_path / "pipe"
    getattr(diffusers, cls)(**diffusers_components(model, config, tmp_path / "tok")
                            ).save_pretrained(folder)
    found = detect_folder(*folder_configs(folder))
    assert (found.family.name, found.variant) == ("sdxl", variant)
    choice = choose_model(folder, ROOT / "configs" / "tiny" / f"{name}.yaml")
    got = load_model(choice.ckpt, choice.config).state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(got[k], torch.zeros_like(v) if k.endswith("logit_scale") else v), k


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_base_and_refiner_hand_over_matches_diffusers_denoising_end_and_start(tmp_path,
                                                                             sampler):
    """One loop in which the base takes the steps above timestep 200 and the refiner the
    rest (``set_refiner(refiner, 0.8)``) gives diffusers' ensemble of experts: the base
    pipeline with denoising_end=0.8, its latents into the refiner's img2img pipeline with
    denoising_start=0.8; and the base alone differs."""
    import sys
    sys.path.insert(0, str(ROOT / "tests" / "models"))
    from test_crosscheck_diffusers import EDIT_SAMPLERS
    from ldm.compare import diffusers_components
    from ldm.pipeline import Pipeline
    base, base_config = tiny(TINY_XL, 3)
    refiner, refiner_config = tiny(TINY_REFINER, 5)
    cpu = torch.device("cpu")
    ours = Pipeline(base, cpu, "full").set_refiner(Pipeline(refiner, cpu, "full"), 0.8)
    prompts, seeds = ["a red circle", "two blue squares"], [7, 8]
    kw = dict(sampler=sampler, steps=10, scale=5.0, height=32, width=32, progress=False)
    z_ours = ours.latents(prompts, seeds, **kw)
    x, _ = ours.initial_noise(seeds, 32, 32)
    pipes = [cls(**diffusers_components(m, c, tmp_path / name)) for cls, m, c, name in (
        (diffusers.StableDiffusionXLPipeline, base, base_config, "base"),
        (diffusers.StableDiffusionXLImg2ImgPipeline, refiner, refiner_config, "refiner"))]
    for pipe in pipes:
        pipe.scheduler = getattr(diffusers, EDIT_SAMPLERS[sampler]).from_config(
            pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
    mid = pipes[0](prompts, num_inference_steps=10, guidance_scale=5.0, height=32, width=32,
                   latents=x.clone(), denoising_end=0.8, output_type="latent").images
    z_theirs = pipes[1](prompts, image=mid, num_inference_steps=10, guidance_scale=5.0,
                        denoising_start=0.8, output_type="latent").images
    assert z_ours.abs().max() > 0.1 and rel_err(z_ours, z_theirs) < 1e-5
    alone = Pipeline(base, cpu, "full").latents(prompts, seeds, **kw)
    assert rel_err(alone, z_ours) > 1e-4   # the refiner's two low-noise steps changed it
    record = ours.options_record()
    assert record["refiner_switch"] == 0.8 and "refiner" in record


def test_a_refiner_that_cannot_continue_the_base_is_refused_in_one_line(tiny_xl):
    from ldm.errors import UsageError
    from ldm.pipeline import Pipeline
    import sys
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_tiny
    cpu = torch.device("cpu")
    base = Pipeline(tiny_xl[0], cpu, "full")
    with pytest.raises(UsageError, match="between 0 and 1"):
        base.set_refiner(Pipeline(tiny(TINY_REFINER, 5)[0], cpu, "full"), 1.0)
    sd1 = Pipeline(build_tiny(), cpu, "full")   # another autoencoder (scale 0.18215)
    with pytest.raises(UsageError, match="another latent space"):
        base.set_refiner(sd1)
    assert base.refiner is None


def _compare(ours, theirs_cls, model, config, folder, task, strength, **theirs_kwargs):
    """Final latents of ours and of a diffusers SDXL pipeline from the same seeds, DDIM 10,
    guidance 5, no negative prompt (zeros on both sides)."""
    from ldm.compare import diffusers_components
    theirs = theirs_cls(**diffusers_components(model, config, folder))
    theirs.set_progress_bar_config(disable=True)
    prompts, seeds = ["a red circle", "a blue square"], [7, 8]
    z_ours = ours.latents(prompts, seeds, sampler="ddim", steps=10, scale=5.0,
                          progress=False, strength=strength, height=32, width=32, **task)
    z_theirs = theirs(prompts, strength=strength, num_inference_steps=10, guidance_scale=5.0,
                      output_type="latent",
                      generator=[torch.Generator().manual_seed(s) for s in seeds],
                      **theirs_kwargs).images
    return z_ours, z_theirs


def test_tiny_sdxl_img2img_matches_diffusers(tmp_path, tiny_xl):
    import sys
    sys.path.insert(0, str(ROOT / "tests" / "models"))
    from test_crosscheck_diffusers import _image_and_mask
    from ldm.pipeline import Pipeline
    model, config = tiny_xl
    ours = Pipeline(model, torch.device("cpu"), "full")
    image, _ = _image_and_mask()
    init = ours.encode([image])
    z_ours, z_theirs = _compare(ours, diffusers.StableDiffusionXLImg2ImgPipeline, model, config,
                                tmp_path, {"init": init}, 0.6,
                                image=init.expand(2, -1, -1, -1).clone())
    assert z_ours.abs().max() > 0.1 and rel_err(z_ours, z_theirs) < 1e-5


@pytest.mark.parametrize("strength", [0.7, 1.0])
def test_tiny_sdxl_nine_channel_inpainting_matches_diffusers(tmp_path, strength):
    """SDXL's inpainting model (UNet input [x, mask, masked-image latents]; the config is
    the base's with 9 input channels) against StableDiffusionXLInpaintPipeline."""
    import sys
    sys.path.insert(0, str(ROOT / "tests" / "models"))
    from test_crosscheck_diffusers import nine_channel_task
    from ldm.pipeline import Pipeline
    from ldm.util import instantiate_from_config
    config = OmegaConf.load(TINY_XL)
    config.model.params.network_config.params.in_channels = 9
    model = randomize(instantiate_from_config(config.model), 21).eval()
    ours = Pipeline(model, torch.device("cpu"), "full")
    assert ours.is_inpainting_model
    task, theirs = nine_channel_task(ours, model, strength)
    z_ours, z_theirs = _compare(
        ours, diffusers.StableDiffusionXLInpaintPipeline, model, config, tmp_path, task,
        strength, **theirs)
    assert z_ours.abs().max() > 0.1 and rel_err(z_ours, z_theirs) < 1e-5


def kohya_sdxl_lora(pipe, peft=False):
    """A random SDXL LoRA from diffusers' modules: lora_unet_, lora_te1_ (CLIP ViT-L),
    lora_te2_ (bigG); or the same layers in PEFT form (``text_encoder_2.``)."""
    return diffusers_named_lora([
        ("lora_unet_", "unet.", pipe.unet, ""),
        ("lora_te1_", "text_encoder.", pipe.text_encoder, "text_model."),
        ("lora_te2_", "text_encoder_2.", pipe.text_encoder_2, "text_model.")], peft=peft)


@pytest.mark.parametrize("names", ["diffusers-names", "sgm-names", "peft"])
def test_kohya_sdxl_lora_matches_diffusers_load_lora_weights(tmp_path, names):
    """A kohya SDXL LoRA (lora_unet_ in diffusers' or sgm's block names, lora_te1_ for
    CLIP ViT-L, lora_te2_ for bigG whose q/k/v land in thirds of in_proj_weight), or the
    same layers in diffusers' PEFT form (text_encoder_2.), merged by us at 0.7 against diffusers' load_lora_weights on the same weights: the UNet's output
    and both text encoders'; unmerged, the weights are back bit for bit."""
    from safetensors.torch import save_file
    from ldm.compare import diffusers_components
    from ldm.convert import module_names
    from ldm.lora import kohya_names
    from ldm.pipeline import Pipeline
    model, config = tiny(TINY_XL, 17)
    pipe = diffusers.StableDiffusionXLPipeline(**diffusers_components(model, config,
                                                                      tmp_path / "tok"))
    lora = kohya_sdxl_lora(pipe, peft=names == "peft")
    theirs_path, ours_path = tmp_path / "d.safetensors", tmp_path / "o.safetensors"
    save_file(lora, theirs_path)
    if names == "sgm-names":   # kohya's sd-scripts name SDXL's UNet as sgm does
        table = kohya_names(module_names(model))
        sgm = {}
        for key, v in lora.items():
            name, _, suffix = key.partition(".")
            if name.startswith("lora_unet_"):
                module = table[name]
                name = "lora_unet_" + module[len("model.diffusion_model."):].replace(".", "_")
            sgm[f"{name}.{suffix}"] = v
        assert any("input_blocks" in k for k in sgm)
        save_file(sgm, ours_path)
    else:
        ours_path = theirs_path
    base = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([901, 11])
    cond = model.conditioning(["a red circle", "two squares"], model.size_values(32, 32))
    ids = [e.tokenize(["a red circle", "two squares"], 77)
           for e in model.conditioner.text_embedders]

    def outputs():
        with torch.no_grad():
            return (model.apply_model(x, t, cond),
                    *(e.encode_ids(i) for e, i in zip(model.conditioner.text_embedders, ids)))
    before = outputs()
    pipe.load_lora_weights(str(theirs_path), adapter_name="x")
    pipe.set_adapters(["x"], adapter_weights=[0.7])
    with torch.no_grad():
        theirs = (pipe.unet(x, t, encoder_hidden_states=cond["crossattn"], added_cond_kwargs={
                      "text_embeds": cond["vector"][:, :48],
                      "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)}).sample,
                  pipe.text_encoder(ids[0], output_hidden_states=True).hidden_states[-2],
                  pipe.text_encoder_2(ids[1], output_hidden_states=True).hidden_states[-2])
    ours = Pipeline(model, torch.device("cpu"), "full")
    ours.set_loras([(ours_path, 0.7)])
    after = outputs()
    for a, b, b0 in zip(after, theirs, before):
        assert rel_err(a, b) < 1e-4 and rel_err(a, b0) > 1e-2
    ours.set_loras([])
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())


def test_an_sdxl_lora_on_sd1_and_an_sd1_lora_on_sdxl_are_refused_in_one_line(tmp_path):
    from safetensors.torch import save_file
    from ldm.lora import LoraError, read_lora
    import sys
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_tiny
    from test_toolbox import kohya_lora
    sd1 = build_tiny()
    xl, _ = tiny(TINY_XL, 2)
    save_file(kohya_lora(sd1), tmp_path / "sd1.safetensors")
    save_file({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight":
               torch.zeros(4, 32), "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight":
               torch.zeros(32 * 4, 4)}, tmp_path / "xl.safetensors")
    with pytest.raises(LoraError, match="is for SDXL"):
        read_lora(tmp_path / "xl.safetensors", sd1)
    # tiny widths (SD 1's 32 against 32 + 48): the real ones name the generations
    with pytest.raises(LoraError, match="is for a model of 32-wide text; this model is a "
                                        "model of 80-wide text"):
        read_lora(tmp_path / "sd1.safetensors", xl)


def test_an_sdxl_embedding_pair_encodes_as_diffusers_load_textual_inversion(tmp_path, tiny_xl,
                                                                            twin):
    """An SDXL textual inversion ({"clip_l": [n, 768], "clip_g": [n, 1280]}, tiny widths
    here): each text encoder gets its part; the prompt's cross-attention states and pooled
    embedding equal diffusers' with load_textual_inversion on both encoders. One of a
    single width is refused for SDXL in one line, and the pair for SD 1."""
    import copy
    import sys
    from safetensors.torch import save_file
    from ldm.embeddings import EmbeddingError
    from ldm.pipeline import Pipeline
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_tiny
    model = copy.deepcopy(tiny_xl[0])
    g = torch.Generator().manual_seed(4)
    pair = {"clip_l": torch.randn(2, 32, generator=g), "clip_g": torch.randn(2, 48, generator=g)}
    path = tmp_path / "xlstyle.safetensors"
    save_file(pair, path)
    ours = Pipeline(model, torch.device("cpu"), "full")
    assert ours.load_embedding(path) == "xlstyle"
    theirs = copy.deepcopy(twin)
    theirs.load_textual_inversion(pair["clip_l"], token="xlstyle", text_encoder=theirs.text_encoder,
                                  tokenizer=theirs.tokenizer)
    theirs.load_textual_inversion(pair["clip_g"], token="xlstyle",
                                  text_encoder=theirs.text_encoder_2, tokenizer=theirs.tokenizer_2)
    prompt = "a xlstyle painting of a cat"
    with torch.no_grad():
        states, pooled = model.conditioner.encode_text([prompt])
        want, _, want_pooled, _ = theirs.encode_prompt(prompt, do_classifier_free_guidance=False)
        plain, _ = model.conditioner.encode_text(["a painting of a cat"])
    assert rel_err(states, want) < 1e-5 and rel_err(pooled[0], want_pooled) < 1e-5
    assert rel_err(states, plain) > 1e-2
    save_file({"emb_params": torch.randn(2, 32)}, tmp_path / "sd1style.safetensors")
    with pytest.raises(EmbeddingError, match="takes clip_l and clip_g vectors"):
        ours.load_embedding(tmp_path / "sd1style.safetensors")
    with pytest.raises(EmbeddingError, match=r"is for SDXL \(clip_l and clip_g vectors\)"):
        Pipeline(build_tiny(), torch.device("cpu"), "full").load_embedding(path)


@pytest.mark.parametrize("steps", [None, 4])
def test_sdxl_turbo_defaults_match_diffusers(tmp_path, steps):
    """SDXL-Turbo's config (SDXL base at 512 px with a ``sampling:`` section): with nothing
    asked, 1 Euler step from t = 999 without guidance, as diffusers' SDXL pipeline set up
    for it (EulerDiscreteScheduler, trailing, guidance_scale=0.0); 4 steps too. A file
    named "...turbo..." with the base's keys gets that config."""
    from ldm.compare import diffusers_components
    from ldm.config import sampling_defaults
    from ldm.families import by_name
    from ldm.pipeline import Pipeline
    from ldm.util import instantiate_from_config
    full = OmegaConf.load(XL / "sd_xl_turbo.yaml")
    assert full.model.params.image_size * 8 == 512
    config = OmegaConf.load(TINY_XL)
    config.sampling = full.sampling
    defaults = sampling_defaults(config)
    assert defaults == {"sampler": "euler", "steps": 1, "scale": 1.0,
                        "timestep_spacing": "trailing"}
    assert by_name("sdxl").named_variant("txt2img", "sd_xl_turbo_1.0_fp16.safetensors") == "turbo"
    model = randomize(instantiate_from_config(config.model), 23).eval()
    parts = diffusers_components(model, config, tmp_path / "tok")
    parts["scheduler"] = diffusers.EulerDiscreteScheduler.from_config(
        parts["scheduler"].config, timestep_spacing="trailing", steps_offset=1)
    theirs = diffusers.StableDiffusionXLPipeline(**parts)
    theirs.set_progress_bar_config(disable=True)
    ours = Pipeline(model, torch.device("cpu"), "full", watermark=False, defaults=defaults)
    prompts, seeds = ["a red circle", "two blue squares"], [7, 8]
    x, _ = ours.initial_noise(seeds, 32, 32)
    z_ours = ours.latents(prompts, seeds, height=32, width=32, steps=steps, progress=False)
    theirs.scheduler.set_timesteps(steps or 1)   # the same start (see test_sd2's turbo test)
    top = float(theirs.scheduler.sigmas[0])
    start = x * (1 + top ** 2) ** 0.5 / theirs.scheduler.init_noise_sigma
    z_theirs = theirs(prompts, num_inference_steps=steps or 1, guidance_scale=0.0, height=32,
                      width=32, latents=start, output_type="latent").images
    assert z_ours.abs().max() > 0.1 and rel_err(z_ours, z_theirs) < 1e-4


def test_a_bad_refiner_is_named_by_its_flag_in_one_line(tmp_path, capsys):
    import sys
    sys.path.insert(0, str(ROOT / "scripts"))
    import txt2img
    out = tmp_path / "o"
    for argv, said in (([str(tmp_path / "nope.safetensors")], "--refiner "),
                       ([str(ROOT / "models" / "ldm" / "shapes")], "--refiner "),
                       (["x.safetensors", "--refiner_switch", "1.5"], "--refiner_switch")):
        rc = txt2img.main(["--prompt", "x", "--outdir", str(out), "--refiner", *argv])
        err = capsys.readouterr().err.strip()
        assert rc != 0 and len(err.splitlines()) == 1 and said in err and "--ckpt" not in err, err
    assert not out.exists()


def test_the_refiner_given_for_text_to_image_is_refused_in_one_line(tmp_path):
    """SDXL's refiner refines images: txt2img with it as the model is refused in one line
    before its weights are read (its config conditions on an aesthetic score), saying what
    it is for; the library says the same."""
    from safetensors.torch import save_file
    from conftest import run_here
    from ldm.pipeline import Pipeline
    model, _ = tiny(TINY_REFINER, 5)
    path = tmp_path / "refiner.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    r = run_here("txt2img.py", "--prompt", "x", "--ckpt", path, "--config", TINY_REFINER,
                 "--outdir", tmp_path / "o", cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1, r.stderr
    assert "is SDXL's refiner: it refines images (scripts/img2img.py" in lines[0]
    assert not (tmp_path / "o").exists()
    with pytest.raises(Exception, match="this is SDXL's refiner"):
        Pipeline(model, torch.device("cpu"), "full").generate("x", 1, height=32, width=32,
                                                               progress=False)
