"""Model configs (CompVis schema) read and checked without torch or any weights.

``load_config`` turns every way a config file can be wrong into one ``ConfigError`` line
naming the file. ``Geometry`` reads what the command line checks before the slow model load
(the autoencoder's factor, latent channels, native size, timesteps, UNet input channels) and
estimates the memory a size needs.
"""
import logging
from dataclasses import dataclass
from pathlib import Path

from ldm import families, source
from ldm.errors import CheckpointError, ConfigError, ModelNotFound
from ldm.samplers import TIMESTEP_SPACINGS as TIMESTEP_SPACING_NAMES

log = logging.getLogger(__name__)

SAMPLING_KEYS = ("sampler", "steps", "scale", "rescale", "timestep_spacing", "slg",
                 "slg_layers", "slg_start", "slg_stop")


def load_config(path):
    """The OmegaConf config at ``path``, with a ``model:`` that has a ``target``."""
    from omegaconf import DictConfig, OmegaConf
    from yaml import YAMLError
    path = Path(path)
    if not path.is_file():
        raise ModelNotFound(f"config not found: {path}" if not path.is_dir() else
                            f"--config {path} is a folder: give its .yaml file")
    try:
        config = OmegaConf.load(path)
    except YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"config {path} is not valid YAML{at}: fix it or pass another "
                          f"--config") from None
    except (UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"cannot read config {path} ({type(e).__name__}): give a YAML "
                          f"text file") from None
    except Exception as e:  # OmegaConf's own errors (bad interpolation, ...)
        raise ConfigError(f"config {path} cannot be read: {str(e).splitlines()[0]}") from None
    if not isinstance(config, DictConfig) or not config:
        kind = "empty" if not config else "a list, not a mapping"
        raise ConfigError(f"config {path} is {kind}: a model config has a top-level "
                          f"'model:' with 'target:' and 'params:'")
    model = config.get("model")
    if not isinstance(model, DictConfig) or "target" not in model:
        raise ConfigError(f"config {path} has no 'model:' with a 'target:' (a class to "
                          f"build): is it a model config?")
    return config


def check_targets(config, path):
    """Every ``target:`` the model is built from (the model's own, and those of its UNet,
    autoencoder and text encoder or conditioner; ``sgm.`` ones as ``resolve_target`` reads
    them) names a module that exists, found without importing it
    (no torch import yet). Training-only targets (``scheduler_config``, ``lossconfig``
    of upstream configs) are not built for inference and not checked."""
    import importlib.util
    from ldm.util import resolve_target
    params = config.model.get("params") or {}
    parts = [config.model.target] + [t for key in ("unet_config", "first_stage_config",
                                                     "cond_stage_config", "network_config",
                                                     "conditioner_config")
                                     for t in _targets(params.get(key), skip=("lossconfig",))]
    for target in parts:
        module, _, name = resolve_target(target).rpartition(".")
        try:
            found = bool(module) and importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise ConfigError(f"config {path} names {target}, but there is no module "
                              f"{module or target!r}: fix the target or install its package")


def _targets(node, skip=()):
    from omegaconf import DictConfig, ListConfig
    if isinstance(node, DictConfig):
        for k, v in node.items_ex(resolve=False):
            if k == "target":
                yield v
            elif k not in skip:
                yield from _targets(v, skip)
    elif isinstance(node, ListConfig):
        for v in node:
            yield from _targets(v, skip)


def build_error(path, e):
    """A ConfigError for an exception raised while building ``path``'s model."""
    if isinstance(e, (ImportError, AttributeError)):
        return ConfigError(f"config {path} names a class that does not exist ({e})")
    return ConfigError(f"config {path} does not build: {type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''}")


