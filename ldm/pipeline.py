"""Stable Diffusion as a library: load a model once, generate for many prompts.

    from ldm.pipeline import Pipeline
    pipe = Pipeline.load()                     # SD v1 if installed, else the built-in model
    samples = pipe.generate("a red circle", seeds=[42, 43], sampler="plms", steps=50)
    samples[0].image.save("out.png")

Bad values raise the errors of ``ldm.errors`` (the scripts print them in one line).

Every call builds one ``ldm.request.Request`` (validated once; the scripts build the same)
and ``Pipeline.run`` makes its images. Arguments left out take the model's defaults, the
same as the scripts' (``ModelInfo.default``).

Reproducibility contract: the image made with seed ``s`` starts from
``torch.randn([C, H // f, W // f], generator=torch.Generator("cpu").manual_seed(s))``, moved
to the device, and any further noise (DDIM with eta > 0) comes from the same generator, so an
image is the same alone or in any batch, on any device, up to float rounding: the matrix
kernels may round a batch of 2 differently from a batch of 1 (a few pixel values off by one;
each image records its ``batch_size``).
"""
import logging
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm.config import (BUILTIN_DIR, BUILTIN_INPAINTING_DIR, INSTALL_HINT, ROOT,  # noqa: F401
                        SD_CKPT, SD_CONFIG, ModelChoice, build_error, choose_model, load_config,
                        distillate_defaults, sampling_defaults)
from ldm.errors import ModelNotFound, ResourceError, UsageError  # noqa: F401
from ldm.image_io import (blend_tiles, fill_masked, fit_image, fit_mask, image_sha256,
                          outpaint_canvas, paste_back, pil_to_tensor, tensor_to_pil,
                          tile_boxes)
from ldm.models.diffusion.sampling import (SAMPLERS, sample, sampler_label,  # noqa: F401
                                           sampler_spacing, strength_steps)
from ldm.request import (SIZE_CONDITIONING, ModelInfo, Request, as_image, available_memory,
                         check_field, check_memory, check_size, check_work, working_size)
from ldm import devices
from ldm.devices import (NORMS, PRECISIONS, autocast_for, bf16_is_native, cast_weights,  # noqa: F401
                         channels_last_pays, check_compiler, compute_dtype, packing_pays,
                         pick_device)
from ldm.modules.diffusionmodules.util import set_weight_packing

log = logging.getLogger(__name__)

PROMPT_SYNTAXES = ("compvis", "a1111")
SAFETY_HINT = ("put CompVis/stable-diffusion-safety-checker weights in models/safety_checker/, "
               "or pass --safety_checker none to silence this")


def build_model(config, meta=False, path=None):
    """The model a config (a path or a loaded config) describes, on the ``meta`` device if
    asked (no memory for weights). A class that does not exist or does not take the
    config's parameters is a one-line ConfigError naming the config."""
    from ldm.util import instantiate_from_config
    if not hasattr(config, "model"):
        config, path = load_config(config), config
    try:
        with torch.device("meta") if meta else nullcontext():
            return instantiate_from_config(config.model)
    except (ImportError, AttributeError, TypeError, KeyError, ValueError) as e:
        raise build_error(path or "config", e) from None


def load_model(ckpt, config, device="cpu", dtype=torch.float32, text_encoders=None):
    """A ``LatentDiffusion`` with the checkpoint's weights, in eval mode, on ``device``,
    its weights in ``dtype`` as ``cast_weights`` leaves them (the normalisation layers'
    in float32): cast while they are read, so a bfloat16 SDXL never holds a float32 copy.
    The model is built (on ``meta``, instantly) before the weights are read, so a config
    that does not build, or a model this machine's memory cannot hold
    (``check_load_memory``), is reported before the slow part. ``text_encoders``: SD 3's
    text encoder files and T5 tokenizer ({"clip_l": path, ..., "t5_tokenizer": path};
    ``RectifiedFlow.prepare_weights``)."""
    from ldm.checkpoint import load_model_weights, load_state_dict_file
    from ldm.convert import is_diffusers_folder, load_diffusers_folder
    model = build_model(config, meta=True)
    check_load_memory(model, ckpt, dtype)
    keep = {f"{name}.{p}" if name else p for name, module in model.named_modules()
            if isinstance(module, NORMS) for p, _ in module.named_parameters(recurse=False)}
    files = {k: v for k, v in (text_encoders or {}).items() if v}
    if is_diffusers_folder(ckpt):
        sd = load_diffusers_folder(ckpt, model)
        if (Path(ckpt) / "tokenizer_3").is_dir():   # SD 3's T5 tokenizer, unless one is given
            files.setdefault("t5_tokenizer", Path(ckpt) / "tokenizer_3")
    else:
        sd = load_state_dict_file(ckpt)
    sd = model.prepare_weights(sd, files)
    load_model_weights(model, sd, source=str(ckpt), dtype=dtype, keep_float32=keep)
    return model.eval().requires_grad_(False).to(device)


def check_load_memory(model, ckpt, dtype=torch.float32):
    """Refuse, before any weight is read, a model whose loading needs more memory than this
    machine has free: its weights in ``dtype`` (``model`` built on ``meta``), or the file's
    tensors, read whole before each is cast, when they are larger. One line, with what to
    change."""
    have = available_memory("cpu")
    if have is None:
        return
    weights = sum(p.numel() for p in model.parameters()) * DTYPE_BYTES.get(dtype, 4)
    path = Path(ckpt)
    files = [f for f in path.rglob("*") if f.is_file()] if path.is_dir() else [path]
    need = max(weights, sum(f.stat().st_size for f in files if f.exists()))
    if need <= have:
        return
    params = sum(p.numel() for p in model.parameters())
    smaller = (" or use --precision bf16 (half the memory)" if dtype == torch.float32
               else "")
    raise ResourceError(
        f"{path.name} needs about {need / 2**30:.1f} GiB to load ({params / 1e9:.2f} billion "
        f"parameters in {str(dtype).replace('torch.', '')}) and this machine has "
        f"{have / 2**30:.1f} GiB free: close other programs{smaller}")


DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


def settle_prediction(choice, model):
    """For a checkpoint whose keys cannot tell its prediction type (SD 2.x's 512 eps model
    and 768 v model), detected rather than given a config: the type its UNet makes
    (``fitting_prediction``), and, when that is the other variant's, the model switched to
    that variant's config (its prediction and native size: the weights are the same) with
    one line saying so. Returns the ``ModelChoice`` now true."""
    from ldm.models.diffusion.noise_model import fitting_prediction
    from ldm.source import is_diffusers_folder
    family = choice.family
    options = family.prediction_variants.get(choice.variant) if family else None
    if not options or is_diffusers_folder(choice.ckpt):   # a folder's scheduler said which
        return choice
    variant = options[fitting_prediction(model)]
    if variant == choice.variant:
        return choice
    path = family.config(variant)
    config = load_config(path)
    params = config.model.params
    model.parameterization = params.get("parameterization", "eps")
    model.image_size = params.image_size
    log.warning("%s predicts %s: using %s (give --config to choose)", choice.name,
                model.parameterization, path.relative_to(ROOT))
    return replace(choice, config_path=path, config=config, variant=variant)


def settle_guidance(choice, model):
    """A UNet given by ``--unet`` that takes the guidance scale as an embedding (a latent
    consistency model distilled from the checkpoint's: LCM-SDXL's, LCM_Dreamshaper's UNet)
    on a checkpoint whose config does not: the config gains the projection's width and the
    sampling defaults of the family's LCM config (LCM, 4 steps, guidance 8.5 for SD 1, 8
    for SDXL; the latter when the family is unknown), said in one line. Returns the
    ``ModelChoice`` now true."""
    import copy
    from ldm import families
    from ldm.families.distilled import Distillate
    if not model.guidance_embedded or choice.geometry.guidance_embedded:
        return choice
    family = choice.family or families.of_config(choice.config_path)
    lcm = (load_config(family.config("lcm")).sampling
           if family is not None and "lcm" in family.configs else
           {"sampler": "lcm", "steps": 4, "scale": 8.0})
    config = copy.deepcopy(choice.config)
    params = config.model.params
    unet = params.network_config if "network_config" in params else params.unet_config
    unet.params.time_cond_proj_dim = model.model.diffusion_model.time_cond_proj_dim
    config.sampling = lcm
    choice = replace(choice, config=config, variant="lcm")
    log.warning("%s", Distillate("a latent consistency model's UNet (guidance embedded)",
                                 choice.unet.name, sampling_defaults(config)).phrase)
    return choice


