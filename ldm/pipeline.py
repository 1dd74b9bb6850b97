"""Text to image as a library: load a model once, generate for many prompts.

    from ldm.pipeline import Txt2Img
    pipe = Txt2Img.load()                      # SD v1 if installed, else the built-in model
    samples = pipe.generate(["a red circle"], seeds=[42], sampler="plms", steps=50)
    samples[0].image.save("out.png")

Reproducibility contract: the image made with seed ``s`` starts from
``torch.randn([C, H // f, W // f], generator=torch.Generator("cpu").manual_seed(s))``, moved
to the device, and any further noise (DDIM with eta > 0) comes from the same generator, so an
image is the same alone or in any batch, on any device (up to float rounding).
"""
import logging
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ldm.models.diffusion.sampling import SAMPLERS, sample

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
SD_CKPT = ROOT / "models" / "ldm" / "stable-diffusion-v1" / "model.ckpt"
SD_CONFIG = ROOT / "configs" / "stable-diffusion" / "v1-inference.yaml"
BUILTIN_DIR = ROOT / "models" / "ldm" / "shapes"
INSTALL_HINT = (f"for Stable Diffusion, put an SD v1.x .ckpt/.safetensors at "
                f"{SD_CKPT.relative_to(ROOT)} or pass --ckpt")
PRECISIONS = ("autocast", "full", "bf16")


class ModelNotFound(FileNotFoundError):
    pass


def pick_device(name="auto"):
    """"auto": CUDA, then MPS, then CPU; otherwise the named device."""
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ValueError(f"unknown device {name!r} (use auto, cpu, cuda, cuda:1 or mps)")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA GPU is available here (use --device cpu)")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError("--device mps: MPS is not available here (use --device cpu)")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast_for(device, precision):
    """fp16 autocast on CUDA for "autocast" (CompVis' default), bf16 autocast for "bf16";
    float32 everywhere else (CPU "autocast" stays float32: fp16 on CPU is slow and lossy)."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {PRECISIONS}")
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "autocast" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return nullcontext()


def resolve_model(ckpt=None, config=None):
    """(checkpoint, config, description) for the model to use.

    No ``ckpt``: SD v1 at the default path if present, else the built-in model. A config
    defaults to ``config.yaml`` beside the checkpoint, else SD v1's."""
    if ckpt is None:
        if SD_CKPT.exists():
            ckpt, name = SD_CKPT, "Stable Diffusion v1"
        else:
            builtin = sorted(BUILTIN_DIR.glob("*.safetensors"))
            if not builtin:
                raise ModelNotFound(f"no model found: {INSTALL_HINT}")
            ckpt, name = builtin[0], "the built-in shapes model"
    else:
        ckpt, name = Path(ckpt), None
        if not ckpt.is_file():
            raise ModelNotFound(f"checkpoint not found: {ckpt}")
    if config is None:
        beside = Path(ckpt).parent / "config.yaml"
        config = beside if beside.exists() else SD_CONFIG
    config = Path(config)
    if not config.is_file():
        raise ModelNotFound(f"config not found: {config}")
    return Path(ckpt), config, name or f"{ckpt}"


def build_model(config_path, meta=False):
    from omegaconf import OmegaConf
    from ldm.util import instantiate_from_config
    config = OmegaConf.load(config_path)
    with torch.device("meta") if meta else nullcontext():
        return instantiate_from_config(config.model)


def sampling_defaults(config_path):
    """A config's own sampling defaults (its optional top-level ``sampling:`` section, e.g.
    ``scale: 5.0`` for a model that follows prompts best at that guidance, or
    ``timestep_spacing: trailing`` for a zero-terminal-SNR model), else {}."""
    from omegaconf import OmegaConf
    section = OmegaConf.load(config_path).get("sampling")
    defaults = OmegaConf.to_container(section) if section else {}
    unknown = set(defaults) - {"scale", "timestep_spacing"}
    if unknown:
        raise ValueError(f"{config_path}: unknown sampling defaults {sorted(unknown)}")
    from ldm.modules.diffusionmodules.util import TIMESTEP_SPACINGS
    if defaults.get("timestep_spacing", "uniform") not in TIMESTEP_SPACINGS:
        raise ValueError(f"{config_path}: sampling timestep_spacing must be one of "
                         f"{sorted(TIMESTEP_SPACINGS)}, not {defaults['timestep_spacing']!r}")
    return defaults


def load_model(ckpt, config, device="cpu"):
    """A ``LatentDiffusion`` with the checkpoint's weights, in eval mode, on ``device``."""
    from ldm.checkpoint import load_model_weights, load_state_dict_file
    model = build_model(config, meta=True)
    load_model_weights(model, load_state_dict_file(ckpt), source=str(ckpt))
    return model.eval().requires_grad_(False).to(device)


@dataclass
class Sample:
    image: "PIL.Image.Image"
    parameters: dict = field(default_factory=dict)


