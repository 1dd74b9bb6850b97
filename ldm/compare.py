"""Our model as diffusers/transformers objects with identical weights, for cross-checks and
benchmarks (never for inference). The conversion is diffusers' own converter of the original
CompVis layout, so it also referees our key names. Needs diffusers and transformers."""
import gzip
import json
from contextlib import nullcontext

import torch
from omegaconf import OmegaConf


def to_diffusers(model, config, drop_pos_emb=False):
    """(UNet2DConditionModel, AutoencoderKL, transformers CLIPTextModel) holding ``model``'s
    weights; ``config`` is the model's OmegaConf config (with its ``model`` section).

    diffusers has nothing like our ``spatial_pos_emb``: such a model is refused, unless
    ``drop_pos_emb`` (timing twins only: the same network without those small Linear layers)."""
    import diffusers
    import transformers
    from diffusers.loaders import single_file_utils as su

    sd = model.state_dict()
    pos_emb = [k for k in sd if ".pos_emb." in k]
    if pos_emb and not drop_pos_emb:
        raise ValueError("diffusers has no spatial_pos_emb: no exact diffusers twin of this model")
    sd = {k: v for k, v in sd.items() if k not in pos_emb}
    original = OmegaConf.to_container(config)
    ucfg = su.create_unet_diffusers_config_from_ldm(original, sd)
    unet_params = original["model"]["params"]["unet_config"]["params"]
    if ucfg.get("attention_head_dim") is None and unet_params.get("num_head_channels", -1) > 0:
        # heads from a fixed head width (as SD 2.x): diffusers wants the head count per level
        ucfg["attention_head_dim"] = [unet_params["model_channels"] * m
                                      // unet_params["num_head_channels"]
                                      for m in unet_params["channel_mult"]]
    unet_sd = _guidance_projection(sd, ucfg, su.convert_ldm_unet_checkpoint(sd, ucfg))
    unet = diffusers.UNet2DConditionModel(**ucfg)
    unet.load_state_dict(unet_sd, strict=True)
    vcfg = su.create_vae_diffusers_config_from_ldm(original, sd)
    vcfg["scaling_factor"] = float(model.scale_factor)
    ddconfig = original["model"]["params"]["first_stage_config"]["params"]["ddconfig"]
    vcfg["norm_num_groups"] = ddconfig.get("norm_groups", 32)
    vae = diffusers.AutoencoderKL(**vcfg)
    vae.load_state_dict(su.convert_ldm_vae_checkpoint(sd, vcfg), strict=True)
    clip, clip_sd = _text_encoder(model.cond_stage_model, sd, transformers, su)
    if not any(k.startswith("text_model.") for k in clip.state_dict()):  # transformers >= 5
        clip_sd = {k.removeprefix("text_model."): v for k, v in clip_sd.items()}
    missing, unexpected = clip.load_state_dict(clip_sd, strict=False)
    if unexpected or any("position_ids" not in k for k in missing):
        raise RuntimeError(f"CLIP conversion: missing {missing}, unexpected {unexpected}")
    return unet.eval(), vae.eval(), clip.eval()


def _guidance_projection(sd, ucfg, unet_sd):
    """An LCM's guidance embedding into diffusers' UNet config and weights: diffusers'
    converter of the single-file layout does not read it, its converter to that layout
    leaves the key as it is (``time_embedding.cond_proj``): so do we."""
    cond_proj = "model.diffusion_model.time_embedding.cond_proj.weight"
    if cond_proj in sd:
        ucfg["time_cond_proj_dim"] = sd[cond_proj].shape[1]
        unet_sd["time_embedding.cond_proj.weight"] = sd[cond_proj]
    return unet_sd


