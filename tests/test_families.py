"""Model families (``ldm.families``): a checkpoint's family and variant found from its keys
and shapes alone; a file of no family here named in one line, before any weights load."""
import pytest
import torch

from conftest import ROOT, TINY_CONFIG, V1_CONFIG
from ldm.families import describe, detect, detect_folder, describe_folder, shapes_of

V1_INPAINTING = ROOT / "configs" / "stable-diffusion" / "v1-inpainting-inference.yaml"


def meta_shapes(config):
    """{key: shape} of the model a config builds, in the official layout, no weights."""
    from ldm.pipeline import build_model
    return shapes_of(build_model(config, meta=True).state_dict())


@pytest.mark.parametrize("config,family,variant", [
    ("v2-inference.yaml", "sd2", "txt2img"),
    ("v2-inference-v.yaml", "sd2", "txt2img"),   # the same keys: a file is taken as eps
    ("v2-inpainting-inference.yaml", "sd2", "inpainting")])
def test_sd2_variants_are_found_from_their_shapes(config, family, variant):
    found = detect(meta_shapes(ROOT / "configs" / "stable-diffusion" / config))
    assert (found.family.name, found.variant) == (family, variant)
    assert found.config.name == ("v2-inpainting-inference.yaml" if variant == "inpainting"
                                 else "v2-inference.yaml")


def test_sd1_and_its_inpainting_variant_are_found_from_their_shapes():
    found = detect(meta_shapes(V1_CONFIG))
    assert (found.family.name, found.variant) == ("sd1", "txt2img")
    assert found.config == V1_CONFIG
    found = detect(meta_shapes(V1_INPAINTING))
    assert (found.family.name, found.variant) == ("sd1", "inpainting")
    assert found.config == V1_INPAINTING
    older = {k.replace("transformer.text_model.", "transformer."): v   # transformers 5 names
             for k, v in meta_shapes(V1_CONFIG).items()}
    assert detect(older).variant == "txt2img"


@pytest.mark.parametrize("family,lcm,base,folder", [
    ("sd1", "v1-lcm-inference.yaml", "v1-inference.yaml",
     ({"_class_name": "LatentConsistencyModelPipeline"},
      {"cross_attention_dim": 768, "time_cond_proj_dim": 256})),
    ("sdxl", "sd_xl_lcm.yaml", "sd_xl_base.yaml",
     ({"_class_name": "StableDiffusionXLPipeline", "text_encoder": ["transformers", "x"],
       "text_encoder_2": ["transformers", "y"]},
      {"cross_attention_dim": 2048, "addition_embed_type": "text_time",
       "time_cond_proj_dim": 256}))])
def test_an_lcm_with_a_guidance_embedding_is_found_from_its_keys(family, lcm, base, folder):
    """LCM_Dreamshaper_v7 and LCM-SDXL: their base model's keys plus
    ``time_embedding.cond_proj`` (what diffusers' converter to the single-file layout
    writes), as a file and as a diffusers folder (``time_cond_proj_dim``); its config builds
    exactly those keys."""
    lcm = ROOT / "configs" / "stable-diffusion" / lcm
    shapes = meta_shapes(lcm)
    assert shapes["model.diffusion_model.time_embedding.cond_proj.weight"] == (320, 256)
    assert set(shapes) - set(meta_shapes(lcm.with_name(base))) == {
        "model.diffusion_model.time_embedding.cond_proj.weight"}
    found = detect(shapes)
    assert (found.family.name, found.variant, found.config) == (family, "lcm", lcm)
    assert "LCM checkpoint" in found.phrase
    assert detect_folder(*folder, {"_class_name": "LCMScheduler"}).variant == "lcm"


def test_a_model_of_other_widths_is_no_family_and_says_its_base_channels():
    shapes = meta_shapes(TINY_CONFIG)
    assert detect(shapes) is None
    assert describe(shapes).startswith("a model with 32 base channels (SD's have 320)")