class Txt2Img:
    """A loaded model plus the finishing steps (safety check, watermark, metadata)."""

    def __init__(self, model, device=None, precision="autocast", safety_checker=None,
                 watermark=True, model_name="model", checkpoint_hash=None, defaults=None):
        self.model = model
        # sampling defaults: CompVis' unless the model's config has a `sampling:` section
        self.defaults = {"scale": 7.5, **(defaults or {})}
        self.device = device or model.device
        self.precision = precision
        self.autocast = autocast_for(self.device, precision)
        self.safety_checker = safety_checker
        self.watermark = watermark
        self.model_name = model_name
        self.checkpoint_hash = checkpoint_hash
        self.factor = model.latent_downsampling_factor
        self.native_size = model.image_size * self.factor

    @classmethod
    def load(cls, ckpt=None, config=None, device="auto", precision="autocast", safety=True,
             safety_checker_path=None, watermark=True):
        from ldm.checkpoint import file_hash
        device = pick_device(device) if isinstance(device, str) else device
        ckpt, config, name = resolve_model(ckpt, config)
        model = load_model(ckpt, config, device)
        checker = None
        if safety:
            from ldm.safety import load_safety_checker
            checker = load_safety_checker(safety_checker_path, device=device)
            if checker is None:
                log.warning("no safety checker weights found, images are not filtered "
                            "(put CompVis/stable-diffusion-safety-checker weights in "
                            "models/safety_checker/)")
        pipe = cls(model, device, precision, checker, watermark, name, file_hash(ckpt),
                   sampling_defaults(config))
        pipe.checkpoint = ckpt
        return pipe

    def check_size(self, height, width):
        f = self.factor
        if height % f or width % f or height < f or width < f:
            raise ValueError(f"--H and --W must be positive multiples of {f} for this model "
                             f"(got {height}x{width}); e.g. {self.native_size}")

    def initial_noise(self, seeds, height, width):
        """The reproducibility contract: one CPU generator per image, seeded with its seed."""
        c = self.model.channels
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        x = torch.stack([torch.randn([c, height // self.factor, width // self.factor],
                                     generator=g) for g in gens])
        return x.to(self.device), gens

    @torch.no_grad()
    def latents(self, prompts, seeds, negative_prompts=None, sampler="plms", steps=50,
                scale=None, eta=0.0, height=None, width=None, progress=True):
        """Denoised latents [B, C, h, w] for prompts and their seeds (``scale``: the
        guidance scale; None for the model's default)."""
        scale = self.defaults["scale"] if scale is None else scale
        if len(prompts) != len(seeds):
            raise ValueError("give one seed per prompt")
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose from {sorted(SAMPLERS)}")
        height, width = height or self.native_size, width or self.native_size
        self.check_size(height, width)
        negative_prompts = negative_prompts or [""] * len(prompts)
        x, gens = self.initial_noise(seeds, height, width)

        def noise(shape):
            return torch.stack([torch.randn(shape[1:], generator=g) for g in gens]).to(self.device)

        with self.autocast:
            encoder = self.model.cond_stage_model
            encoder.warn_truncated(list(prompts) + list(negative_prompts))
            cond = self.model.get_learned_conditioning(list(prompts))
            uncond = (self.model.get_learned_conditioning(list(negative_prompts))
                      if scale != 1.0 else None)
            z = sample(self.model, sampler, x, steps, cond, uncond, scale, eta=eta,
                       noise=noise, disable=not progress,
                       spacing=self.defaults.get("timestep_spacing", "uniform"))
        return z

    @torch.no_grad()
    def decode(self, z):
        from ldm.image_io import tensor_to_pil
        images = []
        for i in range(z.shape[0]):  # one at a time: the decoder's peak memory is per image
            with self.autocast:
                x = self.model.decode_first_stage(z[i:i + 1])
            images += tensor_to_pil(x.float().cpu())
        return images

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
                               "not checked (no safety checker weights)")}
            if self.watermark:
                images[i], note["watermark"] = put_watermark(image)
            else:
                note["watermark"] = "none (disabled)"
            notes.append(note)
        return images, notes

    def generate(self, prompts, seeds, negative_prompts=None, sampler="plms", steps=50,
                 scale=None, eta=0.0, height=None, width=None, progress=True):
        """Finished images with their reproduction parameters, one per prompt and seed."""
        scale = self.defaults["scale"] if scale is None else scale
        height, width = height or self.native_size, width or self.native_size
        negative_prompts = list(negative_prompts or [""] * len(prompts))
        z = self.latents(prompts, seeds, negative_prompts, sampler, steps, scale, eta,
                         height, width, progress)
        images, notes = self.finish(self.decode(z))
        out = []
        for image, note, prompt, negative, seed in zip(images, notes, prompts,
                                                       negative_prompts, seeds):
            params = {"prompt": prompt, "negative_prompt": negative, "seed": int(seed),
                      "sampler": sampler, "steps": steps, "scale": scale, "eta": eta,
                      "width": width, "height": height, "model": self.model_name,
                      "checkpoint_hash": self.checkpoint_hash, "precision": self.precision,
                      **note}
            out.append(Sample(image, params))
        return out

    __call__ = generate