def to_diffusers_xl(model, config, share_unet=False):
    """{"unet", "vae", "text_encoder", "text_encoder_2"}: an SDXL ``DiffusionEngine``'s
    weights in diffusers' UNet2DConditionModel (``text_time`` addition embedding), its
    AutoencoderKL, transformers' CLIPTextModel and CLIPTextModelWithProjection (or only
    the second, for the refiner, as ``text_encoder_2``), each converted by diffusers' own
    converter of the single-file layout. ``share_unet``: diffusers' UNet holds our UNet's
    tensors instead of a copy (built on ``meta``, loaded with ``assign``), so that two
    full-size fp32 SDXL UNets (10 GB each) fit one machine's memory."""
    import diffusers
    import transformers
    from diffusers.loaders import single_file_utils as su
    sd = model.state_dict()
    original = OmegaConf.to_container(config)
    ucfg = su.create_unet_diffusers_config_from_ldm(original, sd)
    sizes = [e for e in model.conditioner.embedders if e.input_key != "txt"]
    # diffusers recognises SDXL by a 2048 or 1280 context; a tiny twin is told here
    ucfg.update(addition_embed_type="text_time", class_embed_type=None,
                addition_time_embed_dim=sizes[0].outdim)
    unet_sd = _guidance_projection(sd, ucfg, su.convert_ldm_unet_checkpoint(sd, ucfg))
    with torch.device("meta") if share_unet else nullcontext():
        unet = diffusers.UNet2DConditionModel(**ucfg)
    unet.load_state_dict(unet_sd, strict=True, assign=share_unet)
    vcfg = su.create_vae_diffusers_config_from_ldm(original, sd)
    vcfg["scaling_factor"] = float(model.scale_factor)
    vae = diffusers.AutoencoderKL(**vcfg)
    vae.load_state_dict(su.convert_ldm_vae_checkpoint(sd, vcfg), strict=True)
    out = {"unet": unet.eval(), "vae": vae.eval()}
    texts = model.conditioner.text_embedders
    for i, encoder in enumerate(model.conditioner.embedders):
        if encoder.input_key != "txt":
            continue
        name = "text_encoder" if len(texts) > 1 and encoder is texts[0] else "text_encoder_2"
        prefix = f"conditioner.embedders.{i}."
        if hasattr(encoder, "transformer"):
            text = encoder.transformer.config
            clip = _clip(transformers, dict(
                vocab_size=text.vocab_size, hidden_size=text.hidden_size,
                intermediate_size=text.intermediate_size,
                num_hidden_layers=text.num_hidden_layers,
                num_attention_heads=text.num_attention_heads,
                max_position_embeddings=text.max_position_embeddings,
                hidden_act=text.hidden_act))
            converted = su.convert_ldm_clip_checkpoint(
                {k: v for k, v in sd.items() if k.startswith(prefix)}, prefix + "transformer.")
        else:
            tower = encoder.model
            clip = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
                vocab_size=tower.token_embedding.weight.shape[0],
                hidden_size=tower.token_embedding.weight.shape[1],
                intermediate_size=tower.transformer.resblocks[0].mlp.c_fc.out_features,
                num_hidden_layers=tower.layers,
                num_attention_heads=tower.transformer.resblocks[0].attn.heads,
                max_position_embeddings=tower.positional_embedding.shape[0],
                projection_dim=tower.text_projection.shape[1], hidden_act="gelu",
                # as SDXL's text_encoder_2/config.json: the legacy id, whose pooling takes
                # the highest token id's position (OpenCLIP's argmax, as ours)
                eos_token_id=2, attn_implementation="eager"))
            converted = su.convert_open_clip_checkpoint(clip, sd, prefix + "model.")
        out[name] = _load_clip(clip, converted, name)
    return out


def _load_clip(clip, converted, name):
    """``clip`` (a transformers CLIP text model) with diffusers' ``converted`` weights, in
    eval mode; transformers 5 has no ``text_model.`` level; only position ids may be
    missing."""
    if not any(k.startswith("text_model.") for k in clip.state_dict()):   # transformers 5
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    missing, unexpected = clip.load_state_dict(converted, strict=False)
    if unexpected or any("position_ids" not in k for k in missing):
        raise RuntimeError(f"{name} conversion: missing {missing}, unexpected {unexpected}")
    return clip.eval()