def check_deepcache_controls(deepcache, controls):
    """DeepCache skips the UNet blocks a ControlNet's residuals go into: one or the other."""
    if deepcache and deepcache > 1 and controls:
        raise UsageError("--deepcache skips the UNet blocks a ControlNet's residuals go "
                         "into: leave one of them out")


def load_vae(model, path):
    """Replace ``model``'s autoencoder weights with those of ``path``: a VAE file in
    CompVis' layout (``encoder.*``/``decoder.*``, e.g. vae-ft-mse-840000-ema-pruned.ckpt),
    in diffusers' (a ``vae/`` folder's diffusion_pytorch_model.safetensors, or the folder
    itself), or a whole SD checkpoint's ``first_stage_model.*``. Strict: a file that does
    not fit is a CheckpointError and the model is unchanged. A tiny autoencoder (TAESD,
    ``load_tiny_vae``) takes the autoencoder's place instead. Returns {"name", "hash"}."""
    from ldm.convert import VAE, vae_state_dict
    tiny = load_tiny_vae(model, path)
    if tiny is not None:
        return tiny
    return _replace_part(model, path, "vae", "first_stage_model", VAE, vae_state_dict)


def load_tiny_vae(model, path):
    """If ``path`` is a tiny autoencoder (``read_tiny_vae``), put it in the place of
    ``model``'s autoencoder and return {"name", "hash"}; else None."""
    found = read_tiny_vae(model, path)
    if found is None:
        return None
    model.first_stage_model, record = found
    return record


def read_tiny_vae(model, path, flag="--vae"):
    """(TinyAutoencoder, {"name", "hash"}) if ``path`` is a tiny autoencoder for ``model``
    (TAESD, TAESDXL, TAESD3: the author's ``taesd_decoder.pth``/``.safetensors``, with
    ``taesd_encoder`` beside it when there is one, or diffusers' ``AutoencoderTiny`` file
    or folder; ``ldm.models.tiny_autoencoder``), else None. A file for another latent
    space is a CheckpointError in one line, naming ``flag``."""
    from ldm.checkpoint import (CheckpointError, file_hash, load_state_dict_file,
                                mismatch_report)
    from ldm.models import tiny_autoencoder as taesd
    path = Path(path)
    if path.is_dir():
        path = next((f for f in (path / "diffusion_pytorch_model.safetensors",
                                 path / "vae" / "diffusion_pytorch_model.safetensors")
                     if f.is_file()), path)
        if path.is_dir():
            return None
    first = load_state_dict_file(path)
    if not taesd.is_tiny(first):
        return None
    parts = [first]
    name = path.name
    if "decoder" in name and not any("encoder" in k for k in first):
        sibling = path.with_name(name.replace("decoder", "encoder"))
        if sibling.is_file():
            parts.append(load_state_dict_file(sibling))
    try:
        sd = taesd.tiny_state_dict(parts)
    except ValueError as e:
        raise CheckpointError(f"{flag} {path}: {e}") from None
    if "decoder.1.weight" not in sd:
        raise CheckpointError(f"{flag} {path} is a tiny autoencoder's encoder alone: give "
                              f"its decoder file (taesd*_decoder), the encoder beside it")
    channels = taesd.latent_channels_of(sd)
    if model.latent_downsampling_factor != taesd.TinyAutoencoder.downsampling_factor:
        raise CheckpointError(f"{flag} {path} is a tiny autoencoder of 8x8-pixel latents and "
                              f"this model's are {model.latent_downsampling_factor}x"
                              f"{model.latent_downsampling_factor} (the built-in model's "
                              f"autoencoder is small already): leave --vae out")
    if channels != model.channels:
        raise CheckpointError(f"{flag} {path} is a tiny autoencoder for {channels}-channel "
                              f"latents and this model's have {model.channels}: use the "
                              f"TAESD made for this model (taesd, taesdxl, taesd3)")
    xl_model = hasattr(model, "conditioner")
    if "taesd" in name.lower() and ("xl" in name.lower()) != xl_model:
        log.warning("%s: its name says it is for %s, this model is %s: colours may be off",
                    name, "SDXL" if not xl_model else "SD 1/2",
                    "SDXL (use taesdxl)" if xl_model else "not SDXL (use taesd)")
    tiny = taesd.TinyAutoencoder(channels, model.scale_factor,
                                 getattr(model, "shift_factor", 0.0),
                                 with_encoder="encoder.0.weight" in sd)
    report = mismatch_report(tiny, sd)
    if report:
        raise CheckpointError(f"{flag} {path} does not fit a tiny autoencoder: {report}")
    tiny.load_state_dict(sd, strict=True)
    return tiny.eval().requires_grad_(False), {"name": path.name, "hash": file_hash(path)}


def load_unet(model, path):
    """Replace ``model``'s UNet weights with those of ``path`` (``--unet``): a UNet file in
    the original layout (a whole checkpoint's ``model.diffusion_model.*`` or a UNet alone,
    ComfyUI's) or diffusers' (``unet/diffusion_pytorch_model.safetensors``, the folder, or
    a lone UNet file such as SDXL-Lightning's). Strict, as ``load_vae``."""
    from ldm.convert import UNET, unet_state_dict
    unet = model.model.diffusion_model
    had = unet.time_cond_proj_dim

    def state_dict(raw, model):
        # a latent consistency model's UNet (LCM-SDXL) on the model it was distilled from:
        # this UNet gains its guidance projection (``settle_guidance`` then its defaults)
        dim = next((v.shape[1] for k, v in raw.items()
                    if k.endswith("time_embedding.cond_proj.weight")), None)
        if dim and not unet.time_cond_proj_dim:
            unet.add_guidance_projection(dim)
        return unet_state_dict(raw, model)
    try:
        return _replace_part(model, path, "unet", "model.diffusion_model", UNET, state_dict)
    except Exception:
        if unet.time_cond_proj_dim and not had:   # the model as it was
            unet.time_cond_proj_dim = None
            del unet.time_embedding
        raise


def _replace_part(model, path, component, attribute, prefix, state_dict):
    from ldm.checkpoint import CheckpointError, file_hash, load_state_dict_file, mismatch_report
    from ldm.convert import component_files
    path = Path(path)
    if path.is_dir():  # a component folder (its config.json beside the weights), or a pipeline's
        files = (component_files(path.parent, path.name) if (path / "config.json").is_file()
                 else component_files(path, component))
    else:
        files = [path]
    raw = {}
    for f in files:
        raw.update(load_state_dict_file(f))
    path = files[0]
    what = {"vae": "autoencoder", "unet": "UNet"}[component]
    try:
        sd = state_dict(raw, model)
    except CheckpointError as e:
        raise CheckpointError(f"--{component} {path} does not fit this model's {what}: "
                              f"{str(e).split(': ', 1)[-1]}") from None
    part = model.get_submodule(attribute)
    sub = {k[len(prefix):]: v for k, v in sd.items()}
    report = mismatch_report(part, sub)
    if report:
        raise CheckpointError(f"--{component} {path} does not fit this model's {what}: "
                              f"{report.split('. This looks like')[0]}")
    own = part.state_dict()   # each weight in the dtype it has (norms stay float32)
    part.load_state_dict({k: v.to(own[k].dtype) for k, v in sub.items()}, strict=True)
    return {"name": path.name, "hash": file_hash(path)}


class StopSampling(Exception):
    """Raised by a ``Pipeline.run`` callback to end the denoising at that step: the run
    goes on with ``latents`` (the callback's ``pred_x0``, the step's estimate of the
    finished latents, as A1111 decodes an interrupted image) through decoding and the
    finishing steps. A server's interrupt and skip."""

    def __init__(self, latents):
        super().__init__("sampling stopped early")
        self.latents = latents


@dataclass
class Sample:
    image: Image.Image
    parameters: dict = field(default_factory=dict)


