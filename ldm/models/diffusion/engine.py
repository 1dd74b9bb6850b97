"""SDXL's model (Stability's ``sgm.models.diffusion.DiffusionEngine``), built from its
configs as they are: ``network_config`` (the UNet, ``model.diffusion_model.*``),
``first_stage_config`` (the autoencoder, ``first_stage_model.*``), ``conditioner_config``
(``conditioner.embedders.N.*``: the text encoders and size embedders) and
``denoiser_config`` (the noise schedule and what the UNet predicts). Inference only: the
sampler, loss and optimizer configs are kept in ``training_config`` and not built.

It is a ``LatentDiffusion`` (samplers, guidance, the three tasks and the noise model work
on it unchanged) whose text conditioning is the conditioner: ``cond_stage_model`` names it
for the code that serves every family, and ``conditioning`` gives the UNet's vector
beside the cross-attention states.
"""
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.util import instantiate_from_config

# sgm's discretisation and scaling classes -> what they mean here
SCALINGS = {"EpsScaling": "eps", "VScaling": "v"}
DISCRETIZATIONS = ("LegacyDDPMDiscretization",)


def _denoiser(config):
    """(parameterization, timesteps, linear_start, linear_end) of sgm's
    ``DiscreteDenoiser`` config: ``LegacyDDPMDiscretization`` is SD's scaled-linear betas
    (0.00085 to 0.012 over 1000 steps unless given), ``EpsScaling``/``VScaling`` say
    whether the UNet predicts the noise or v."""
    params = dict(config.get("params") or {})
    scaling = str(params.get("scaling_config", {}).get("target", "")).rsplit(".", 1)[-1]
    disc = params.get("discretization_config", {})
    disc_name = str(disc.get("target", "")).rsplit(".", 1)[-1]
    if scaling not in SCALINGS:
        raise ValueError(f"denoiser scaling {scaling or 'missing'!r} is not supported (supported: "
                         f"{', '.join(SCALINGS)})")
    if disc_name not in DISCRETIZATIONS:
        raise ValueError(f"denoiser discretization {disc_name or 'missing'!r} is not supported "
                         f"(supported: {', '.join(DISCRETIZATIONS)})")
    dp = dict(disc.get("params") or {})
    return (SCALINGS[scaling], int(params.get("num_idx", dp.get("num_timesteps", 1000))),
            float(dp.get("linear_start", 0.00085)), float(dp.get("linear_end", 0.0120)))


class DiffusionEngine(LatentDiffusion):
    """sgm's parameters; ``size_defaults`` (ours) are the conditioner's inputs when a
    request gives none: the native size as original and target size, crop (0, 0),
    aesthetic score 6.0 (diffusers' defaults)."""

    def __init__(self, network_config, denoiser_config, first_stage_config, conditioner_config,
                 scale_factor=1.0, disable_first_stage_autocast=False, image_size=128,
                 zero_terminal_snr=False, force_zeros_for_empty_prompt=None,
                 **training_kwargs):
        parameterization, timesteps, start, end = _denoiser(denoiser_config)
        unet = network_config.get("params", {})
        in_channels, channels = unet.get("in_channels", 4), unet.get("out_channels", 4)
        super().__init__(network_config, first_stage_config, None, timesteps=timesteps,
                         channels=channels,
                         linear_start=start, linear_end=end, parameterization=parameterization,
                         zero_terminal_snr=zero_terminal_snr, scale_factor=scale_factor,
                         conditioning_key="hybrid" if in_channels == 9 else "crossattn",
                         image_size=image_size, **training_kwargs)
        self.disable_first_stage_autocast = disable_first_stage_autocast
        self.conditioner = instantiate_from_config(conditioner_config)
        self.conditioner.freeze()
        # an empty negative prompt conditions on zeros: the base model's convention (sgm's
        # force_uc_zero_embeddings, diffusers' force_zeros_for_empty_prompt), not the
        # refiner's (one text encoder); a config may say otherwise
        if force_zeros_for_empty_prompt is None:
            force_zeros_for_empty_prompt = len(self.conditioner.text_embedders) > 1
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)

    @property
    def cond_stage_model(self):
        """The text conditioning, by the name the rest of the code uses for every family."""
        return self.conditioner

    def size_values(self, height=None, width=None, original=None, crop=None, target=None,
                    aesthetic=None, negative=False):
        """The conditioner's non-text inputs {input_key: [1, d]} for an image of
        ``height`` x ``width`` (None: the native size): ``original`` and ``target`` sizes
        (default: the image's, as diffusers), ``crop`` top-left (default (0, 0)),
        ``aesthetic`` score (default 6.0, for the ``negative`` prompt 2.5: diffusers')."""
        native = self.image_size * self.latent_downsampling_factor
        size = (height or native, width or native)
        known = {"original_size_as_tuple": original or size,
                 "crop_coords_top_left": crop or (0, 0), "target_size_as_tuple": target or size,
                 "aesthetic_score": ((2.5 if negative else 6.0) if aesthetic is None
                                     else aesthetic,)}
        values = {}
        for key in self.conditioner.value_keys:
            if key not in known:
                raise ValueError(f"the conditioner's input {key!r} is not supported")
            values[key] = [list(map(float, known[key]))]
        return values

    def conditioning(self, prompts, values=None, negative=False):
        """{"crossattn", "vector"} of the prompts, with ``values`` (``size_values``; None:
        the defaults at the native size). ``negative``: they are negative prompts, the
        empty ones zeros (``force_zeros_for_empty_prompt``)."""
        zero = ([p == "" for p in prompts]
                if negative and self.force_zeros_for_empty_prompt else None)
        return self.conditioner.conditioning(prompts, values or self.size_values(), zero)

