"""Latent diffusion (Rombach et al. 2022): UNet + autoencoder + text encoder, inference core.

Plain ``nn.Module`` with the CompVis method names; training lives in ``ldm.lightning``.
Attribute names (``model.diffusion_model``, ``first_stage_model``, ``cond_stage_model``) are
the checkpoint's key prefixes.
"""
import logging
from contextlib import contextmanager

import torch
from torch import nn

from ldm.errors import CheckpointError
from ldm.models.diffusion.noise_model import PREDICTIONS, DiscreteSchedule
from ldm.modules.diffusionmodules.util import make_beta_schedule, rescale_zero_terminal_snr
from ldm.util import instantiate_from_config

log = logging.getLogger(__name__)

# Buffers CompVis stores in checkpoints. Ours are derived from the config (non-persistent);
# the loader drops these names from a checkpoint after checking they agree.
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2")


class DiffusionWrapper(nn.Module):
    """Holds the UNet as ``diffusion_model`` (key prefix ``model.diffusion_model.``) and
    gives it a conditioning dict, as sgm's ``OpenAIWrapper``: ``crossattn`` (the text
    encoder's states, attended to), ``concat`` (channels put beside the latents: an
    inpainting model's mask and masked-image latents) and ``vector`` (SDXL's pooled text
    embedding and size conditioning, the UNet's ADM input ``y``) and ``guidance`` (a
    consistency model's guidance-scale embedding). ``conditioning_key`` is CompVis':
    "crossattn", "hybrid" for crossattn + concat, or Stability's "hybrid-adm" for those and
    the ADM input (the x4 upscaler's noise level as a class label)."""

    def __init__(self, diff_model_config, conditioning_key):
        super().__init__()
        if conditioning_key not in ("crossattn", "hybrid", "hybrid-adm"):
            raise ValueError(f"conditioning_key {conditioning_key!r} is not supported "
                             "(supported: 'crossattn', 'hybrid', 'hybrid-adm')")
        self.diffusion_model = instantiate_from_config(diff_model_config)
        self.conditioning_key = conditioning_key
        # ControlNets (``ldm.controlnet.ControlUnit``, a plain list: not part of the model's
        # weights) and the sampling step they are at ({"step", "steps"}), set by the pipeline
        self.controls = []
        self.control_progress = None

    def forward(self, x, t, cond):
        latents = x
        if "concat" in cond:
            x = torch.cat([x, cond["concat"]], dim=1)
        extra = {}
        if "vector" in cond:
            extra["y"] = cond["vector"]
        if "guidance" in cond:
            extra["guidance"] = cond["guidance"]
        if "hint" in cond and self.controls:
            from ldm.modules.diffusionmodules.controlnet import control_residuals
            extra["control"] = control_residuals(self.controls, self.control_progress,
                                                 latents, t, cond)
        return self.diffusion_model(x, t, context=cond.get("crossattn"), **extra)