U = "model.diffusion_model."
CONV_IN = U + "input_blocks.0.0.weight"
CROSS = U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
# (what, the distinguishing {key: shape} of such a file, what it is said to be)
OTHERS = [
    ("sdxl", {"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight":
              (49408, 768), "conditioner.embedders.1.model.text_projection": (1280, 1280),
              CONV_IN: (320, 4, 3, 3), U + "label_emb.0.0.weight": (1280, 2816)},
     "a checkpoint in SDXL's layout (two text encoders, 2,816-wide ADM input) but not a "
     "whole SDXL model"),
    ("sdxl-inpainting", {"conditioner.embedders.1.model.text_projection": (1280, 1280),
                         CONV_IN: (320, 9, 3, 3), U + "label_emb.0.0.weight": (1280, 2816)},
     "a checkpoint in SDXL's layout (two text encoders, 2,816-wide ADM input) but not a "
     "whole SDXL inpainting model"),
    ("sdxl-refiner", {"conditioner.embedders.0.model.text_projection": (1280, 1280),
                      CONV_IN: (384, 4, 3, 3), U + "label_emb.0.0.weight": (1536, 2560)},
     "a checkpoint in SDXL's layout (OpenCLIP ViT-bigG, 2,560-wide ADM input) but not a "
     "whole SDXL refiner"),
    ("sd2-depth", {"cond_stage_model.model.token_embedding.weight": (49408, 1024),
                   "depth_model.model.pretrained.layer1.0.weight": (1, 1),
                   CONV_IN: (320, 5, 3, 3), CROSS: (320, 1024)},
     "an SD 2 depth-to-image checkpoint"),
    ("sd2-unclip", {"cond_stage_model.model.token_embedding.weight": (49408, 1024),
                    "noise_augmentor.betas": (1000,), CONV_IN: (320, 4, 3, 3),
                    U + "label_emb.0.0.weight": (1280, 2048), CROSS: (320, 1024)},
     "an SD 2.x unCLIP checkpoint"),
    ("x4-upscaler", {"cond_stage_model.model.token_embedding.weight": (49408, 1024),
                     CONV_IN: (256, 7, 3, 3), CROSS: (256, 1024)},
     "an SD x4 upscaler checkpoint"),
    ("sd3", {U + "joint_blocks.0.x_block.attn.qkv.weight": (4608, 1536),
             "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": (768,)},
     "an MMDiT checkpoint in SD 3's layout (1 joint block) but not SD 3 Medium"),
    ("flux", {"double_blocks.0.img_attn.qkv.weight": (9216, 3072)}, "a FLUX checkpoint"),
    ("pix2pix", {CONV_IN: (320, 8, 3, 3), CROSS: (320, 768)},
     "an instruct-pix2pix checkpoint (8-channel UNet input)"),
    ("lora", {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320),
              "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": (320, 4)},
     "a LoRA (2 LoRA weights), not a model: pass it with --lora"),
    ("embedding", {"emb_params": (2, 768)},
     "a textual-inversion embedding, not a model: pass it with --embedding"),
    ("vae", {"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_out.weight": (3, 128, 3, 3)},
     "an autoencoder (VAE) alone, not a whole model: pass it with --vae"),
    ("diffusers-unet", {"down_blocks.0.resnets.0.conv1.weight": (320, 320, 3, 3)},
     "weights in diffusers' folder layout"),
    ("not-sd", {"fc.weight": (10, 10)},
     "not a Stable Diffusion checkpoint (no model.diffusion_model.* weights)"),
]


@pytest.mark.parametrize("shapes,said", [(s, w) for _, s, w in OTHERS], ids=[o[0] for o in OTHERS])
def test_a_file_of_no_family_here_is_named(shapes, said):
    assert detect(shapes) is None
    assert describe(shapes).startswith(said)


@pytest.mark.parametrize("index,unet,scheduler,variant,said", [
    ({"_class_name": "StableDiffusionPipeline"}, {"cross_attention_dim": 768}, {}, "txt2img", None),
    ({"_class_name": "StableDiffusionInpaintPipeline"},
     {"cross_attention_dim": 768, "in_channels": 9}, {}, "inpainting", None),
    ({"_class_name": "StableDiffusionXLPipeline", "text_encoder_2": []},
     {"cross_attention_dim": 2048}, {}, None, "an SDXL pipeline (StableDiffusionXLPipeline)"),
    ({"_class_name": "StableDiffusionPipeline"}, {"cross_attention_dim": 1024},
     {"prediction_type": "v_prediction"}, "v", None),
    ({"_class_name": "StableDiffusionPipeline"}, {"cross_attention_dim": 1024}, {},
     "txt2img", None),
    ({"_class_name": "StableDiffusionDepth2ImgPipeline"},
     {"cross_attention_dim": 1024, "in_channels": 5}, {}, None,
     "an SD 2 depth-to-image pipeline"),
    ({"_class_name": "StableDiffusionPipeline"}, {"cross_attention_dim": 768},
     {"prediction_type": "v_prediction"}, None, "a pipeline whose scheduler predicts v"),
])
def test_diffusers_folders_are_found_from_their_json(index, unet, scheduler, variant, said):
    found = detect_folder(index, unet, scheduler)
    assert (found.variant if found else None) == variant
    assert (describe_folder(index, unet, scheduler) or None if not found else None) == said \
        or describe_folder(index, unet, scheduler).startswith(said)