def _text_encoder(encoder, sd, transformers, su):
    """(transformers CLIPTextModel, its converted weights): SD v1's CLIP as is; SD 2.x's
    OpenCLIP as diffusers converts it (``convert_open_clip_checkpoint``): a CLIPTextModel
    of the layers the config's ``layer`` (and the clip skip) runs, whose last hidden state
    (final norm applied) is what SD 2 conditions on."""
    if hasattr(encoder, "transformer"):
        text = encoder.transformer.config
        config = dict(vocab_size=text.vocab_size, hidden_size=text.hidden_size,
                      intermediate_size=text.intermediate_size,
                      num_hidden_layers=text.num_hidden_layers,
                      num_attention_heads=text.num_attention_heads,
                      max_position_embeddings=text.max_position_embeddings,
                      hidden_act=text.hidden_act)
        return _clip(transformers, config), su.convert_ldm_clip_checkpoint(sd)
    tower = encoder.model
    width = tower.token_embedding.weight.shape[1]
    layers = encoder.layers - (encoder.clip_skip - 1)   # what ``encode_ids`` runs
    config = dict(vocab_size=tower.token_embedding.weight.shape[0], hidden_size=width,
                  intermediate_size=tower.transformer.resblocks[0].mlp.c_fc.out_features,
                  num_hidden_layers=layers,
                  num_attention_heads=tower.transformer.resblocks[0].attn.heads,
                  max_position_embeddings=tower.positional_embedding.shape[0],
                  hidden_act="gelu")
    clip = _clip(transformers, config)
    prefix = "cond_stage_model.model."
    dropped = tuple(f"{prefix}transformer.resblocks.{i}." for i in range(layers, tower.layers))
    kept = {k: v for k, v in sd.items() if not k.startswith(dropped)}
    converted = su.convert_open_clip_checkpoint(clip, kept, prefix)
    return clip, {k: v for k, v in converted.items() if not k.startswith("text_projection")}


def _clip(transformers, config):
    return transformers.CLIPTextModel(transformers.CLIPTextConfig(
        **config, attn_implementation="eager"))