class Pipeline:
    """A loaded model plus the finishing steps (safety check, watermark, metadata)."""

    def __init__(self, model, device=None, precision="autocast", safety_checker=None,
                 watermark=True, model_name="model", checkpoint_hash=None, defaults=None,
                 safety_note="not checked (no safety checker weights)"):
        self.model = model
        # the model's own sampling defaults (its config's `sampling:` section, a few-step
        # distillate's); what they do not say comes from ``ModelInfo.default``. A
        # distillate LoRA adds its own (``set_loras``)
        self.model_defaults = dict(defaults or {})
        self.defaults = dict(self.model_defaults)
        self.device = device or model.device
        self.precision = precision
        self.dtype = compute_dtype(self.device, precision)
        self.autocast = autocast_for(self.device, self.dtype)
        if self.dtype == torch.bfloat16 and not devices.bf16_is_native(self.device):
            log.warning("this %s has no native bfloat16 (AVX512-BF16 or AMX on a CPU): "
                        "--precision bf16 is emulated here and slower than full",
                        self.device.type.upper())
        cast_weights(model, self.dtype)  # once, here: the model is changed in place
        self.vae_autocast = self.autocast
        if self.dtype == torch.float16 and getattr(model, "disable_first_stage_autocast", False):
            # SDXL's autoencoder overflows in float16 (sgm's disable_first_stage_autocast,
            # diffusers' force_upcast): it encodes and decodes in float32
            model.first_stage_model.float()
            self.vae_autocast = nullcontext()
        self.packing = devices.packing_pays(self.device, self.dtype)
        set_weight_packing(model, self.packing)
        if channels_last_pays(self.device, self.dtype):
            model.first_stage_model.to(memory_format=torch.channels_last)
        # speed and memory options (``set_options``), off by default
        self.deepcache = None         # UNet feature-cache interval (``UNetModel.caching``)
        self.vae_tile = None          # VAE tiles of this many latent pixels
        self.attention_slicing = None  # queries per attention slice
        self.compiled = False         # the UNet under torch.compile
        self._compiled_impl = None
        self.backend = "torch"        # what runs the networks (``ldm.backends``)
        self._openvino = None         # ``ldm.backends.openvino.OpenVINOBackend`` once used
        self.offload = False          # submodels on the device only while they run
        self.lora_stack = None        # merged LoRAs (``set_loras``)
        self.vae = None               # {"name", "hash"} of a swapped autoencoder
        self.unet = None              # {"name", "hash"} of a swapped UNet (``--unet``)
        self.embeddings = []          # textual inversions added (``load_embedding``)
        self.refiner = None           # a second Pipeline for the last steps (``set_refiner``)
        self.refiner_switch = 0.8
        self.safety_checker = safety_checker
        self.safety_note = safety_note  # what images say when no checker ran
        self.watermark = watermark
        self.model_name = model_name
        self.checkpoint_hash = checkpoint_hash
        self.factor = model.latent_downsampling_factor
        self.native_size = model.image_size * self.factor
        self.geometry = geometry_of(model)
        self.family = None   # the ``ldm.families.Family`` detected (``load``), recorded
        self._warned = set()  # prompts whose truncation was already reported

    @classmethod
    def load(cls, ckpt=None, config=None, device="auto", precision="autocast", safety=True,
             safety_checker_path=None, watermark=True, task="txt2img", offload=False,
             vae=None, backend="auto", unet=None, text_encoders=None):
        """Load a checkpoint (a path, or a ``ModelChoice`` from ``choose_model``; None: SD v1
        if installed, for ``task="inpaint"`` SD's inpainting model first, else the built-in
        model). ``safety=False`` turns the safety checker off;
        without its weights the run says so once (not for the built-in model, which draws
        nothing the checker looks for).
        ``offload`` keeps the weights on the CPU and moves each submodel (text encoder,
        UNet, autoencoder) to ``device`` only while it runs (``offload_to``).
        ``vae``: an autoencoder file that replaces the checkpoint's (``load_vae``);
        ``unet``: a UNet file that does (``load_unet``: SDXL-Lightning's UNets). A few-step
        distillate named by the checkpoint's or the UNet's file sets the sampling defaults
        (``ldm.families.distilled``), said in one line.
        ``backend``: what runs the networks ("auto", "torch", "openvino"; ``set_options``).
        ``text_encoders``: SD 3's separate text encoder files and T5 tokenizer
        ({"clip_l", "clip_g", "t5xxl", "t5_tokenizer": path}; ``load_model``)."""
        from ldm.checkpoint import file_hash
        device = pick_device(device) if isinstance(device, str) else device
        choice = ckpt if isinstance(ckpt, ModelChoice) else choose_model(ckpt, config, task)
        if unet is not None:
            choice = replace(choice, unet=Path(unet))
        choice.named_defaults()   # refused before the load
        model = load_model(choice.ckpt, choice.config, "cpu", compute_dtype(device, precision),
                           text_encoders)
        unet_record = load_unet(model, choice.unet) if choice.unet is not None else None
        choice = settle_prediction(choice, model)   # the UNet that runs tells
        choice = settle_guidance(choice, model)
        choice.named_defaults(log_it=True)   # said once the UNet that runs is known
        vae_record = load_vae(model, vae) if vae is not None else None
        model.to("cpu" if offload else device)
        checker, note = None, "not checked (turned off)"
        if safety:
            from ldm.safety import load_safety_checker
            checker = load_safety_checker(safety_checker_path, device=device)
            note = "not checked (no safety checker weights)"
            if checker is None and not choice.builtin:
                log.warning("no safety checker weights found, images are not filtered (%s)",
                            SAFETY_HINT)
        pipe = cls(model, device, precision, checker, watermark, choice.name,
                   file_hash(choice.ckpt), choice.own_defaults, note)
        if offload:
            pipe.offload_to(device)
        pipe.checkpoint = choice.ckpt
        pipe.family = choice.family
        pipe.vae = vae_record
        pipe.unet = unet_record
        pipe.set_options(backend=backend)
        return pipe

    # -- text conditioning ---------------------------------------------------------------
    def set_text_options(self, clip_skip=1, prompt_syntax="compvis", t5_length=None):
        """``clip_skip``: condition on the text encoder's ``clip_skip``-th layer from the
        end (1: the last, SD's own; 2: the penultimate, which many SD 1.x fine-tunes were
        trained with), with the final layer norm applied, as A1111. ``prompt_syntax``:
        "compvis" (plain text, cut at 77 tokens) or "a1111" (weights, BREAK, any length:
        ``ldm.modules.encoders.prompts``). ``t5_length``: SD 3's T5 tokens (None: the
        config's, 256)."""
        encoder = self.model.cond_stage_model
        layers = encoder.layers
        if not 1 <= int(clip_skip) <= layers:
            raise UsageError(f"--clip-skip must be in [1, {layers}] for this text encoder "
                             f"({layers} layers), got {clip_skip}")
        if prompt_syntax not in PROMPT_SYNTAXES:
            raise UsageError(f"--prompt-syntax must be one of {PROMPT_SYNTAXES}")
        if t5_length is not None:
            if not self.is_flow:
                raise UsageError("--t5_length is for SD 3's T5 encoder: drop it")
            if not 1 <= int(t5_length) <= 512:
                raise UsageError(f"--t5_length must be in [1, 512], got {t5_length}")
            encoder.t5_length = int(t5_length)
        encoder.clip_skip = int(clip_skip)
        try:
            encoder.syntax = prompt_syntax
        except ValueError as e:   # SD 3's encoders take plain prompts only
            raise UsageError(str(e)) from None
        return self

    def load_embedding(self, path, token=None):
        """Add a textual-inversion embedding (``ldm.embeddings``): its token (the file's
        name unless given) stands for its vectors in prompts and negative prompts. A file
        that cannot be added raises EmbeddingError and nothing is added."""
        from ldm.embeddings import check_embedding, read_embedding
        if self.is_flow:
            raise UsageError("textual-inversion embeddings are not read for SD 3 here "
                             "(--embedding): drop it")
        embedding = read_embedding(path, token)
        encoder = self.model.cond_stage_model
        check_embedding(embedding, encoder)
        with self.on_device("cond_stage_model"):
            encoder.add_embedding(embedding.token, embedding.vectors)
        self.embeddings.append({"token": embedding.token, "hash": embedding.hash,
                                "vectors": embedding.count})
        return embedding.token

    # -- LoRA --------------------------------------------------------------------------
    def set_loras(self, loras):
        """Merge exactly these LoRAs into the weights: ``loras`` is [(path or ``Lora``,
        weight)]; [] removes them all. The base weights are restored bit for bit before
        (``ldm.lora.LoraStack``), so calls do not accumulate. Every file is read and
        checked before any weight changes: a bad one raises LoraError with nothing
        applied. A compiled UNet is compiled again (its frozen weights are a copy)."""
        from ldm.lora import Lora, LoraStack, read_lora
        from ldm.convert import module_names
        names = module_names(self.model) if loras else None
        read = [(lora if isinstance(lora, Lora) else read_lora(lora, self.model, names),
                 float(weight)) for lora, weight in loras]
        # a few-step distillate LoRA (SDXL-Lightning, Hyper-SD) brings its sampling
        defaults = distillate_defaults([lora.path for lora, _ in read], log_it=True)
        if self.lora_stack is None:
            self.lora_stack = LoraStack(self.model)
        self.lora_stack.set(read)
        self.defaults = {**self.model_defaults, **defaults}
        if self._openvino is not None:
            self._openvino.reset("unet", "text")   # new weights: their own conversion
        if self.compiled:
            self.model.model.diffusion_model._compiled_call_impl = None
            self._compiled_impl = None
            self._compile()
        return self

    # -- a refiner ---------------------------------------------------------------------
    def set_refiner(self, refiner=None, switch=0.8):
        """Hand the last ``1 - switch`` of every schedule to ``refiner`` (a ``Pipeline``
        of the same latent space and noise schedule: SDXL's refiner under the base), as
        diffusers' ``denoising_end`` / ``denoising_start``: one sampling loop in which each
        step's UNet call goes to the model whose share the timestep is in
        (``ldm.models.diffusion.experts``), each with its own conditioning. None removes
        it. The refiner's own safety checker, watermark and autoencoder are not used."""
        if refiner is None:
            self.refiner = None
            return self
        switch = check_field("refiner_switch", switch)
        if not 0 < switch < 1:
            raise UsageError(f"--refiner_switch must be between 0 and 1 (the share of the "
                             f"schedule the base denoises), got {switch:g}")
        if (refiner.factor, refiner.model.channels, refiner.model.scale_factor) != (
                self.factor, self.model.channels, self.model.scale_factor):
            raise UsageError(f"the refiner {refiner.model_name} works in another latent space "
                             f"than {self.model_name}: give a refiner of the same family")
        if refiner.offload or self.offload:
            raise UsageError("--refiner with --offload is not supported: drop one")
        from ldm.models.diffusion.experts import Experts, switch_timestep
        try:   # the same schedule and prediction, or a one-line refusal now
            Experts(self.model, refiner.model, switch_timestep(switch, self.model.num_timesteps))
        except ValueError as e:
            raise UsageError(f"the refiner {refiner.model_name} cannot continue "
                             f"{self.model_name}'s schedule: {e}") from None
        self.refiner, self.refiner_switch = refiner, switch
        return self

    # -- speed and memory options ---------------------------------------------------------
    def set_options(self, compile=False, deepcache=None, attention_slicing=None,
                    vae_tiling=None, backend=None):
        """The optional speed-ups and memory savers (the scripts' flags; all off by default,
        measured in the README's speed section):

        - ``compile``: the UNet under ``torch.compile`` (inductor; the first step compiles,
          for a minute or more, and again for each new size or batch; False after True
          returns to eager);
        - ``deepcache``: N > 1 reuses the UNet's deep features for N - 1 of every N UNet
          calls (``UNetModel.caching``), about 2x fewer FLOPs at N = 3, close to the
          uncached image (a reused call is not the exact one);
        - ``attention_slicing``: at most that many queries per attention call
          (``set_attention_slicing``), exact;
        - ``vae_tiling``: decode (and encode) in overlapping tiles of that many latent
          pixels (True: 64, 512 px for SD), blended, for sizes whose whole decode does not
          fit in memory (``ldm.models.autoencoder.tiled``);
        - ``backend``: what runs the networks: "torch", "openvino" (converted once per
          weights and cached, CPU only; ``ldm.backends.openvino``) or "auto" (OpenVINO on a
          CPU when it is installed and the model is SD-sized; ``ldm.backends.choose``);
          None keeps the current one. OpenVINO runs neither ``compile``, ``deepcache`` nor
          ``attention_slicing`` (nor offload): asked for together, a UsageError; under
          "auto" they keep torch.
        """
        from ldm.modules.attention import set_attention_slicing
        if deepcache is not None and deepcache < 1:
            raise UsageError(f"--deepcache must be at least 1 (1: off), got {deepcache}")
        if attention_slicing is not None and attention_slicing < 1:
            raise UsageError(f"--attention_slicing must be at least 1, got {attention_slicing}")
        if vae_tiling is True:
            vae_tiling = 64
        if vae_tiling is not None and vae_tiling is not False and vae_tiling < 16:
            raise UsageError(f"--vae_tiling tiles must be at least 16 latent pixels, got {vae_tiling}")
        torch_only = [flag for flag, on in (("--compile", compile),
                                            ("--deepcache", deepcache and deepcache > 1),
                                            ("--attention_slicing", attention_slicing),
                                            ("--offload", self.offload),
                                            # the OpenVINO export is the UNet's
                                            ("SD 3's MMDiT",
                                             self.is_flow)) if on]
        self._set_backend(self.backend if backend is None else backend, torch_only)
        check_deepcache_controls(deepcache, self.model.model.controls)
        if deepcache and deepcache > 1 and self.is_flow:
            raise UsageError("--deepcache caches a UNet's skip branches; SD 3's MMDiT has "
                             "none: drop it")
        self.deepcache = deepcache if deepcache and deepcache > 1 else None
        self.vae_tile = vae_tiling or None
        self.attention_slicing = attention_slicing
        set_attention_slicing(self.model, attention_slicing)
        if compile and not self.compiled:
            self._compile()
        elif self.compiled and not compile:  # back to eager (what nn.Module.compile set)
            self.model.model.diffusion_model._compiled_call_impl = None
            set_weight_packing(self.model.model.diffusion_model, self.packing)
            self.compiled = False
        return self

    def _set_backend(self, name, torch_only=()):
        from ldm import backends
        unet = self.model.model.diffusion_model
        extra = 0 if self._openvino is not None else 4 * sum(
            p.numel() for m in (unet, self.model.first_stage_model, self.model.cond_stage_model)
            for p in m.parameters())
        try:
            chosen = backends.choose(name, self.device.type,
                                     sum(p.numel() for p in unet.parameters()), torch_only,
                                     extra, available_memory(self.device.type))
        except ValueError as e:
            raise UsageError(str(e)) from None
        if chosen == "openvino":
            if self._openvino is None:
                from ldm.backends.openvino import OpenVINOBackend
                self._openvino = OpenVINOBackend(
                    self.model, "bf16" if self.dtype == torch.bfloat16 else "f32")
            set_weight_packing(self.model, False)   # OpenVINO holds its own weights
            self._openvino.attach()
        elif self._openvino is not None and self._openvino.attached:
            self._openvino.detach()
            set_weight_packing(self.model, self.packing)
        self.backend = chosen

    def _compile(self):
        """``torch.compile`` the UNet in place (its keys unchanged); compiled again after a
        return to eager, the same compiled code (no second compilation). On the CPU with
        inductor's freezing: the weights become constants of the compiled code, prepacked
        for oneDNN's convolutions and matmuls, which is what makes it faster than eager
        (without freezing it is slower); the compiled code then holds its own copy of
        them, and changing the module's weights later does not reach it."""
        check_compiler(self.device)
        unet = self.model.model.diffusion_model
        set_weight_packing(unet, False)  # inductor packs the frozen weights itself
        if self._compiled_impl is None:
            log.info("compiling the UNet (torch.compile): the first step takes a minute or more")
            if self.device.type == "cpu":
                # process-wide: inductor reads it when it compiles (at the first call);
                # compile(options={"freezing": True}) does not reach that point
                import torch._inductor.config
                torch._inductor.config.freezing = True
            unet.compile(dynamic=False)
            self._compiled_impl = unet._compiled_call_impl
        unet._compiled_call_impl = self._compiled_impl
        self.compiled = True

    def offload_to(self, device):
        """Model offload: the submodels stay on the CPU and each goes to ``device`` while it
        runs (``on_device``), so that the device holds one of them at a time (the UNet, the
        largest: 1.7 GB in fp16 for SD v1, against 2.1 GB for all three). The schedule's
        buffers live on ``device``."""
        self.offload = True
        self.device = torch.device(device)
        self.model.to("cpu")
        for name, buffer in self.model.named_buffers(recurse=False):
            setattr(self.model, name, buffer.to(self.device))
        return self

    @contextmanager
    def on_device(self, part):
        """With offload, the submodel ``part`` ("cond_stage_model", "model",
        "first_stage_model") on the device for the block, and back on the CPU after it
        (the device's cache emptied); without, nothing."""
        if not self.offload:
            yield
            return
        module = getattr(self.model, part)
        module.to(self.device)
        try:
            yield
        finally:
            module.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def options_record(self, prompts=None):
        """The options an image was made with, for its parameters (only those in use; of
        the embeddings, those whose token is in ``prompts`` when they are given, as
        A1111's "TI hashes")."""
        loras = self.lora_stack.record() if self.lora_stack else []
        encoder = self.model.cond_stage_model
        embeddings = list(self.embeddings)
        if prompts is not None:
            from ldm.modules.encoders.tokenizer import added_in
            used = added_in(prompts, {e["token"]: None for e in embeddings})
            embeddings = [e for e in embeddings if e["token"] in used]
        record = {"loras": loras or None,
                  "embeddings": embeddings or None,
                  "vae": self.vae["name"] if self.vae else None,
                  "vae_hash": self.vae["hash"] if self.vae else None,
                  "unet": self.unet["name"] if self.unet else None,
                  "unet_hash": self.unet["hash"] if self.unet else None,
                  "clip_skip": encoder.clip_skip if encoder.clip_skip > 1 else None,
                  "prompt_syntax": encoder.syntax if encoder.syntax != "compvis" else None,
                  "deepcache": self.deepcache, "vae_tiling": self.vae_tile,
                  "attention_slicing": self.attention_slicing,
                  "compile": True if self.compiled else None,
                  "offload": True if self.offload else None,
                  "backend": self.backend if self.backend != "torch" else None,
                  "refiner": self.refiner.model_name if self.refiner else None,
                  "refiner_hash": self.refiner.checkpoint_hash if self.refiner else None,
                  "refiner_switch": self.refiner_switch if self.refiner else None,
                  "controlnets": [{"model": u.name, "preprocess": u.preprocess,
                                   "weight": u.weight, "start": u.start, "end": u.end,
                                   "mode": u.mode, **({"guess": True} if u.guess else {})}
                                  for u in self.model.model.controls] or None}
        return {k: v for k, v in record.items() if v is not None}

    # -- the request's model facts and defaults ------------------------------------------
    @property
    def info(self):
        """What requests are checked against and completed from (``ldm.request.ModelInfo``):
        the factor, native size, timesteps and the config's sampling defaults."""
        return ModelInfo(self.factor, self.native_size, self.model.num_timesteps,
                         self.defaults, self.is_inpainting_model, self.model.guidance_embedded,
                         self.is_upscaler, self.is_flow)

    @property
    def is_flow(self):
        """A rectified-flow model (SD 3's ``RectifiedFlow``)."""
        return self.model.parameterization == "flow"

    @property
    def is_upscaler(self):
        """The SD x4 upscaler (``LatentUpscaleDiffusion``): its one task is "upscale"."""
        return hasattr(self.model, "upscale_condition")

    @property
    def is_refiner(self):
        """SDXL's refiner: conditioned on an aesthetic score, made to refine images."""
        embedders = getattr(getattr(self.model, "conditioner", None), "embedders", ())
        return any(getattr(e, "input_key", None) == "aesthetic_score" for e in embedders)

    @property
    def is_inpainting_model(self):
        """A dedicated inpainting model (9-channel UNet, ``conditioning_key: hybrid``)."""
        return self.model.model.conditioning_key == "hybrid"

    def request(self, task, prompts, seeds, **values):
        """A validated ``Request`` for this model (``Request.build``; ``values``: any of
        its fields by keyword; ``hires`` may be a dict of ``Hires.build``'s)."""
        if isinstance(values.get("hires"), dict):
            from ldm.hires import Hires
            values["hires"] = Hires.build(**values["hires"])
        return Request.build(task, self.info, prompts, seeds, **values)

    def num_steps(self, steps, schedule="discrete", sampler=None):
        """How many denoising steps ``steps`` sampling steps run: ``steps`` on the Karras,
        exponential and SGM schedules, the number of ``sampling_timesteps`` on the model's
        own (which can differ above half the training timesteps)."""
        if schedule not in (None, "discrete"):
            return steps
        return len(self.model.schedule.discrete(steps, self.spacing(sampler)))

    def spacing(self, sampler=None):
        """The timestep spacing ``sampler`` runs on with this model: the sampler's own
        (LCM, TCD), else the model's default."""
        default = self.defaults.get("timestep_spacing", "uniform")
        return sampler_spacing(sampler, default) if sampler else default

    def steps_run(self, request):
        """The denoising steps ``request`` runs (image-to-image: its share of them; the
        hires fix: both passes)."""
        n = self.num_steps(request.steps, request.schedule, request.sampler)
        if request.hires is not None:
            return n + self._hires_steps(request)[1]
        if request.task == "upscale":
            return n * len(self._tiles(request, warn=False)[1])
        return n if request.task == "txt2img" else strength_steps(n, request.strength)

    def _hires_steps(self, request):
        """(schedule length, steps run) of the hires fix's second pass."""
        steps, run = request.hires.schedule_steps(request.steps)
        if steps == 0:
            return 0, 0
        steps = min(steps, self.model.num_timesteps)
        return steps, min(run, self.num_steps(steps, request.schedule, request.sampler))

    def initial_noise(self, seeds, height, width):
        """The reproducibility contract: one CPU generator per image, seeded with its seed."""
        c = self.model.channels
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        x = torch.stack([torch.randn([c, height // self.factor, width // self.factor],
                                     generator=g) for g in gens])
        return x.to(self.device), gens

    def _warn_truncated(self, texts):
        new = [t for t in dict.fromkeys(texts) if t not in self._warned]
        self._warned.update(new)
        self.model.cond_stage_model.warn_truncated(new)

    # -- the three tasks -------------------------------------------------------------------
    def generate(self, prompts, seeds, *, progress=True, callback=None, **values):
        """Text to image: finished images with their reproduction parameters, one per prompt
        and seed. ``prompts`` may be one string (repeated for every seed), ``seeds`` one int
        (-1: drawn at random, and recorded). ``values``: ``negative_prompts``, ``sampler``
        (any name of ``ldm.samplers.SAMPLERS``, A1111's too), ``schedule``,
        ``steps``, ``scale``, ``eta``, ``height``, ``width`` (``Request.build``); None or
        left out: the model's defaults, the same as the scripts'."""
        return self.run(self.request("txt2img", prompts, seeds, **values),
                        progress=progress, callback=callback)

    def img2img(self, prompts, seeds, image, *, progress=True, callback=None, **values):
        """Image to image: ``image`` (PIL, a path or a numpy array) encoded, noised to the
        first of the last ``strength`` share of the sampling steps (at least one for a
        strength above 0) and denoised over them. The size: ``height``/``width`` with
        ``resize_mode``, else the image's own down to multiples of the factor, or the
        model's own area for an image of more than 4 times it (``full_size=True`` keeps
        it). ``image_hash`` is recorded (default: the pixels' SHA-256)."""
        return self.run(self.request("img2img", prompts, seeds, image=image, **values),
                        progress=progress, callback=callback)

    def inpaint(self, prompts, seeds, image, mask, *, progress=True, callback=None,
                **values):
        """Inpainting: repaint where ``mask`` is white (binarised at 0.5 for the model), with
        a dedicated inpainting model or any text-to-image one (latent blending). The images
        come back at the input's size, sampled at the nearest size the model takes; with
        ``paste_back`` the pixels outside the mask are ``image``'s own exactly, the seam
        feathered inwards by ``mask_blur`` pixels (``ldm.image_io.paste_back``).

        ``latent_blend``: after every step the latents outside the mask are the image's own,
        noised to that step. A text-to-image model needs it; an inpainting model gets it too
        by default, as ComfyUI's InpaintModelConditioning does (``noise_mask``): the
        known region then cannot drift, and the repainted one is made to fit it (on the
        built-in inpainting model: see models/ldm/shapes-inpainting/README.md). False gives
        diffusers' StableDiffusionInpaintPipeline for an inpainting model."""
        return self.run(self.request("inpaint", prompts, seeds, image=image, mask=mask,
                                     **values), progress=progress, callback=callback)

    def outpaint(self, prompts, seeds, image, *, left=0, right=0, up=0, down=0,
                 fill="fill", progress=True, callback=None, **values):
        """Outpainting: ``image`` extended by ``left``/``right``/``up``/``down`` pixels and
        the new part painted (``ldm.image_io.outpaint_canvas``: the mask reaches
        2 x ``mask_blur`` pixels into the image on the extended sides, for a seam that
        blends; every pixel further in is the input's own). ``fill``: what the new part
        starts from (``FILLS``; it matters at a strength below 1). Then ``inpaint``, with
        the inpainting model when this is one."""
        blur = values.get("mask_blur", 4)
        image = as_image(image, "image", "RGB")
        canvas, mask = outpaint_canvas(image, left, right, up, down, blur)
        samples = self.inpaint(prompts, seeds, canvas, mask, progress=progress,
                               callback=callback, fill=fill, **values)
        for s in samples:
            s.parameters["outpaint"] = dict(left=left, right=right, up=up, down=down)
            s.parameters["init_image_sha256"] = values.get("image_hash") or image_sha256(image)
        return samples

    __call__ = generate

    def upscale(self, prompts, seeds, image, *, progress=True, callback=None, **values):
        """The SD x4 upscaler: ``image`` (PIL, a path or a numpy array; sides made multiples
        of 8) four times larger, guided by the prompt. ``noise_level`` (0 to 350, default
        20): how much noise the low-resolution image is given (more: more detail invented,
        less of the input kept). ``tile`` (default 128, 0: none) and ``tile_overlap``
        (default 32), in low-resolution pixels: large images are made in tiles, each
        denoised alone from its share of one noise image and blended over the overlap."""
        return self.run(self.request("upscale", prompts, seeds, image=image, **values),
                        progress=progress, callback=callback)

    @torch.no_grad()
    def run(self, request, *, progress=True, callback=None):
        """The images a ``Request`` asks for, each with its reproduction parameters, in the
        same steps for the three tasks. ``callback(i, x, pred_x0)`` after every step; it
        may raise ``StopSampling(pred_x0)`` to finish the images from that step's estimate."""
        # 1. the task against the model
        self.check_task(request)
        if request.task == "upscale":
            return self._upscale(request, progress, callback)
        # 2. the input image (and mask) at the size to sample; the memory that size needs
        image = mask = None
        if request.task != "txt2img":
            image, mask = self.prepare(request)
            height, width = image.height, image.width
        else:
            height, width = request.height, request.width
        for h, w in [(height, width)] + ([] if request.hires is None else [
                request.hires.sizes(width, height, self.factor)[1][::-1]]):
            check_memory(self.geometry, h, w, request.batch_size, self.device.type,
                         self.vae_tile, request.names)
            check_work(self.geometry, h, w, self.vae_tile, request.names)
        # 3. the latents to start from: the init image's, the mask's, the masked image's
        init = small = masked = None
        if mask is not None:
            small, full = self.latent_mask(mask)
            if not full.any():
                raise UsageError("the mask is empty (all black): nothing to repaint")
            if full.all():
                log.warning("the mask covers the whole image: everything is repainted")
            if self.is_inpainting_model:
                masked = self.encode_pixels(pil_to_tensor([image]) * (1 - full))
        if image is not None and (mask is None or request.latent_blend
                                  or request.strength < 1.0):
            # noised (img2img, strength < 1) or blended back; the masked part filled first
            # as asked (A1111's inpainting_fill): with the colours around it, or its
            # latents replaced by the seeds' noise or by zeros
            init = self.encode([fill_masked(image, mask) if request.fill == "fill" else image])
            if request.fill in ("latent-noise", "latent-nothing"):
                other = (self.initial_noise(request.seeds, height, width)[0]
                         if request.fill == "latent-noise" else torch.zeros_like(init))
                m = small.to(init.device)
                init = init * (1 - m) + other.to(init.device) * m
        # 4. denoising (and the hires fix's second pass, at its larger size)
        z = self._denoise(request, height, width, init=init, mask=small, masked=masked,
                          progress=progress, callback=callback)
        if request.hires is not None:
            z = self._hires(request, z, height, width, progress, callback)
        # 5. decoding, the safety check, the watermark
        self.check_finite(z, "the UNet's")
        images, notes = self.finish(self.decode(z))
        # 6. inpainting: the input's size, every pixel outside the mask the input's own
        if request.task == "inpaint":
            images = [self.restore(im, request) for im in images]
        # 7. the parameters that make each image again
        return [Sample(im, self.record(request, i, height, width, note))
                for i, (im, note) in enumerate(zip(images, notes))]

    def _hires(self, request, z, height, width, progress, callback):
        """The hires fix's second pass on the first pass's latents ``z``
        (``ldm.hires``): upscaled (the latents, or the decoded images, encoded again),
        cropped to the asked size, then refined as image-to-image from fresh noise of the
        same seeds. Bit for bit our img2img on the upscaled latents, run for exactly the
        hires steps."""
        from ldm import hires
        hr, f = request.hires, self.factor
        (uw, uh), (w, h) = hr.sizes(width, height, f)
        if hr.latent:
            z = hires.upscale_latents(z, (uh // f, uw // f), hr.upscaler)
        else:
            images = self.decode(z)
            z = self.encode([hires.upscale_image(im, uw, uh, hr.upscaler, request.prompts[i],
                                                 request.seeds[i])
                             for i, im in enumerate(images)])
        z = hires.crop_latents(z, (h // f, w // f))
        steps, run = self._hires_steps(request)
        second = request.with_(task="img2img", steps=max(steps, 1), strength=hr.strength,
                               height=h, width=w, hires=None)
        return self._denoise(second, h, w, init=z, run=run, progress=progress,
                             callback=callback)

    def _tiles(self, request, warn=True):
        """(the low-resolution image at sides of multiples of 8, its tiles as (top, left,
        height, width) in its pixels) of an upscaling request."""
        image, fitted = fit_image(request.image, 8)
        if fitted and warn:
            log.warning(fitted)
        return image, tile_boxes(image.height, image.width, request.tile,
                                 request.tile_overlap)

    def _upscale(self, request, progress, callback):
        """The SD x4 upscaler's task: the low-resolution image noised to the request's
        level beside the latents (the same noise for every tile: one draw for the whole
        image, after the start noise, from each seed's generator), tile by tile, each
        decoded and blended with linear ramps over the overlaps (``ldm.upscalers``)."""
        r, f = request, self.factor
        image, boxes = self._tiles(r)
        h, w = image.height, image.width
        th, tw = max(b[2] for b in boxes), max(b[3] for b in boxes)
        check_memory(self.geometry, th * f, tw * f, r.batch_size, self.device.type,
                     self.vae_tile, r.names)
        check_work(self.geometry, th * f, tw * f, self.vae_tile, r.names)
        noise, gens = self.initial_noise(r.seeds, h * f, w * f)
        low_noise = torch.stack([torch.randn([3, h, w], generator=g) for g in gens])
        low = pil_to_tensor([image]).expand(r.batch_size, -1, -1, -1)
        condition = self.model.upscale_condition(low, r.noise_level, low_noise)

        def make(top, left, bh, bw):
            box = (..., slice(top, top + bh), slice(left, left + bw))
            extra = {"concat": condition["concat"][box].to(self.device),
                     "vector": condition["vector"].to(self.device)}
            z = self._denoise(r, bh * f, bw * f, progress=progress, callback=callback,
                              extra=extra, drawn=(noise[box].contiguous(), gens))
            self.check_finite(z, "the UNet's")
            return torch.cat(self.decode_pixels(z))
        pixels = blend_tiles(boxes, h, w, f, r.tile_overlap, make)
        images, notes = self.finish(tensor_to_pil(pixels))
        params = []
        for i, note in enumerate(notes):
            p = self.record(r, i, h * f, w * f, note)
            p.update(task="upscale", noise_level=r.noise_level, tile=r.tile,
                     tile_overlap=r.tile_overlap, tiles=len(boxes),
                     init_image_sha256=r.image_hash or image_sha256(r.image),
                     input_size=f"{image.width}x{image.height}")
            params.append(p)
        return [Sample(im, p) for im, p in zip(images, params)]

    def check_finite(self, x, what):
        """A NaN or infinity where a number should be (a network that overflowed in float16:
        SD 2.x's UNet or SDXL's autoencoder without their float32 parts) is a one-line
        error saying what to change, not a black image."""
        if torch.isfinite(x).all():
            return
        dtype = str(self.dtype).replace("torch.", "")
        autoencoder = "autoencoder" in what
        if self.dtype == torch.float16:
            hint = "run with --precision full or bf16" + (
                ", or an autoencoder fixed for float16 (--vae)" if autoencoder else "")
        else:   # float32 and bf16 do not overflow where SD's networks work
            hint = ("the weights may be damaged: check the checkpoint"
                    + (" and --vae" if autoencoder else ""))
        raise UsageError(f"{what} output is not finite (NaN or infinity) in {dtype}: {hint}")

    def check_task(self, request):
        if self.is_upscaler != (request.task == "upscale"):
            raise UsageError("this is the SD x4 upscaler: it makes images 4x larger "
                             "(scripts/upscale.py, Pipeline.upscale)" if self.is_upscaler else
                             "upscaling needs the SD x4 upscaler (x4-upscaler-ema) as --ckpt")
        if request.task == "txt2img" and self.is_refiner:
            raise UsageError("this is SDXL's refiner: it refines images (Pipeline.img2img, "
                             "strength about 0.3) or a base's last steps (set_refiner)")
        if request.task == "txt2img" and self.is_inpainting_model:
            raise UsageError("this is an inpainting model (9-channel UNet): it takes an image "
                             "and a mask (scripts/inpaint.py, Pipeline.inpaint)")
        if request.task == "img2img" and self.is_inpainting_model:
            raise UsageError("this is an inpainting model (9-channel UNet): it takes a mask "
                             "too (scripts/inpaint.py, Pipeline.inpaint)")
        if request.task == "inpaint" and not (request.latent_blend or self.is_inpainting_model):
            raise UsageError("a text-to-image model inpaints by latent blending only; "
                             "latent_blend=False needs an inpainting model")

    def prepare(self, request):
        """The request's image (and mask) at the size to sample (``working_size``), each
        change said in one line."""
        (w, h), note = working_size(request.image.size, self.factor, self.native_size,
                                    request.height, request.width, request.full_size,
                                    request.names)
        image, fitted = fit_image(request.image, self.factor, w, h, request.resize_mode)
        if note or fitted:
            log.warning(note or fitted)
        check_size(self.info, image.height, image.width, request.names)
        mask = None
        if request.mask is not None:
            mask, note = fit_mask(request.mask, request.image.size)
            if note:
                log.warning(note)
            mask, _ = fit_image(mask, self.factor, w, h, request.resize_mode, Image.BILINEAR)
        return image, mask

    def restore(self, generated, request):
        """An inpainted image at the input's size: resized back if it was sampled at
        another, then pasted onto the input outside the mask (``paste_back``)."""
        original = request.image
        if generated.size != original.size:
            generated = generated.resize(original.size, Image.LANCZOS)
        if not request.paste_back:
            return generated
        mask, _ = fit_mask(request.mask, original.size)
        return paste_back(generated, original, mask, request.mask_blur)

    def record(self, request, i, height, width, note):
        """Image ``i``'s parameters: the request's values, the model and options."""
        r = request
        params = {"prompt": r.prompts[i], "negative_prompt": r.negative_prompts[i],
                  "seed": r.seeds[i], "sampler": r.sampler, "schedule": r.schedule,
                  "sampler_name": sampler_label(r.sampler, r.schedule), "steps": r.steps,
                  "scale": r.scale, "eta": r.eta, "width": width, "height": height,
                  "batch_size": r.batch_size, "model": self.model_name,
                  "checkpoint_hash": self.checkpoint_hash,
                  "prediction": self.model.parameterization, "precision": self.precision,
                  **self.options_record([r.prompts[i], r.negative_prompts[i]])}
        if r.hires is not None:   # A1111's Size is the first pass's
            w, h = r.hires.sizes(width, height, self.factor)[1]
            params.update(r.hires.record(), output_size=f"{w}x{h}")
        if r.task == "img2img":
            params.update(task="img2img", strength=r.strength,
                          init_image_sha256=r.image_hash or image_sha256(r.image))
        elif r.task == "inpaint":
            params.update(task="inpaint", strength=r.strength,
                          inpainting_model=self.is_inpainting_model,
                          init_image_sha256=r.image_hash or image_sha256(r.image),
                          mask_sha256=r.mask_hash or image_sha256(r.mask),
                          mask_blur=r.mask_blur if r.paste_back else None,
                          paste_back=r.paste_back, latent_blend=r.latent_blend)
            if r.fill != "original":
                params["fill"] = r.fill
            if r.image.size != (width, height):
                params["output_size"] = f"{r.image.width}x{r.image.height}"
        if self.family is not None:
            params["family"] = self.family.name
        if self.is_flow:   # SD 3: what T5 read, or that it did not
            encoders = self.model.cond_stage_model
            params.update(t5="used" if encoders.use_t5 else "left out (zeros)",
                          t5_tokens=encoders.t5_length)
        if r.rescale:
            params["rescale"] = r.rescale
        if r.slg:
            layers = self.skip_layers(r)
            params.update(slg=r.slg, slg_layers=list(layers.layers), slg_start=layers.start,
                          slg_stop=layers.stop)
        if self.model.size_values() is not None:   # SDXL: what its conditioning was told
            params.update({k: (list(v) if isinstance(v, tuple) else v)
                           for k in SIZE_CONDITIONING if (v := getattr(r, k)) is not None})
        return {**params, **note}

    @torch.no_grad()
    def latents(self, prompts, seeds, *, init=None, strength=None, mask=None, masked=None,
                latent_blend=False, progress=True, callback=None, **values):
        """Denoised latents [B, C, h, w] for prompts and their seeds, the core of the three
        tasks (``values``: the sampling fields of ``Request.build``).

        Image-to-image: ``init``, the init image's latents ([1 or B, C, h, w]), noised to the
        first of the last ``strength_steps(n, strength)`` steps, which are then run.
        Inpainting: also ``mask`` ([1 or B, 1, h, w], 1 = repaint): a text-to-image model
        gets the known latents (``init``) blended back after every step; an inpainting model
        gets the mask and ``masked`` (the masked image's latents) as its extra input, and the
        blending too when ``latent_blend`` is true (a text-to-image model is always
        blended). Strength 1 starts inpainting from pure noise."""
        if init is not None:
            values.update(height=init.shape[-2] * self.factor,
                          width=init.shape[-1] * self.factor)
        task = "txt2img" if init is None and mask is None else (
            "inpaint" if mask is not None else "img2img")
        info = self.info
        request = Request.build("txt2img", replace(info, inpainting=False), prompts, seeds,
                                **values)
        if task != "txt2img":
            strength = check_field("strength", info.default("strength", task)
                                      if strength is None else strength)
            request = request.with_(task=task, strength=strength, latent_blend=latent_blend)
        if self.is_inpainting_model and (mask is None or masked is None):
            raise UsageError("this is an inpainting model (9-channel UNet): it takes an image "
                             "and a mask (scripts/inpaint.py)")
        return self._denoise(request, request.height, request.width, init=init, mask=mask,
                             masked=masked, progress=progress, callback=callback)

    def _denoise(self, request, height, width, init=None, mask=None, masked=None,
                 progress=True, callback=None, run=None, extra=None, drawn=None):
        r = request
        # the start noise and the generators that go on from it (``drawn``: already drawn)
        noise, gens = drawn or self.initial_noise(r.seeds, height, width)
        b = r.batch_size
        spacing = self.defaults.get("timestep_spacing", "uniform")
        n = self.num_steps(r.steps, r.schedule, r.sampler)
        if run is None:   # the steps run: all, or image-to-image's share (the hires fix: its own)
            run = n if init is None else strength_steps(n, r.strength)
        start, known, extra = None, None, dict(extra or {})
        if init is not None:
            init = init.to(self.device).expand(b, -1, -1, -1)
            if run == 0:
                return init  # strength 0: the autoencoder round trip
            if not (mask is not None and r.strength >= 1.0):
                start = init     # noised to the first step run; inpainting at 1: pure noise
        if mask is not None:
            mask = mask.to(self.device).expand(b, -1, -1, -1)
            if self.is_inpainting_model:
                extra["concat"] = self.model.inpainting_concat(
                    mask, masked.to(self.device).expand(b, -1, -1, -1))
            if r.latent_blend or not self.is_inpainting_model:
                known = init
            else:
                mask = None

        def fresh_noise(shape):
            return torch.stack([torch.randn(shape[1:], generator=g) for g in gens]).to(self.device)

        wrapper = self.model.model
        if wrapper.controls:   # ControlNets: their images in the conditioning, steps counted
            from ldm.controlnet import control_hints
            extra["hint"] = control_hints(wrapper.controls, height, width, b, self.device,
                                          torch.float32)
            wrapper.control_progress = counted = {"step": 0, "steps": run}
            inner = callback

            def callback(i, x, x0):
                counted["step"] = i + 1
                if inner is not None:
                    inner(i, x, x0)

        with self.autocast:
            cond, uncond = self.conditioning(r, extra, height, width)
            if wrapper.controls:   # which half of a guided batch is the conditional one
                cond["cond_mark"] = torch.ones(b, device=self.device)
                if uncond is not None:
                    uncond["cond_mark"] = torch.zeros(b, device=self.device)
            model = self.model
            if self.refiner is not None:   # the base above the switch, the refiner below
                from ldm.models.diffusion.experts import Experts, switch_timestep
                second, second_uncond = self.refiner.conditioning(r, None, height, width)
                model = Experts(self.model, self.refiner.model, switch_timestep(
                    self.refiner_switch, self.model.num_timesteps))
                cond = Experts.conditioning(cond, second)
                uncond = Experts.conditioning(uncond, second_uncond)
            unet = self.model.model.diffusion_model
            with self.on_device("model"), unet.caching(self.deepcache or 1):
                try:
                    z = sample(model, r.sampler, noise, r.steps, cond, uncond, r.scale,
                               eta=r.eta, noise=fresh_noise, disable=not progress,
                               callback=callback, spacing=spacing, run_steps=run,
                               schedule=r.schedule, init=start, mask=mask, known=known,
                               rescale=r.rescale, skip=self.skip_layers(r))
                except StopSampling as stop:   # the callback ended it early
                    z = stop.latents
        return z

    def skip_layers(self, request):
        """The request's skip-layer guidance (``sampling.SkipLayers``), or None: its
        scale, with the layers and the share of the schedule the model's config says
        (``sampling: slg_layers, slg_start, slg_stop``), else Stability's for SD 3.5
        Medium (blocks 7, 8, 9 from 1% to 20% of the steps)."""
        if not request.slg:
            return None
        from ldm.models.diffusion.sampling import SkipLayers
        d = self.defaults
        return SkipLayers(request.slg, tuple(d.get("slg_layers", (7, 8, 9))),
                          float(d.get("slg_start", 0.01)), float(d.get("slg_stop", 0.2)))

    def set_controls(self, units):
        """ControlNets for the runs that follow (``ldm.controlnet.ControlUnit``: network,
        control image, weight, start and end), their residuals summed; [] for none."""
        check_deepcache_controls(self.deepcache, units)
        self.model.model.controls = list(units)

    def conditioning(self, request, extra=None, height=None, width=None):
        """(cond, uncond): the conditioning dicts of the request's prompts and negative
        prompts (``LatentDiffusion.conditioning``; uncond None without guidance, or with
        it given to the UNet as an embedding, ``guidance_condition``) for an
        image of ``height`` x ``width`` (SDXL's size conditioning, ``size_values``), the
        two text encodings at one length (long A1111 prompts), and the task's ``extra``
        keys (an inpainting model's ``concat``) in both."""
        r = request
        prompts, negatives = list(r.prompts), list(r.negative_prompts)
        self._warn_truncated(prompts + negatives)
        sizes = dict(height=height or r.height, width=width or r.width,
                     original=r.original_size, crop=r.crop, target=r.target_size)
        with self.on_device("cond_stage_model"):
            cond = self.model.conditioning(
                prompts, self.model.size_values(**sizes, aesthetic=r.aesthetic_score))
            uncond = None
            if self.model.guidance_embedded:   # a consistency model: guidance in the UNet
                cond.update(self.model.guidance_condition(r.scale, len(prompts)))
            elif r.scale != 1.0:
                uncond = self.model.conditioning(
                    negatives, self.model.size_values(
                        **sizes, aesthetic=r.negative_aesthetic_score, negative=True),
                    negative=True)
            if uncond is not None:
                cond["crossattn"], uncond["crossattn"] = self.model.cond_stage_model.equalize(
                    cond["crossattn"], uncond["crossattn"])
        extra = extra or {}
        return {**cond, **extra}, (None if uncond is None else {**uncond, **extra})

    # -- the autoencoder and the finishing steps ------------------------------------------
    @torch.no_grad()
    def encode(self, images):
        """PIL images (sides multiples of the factor) -> latents [B, C, h, w]: the posterior
        mean times scale_factor, one image at a time."""
        return torch.cat([self.encode_pixels(pil_to_tensor([image])) for image in images])

    @torch.no_grad()
    def encode_pixels(self, x):
        """[1, 3, H, W] pixels in [-1, 1] -> latents (the posterior mean, scaled)."""
        with self.vae_autocast, self.on_device("first_stage_model"):
            return self.model.encode_image(x.to(self.device), self.vae_tile).float()

    def latent_mask(self, mask):
        """A PIL mask (white = repaint) -> [1, 1, h, w] in {0, 1}: binarised at 0.5, then
        nearest-neighbour downsampled to the latent size (as diffusers)."""
        m = torch.from_numpy((np.asarray(mask.convert("L")) >= 128).astype(np.float32))[None, None]
        h, w = m.shape[-2] // self.factor, m.shape[-1] // self.factor
        return torch.nn.functional.interpolate(m, size=(h, w), mode="nearest"), m

    @torch.no_grad()
    def decode(self, z):
        """Latents -> PIL images."""
        return [image for x in self.decode_pixels(z) for image in tensor_to_pil(x)]

    @torch.no_grad()
    def decode_pixels(self, z):
        """Latents -> one [1, 3, H, W] float32 CPU tensor in about [-1, 1] per image."""
        out = []
        for i in range(z.shape[0]):  # one at a time: the decoder's peak memory is per image
            with self.vae_autocast, self.on_device("first_stage_model"):
                x = self.model.decode_first_stage(z[i:i + 1], self.vae_tile)
            self.check_finite(x, "the autoencoder's")
            out.append(x.float().cpu())
        return out

    def finish(self, images):
        """Safety check (flagged images are replaced), then the invisible watermark."""
        from ldm.watermark import put_watermark
        flags = [False] * len(images)
        if self.safety_checker is not None:
            images, flags = self.safety_checker.check_images(images)
        notes = []
        for i, image in enumerate(images):
            note = {"safety": ("replaced (flagged as NSFW)" if flags[i] else
                               "passed" if self.safety_checker is not None else
                               self.safety_note)}
            if self.watermark:
                images[i], note["watermark"] = put_watermark(image)
            else:
                note["watermark"] = "none (disabled)"
            notes.append(note)
        return images, notes


def geometry_of(model):
    """The ``ldm.config.Geometry`` of a built model (what the memory check needs)."""
    from ldm.config import Geometry
    unet = model.model.diffusion_model
    decoder = getattr(model.first_stage_model, "decoder", None)
    return Geometry(factor=model.latent_downsampling_factor, channels=model.channels,
                    latent_size=model.image_size, timesteps=model.num_timesteps,
                    unet_in_channels=getattr(unet, "in_channels", None),
                    model_channels=getattr(unet, "model_channels", None),
                    decoder_channels=(decoder.conv_out.in_channels
                                      if decoder is not None and hasattr(decoder, "conv_out")
                                      else None))


Txt2Img = Pipeline  # the name of the text-to-image API before img2img and inpainting