def test_a_partial_sdxl_file_is_refused_in_one_line_before_any_load(tmp_path, capsys):
    """A file with some of SDXL's distinguishing keys (shapes real, contents not), not a
    whole SDXL model: named from its header alone, as the script starts, and nothing
    written."""
    import sys
    from safetensors.torch import save_file
    sys.path.insert(0, str(ROOT / "scripts"))
    import txt2img
    path = tmp_path / "sd_xl_base_1.0.safetensors"
    save_file({"conditioner.embedders.1.model.text_projection": torch.zeros(1280, 1280,
                                                                          dtype=torch.bool),
               CONV_IN: torch.zeros(320, 4, 3, 3, dtype=torch.bool),
               U + "label_emb.0.0.weight": torch.zeros(1280, 2816, dtype=torch.bool)}, path)
    rc = txt2img.main(["--ckpt", str(path), "--outdir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 3 and err == (
        f"error: {path} is a checkpoint in SDXL's layout (two text encoders, 2,816-wide ADM "
        "input) but not a whole SDXL model; a distilled or partial one: this project runs "
        "Stable Diffusion 1.x, Stable Diffusion 2.x, Stable Diffusion XL and Stable "
        "Diffusion 3 checkpoints; pass --config if it is one")
    assert not (tmp_path / "o").exists()


def test_an_sd2_file_gets_stabilitys_config_and_the_familys_defaults(tmp_path):
    """From the header alone: SD 2's config (512 eps unless --config says v), guidance 9 as
    Stability's scripts; a config given wins."""
    from safetensors.torch import save_file
    from ldm.config import choose_model
    from ldm.request import ModelInfo
    path = tmp_path / "v2-1_512-ema-pruned.safetensors"
    save_file({"cond_stage_model.model.token_embedding.weight": torch.zeros(49408, 1024,
                                                                           dtype=torch.bool),
               CONV_IN: torch.zeros(320, 4, 3, 3, dtype=torch.bool),
               CROSS: torch.zeros(320, 1024, dtype=torch.bool)}, path)
    choice = choose_model(path)
    assert choice.family.name == "sd2" and choice.config_path.name == "v2-inference.yaml"
    info = ModelInfo.of_choice(choice)
    assert (info.native_size, info.default("scale"), info.default("sampler")) == (512, 9.0, "ddim")
    v = ROOT / "configs" / "stable-diffusion" / "v2-inference-v.yaml"
    choice = choose_model(path, v)
    assert choice.config_path == v and choice.family.name == "sd2"
    assert (ModelInfo.of_choice(choice).native_size, choice.defaults["scale"]) == (768, 9.0)


@pytest.mark.parametrize("scheduler, variant, config", [
    ({"prediction_type": "epsilon"}, "txt2img", "v2-inference.yaml"),
    ({"prediction_type": "v_prediction"}, "v", "v2-inference-v.yaml"),
    ({"prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
      "timestep_spacing": "trailing"}, "zero-snr", "v2-inference-v-zero-snr.yaml"),
    ({"_class_name": "EulerDiscreteScheduler", "prediction_type": "epsilon",
      "timestep_spacing": "trailing"}, "turbo", "sd-turbo.yaml")])
def test_an_sd2_diffusers_folder_chooses_its_config_from_its_scheduler(tmp_path, scheduler,
                                                                      variant, config):
    import json
    from ldm.config import choose_model
    (tmp_path / "unet").mkdir()
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": 1024}))
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    choice = choose_model(tmp_path)
    assert (choice.family.name, choice.variant) == ("sd2", variant)
    assert choice.config_path == ROOT / "configs" / "stable-diffusion" / config


def test_each_image_records_its_family_and_prediction(tmp_path):
    """The family comes from detection (SD 1.x here: the tiny checkpoint's is none, so it
    is left out), the prediction from the model."""
    from conftest import build_tiny
    from ldm.families import by_name
    from ldm.pipeline import Pipeline
    pipe = Pipeline(build_tiny(), torch.device("cpu"), "full", watermark=False)
    kw = dict(steps=2, progress=False)
    p = pipe.generate("a red circle", [1], **kw)[0].parameters
    assert p["prediction"] == "eps" and "family" not in p
    pipe.family = by_name("sd2")
    pipe.model.parameterization = "v"
    try:
        p = pipe.generate("a red circle", [1], **kw)[0].parameters
    finally:
        pipe.model.parameterization = "eps"
    assert (p["family"], p["prediction"]) == ("sd2", "v")