def write_clip_tokenizer_files(folder):
    """vocab.json and merges.txt for a transformers CLIPTokenizer, from the BPE we ship."""
    from ldm.modules.encoders.tokenizer import BPE_PATH, N_MERGES, get_tokenizer
    with gzip.open(BPE_PATH, "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1:N_MERGES + 1]
    (folder / "vocab.json").write_text(json.dumps(get_tokenizer().encoder), "utf-8")
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2"] + merges) + "\n", "utf-8")


def diffusers_components(model, config, folder, drop_pos_emb=False, share_unet=False):
    """The keyword arguments of any diffusers SD v1 pipeline (StableDiffusion, Img2Img,
    Inpaint) with ``model``'s weights: tokenizer files written to ``folder``, a DDIM
    scheduler with our schedule, no safety checker. ``share_unet`` (SDXL): see
    ``to_diffusers_xl``."""
    import diffusers
    import transformers
    folder.mkdir(parents=True, exist_ok=True)
    write_clip_tokenizer_files(folder)

    def tokenizer(encoder):
        # OpenCLIP's pads with "!" (id 0: SD 2, SDXL's second); CLIP's with the end token
        pad = "!" if getattr(encoder, "pad_id", None) == 0 else "<|endoftext|>"
        return transformers.CLIPTokenizer(str(folder / "vocab.json"),
                                          str(folder / "merges.txt"), pad_token=pad,
                                          model_max_length=encoder.max_length)
    scheduler = ddim_scheduler(model, config)
    if hasattr(model, "conditioner"):   # SDXL: StableDiffusionXL* pipelines' arguments
        parts = to_diffusers_xl(model, config, share_unet)
        texts = model.conditioner.text_embedders
        names = ["tokenizer", "tokenizer_2"] if len(texts) > 1 else ["tokenizer_2"]
        return dict(**parts, **{n: tokenizer(e) for n, e in zip(names, texts)},
                    scheduler=scheduler, **({} if len(texts) > 1 else dict(
                        text_encoder=None, tokenizer=None, requires_aesthetics_score=True,
                        force_zeros_for_empty_prompt=False)))
    unet, vae, clip = to_diffusers(model, config, drop_pos_emb)
    return dict(vae=vae, text_encoder=clip, tokenizer=tokenizer(model.cond_stage_model),
                unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                requires_safety_checker=False)


def ddim_scheduler(model, config):
    """diffusers' DDIMScheduler with ``model``'s noise schedule and prediction, leading
    timesteps with SD's offset (trailing when the config's ``sampling:`` says so)."""
    import diffusers
    params = config.model.params
    trailing = (config.get("sampling") or {}).get("timestep_spacing") == "trailing"
    return diffusers.DDIMScheduler(
        beta_start=model.linear_start, beta_end=model.linear_end, beta_schedule="scaled_linear",
        num_train_timesteps=model.num_timesteps, clip_sample=False, set_alpha_to_one=False,
        rescale_betas_zero_snr=bool(params.get("zero_terminal_snr", False)),
        timestep_spacing="trailing" if trailing else "leading", steps_offset=0 if trailing else 1,
        prediction_type="v_prediction" if model.parameterization == "v" else "epsilon")


def save_diffusers_pipeline(model, config, folder, drop_pos_emb=False,
                            cls="StableDiffusionPipeline"):
    """A diffusers pipeline folder (``cls``, e.g. StableDiffusionInpaintPipeline for a
    9-channel model; no safety checker) with ``model``'s weights and DDIM/PNDM-compatible
    scheduler settings, loadable by ``from_pretrained``."""
    import diffusers
    pipe = getattr(diffusers, cls)(
        **diffusers_components(model, config, folder / "tokenizer", drop_pos_emb))
    pipe.save_pretrained(folder)
    return pipe


def random_sd(seed=0, config_path=None):
    """(model, config): our SD ``LatentDiffusion`` (v1, or the model of ``config_path``:
    SD 2's) with seeded random weights, in eval mode, its zero-initialised output layers
    filled with N(0, 0.02) too (else the UNet's output would be 0 and every comparison
    vacuous). Benchmarks and studies only."""
    from ldm.pipeline import SD_CONFIG, build_model, load_config
    config = load_config(config_path or SD_CONFIG)
    torch.manual_seed(seed)
    model = build_model(config).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    return model, config


def time_alternating(runs, repeats, warmup=True):
    """({name: [seconds]}, {name: warm-up output}) of ``runs`` ({name: fn}): one warm-up
    call each (unless ``warmup`` is false: the caller warmed up), then the runs alternating
    so that both sides see the same machine state (benchmarks only)."""
    import time
    times = {name: [] for name in runs}
    outputs = {name: fn() for name, fn in runs.items()} if warmup else {}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times, outputs


def kohya_lora(model, rank=4, alpha=2.0, seed=0, compvis_names=False, te=True, conv=True):
    """A random kohya-ss LoRA (LoCon: with the ResBlocks' convolutions) for ``model``:
    {name.lora_down.weight, name.lora_up.weight, name.alpha}; ``te``: the text encoder's
    layers too; ``compvis_names``: the UNet's layers by our names, not diffusers'. Tests
    and benchmarks."""
    from ldm.convert import TEXT, UNET, module_names
    g = torch.Generator().manual_seed(seed)
    sd = {}
    modules = dict(model.named_modules())
    for ours, theirs in module_names(model).items():
        m = modules[ours]
        if ours.startswith(UNET):
            inner = ours[len(UNET):] if compvis_names else theirs[len("unet."):]
            name = "lora_unet_" + inner.replace(".", "_")
            is_attn = any(s in theirs for s in ("to_q", "to_k", "to_v", "to_out", "ff.net",
                                                 "proj_in", "proj_out"))
            is_conv = isinstance(m, torch.nn.Conv2d) and ("resnets" in theirs)
            if not (is_attn or (conv and is_conv and "conv_shortcut" not in theirs)):
                continue
        elif ours.startswith(TEXT) and te and ("self_attn" in ours or "mlp" in ours):
            name = "lora_te_" + ours[len(TEXT):].replace(".", "_")
        else:
            continue
        w = m.weight
        if w.dim() == 4:
            down = torch.randn(rank, w.shape[1], *w.shape[2:], generator=g) * 0.3
            up = torch.randn(w.shape[0], rank, 1, 1, generator=g) * 0.3
        else:
            down = torch.randn(rank, w.shape[1], generator=g) * 0.3
            up = torch.randn(w.shape[0], rank, generator=g) * 0.3
        sd[f"{name}.lora_down.weight"] = down
        sd[f"{name}.lora_up.weight"] = up
        sd[f"{name}.alpha"] = torch.tensor(alpha)
    return sd


def to_diffusers_controlnet(net, config):
    """diffusers' ``ControlNetModel`` holding the weights of ``net`` (ours, for the model of
    ``config``), through diffusers' own converter of lllyasviel's layout
    (``convert_controlnet_checkpoint``); its config as diffusers'
    ``create_controlnet_diffusers_config_from_ldm`` makes it (which cannot run in
    diffusers 0.37: it calls the UNet config maker without the checkpoint it now needs).
    Returns (the model, its config, the converted state dict)."""
    import diffusers
    from diffusers.loaders import single_file_utils as su
    checkpoint = {"control_model." + k: v for k, v in net.state_dict().items()}
    original = OmegaConf.to_container(config)
    if "control_stage_config" not in original["model"]["params"]:
        original["model"]["params"]["control_stage_config"] = {"params": {"hint_channels": 3}}
    unet_keys = {"model.diffusion_model." + k: v for k, v in net.state_dict().items()}
    u = su.create_unet_diffusers_config_from_ldm(original, unet_keys)
    cfg = {"conditioning_channels": net.input_hint_block[0].in_channels, **{k: u[k] for k in (
        "in_channels", "down_block_types", "block_out_channels", "layers_per_block",
        "cross_attention_dim", "attention_head_dim", "use_linear_projection",
        "class_embed_type", "addition_embed_type", "addition_time_embed_dim",
        "projection_class_embeddings_input_dim", "transformer_layers_per_block")}}
    converted = su.convert_controlnet_checkpoint(checkpoint, cfg)
    theirs = diffusers.ControlNetModel(**cfg)
    if next(net.parameters()).device.type != "meta":
        theirs.load_state_dict(converted, strict=True)
    return theirs.eval(), cfg, converted


def sd3_transformer(net, share=False):
    """diffusers' SD3Transformer2DModel holding an ``MMDiT``'s weights, converted by
    diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers``; ``share``: built on
    ``meta`` and loaded with ``assign`` (our tensors where the converter keeps them)."""
    import diffusers
    from diffusers.loaders import single_file_utils as su
    dim = net.x_embedder.proj.out_channels
    blocks = net.joint_blocks
    first = blocks[0].x_block.attn
    with torch.device("meta") if share else nullcontext():
        transformer = diffusers.SD3Transformer2DModel(
            patch_size=net.patch_size, in_channels=net.in_channels,
            num_layers=len(blocks), attention_head_dim=dim // first.heads,
            num_attention_heads=first.heads, joint_attention_dim=net.context_embedder.in_features,
            caption_projection_dim=dim, pooled_projection_dim=net.y_embedder.mlp[0].in_features,
            out_channels=net.out_channels, pos_embed_max_size=net.pos_embed_max_size,
            dual_attention_layers=tuple(i for i, b in enumerate(blocks) if b.x_block.self_attn2),
            qk_norm=None if isinstance(first.ln_q, torch.nn.Identity) else "rms_norm")
    converted = su.convert_sd3_transformer_checkpoint_to_diffusers(
        {"model.diffusion_model." + k: v for k, v in net.state_dict().items()})
    transformer.load_state_dict(converted, strict=True, assign=share)
    return transformer.eval()


def to_diffusers_sd3(model, share=False):
    """{"transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"}: an SD 3
    ``RectifiedFlow``'s weights in diffusers' SD3Transformer2DModel and AutoencoderKL and
    transformers' CLIPTextModelWithProjection (x2) and T5EncoderModel, through diffusers'
    converters of Stability's single-file layout (``convert_sd3_transformer_checkpoint_to_
    diffusers``, ``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``,
    ``convert_sd3_t5_checkpoint_to_diffusers``). ``share``: the transformer and T5 built
    on ``meta`` and loaded with ``assign`` (no second copy of the big weights; the CLIPs,
    whose transformers models keep buffers outside the state dict, and the autoencoder are
    copies); without T5 ``text_encoder_3`` is None."""
    import diffusers
    import transformers
    from diffusers.loaders import single_file_utils as su
    sd = model.state_dict()
    transformer = sd3_transformer(model.model.diffusion_model, share)
    maker = torch.device("meta") if share else nullcontext()
    ae = model.first_stage_model
    ch = ae.encoder.conv_in.out_channels
    dd = dict(ch=ch, ch_mult=[d.block[0].conv2.out_channels // ch for d in ae.encoder.down],
              num_res_blocks=len(ae.encoder.down[0].block),
              z_channels=ae.encoder.conv_out.out_channels // 2)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=dd["z_channels"],
        down_block_types=["DownEncoderBlock2D"] * len(dd["ch_mult"]),
        up_block_types=["UpDecoderBlock2D"] * len(dd["ch_mult"]),
        block_out_channels=[dd["ch"] * m for m in dd["ch_mult"]],
        layers_per_block=dd["num_res_blocks"], scaling_factor=model.scale_factor,
        shift_factor=model.shift_factor, use_quant_conv=False, use_post_quant_conv=False)
    vae.load_state_dict(su.convert_ldm_vae_checkpoint(sd, dict(vae.config)), strict=True)
    out = {"transformer": transformer.eval(), "vae": vae.eval()}
    for name, encoder in (("text_encoder", model.text_encoders.clip_l),
                          ("text_encoder_2", model.text_encoders.clip_g)):
        cfg = encoder.transformer.config
        clip = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads, projection_dim=cfg.hidden_size,
            max_position_embeddings=cfg.max_position_embeddings, hidden_act=cfg.hidden_act,
            attn_implementation="eager"))
        prefix = f"text_encoders.{'clip_l' if name == 'text_encoder' else 'clip_g'}.transformer."
        converted = su.convert_ldm_clip_checkpoint(
            {k: v for k, v in sd.items() if k.startswith(prefix)}, prefix)
        out[name] = _load_clip(clip, converted, name)
    t5 = model.text_encoders.t5xxl
    out["text_encoder_3"] = None
    if t5 is not None:
        stack = t5.transformer.encoder
        attn = stack.block[0].layer[0].SelfAttention
        with maker:
            enc = transformers.T5EncoderModel(transformers.T5Config(
                vocab_size=t5.transformer.shared.num_embeddings, d_model=t5.width,
                d_kv=attn.q.out_features // attn.heads, num_heads=attn.heads,
                d_ff=stack.block[0].layer[1].DenseReluDense.wi_0.out_features,
                num_layers=len(stack.block), feed_forward_proj="gated-gelu"))
        converted = su.convert_sd3_t5_checkpoint_to_diffusers(sd)
        converted["encoder.embed_tokens.weight"] = converted["shared.weight"]
        enc.load_state_dict(converted, strict=True, assign=share)
        out["text_encoder_3"] = enc.eval()
    return out