class LatentDiffusion(nn.Module):
    def __init__(self, unet_config, first_stage_config, cond_stage_config, timesteps=1000,
                 beta_schedule="linear", linear_start=1e-4, linear_end=2e-2, cosine_s=8e-3,
                 given_betas=None, parameterization="eps", zero_terminal_snr=False,
                 scale_factor=1.0,
                 conditioning_key="crossattn", cond_stage_trainable=False, image_size=256,
                 channels=3, first_stage_key="image", cond_stage_key="image",
                 **training_kwargs):
        """Parameters are CompVis'; ``training_kwargs`` (``monitor``, ``use_ema``,
        ``scheduler_config``, ``log_every_t``, ...) are accepted for config compatibility and
        kept in ``self.training_config`` for the trainer. ``zero_terminal_snr`` (ours) rescales
        the betas so that t = T is pure noise (``rescale_zero_terminal_snr``); v models only."""
        super().__init__()
        if parameterization not in PREDICTIONS:
            raise ValueError(f"parameterization must be one of {sorted(PREDICTIONS)}, got "
                             f"{parameterization!r}")
        if zero_terminal_snr and parameterization != "v":
            raise ValueError("zero_terminal_snr needs parameterization: v (a noise prediction "
                             "says nothing about the image when there is no signal)")
        self.parameterization = parameterization
        self.linear_start, self.linear_end = linear_start, linear_end   # the betas' ends
        self.image_size = image_size  # latent size the model was trained at
        self.channels = channels      # latent channels
        self.first_stage_key, self.cond_stage_key = first_stage_key, cond_stage_key
        self.cond_stage_trainable = cond_stage_trainable
        self.scale_factor = scale_factor
        self.training_config = training_kwargs
        self.model = DiffusionWrapper(unet_config, conditioning_key)
        self.first_stage_model = instantiate_from_config(first_stage_config)
        self.first_stage_model.eval()
        for p in self.first_stage_model.parameters():
            p.requires_grad = False
        if cond_stage_config is not None:   # None: a subclass builds its own (SDXL's)
            self.cond_stage_model = instantiate_from_config(cond_stage_config)
            if not cond_stage_trainable and hasattr(self.cond_stage_model, "freeze"):
                self.cond_stage_model.freeze()
        betas = given_betas if given_betas is not None else make_beta_schedule(
            beta_schedule, timesteps, linear_start, linear_end)
        betas = torch.as_tensor(betas, dtype=torch.float64, device="cpu")
        self.register_schedule(rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas)

    def register_schedule(self, betas):
        """The DDPM forward-process quantities (Ho et al. 2020, eqs. 4, 6, 7), in float32."""
        self.num_timesteps = len(betas)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        posterior_variance = betas * (1.0 - prev) / (1.0 - alphas_cumprod)
        values = {
            "betas": betas, "alphas_cumprod": alphas_cumprod, "alphas_cumprod_prev": prev,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
            "log_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).log(),
            "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1).sqrt(),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
            "posterior_mean_coef1": betas * prev.sqrt() / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod),
        }
        for name in SCHEDULE_BUFFERS:
            self.register_buffer(name, values[name].float(), persistent=False)

    @property
    def device(self):
        return self.betas.device

    @property
    def latent_downsampling_factor(self):
        return self.first_stage_model.downsampling_factor

    # -- the three stages ---------------------------------------------------------------
    def get_learned_conditioning(self, prompts):
        return self.cond_stage_model.encode(prompts)

    def encode_first_stage(self, x, tile=None):
        return self.first_stage_model.encode(x, tile)

    def get_first_stage_encoding(self, posterior, generator=None):
        return self.scale_factor * posterior.sample(generator)

    def encode_image(self, x, tile=None):
        """Image [B, 3, H, W] in [-1, 1] -> latents: the posterior's mean times
        ``scale_factor`` (deterministic; CompVis and diffusers draw a sample instead).
        ``tile``: in tiles of that many latent pixels (``AutoencoderKL.encode``)."""
        return self.scale_factor * self.encode_first_stage(x, tile).mode()

    def decode_first_stage(self, z, tile=None):
        return self.first_stage_model.decode(z / self.scale_factor, tile)

    @property
    def guidance_embedded(self):
        """Whether the UNet takes the guidance scale as an embedding (a latent consistency
        model with ``time_cond_proj_dim``) instead of classifier-free guidance."""
        return bool(getattr(self.model.diffusion_model, "time_cond_proj_dim", None))

    def guidance_condition(self, scale, batch):
        """{"guidance": [batch, d]}: the embedding of guidance ``scale`` for such a UNet."""
        from ldm.modules.diffusionmodules.util import guidance_embedding
        emb = guidance_embedding([float(scale)] * batch,
                                 self.model.diffusion_model.time_cond_proj_dim)
        return {"guidance": emb.to(self.device)}

    def conditioning(self, prompts, values=None, negative=False):
        """The conditioning dict of prompts: ``crossattn``, the text encoder's states
        (``get_learned_conditioning``). A task adds its own keys (inpainting: ``concat``).
        ``values`` (``size_values``) and ``negative`` mean nothing to SD 1/2: their
        conditioning is the text alone (SDXL's is not: ``DiffusionEngine``)."""
        return {"crossattn": self.get_learned_conditioning(prompts)}

    def size_values(self, height=None, width=None, original=None, crop=None, target=None,
                    aesthetic=None, negative=False):
        """The conditioning's inputs besides the prompt: none for SD 1/2."""
        return None

    def inpainting_concat(self, mask, masked_image_latents):
        """An inpainting UNet's extra input (``conditioning_key: hybrid``): the latent-sized
        mask and the masked image's latents."""
        return torch.cat([mask, masked_image_latents], dim=1)

    def apply_model(self, x_noisy, t, cond, c_concat=None):
        """The UNet's raw prediction (eps or v, per ``parameterization``), in float32
        whatever the dtype the UNet computes in (guidance and the sampler's update stay
        float32). ``cond``: a conditioning dict (``conditioning``), or CompVis' form, the
        text states as a tensor with ``c_concat`` beside them."""
        if not isinstance(cond, dict):
            cond = {"crossattn": cond, **({} if c_concat is None else {"concat": c_concat})}
        return self.model(x_noisy, t, cond).float()

    # -- forward process and prediction conversions --------------------------------------
    def _at(self, buffer, t, x):
        return buffer[t].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))

    def q_sample(self, x_start, t, noise):
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (Ho et al. 2020, eq. 4)."""
        return (self._at(self.sqrt_alphas_cumprod, t, x_start) * x_start
                + self._at(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)

    def get_v(self, x, noise, t):
        """v = sqrt(abar) eps - sqrt(1 - abar) x_0 (Salimans & Ho 2022, sec. 4)."""
        return PREDICTIONS["v"].target(x, noise, self._at(self.sqrt_alphas_cumprod, t, x),
                                       self._at(self.sqrt_one_minus_alphas_cumprod, t, x))

    def training_target(self, x0, noise, t):
        """What the UNet is trained to output at x_t = q_sample(x0, t, noise)."""
        return self.prediction.target(x0, noise, self._at(self.sqrt_alphas_cumprod, t, x0),
                                      self._at(self.sqrt_one_minus_alphas_cumprod, t, x0))

    @property
    def prediction(self):
        """The noise model: what the UNet's output is (``noise_model.EPS`` or ``V``)."""
        return PREDICTIONS[self.parameterization]

    @property
    def schedule(self):
        """The noise levels the sigma samplers run on (``noise_model.DiscreteSchedule``)."""
        return DiscreteSchedule(self.alphas_cumprod)

    def eps_from_output(self, x_t, t, output):
        """The model output as a noise prediction, whatever the parameterisation."""
        return self.prediction.eps(x_t, self._at(self.sqrt_alphas_cumprod, t, x_t),
                                   self._at(self.sqrt_one_minus_alphas_cumprod, t, x_t), output)

    def prepare_weights(self, sd, files=None):
        """A checkpoint's state dict as the strict load takes it: as it is (SD 3's text
        encoder files are ``RectifiedFlow``'s)."""
        if files:
            raise CheckpointError(f"--{sorted(files)[0]} is for SD 3's text encoders; this is "
                                  "not an SD 3 model: drop it")
        return sd

    @contextmanager
    def ema_scope(self, context=None):
        """CompVis' context for sampling with the EMA weights. An inference model's weights
        already are the ones to sample with (checkpoints ship the EMA weights as the model's),
        so this changes nothing; it lets CompVis' scripts run unchanged."""
        yield


