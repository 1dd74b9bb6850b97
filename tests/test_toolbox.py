"""The SD 1.x toolbox against diffusers on identical weights: the diffusers layout (folders,
VAE files), LoRA/LoCon in kohya-ss and PEFT naming, clip skip."""
import json
import sys

import pytest
import torch
from omegaconf import OmegaConf

from conftest import (ROOT, TINY_CONFIG, V1_CONFIG, build_tiny, network_outputs,
                      randomize, rel_err)

sys.path.insert(0, str(ROOT / "scripts"))

su = pytest.importorskip("diffusers.loaders.single_file_utils")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")



def fresh_tiny(seed=0):
    return build_tiny(seed).requires_grad_(False)


# ------------------------------------------------------------------ the diffusers layout

def test_our_converter_is_the_reverse_of_diffusers_single_file_converter(tiny_model, tiny_config):
    """diffusers' converter of the original layout takes our keys to its own; ours
    (``ldm.convert``) gives the same keys and tensors, and reads them back bit for bit."""
    from ldm import convert
    sd = tiny_model.state_dict()
    original = OmegaConf.to_container(tiny_config)
    ucfg = su.create_unet_diffusers_config_from_ldm(original, sd)
    vcfg = su.create_vae_diffusers_config_from_ldm(original, sd)
    ref = {"unet": su.convert_ldm_unet_checkpoint(sd, ucfg),
           "vae": su.convert_ldm_vae_checkpoint(sd, vcfg),
           "text_encoder": su.convert_ldm_clip_checkpoint(sd)}
    ours = convert.to_diffusers(tiny_model)
    for part, theirs in ref.items():
        assert set(ours[part]) == set(theirs), part
        for k, v in theirs.items():
            assert torch.equal(ours[part][k].reshape(v.shape), v), k
    back = convert.from_diffusers(tiny_model, ref)
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_full_size_v1_map_covers_every_weight_as_diffusers_names_it():
    """On SD v1's own shapes (meta tensors): every one of our 1,100+ weights has the
    diffusers name diffusers' converter gives it."""
    from ldm import convert
    from ldm.pipeline import build_model
    model = build_model(V1_CONFIG, meta=True)
    sd = model.state_dict()
    original = OmegaConf.to_container(OmegaConf.load(V1_CONFIG))
    ucfg = su.create_unet_diffusers_config_from_ldm(original, sd)
    vcfg = su.create_vae_diffusers_config_from_ldm(original, sd)
    names = convert.parameter_names(model)
    want = ({"unet." + k for k in su.convert_ldm_unet_checkpoint(sd, ucfg)}
            | {"vae." + k for k in su.convert_ldm_vae_checkpoint(sd, vcfg)}
            | {"text_encoder." + k for k in su.convert_ldm_clip_checkpoint(sd)})
    assert set(names) == want
    assert set(names.values()) == set(sd)


@pytest.mark.parametrize("variant", ["fp32-safetensors", "fp16-variant", "fp32-bin", "sharded"])
def test_a_diffusers_folder_loads_bit_identical_to_the_single_file(tmp_path, tiny_model,
                                                                   tiny_config, variant):
    """A folder diffusers' save_pretrained wrote from our weights, given as --ckpt, loads
    to exactly our weights (the fp16 variant: to them rounded to fp16)."""
    from ldm.compare import save_diffusers_pipeline
    from ldm.config import choose_model
    from ldm.pipeline import load_model
    folder = tmp_path / "pipe"
    pipe = save_diffusers_pipeline(tiny_model, tiny_config, folder)
    if variant != "fp32-safetensors":
        import shutil
        shutil.rmtree(folder)
        if variant == "fp16-variant":
            pipe.to(torch.float16).save_pretrained(folder, variant="fp16")
        elif variant == "sharded":
            pipe.save_pretrained(folder, max_shard_size="100KB")
            assert list((folder / "unet").glob("*.index.json"))
        else:
            pipe.save_pretrained(folder, safe_serialization=False)
    choice = choose_model(folder, TINY_CONFIG)
    loaded = load_model(choice.ckpt, choice.config)
    want = tiny_model.state_dict()
    got = loaded.state_dict()
    for k, v in want.items():
        if v.is_floating_point() and variant == "fp16-variant" and not k.endswith(
                ("alphas_cumprod", "betas", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                 "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
                 "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
                 "posterior_variance", "posterior_log_variance_clipped",
                 "posterior_mean_coef1", "posterior_mean_coef2")):
            v = v.half().float()
        assert torch.equal(got[k], v), k