def sampling_defaults(config, path="config"):
    """A config's own sampling defaults (its optional top-level ``sampling:`` section:
    ``sampler``, ``steps``, ``scale``, ``rescale``, ``timestep_spacing``; e.g. SD-Turbo's
    one Euler step without guidance on trailing timesteps, or ``rescale: 0.7`` for a
    zero-terminal-SNR model), else {}; each checked as the request checks it. ``config``: a
    loaded config or its path."""
    from omegaconf import OmegaConf
    if isinstance(config, (str, Path)):
        config, path = load_config(config), config
    section = config.get("sampling")
    defaults = OmegaConf.to_container(section) if section else {}
    if not isinstance(defaults, dict):
        raise ConfigError(f"{path}: 'sampling:' must be a mapping")
    unknown = set(defaults) - set(SAMPLING_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown sampling defaults {sorted(unknown)}")
    if defaults.get("timestep_spacing", "uniform") not in TIMESTEP_SPACING_NAMES:
        raise ConfigError(f"{path}: sampling timestep_spacing must be one of "
                          f"{sorted(TIMESTEP_SPACING_NAMES)}, not "
                          f"{defaults['timestep_spacing']!r}")
    from ldm.request import LIMITS, check_number
    from ldm.samplers import resolve_sampler
    for key in ("steps", "scale", "rescale", "slg"):
        if key in defaults:
            limit = LIMITS[key]
            try:
                defaults[key] = check_number(defaults[key], limit.kind, limit.lo, limit.hi)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{path}: sampling {key}: {e}") from None
    if "sampler" in defaults:
        try:
            resolve_sampler(str(defaults["sampler"]))
        except ValueError as e:
            raise ConfigError(f"{path}: sampling sampler: {e}") from None
    return defaults


@dataclass
class Geometry:
    """What a config says about the sizes its model takes (None where it does not say)."""
    factor: int = None          # image pixels per latent pixel, per side
    channels: int = None        # latent channels
    latent_size: int = None     # the latent side the model was trained at
    timesteps: int = 1000
    unet_in_channels: int = None
    model_channels: int = None  # the UNet's base width
    decoder_channels: int = None  # the autoencoder decoder's width at full resolution
    refiner: bool = False       # SDXL's refiner (conditioned on an aesthetic score)
    guidance_embedded: bool = False  # a consistency model taking its guidance as an embedding
    upscaler: bool = False      # the SD x4 upscaler (LatentUpscaleDiffusion)
    flow: bool = False          # a rectified-flow model (SD 3: RectifiedFlow)

    @property
    def is_inpainting(self):
        """A dedicated inpainting UNet: latents, mask and masked-image latents in."""
        return bool(self.unet_in_channels and self.channels
                    and self.unet_in_channels == 2 * self.channels + 1)

    @property
    def native_size(self):
        return self.latent_size * self.factor if self.latent_size and self.factor else None

    def activation_bytes(self, height, width, batch, vae_tile=None):
        """A floor for the float32 activations a run at ``height`` x ``width`` needs: the
        UNet over the batch (x2 for guidance), or the decoder for one image, whichever is
        more. Measured on CPU (torch 2.13, fused attention): the UNet peaks at 22-37 x its
        first level's size (base width x latent positions x batch x 4 bytes; the built-in
        model and SD v1), the decoder at 7 x its last level's; the floor takes 16 and 6, so
        a size it refuses cannot run (weights come on top). With ``vae_tile`` (latent pixels)
        the decoder holds one tile at a time."""
        pixels = height * width
        unet = decoder = 0
        if self.model_channels and self.factor:
            unet = 16 * 2 * batch * self.model_channels * (pixels // self.factor ** 2) * 4
        if self.decoder_channels:
            if vae_tile and self.factor:
                side = vae_tile * self.factor
                pixels = min(height, side) * min(width, side)
            decoder = 6 * self.decoder_channels * pixels * 4
        return max(unet, decoder)


def geometry(config):
    """The ``Geometry`` of a loaded config (``load_config``)."""
    params = config.model.get("params") or {}
    sgm = "network_config" in params   # Stability's generative-models schema (SDXL)
    unet = ((params.get("network_config" if sgm else "unet_config") or {}).get("params") or {})
    # the model classes' defaults where a config says nothing (CompVis': 3 channels and
    # 256; DiffusionEngine: the UNet's output channels and SDXL's 128)
    g = Geometry(channels=params.get("channels", unet.get("out_channels", 4) if sgm else 3),
                 latent_size=params.get("image_size", 128 if sgm else 256),
                 timesteps=params.get("timesteps", 1000))
    first = (params.get("first_stage_config") or {})
    dd = ((first.get("params") or {}).get("ddconfig") or {}) if hasattr(first, "get") else {}
    if dd.get("ch_mult") is not None:
        g.factor = 2 ** (len(dd["ch_mult"]) - 1)
        g.decoder_channels = dd.get("ch", 128) * dd["ch_mult"][0]
    g.unet_in_channels = unet.get("in_channels")
    g.model_channels = unet.get("model_channels")
    g.guidance_embedded = bool(unet.get("time_cond_proj_dim"))
    embedders = ((params.get("conditioner_config") or {}).get("params") or {}).get("emb_models")
    g.upscaler = str(config.model.get("target", "")).endswith("LatentUpscaleDiffusion")
    g.flow = str(config.model.get("target", "")).endswith("RectifiedFlow")
    g.refiner = any(hasattr(e, "get") and e.get("input_key") == "aesthetic_score"
                    for e in embedders or ())
    return g


# ------------------------------------------------------------------ which model to load

ROOT = Path(__file__).resolve().parents[1]
SD_CKPT = ROOT / "models" / "ldm" / "stable-diffusion-v1" / "model.ckpt"
SD_CONFIG = ROOT / "configs" / "stable-diffusion" / "v1-inference.yaml"
SD_INPAINTING_CKPT = ROOT / "models" / "ldm" / "stable-diffusion-v1" / "inpainting.ckpt"
SD_INPAINTING_CONFIG = ROOT / "configs" / "stable-diffusion" / "v1-inpainting-inference.yaml"
UNET_INPUT_KEY = "model.diffusion_model.input_blocks.0.0.weight"
BUILTIN_DIR = ROOT / "models" / "ldm" / "shapes"
BUILTIN_INPAINTING_DIR = ROOT / "models" / "ldm" / "shapes-inpainting"
BUILTIN_FAST_DIR = ROOT / "models" / "ldm" / "shapes-fast"
BUILTIN_INPAINTING_FAST_DIR = ROOT / "models" / "ldm" / "shapes-inpainting-fast"
# what --ckpt can name the built-in models by: (folder, what the run calls it)
BUILTIN_NAMES = {"builtin": (BUILTIN_DIR, "the built-in shapes model"),
                 "builtin-fast": (BUILTIN_FAST_DIR, "the built-in fast shapes model (4 steps)"),
                 "builtin-inpainting": (BUILTIN_INPAINTING_DIR,
                                        "the built-in shapes inpainting model"),
                 "builtin-inpainting-fast": (BUILTIN_INPAINTING_FAST_DIR,
                                             "the built-in fast inpainting model (4 steps)")}
INSTALL_HINT = ("for Stable Diffusion, put an SD v1.x .ckpt/.safetensors at "
                "models/ldm/stable-diffusion-v1/model.ckpt or pass --ckpt")
INPAINTING_HINT = ("for Stable Diffusion inpainting, put sd-v1-5-inpainting at "
                   "models/ldm/stable-diffusion-v1/inpainting.ckpt or pass --ckpt")


@dataclass
class ModelChoice:
    """A checkpoint and the config that describes it, checked without reading weights.
    ``family``: the ``ldm.families.Family`` detected from the checkpoint (None when its
    config was given or found beside it and detection was not needed or found none)."""
    ckpt: Path
    config_path: Path
    config: object
    name: str
    builtin: bool = False
    family: object = None
    variant: str = None       # the family's variant, when detection chose the config
    unet: Path = None         # a UNet file that replaces the checkpoint's (``--unet``)
    loras: tuple = ()         # the LoRA files the run merges (their names may set defaults)

    @property
    def geometry(self):
        return geometry(self.config)

    @property
    def own_defaults(self):
        """The model's sampling defaults: the family's, overridden by the config's
        ``sampling:``, overridden by a few-step distillate's that the checkpoint's or the
        UNet's file name tells (``ldm.families.distilled``)."""
        family = dict(self.family.defaults) if self.family is not None else {}
        return {**family, **sampling_defaults(self.config, self.config_path),
                **self.named_defaults()}

    def named_defaults(self, log_it=False):
        """The sampling defaults the checkpoint's or the UNet's file name tells (a few-step
        distillate), unless the model is a consistency model with a guidance embedding,
        whose config says them (a name saying LCM then tells nothing more)."""
        if self.geometry.guidance_embedded:
            return {}
        return distillate_defaults([self.ckpt, self.unet], log_it)

    @property
    def defaults(self):
        """The run's sampling defaults: the model's, then a distillate LoRA's."""
        return {**self.own_defaults, **distillate_defaults(self.loras)}


def distillate_defaults(paths, log_it=False):
    """The sampling defaults of the first few-step distillate among the files ``paths``
    ({} for none); one it cannot run is a CheckpointError in one line."""
    found = families.distilled.find(paths)
    if found is None:
        return {}
    if found.refusal:
        raise CheckpointError(found.refusal)
    if log_it:
        log.warning("%s", found.phrase)   # it changes the defaults: said as the Turbo name is
    return dict(found.defaults)


def choose_model(ckpt=None, config=None, task="txt2img"):
    """The ``ModelChoice`` for ``ckpt`` and ``config`` (either may be None).

    No ``ckpt``: SD v1 at ``SD_CKPT`` if present (for ``task="inpaint"``, SD's inpainting
    model at ``SD_INPAINTING_CKPT`` first, then the built-in inpainting model), else the
    built-in model; a ``config`` given alone must then be the built-in model's (or SD's,
    with SD installed): any other says which checkpoint it needs. ``ckpt`` may name a
    built-in model (``BUILTIN_NAMES``: "builtin", "builtin-fast", "builtin-inpainting",
    "builtin-inpainting-fast"). The config: ``config``,
    else ``config.yaml`` beside the checkpoint, else the one of the family and variant
    detected from the checkpoint's keys and shapes (``ldm.families``). A file that clearly
    is no model this project runs (an SDXL checkpoint, a LoRA) is refused in one line
    here, before any weights are read; one of no known kind gets SD v1's config (or its
    inpainting config for a 9-channel UNet), and the strict load says what does not fit."""
    builtin = False
    inpainting_builtin = sorted(BUILTIN_INPAINTING_DIR.glob("*.safetensors"))
    if ckpt is None:
        if task == "inpaint" and SD_INPAINTING_CKPT.exists():
            ckpt, name = SD_INPAINTING_CKPT, "Stable Diffusion v1 inpainting"
        elif task == "inpaint" and inpainting_builtin and config is None:
            ckpt, name, builtin = inpainting_builtin[0], "the built-in shapes inpainting model", True
        elif SD_CKPT.exists():
            ckpt, name = SD_CKPT, "Stable Diffusion v1"
        else:
            found = sorted(BUILTIN_DIR.glob("*.safetensors"))
            if not found:
                raise ModelNotFound(f"no model found: {INSTALL_HINT}")
            ckpt, name, builtin = found[0], "the built-in shapes model", True
            if config is not None and not _same_file(config, BUILTIN_DIR / "config.yaml"):
                raise ModelNotFound(
                    f"--config {config} needs the checkpoint it describes: pass it with "
                    f"--ckpt (none at models/ldm/stable-diffusion-v1/model.ckpt; the "
                    f"built-in model has its own config)")
    elif str(ckpt) in BUILTIN_NAMES and not Path(ckpt).exists():
        folder, name = BUILTIN_NAMES[str(ckpt)]
        found = sorted(folder.glob("*.safetensors"))
        if not found:
            raise ModelNotFound(f"--ckpt {ckpt}: {name} is not installed here (no "
                                f"{folder.relative_to(ROOT)}/model.safetensors)")
        ckpt, builtin = found[0], True
    else:
        ckpt, name = Path(ckpt), str(ckpt)
        source.sniff(ckpt)
        # the built-in models named by their path (or a copy) are still the built-in ones:
        # they draw nothing a safety checker looks for
        builtin = any(_same_weights(ckpt, f) for folder, _ in BUILTIN_NAMES.values()
                      for f in sorted(folder.glob("*.safetensors")))
    family = variant = None
    if config is None:
        beside = Path(ckpt).parent / "config.yaml"
        if Path(ckpt).is_dir():
            beside = Path(ckpt) / "config.yaml"  # a diffusers folder: never its parent's
        if beside.exists():
            config = beside
        else:
            family, variant, config = identify(ckpt)
    config = Path(config)
    if family is None:
        family = families.of_config(config)
    loaded = load_config(config)
    check_targets(loaded, config)
    choice = ModelChoice(Path(ckpt), config, loaded, name, builtin, family, variant)
    choice.defaults  # noqa: B018 - a bad `sampling:` section is reported now
    return choice


def identify(ckpt):
    """(family, variant, config path) of a checkpoint file or diffusers folder, detected from its
    keys and shapes or JSON files (``ldm.families``); (None, None, SD v1's config, or its
    inpainting config for a 9-channel UNet) for one of no known kind, whose strict load
    will say what does not fit; a CheckpointError in one line for one that clearly is no
    model this project runs."""
    path = Path(ckpt)
    if source.is_diffusers_folder(path):
        configs = source.folder_configs(path)
        found = families.detect_folder(*configs)
        if found is None:
            what = families.describe_folder(*configs)
            if what:
                raise CheckpointError(f"{path} is {what}: this project runs "
                                      f"{families.runs()} pipelines")
        return _found(found, configs[1].get("in_channels"))
    from ldm.checkpoint import checkpoint_shapes
    try:
        shapes = checkpoint_shapes(path)
    except CheckpointError:
        return None, None, SD_CONFIG  # the loader says what is wrong with it
    found = families.detect(shapes)
    if found is not None:
        named = found.family.named_variant(found.variant, path.name)
        if named != found.variant:
            found = families.Detected(found.family, named)
            log.warning("%s: its name says it is %s", path.name, found.phrase)
        return _found(found)
    addon = families.addon(list(shapes))
    if addon:
        raise CheckpointError(f"{path} is {addon}")
    generation = families.generation(shapes)
    if generation:
        raise CheckpointError(f"{path} is {generation}: this project runs {families.runs()} "
                              f"checkpoints; pass --config if it is one")
    conv_in = shapes.get(UNET_INPUT_KEY) or ()
    return _found(None, conv_in[1] if len(conv_in) == 4 else None)


def _found(detected, in_channels=None):
    if detected is not None:
        return detected.family, detected.variant, detected.config
    return None, None, SD_INPAINTING_CONFIG if in_channels == 9 else SD_CONFIG


def unet_in_channels(path):
    """The input channels of a checkpoint's UNet (its first convolution), or None."""
    path = Path(path)
    if source.is_diffusers_folder(path):
        return source.folder_configs(path)[1].get("in_channels", 4)
    from ldm.checkpoint import checkpoint_shapes
    try:
        conv_in = checkpoint_shapes(path).get(UNET_INPUT_KEY) or ()
    except CheckpointError:
        return None
    return conv_in[1] if len(conv_in) == 4 else None


def _same_weights(a, b):
    """The same file, a link to it, or a copy (compared only when the sizes agree)."""
    try:
        a, b = Path(a), Path(b)
        if not (a.is_file() and b.is_file()):
            return False
        return a.samefile(b) or (a.stat().st_size == b.stat().st_size
                                 and a.read_bytes() == b.read_bytes())
    except OSError:
        return False


def _same_file(a, b):
    try:
        return Path(a).resolve() == Path(b).resolve() or Path(a).read_bytes() == Path(b).read_bytes()
    except OSError:
        return False