class LatentInpaintDiffusion(LatentDiffusion):
    """Stable Diffusion inpainting (RunwayML's ``sd-v1-5-inpainting``): ``conditioning_key:
    hybrid``, the UNet's input being ``[x, mask, masked-image latents]`` (4 + 1 + 4
    channels for SD), the mask 1 where to repaint. The other parameters are
    ``LatentDiffusion``'s; RunwayML's training-only ones (``finetune_keys``, ...) are kept
    in ``training_config``."""

    def __init__(self, *args, concat_keys=("mask", "masked_image"),
                 masked_image_key="masked_image", **kwargs):
        super().__init__(*args, **kwargs)
        if self.model.conditioning_key != "hybrid":
            raise ValueError("LatentInpaintDiffusion needs conditioning_key: hybrid")
        unet_in = self.model.diffusion_model.in_channels
        if unet_in != 2 * self.channels + 1:
            raise ValueError(f"an inpainting UNet takes {2 * self.channels + 1} input channels "
                             f"(latents, mask, masked-image latents), not {unet_in}")
        self.concat_keys, self.masked_image_key = tuple(concat_keys), masked_image_key


class LatentUpscaleDiffusion(LatentDiffusion):
    """The SD x4 upscaler (Stability's ``x4-upscaler-ema``, ``x4-upscaling.yaml``):
    ``conditioning_key: hybrid-adm``, the UNet's input ``[x, the low-resolution image noised
    by low_scale_model]`` (4 + 3 channels; the latents are the low-resolution image's size,
    the f4 autoencoder decoding them to 4x), the noise level as its class label. The other
    parameters are ``LatentDiffusion``'s."""

    def __init__(self, *args, low_scale_config, low_scale_key="LR", noise_level_key=None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        if self.model.conditioning_key != "hybrid-adm":
            raise ValueError("LatentUpscaleDiffusion needs conditioning_key: hybrid-adm")
        self.low_scale_model = instantiate_from_config(low_scale_config)
        self.low_scale_key, self.noise_level_key = low_scale_key, noise_level_key

    @property
    def max_noise_level(self):
        return self.low_scale_model.max_noise_level

    def upscale_condition(self, image, noise_level, noise):
        """The UNet's extra inputs for a low-resolution ``image`` [B, 3, h, w] in [-1, 1]:
        {"concat": it noised to ``noise_level`` with ``noise``, "vector": the level}."""
        noised, level = self.low_scale_model(image, noise_level, noise)
        return {"concat": noised, "vector": level}