def test_a_diffusers_folder_of_another_family_is_refused_in_one_line(tmp_path):
    from ldm.checkpoint import CheckpointError
    from ldm.config import choose_model
    for name, unet, index, says in [
            ("sd2-depth", {"cross_attention_dim": 1024, "in_channels": 5},
             {"_class_name": "StableDiffusionDepth2ImgPipeline"}, "SD 2 depth-to-image"),
            ("sdxl", {"cross_attention_dim": 2048}, {"text_encoder_2": []}, "SDXL")]:
        folder = tmp_path / name
        (folder / "unet").mkdir(parents=True)
        (folder / "model_index.json").write_text(json.dumps(
            {"_class_name": "StableDiffusionPipeline", **index}))
        (folder / "unet" / "config.json").write_text(json.dumps(unet))
        with pytest.raises(CheckpointError, match=says):
            choose_model(folder)


# ------------------------------------------------------------------------------- VAE

def test_a_swapped_vae_decodes_as_diffusers_autoencoder_with_the_same_file(tmp_path, tiny_config):
    """--vae in CompVis' layout (encoder.*, decoder.*) and in diffusers' (a vae/ folder):
    our decode equals diffusers' AutoencoderKL holding that file's weights."""
    from ldm.pipeline import Pipeline, load_vae
    other = randomize(fresh_tiny(), seed=5).first_stage_model
    compvis = tmp_path / "vae-ft.ckpt"
    torch.save({"state_dict": {**other.state_dict(), "loss.logvar": torch.zeros(())}}, compvis)
    model = fresh_tiny()
    vcfg = su.create_vae_diffusers_config_from_ldm(
        OmegaConf.to_container(tiny_config),
        {"first_stage_model." + k: v for k, v in other.state_dict().items()})
    theirs = diffusers.AutoencoderKL(**vcfg).eval()
    theirs.load_state_dict(su.convert_ldm_vae_checkpoint(
        {"first_stage_model." + k: v for k, v in other.state_dict().items()}, vcfg))
    theirs.save_pretrained(tmp_path / "vae")
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = theirs.decode(z).sample
        for path in (compvis, tmp_path / "vae", tmp_path / "vae" /
                     "diffusion_pytorch_model.safetensors"):
            model = fresh_tiny()
            record = load_vae(model, path)
            got = model.first_stage_model.decode(z)
            assert rel_err(got, want) < 1e-5
            assert record["hash"]
    pipe = Pipeline(model, torch.device("cpu"), "full", watermark=False)
    pipe.vae = record
    assert pipe.options_record()["vae"] == "diffusion_pytorch_model.safetensors"


def test_a_vae_that_does_not_fit_is_refused_and_changes_nothing(tmp_path):
    from safetensors.torch import save_file
    from ldm.checkpoint import CheckpointError
    from ldm.pipeline import load_vae
    model = fresh_tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = {k: v for k, v in model.first_stage_model.state_dict().items()}
    sd["decoder.conv_out.weight"] = torch.zeros(3, 7, 3, 3)
    save_file(sd, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="does not fit this model's autoencoder"):
        load_vae(model, tmp_path / "bad.safetensors")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# -------------------------------------------------------------------------- clip skip

def test_clip_skip_2_is_the_penultimate_hidden_state_with_the_final_layer_norm(tiny_model,
                                                                             tiny_config):
    from ldm.compare import to_diffusers
    from ldm.modules.encoders.modules import FrozenCLIPEmbedder
    clip = to_diffusers(tiny_model, tiny_config)[2]
    ids = FrozenCLIPEmbedder.tokenize(["a red circle"])
    enc = tiny_model.cond_stage_model
    with torch.no_grad():
        out = clip(ids, output_hidden_states=True)
        want = getattr(clip, "text_model", clip).final_layer_norm(out.hidden_states[-2])
        enc.clip_skip = 2
        try:
            got = enc.encode_ids(ids)
        finally:
            enc.clip_skip = 1
        last = enc.encode_ids(ids)
    assert rel_err(got, want) < 1e-5
    assert rel_err(last, out.last_hidden_state) < 1e-5
    assert (got - last).abs().max() > 1e-2  # the two are different layers


# ------------------------------------------------------------------------------- LoRA

from ldm.compare import kohya_lora  # noqa: E402,F401  (the other tests import it from here)


@pytest.fixture(scope="module")
def kohya_file(tmp_path_factory, tiny_model):
    from safetensors.torch import save_file
    path = tmp_path_factory.mktemp("lora") / "style.safetensors"
    save_file(kohya_lora(tiny_model), path)
    return path