def sd3_components(model, folder, t5_tokenizer=None, share=False):
    """The keyword arguments of diffusers' StableDiffusion3 pipelines with ``model``'s
    weights: CLIP tokenizer files written to ``folder`` (CLIP-L padding with the end token,
    CLIP-G with "!"), T5's from the folder ``t5_tokenizer`` (a ``tokenizer.json``), and a
    FlowMatchEulerDiscreteScheduler with the model's shift. ``share``: see
    ``to_diffusers_sd3``."""
    import diffusers
    import transformers
    folder.mkdir(parents=True, exist_ok=True)
    write_clip_tokenizer_files(folder)
    parts = to_diffusers_sd3(model, share)

    def clip_tokenizer(pad):
        return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                                          pad_token=pad, model_max_length=77)
    t5 = None
    if t5_tokenizer is not None and parts["text_encoder_3"] is not None:
        t5 = transformers.T5TokenizerFast(tokenizer_file=str(t5_tokenizer / "tokenizer.json"),
                                          eos_token="</s>", pad_token="<pad>",
                                          unk_token="<unk>", extra_ids=0)
    elif parts["text_encoder_3"] is not None:
        raise ValueError("a model with T5 needs its tokenizer folder")
    return dict(**parts, tokenizer=clip_tokenizer("<|endoftext|>"),
                tokenizer_2=clip_tokenizer("!"), tokenizer_3=t5,
                scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=model.flow_shift))