def diffusers_twin(model, config, folder):
    from ldm.compare import diffusers_components
    pipe = diffusers.StableDiffusionPipeline(**diffusers_components(model, config, folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("names", ["diffusers-names", "compvis-names"])
def test_kohya_locon_lora_matches_diffusers_load_lora_weights(tmp_path, tiny_config, names):
    """A kohya LoRA with alpha and LoCon convolutions, merged by us, against diffusers'
    load_lora_weights (PEFT, on the fly) on identical base weights, at weight 0.7."""
    from safetensors.torch import save_file
    from ldm.pipeline import Pipeline
    model = fresh_tiny()
    path = tmp_path / "style.safetensors"
    save_file(kohya_lora(model, compvis_names=names == "compvis-names"), path)
    pipe = diffusers_twin(model, tiny_config, tmp_path / "tok")
    if names == "compvis-names":  # diffusers reads kohya's diffusers-based names only
        save_file(kohya_lora(model), tmp_path / "same.safetensors")
        pipe.load_lora_weights(str(tmp_path / "same.safetensors"), adapter_name="x")
    else:
        pipe.load_lora_weights(str(path), adapter_name="x")
    pipe.set_adapters(["x"], adapter_weights=[0.7])
    base = network_outputs(model, pipe)
    ours = Pipeline(model, torch.device("cpu"), "full", watermark=False)
    ours.set_loras([(path, 0.7)])
    (u, t), (du, dt) = network_outputs(model, pipe)
    assert rel_err(u, du) < 1e-4
    assert rel_err(t, dt) < 1e-4
    assert (u - base[0][0]).abs().max() > 1e-2  # the LoRA changed something
    assert ours.options_record()["loras"] == [
        {"name": "style", "hash": ours.lora_stack.applied[0][0].hash, "weight": 0.7}]


def test_peft_format_lora_with_its_alpha_in_the_metadata_matches_diffusers(tmp_path, tiny_config):
    """A LoRA in diffusers/PEFT naming (``unet.<module>.lora_A.weight``), lora_alpha in the
    file's lora_adapter_metadata, as diffusers' save_lora_weights writes it."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from ldm.pipeline import Pipeline
    model = fresh_tiny()
    pipe = diffusers_twin(model, tiny_config, tmp_path / "tok")
    unet_cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0",
                                                             "proj_in", "conv1"])
    te_cfg = LoraConfig(r=2, lora_alpha=1, target_modules=["q_proj", "v_proj", "fc1"])
    pipe.unet.add_adapter(unet_cfg)
    inject_adapter_in_model(te_cfg, pipe.text_encoder)  # peft itself: any transformers
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for net in (pipe.unet, pipe.text_encoder):
            for name, p in net.named_parameters():
                if "lora_" in name:
                    # 0.1: at 0.3 the updates dwarf the tiny model's weights and its
                    # activations amplify float rounding to 1e-4
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    diffusers.StableDiffusionPipeline.save_lora_weights(
        tmp_path / "peft", unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata=unet_cfg.to_dict(),
        text_encoder_lora_adapter_metadata=te_cfg.to_dict())
    ours = Pipeline(model, torch.device("cpu"), "full", watermark=False)
    (u0, t0), _ = network_outputs(model, pipe)
    ours.set_loras([(tmp_path / "peft", 1.0)])  # the folder save_lora_weights wrote
    assert ours.lora_stack.applied[0][0].layout == "peft"
    (u, t), (du, dt) = network_outputs(model, pipe)
    assert rel_err(u, du) < 1e-5
    assert rel_err(t, dt) < 1e-5
    assert rel_err(u, u0) > 1e-2 and rel_err(t, t0) > 1e-2  # it changed both


def test_unmerging_restores_the_base_weights_bit_for_bit(tmp_path, kohya_file):
    """set_loras([]) puts back exactly the base weights (fp32 and bf16 weights); switching
    from one LoRA to another equals applying the second alone."""
    from safetensors.torch import save_file
    from ldm.pipeline import Pipeline
    for precision in ("full", "bf16"):
        model = fresh_tiny()
        pipe = Pipeline(model, torch.device("cpu"), precision, watermark=False)
        base = {k: v.clone() for k, v in model.state_dict().items()}
        other = tmp_path / "other.safetensors"
        save_file(kohya_lora(model, seed=9, alpha=4.0), other)
        pipe.set_loras([(kohya_file, 1.0), (other, -0.5)])
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, base[k])]
        assert len(changed) > 20
        pipe.set_loras([(other, 0.8)])
        only_other = {k: v.clone() for k, v in model.state_dict().items()}
        pipe.set_loras([])
        assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())
        pipe.set_loras([(other, 0.8)])
        assert all(torch.equal(v, only_other[k]) for k, v in model.state_dict().items())
        assert all(v.dtype == base[k].dtype for k, v in model.state_dict().items())


def _write(path, data):
    path.write_bytes(data)
    return path


def _save(path, sd):
    from safetensors.torch import save_file
    save_file(sd, path)
    return path


@pytest.mark.parametrize("case,make,says", [
    ("sdxl", lambda m, d: _save(d / "x.safetensors", {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight":
            torch.zeros(4, 768)}), "SDXL"),
    ("sd2", lambda m, d: _save(d / "x.safetensors", {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight":
            torch.zeros(4, 1024),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight":
            torch.zeros(320, 4)}), r"is for Stable Diffusion 2.x \(1,024-wide text\); this model is a "
                                   "model of 32-wide text"),
    ("flux", lambda m, d: _save(d / "x.safetensors", {
        "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 8)}),
     "transformer model"),
    ("loha-incomplete", lambda m, d: _save(d / "x.safetensors", {
        "lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.zeros(4, 4)}),
     "LoHa .* incomplete"),
    ("loha-tucker", lambda m, d: _save(d / "x.safetensors", {
        f"lora_unet_down_blocks_0_resnets_0_conv1.{k}": torch.zeros(4, 4)
        for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")}),
     "Tucker"),
    ("empty", lambda m, d: _write(d / "x.safetensors", b""), "is empty"),
    ("truncated", lambda m, d: _write(d / "x.safetensors",
                                      (d / "style.safetensors").read_bytes()[:300]), "truncated"),
    ("unknown-layer", lambda m, d: _save(d / "x.safetensors", {
        "lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
        "lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4)}),
     "name layers this model does not have"),
    ("wrong-shape", lambda m, d: _save(d / "x.safetensors", {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 40),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4)}),
     "does not fit this model"),
    ("not-a-lora", lambda m, d: _save(d / "x.safetensors", {"weight": torch.zeros(3)}),
     "not a LoRA file"),
])
def test_a_lora_that_cannot_apply_is_refused_in_one_line_with_nothing_applied(
        tmp_path, kohya_file, case, make, says):
    from ldm.lora import LoraError
    from ldm.pipeline import Pipeline
    model = fresh_tiny()
    (tmp_path / "style.safetensors").write_bytes(kohya_file.read_bytes())
    pipe = Pipeline(model, torch.device("cpu"), "full", watermark=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = make(model, tmp_path)
    with pytest.raises(LoraError, match=says) as e:
        pipe.set_loras([(tmp_path / "style.safetensors", 1.0), (path, 1.0)])
    assert "\n" not in str(e.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------------ A1111 prompt syntax

W = 1.1
PARSE_TABLE = [
    ("a cat", [("a cat", 1.0)], 0),
    ("a (cat)", [("a ", 1.0), ("cat", W)], 0),
    ("((cat))", [("cat", W * W)], 0),
    ("[cat]", [("cat", 1 / W)], 0),
    ("[[cat]]", [("cat", 1 / W / W)], 0),
    ("(cat:1.3) dog", [("cat", 1.3), (" dog", 1.0)], 0),
    ("(cat: 0.5 )", [("cat", 0.5)], 0),
    ("(a (b:0.5) c)", [("a ", W), ("b", 0.5 * W), (" c", W)], 0),
    (r"\(cat\) \[x\] a\\b", [(r"(cat) [x] a\b", 1.0)], 0),
    ("a BREAK b", [("a", 1.0), ("BREAK", None), ("b", 1.0)], 0),
    ("aBREAKb", [("aBREAKb", 1.0)], 0),
    ("cat:1.2", [("cat:1.2", 1.0)], 0),
    ("(cat", [("(cat", 1.0)], 1),
    ("cat)", [("cat)", 1.0)], 1),
    ("((a)", [("(", 1.0), ("a", W)], 1),
    ("a]", [("a]", 1.0)], 1),
    ("", [("", 1.0)], 0),
]


@pytest.mark.parametrize("text,pieces,warnings", PARSE_TABLE)
def test_a1111_weights_against_a_table(text, pieces, warnings):
    from ldm.modules.encoders.prompts import parse_attention
    got, warned = parse_attention(text)
    assert [t for t, _ in got] == [t for t, _ in pieces]
    for (_, w), (_, want) in zip(got, pieces):
        assert (w is None and want is None) or w == pytest.approx(want, rel=1e-12)
    assert len(warned) == warnings


def chunks_of(text, added=None):
    from ldm.modules.encoders.prompts import chunk_prompt, parse_attention
    from ldm.modules.encoders.tokenizer import get_tokenizer
    tok = get_tokenizer()
    return chunk_prompt(parse_attention(text)[0], lambda t: tok.units(t, added), tok.bos_id,
                        tok.eos_id, tok.encoder[",</w>"]), tok


def test_a1111_chunks_of_75_with_bos_eos_padding_break_and_the_comma_rule():
    chunks, tok = chunks_of("a " * 80)
    a = tok.encoder["a</w>"]
    assert [len(c.ids) for c in chunks] == [77, 77]
    assert chunks[0].ids == [tok.bos_id] + [a] * 75 + [tok.eos_id]
    assert chunks[1].ids == [tok.bos_id] + [a] * 5 + [tok.eos_id] * 71
    assert all(w == 1.0 for c in chunks for w in c.weights)
    # a chunk full within 20 tokens of a comma is cut after the comma
    chunks, _ = chunks_of("a " * 70 + ", " + "b " * 10)
    b, comma = tok.encoder["b</w>"], tok.encoder[",</w>"]
    assert chunks[0].ids[1:73] == [a] * 70 + [comma] + [tok.eos_id]
    assert chunks[1].ids[1:12] == [b] * 10 + [tok.eos_id]
    # BREAK starts a new chunk; weights follow their tokens; padding weighs 1
    chunks, _ = chunks_of("(a) BREAK [b]")
    assert [c.ids[:3] for c in chunks] == [[tok.bos_id, a, tok.eos_id], [tok.bos_id, b, tok.eos_id]]
    assert chunks[0].weights[:3] == [1.0, pytest.approx(W), 1.0]
    assert chunks[1].weights[1] == pytest.approx(1 / W) and chunks[1].weights[2:] == [1.0] * 75
    # an embedding's vectors are never split across chunks
    chunks, _ = chunks_of("a " * 74 + "<emb>", {"<emb>": [49408, 49409, 49410]})
    assert chunks[0].ids[75] == tok.eos_id and chunks[1].ids[1:4] == [49408, 49409, 49410]


def test_a1111_emphasis_multiplies_then_restores_each_chunks_mean():
    from ldm.modules.encoders.prompts import weight_chunks
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 77, 8, generator=g) + 0.3
    weights = torch.ones(2, 77)
    weights[0, 3], weights[1, 10] = 1.5, 0.5
    got = weight_chunks(z, weights.tolist())
    for n in range(2):
        scaled = z[n] * weights[n][:, None]
        want = scaled * (z[n].mean() / scaled.mean())
        assert torch.allclose(got[n], want, atol=1e-6)


def test_a1111_syntax_encodes_long_prompts_in_chunks_and_weights_tokens(tiny_model):
    """Without brackets and within 75 tokens it is the plain encoding; a long prompt is its
    chunks' encodings side by side; uncond is padded with the empty prompt's encoding."""
    from ldm.modules.encoders.prompts import weight_chunks
    enc = tiny_model.cond_stage_model
    short, long_ = "a red circle", "red circle, " * 40
    try:
        with torch.no_grad():
            plain = enc.encode([short])
            enc.syntax = "a1111"
            assert torch.allclose(enc.encode([short]), plain, atol=1e-6)
            z = enc.encode([long_])
            chunks, _ = chunks_of(long_)
            assert z.shape == (1, 77 * len(chunks), 32) and len(chunks) == 2
            want = weight_chunks(enc.encode_ids(torch.tensor([c.ids for c in chunks])),
                                 [c.weights for c in chunks]).reshape(1, -1, 32)
            assert torch.allclose(z, want, atol=1e-6)
            cond, uncond = enc.equalize(z, enc.encode([""]))
            assert uncond.shape == cond.shape
            assert torch.allclose(uncond[:, 77:], enc.encode([""]), atol=1e-6)
            weighted = enc.encode(["a (red:1.5) circle"])
            assert (weighted - plain).abs().max() > 1e-3
    finally:
        enc.syntax = "compvis"


def test_a_long_weighted_prompt_samples_end_to_end(tiny_model):
    """The pipeline samples a 2-chunk prompt against a 1-chunk negative prompt."""
    from ldm.pipeline import Pipeline
    pipe = Pipeline(fresh_tiny(), torch.device("cpu"), "full", watermark=False)
    pipe.set_text_options(prompt_syntax="a1111")
    z = pipe.latents(["(red:1.2) circle, " * 30], [1], negative_prompts=["blue"], sampler="ddim", steps=3, height=32, width=32,
                     progress=False)
    assert z.shape == (1, 4, 8, 8) and torch.isfinite(z).all()
    assert pipe.options_record()["prompt_syntax"] == "a1111"


# ------------------------------------------------------------------ textual inversion

@pytest.mark.parametrize("layout", ["a1111-pt", "a1111-safetensors", "diffusers-bin"])
def test_an_embedding_encodes_as_diffusers_load_textual_inversion(tmp_path, tiny_config, layout):
    """A random 3-vector embedding: our text encoder's output for prompts using its token
    equals diffusers' (transformers' tokenizer with added tokens, embedding table grown)."""
    from safetensors.torch import save_file
    from ldm.pipeline import Pipeline
    model = fresh_tiny()
    vectors = torch.randn(3, 32, generator=torch.Generator().manual_seed(4))
    path = tmp_path / {"a1111-pt": "zqwonder.pt", "a1111-safetensors": "zqwonder.safetensors",
                       "diffusers-bin": "learned_embeds.bin"}[layout]
    if layout == "a1111-pt":
        torch.save({"string_to_token": {"*": 265}, "name": "zqwonder", "step": 100,
                    "string_to_param": {"*": torch.nn.Parameter(vectors.clone())}}, path)
    elif layout == "a1111-safetensors":
        save_file({"emb_params": vectors.clone()}, path)
    else:
        torch.save({"<wonder>": vectors.clone()}, path)
    token = "zqwonder" if layout != "diffusers-bin" else "<wonder>"
    pipe = diffusers_twin(model, tiny_config, tmp_path / "tok")
    pipe.load_textual_inversion(str(path), token=token)
    ours = Pipeline(model, torch.device("cpu"), "full", watermark=False)
    assert ours.load_embedding(path, None if layout != "diffusers-bin" else token) == token
    prompts = [f"a photo of {token} on a table", f"{token}", "no token here"]
    with torch.no_grad():
        got = model.cond_stage_model.encode(prompts)
        want = torch.cat([pipe.encode_prompt(p, "cpu", 1, False)[0] for p in prompts])
    assert rel_err(got, want) < 1e-5
    assert model.cond_stage_model.token_embedding.weight.shape[0] == 49408 + 3
    assert ours.options_record()["embeddings"][0]["token"] == token
    # an image's record names the embeddings its prompts use (A1111's "TI hashes")
    assert ours.options_record([prompts[0].upper(), ""])["embeddings"][0]["token"] == token
    assert "embeddings" not in ours.options_record([prompts[2], "blurry"])


def test_an_embedding_that_cannot_be_added_is_refused_in_one_line(tmp_path):
    from safetensors.torch import save_file
    from ldm.embeddings import EmbeddingError
    from ldm.pipeline import Pipeline
    pipe = Pipeline(fresh_tiny(), torch.device("cpu"), "full", watermark=False)
    cases = {"wide.safetensors": ({"emb_params": torch.zeros(2, 1024)},
                                  r"1024 wide, for Stable Diffusion 2.x \(1,024-wide text\); this "
                                  "model.s text encoder is 32 wide"),
             "xl.safetensors": ({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 1280)},
                                "SDXL"),
             "cat.safetensors": ({"emb_params": torch.zeros(2, 32)}, "vocabulary"),
             "many.safetensors": ({"a": torch.zeros(2, 32), "b": torch.zeros(3)}, "not a textual"),
             "nan.safetensors": ({"emb_params": torch.full((1, 32), float("nan"))}, "NaN")}
    for name, (sd, says) in cases.items():
        save_file(sd, tmp_path / name)
        with pytest.raises(EmbeddingError, match=says) as e:
            pipe.load_embedding(tmp_path / name)
        assert "\n" not in str(e.value)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(EmbeddingError, match="empty"):
        pipe.load_embedding(tmp_path / "empty.pt")
    save_file({"emb_params": torch.zeros(1, 32)}, tmp_path / "zqmine.safetensors")
    pipe.load_embedding(tmp_path / "zqmine.safetensors")
    with pytest.raises(EmbeddingError, match="already taken"):
        pipe.load_embedding(tmp_path / "zqmine.safetensors", "ZQMINE")
    assert pipe.model.cond_stage_model.token_embedding.weight.shape[0] == 49408 + 1


# ------------------------------------------------------------------------ the scripts

@pytest.mark.parametrize("script", ["txt2img", "img2img", "inpaint"])
def test_every_script_takes_the_toolbox_flags_and_records_them(tmp_path, ckpts, kohya_file,
                                                               script):
    import importlib

    import numpy as np
    from PIL import Image
    from safetensors.torch import save_file
    from ldm.image_io import parameters_text, read_parameters
    image, mask = tmp_path / "image.png", tmp_path / "mask.png"
    Image.fromarray(np.full((32, 32, 3), 120, np.uint8)).save(image)
    m = np.zeros((32, 32), np.uint8)
    m[8:24, 8:24] = 255
    Image.fromarray(m).save(mask)
    save_file({"emb_params": torch.randn(2, 32)}, tmp_path / "zqshiny.safetensors")
    save_file(randomize(fresh_tiny(), 3).first_stage_model.state_dict(), tmp_path / "ft.safetensors")
    task = {"txt2img": ["--H", "32", "--W", "32"], "img2img": ["--init-img", str(image)],
            "inpaint": ["--image", str(image), "--mask", str(mask)]}[script]
    args = ["--ckpt", str(ckpts["ckpt"]), "--config", str(TINY_CONFIG), "--device", "cpu",
            "--ddim_steps", "2", "--n_samples", "1", "--n_iter", "1", "--outdir",
            str(tmp_path / "out"), "--lora", f"{kohya_file}:0.6",
            "--embedding", str(tmp_path / "zqshiny.safetensors"), "--vae", str(tmp_path / "ft.safetensors"),
            "--clip-skip", "2", "--prompt-syntax", "a1111", "--prompt", "a (zqshiny:1.2) circle",
            *task]
    assert importlib.import_module(script).main(args) == 0
    params = read_parameters(next((tmp_path / "out").rglob("0000*.png")))
    assert params["loras"][0]["name"] == "style" and params["loras"][0]["weight"] == 0.6
    assert params["embeddings"][0]["token"] == "zqshiny"
    assert params["vae"] == "ft.safetensors" and params["clip_skip"] == 2
    assert params["prompt_syntax"] == "a1111"
    text = parameters_text(params)
    assert "<lora:style:0.6>" in text and "Clip skip: 2" in text and "Lora hashes: \"style: " in text
    assert "TI hashes: \"zqshiny: " in text and "VAE: ft.safetensors" in text


@pytest.mark.parametrize("flag,value,says", [
    ("--lora", "nope.safetensors", "--lora nope.safetensors: not found"),
    ("--lora", "style.safetensors:inf", "is not finite"),
    ("--lora", ".", "a folder without pytorch_lora_weights"),
    ("--embedding", "nope.pt", "--embedding nope.pt: not found"),
    ("--vae", "nope.ckpt", "--vae nope.ckpt: not found"),
    ("--clip-skip", "0", "0 is out of range: must be in [1, 12]"),
    ("--prompt-syntax", "comfy", "invalid choice: 'comfy'"),
])
def test_bad_toolbox_flags_are_one_line_before_the_load(tmp_path, ckpts, capsys, monkeypatch,
                                                        flag, value, says):
    import txt2img
    from ldm import pipeline
    loads = []
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: loads.append(a))
    monkeypatch.chdir(tmp_path)
    code = txt2img.main(["--ckpt", str(ckpts["ckpt"]), "--config", str(TINY_CONFIG),
                         "--device", "cpu", "--outdir", str(tmp_path / "out"), flag, value])
    err = capsys.readouterr().err
    assert code != 0 and not loads and err.count("\n") == 1, err
    assert says in err


def test_diffusers_older_lora_names_read_as_the_kohya_file_they_came_from(tmp_path, tiny_model):
    """diffusers' own converter turns a kohya file into its older attention-processor
    names (``attn1.processor.to_q_lora.down.weight``, ``lora_linear_layer``); that file
    merges to the same weights as the kohya one (alpha = rank: the old names keep none)."""
    from safetensors.torch import save_file
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
    from ldm.pipeline import Pipeline
    kohya = kohya_lora(tiny_model, rank=4, alpha=4.0)
    save_file(kohya, tmp_path / "kohya.safetensors")
    old, _ = _convert_non_diffusers_lora_to_diffusers(dict(kohya))
    assert any(".processor.to_q_lora.down.weight" in k for k in old)
    save_file({k: v.contiguous() for k, v in old.items()}, tmp_path / "old.safetensors")
    merged = []
    for name in ("kohya", "old"):
        model = fresh_tiny()
        Pipeline(model, torch.device("cpu"), "full", watermark=False).set_loras(
            [(tmp_path / f"{name}.safetensors", 1.0)])
        merged.append(model.state_dict())
    assert all(torch.equal(merged[0][k], merged[1][k]) for k in merged[0])
    assert not torch.equal(merged[0][next(k for k in merged[0] if "attn1.to_q" in k)],
                           tiny_model.state_dict()[next(k for k in merged[0] if "attn1.to_q" in k)])


def test_a_diffusers_vae_with_the_older_attention_names_loads(tmp_path, tiny_model):
    from safetensors.torch import save_file
    from ldm import convert
    from ldm.pipeline import load_vae
    vae = convert.to_diffusers(tiny_model)["vae"]
    legacy = {k.replace(".to_q.", ".query.").replace(".to_k.", ".key.").replace(".to_v.", ".value.")
              .replace(".to_out.0.", ".proj_attn."): v.contiguous() for k, v in vae.items()}
    assert any(".query." in k for k in legacy)
    save_file(legacy, tmp_path / "legacy.safetensors")
    model = randomize(fresh_tiny(), 7)
    load_vae(model, tmp_path / "legacy.safetensors")
    want = tiny_model.first_stage_model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in model.first_stage_model.state_dict().items())


def test_unbalanced_brackets_and_prompt_lora_tags_are_warned_once(caplog):
    from ldm.pipeline import Pipeline
    pipe = Pipeline(fresh_tiny(), torch.device("cpu"), "full", watermark=False)
    pipe.set_text_options(prompt_syntax="a1111")
    with caplog.at_level("WARNING"):
        pipe.latents(["a (red circle <lora:x:1>"], [1], sampler="ddim", steps=2, height=32, width=32,
                     progress=False)
    text = caplog.text
    assert "unbalanced '('" in text and "--lora FILE:WEIGHT" in text


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_lycoris_loha_and_lokr_match_peft_on_the_diffusers_unet(tmp_path, tiny_config, kind):
    """LyCORIS' LoHa and LoKr in kohya names, merged by us, against PEFT's own LoHa/LoKr
    layers injected into diffusers' UNet (on the fly), on identical weights; the file is
    PEFT's tensors renamed as LyCORIS writes them, with alpha."""
    from peft import LoHaConfig, LoKrConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file
    from ldm.pipeline import Pipeline
    model = fresh_tiny()
    pipe = diffusers_twin(model, tiny_config, tmp_path / "tok")
    targets = ["to_q", "to_v", "proj_in", "conv1"]
    config = (LoHaConfig(r=4, alpha=2, target_modules=targets) if kind == "loha" else
              # r = 2: PEFT then stores w2 as a product, whose rank gives the scale
              # alpha / r; with both factors whole LyCORIS (and A1111) scale by 1, PEFT
              # still by alpha / r, and we follow LyCORIS, whose files these are
              LoKrConfig(r=2, alpha=2, target_modules=targets))
    inject_adapter_in_model(config, pipe.unet)
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "hada_" in name or "lokr_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    sd = {}
    for key, value in get_peft_model_state_dict(pipe.unet).items():
        module, _, suffix = key.rpartition(".")
        name = "lora_unet_" + module.replace(".", "_")
        sd[f"{name}.{suffix}"] = value.contiguous()
        sd[f"{name}.alpha"] = torch.tensor(2.0)
    assert any(k.endswith(".hada_w1_a" if kind == "loha" else ".lokr_w2_b") for k in sd)
    save_file(sd, tmp_path / f"{kind}.safetensors")
    (u0, _), _ = network_outputs(model, pipe)
    ours = Pipeline(model, torch.device("cpu"), "full", watermark=False)
    ours.set_loras([(tmp_path / f"{kind}.safetensors", 1.0)])
    (u, _), (du, _) = network_outputs(model, pipe)
    assert rel_err(u, du) < 1e-5
    assert rel_err(u, u0) > 1e-2


def test_lokr_with_both_factors_whole_scales_by_one_as_lycoris(tmp_path, tiny_model):
    """LyCORIS writes alpha = dim when neither LoKr factor is decomposed, and A1111 scales
    such layers by 1 whatever the alpha: delta W = kron(w1, w2) exactly."""
    from safetensors.torch import save_file
    from ldm.lora import read_lora
    g = torch.Generator().manual_seed(2)
    w1, w2 = torch.randn(4, 4, generator=g), torch.randn(8, 8, generator=g)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{name}.lokr_w1": w1, f"{name}.lokr_w2": w2, f"{name}.alpha": torch.tensor(3.0)},
              tmp_path / "kron.safetensors")
    layer = read_lora(tmp_path / "kron.safetensors", tiny_model).layers[0]
    assert torch.equal(layer.delta((32, 32)), torch.kron(w1, w2))
