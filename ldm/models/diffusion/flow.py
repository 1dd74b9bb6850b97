"""Latent rectified flow (Esser et al. 2024; Stable Diffusion 3 and 3.5): the MMDiT
(``model.diffusion_model.*``) + the 16-channel autoencoder (``first_stage_model.*``) +
three text encoders (``text_encoders.{clip_l, clip_g, t5xxl}.transformer.*``), the key
prefixes of Stability's single files.

It stands where a ``LatentDiffusion`` stands for the samplers, guidance and the three
tasks: the same stage methods, with rectified flow's noise model (``noise_model.FLOW``:
the network predicts the velocity eps - x0) and schedule (``noise_model.FlowSchedule``,
with the timestep shift) in place of the DDPM ones. The latents are the autoencoder's
shifted and scaled: (z - 0.0609) * 1.5305 for SD 3.
"""
import logging

import torch
from torch import nn

from ldm.models.diffusion.ddpm import DiffusionWrapper, LatentDiffusion
from ldm.models.diffusion.noise_model import FlowSchedule
from ldm.util import instantiate_from_config

log = logging.getLogger(__name__)

TEXT = "text_encoders."
# what Stability's and others' files carry beside the weights we build, dropped before the
# strict load: T5's second (tied) copy of its token table, CLIP's position-id buffers and
# logit scales
EXTRA = ("t5xxl.transformer.encoder.embed_tokens.weight",
         "clip_l.transformer.text_model.embeddings.position_ids",
         "clip_g.transformer.text_model.embeddings.position_ids",
         "clip_l.logit_scale", "clip_g.logit_scale")


# a key each separate text encoder file has (transformers' names), and what it is
SIGNATURE = {"clip_l": "text_model.final_layer_norm.weight",
             "clip_g": "text_model.final_layer_norm.weight", "t5xxl": "shared.weight"}
WHAT = {"clip_l": "a CLIP text encoder", "clip_g": "a CLIP text encoder",
        "t5xxl": "a T5 encoder"}


class RectifiedFlow(LatentDiffusion):
    """``network_config`` (the MMDiT), ``first_stage_config`` (the autoencoder),
    ``text_encoders_config`` (``ldm.modules.encoders.sd3.SD3TextEncoders``); ``shift``:
    the schedule's timestep shift (3.0: SD 3 and 3.5); ``scale_factor`` and
    ``shift_factor``: the latents' (SD 3: 1.5305, 0.0609); ``image_size``: the latent side
    it was trained at (128: 1,024 pixels)."""

    def __init__(self, network_config, first_stage_config, text_encoders_config, shift=3.0,
                 scale_factor=1.5305, shift_factor=0.0609, timesteps=1000, image_size=128,
                 **training_kwargs):
        nn.Module.__init__(self)
        self.parameterization = "flow"
        self.image_size, self.num_timesteps = image_size, int(timesteps)
        net = network_config.get("params") or {}
        self.channels = net.get("out_channels") or net.get("in_channels", 16)
        self.scale_factor, self.shift_factor = scale_factor, shift_factor
        self.flow_shift = float(shift)
        self.training_config = training_kwargs
        self.model = DiffusionWrapper(network_config, "crossattn")
        self.first_stage_model = instantiate_from_config(first_stage_config)
        self.first_stage_model.eval()
        self.text_encoders = instantiate_from_config(text_encoders_config)
        self.text_encoders.freeze()
        for p in self.first_stage_model.parameters():
            p.requires_grad = False
        self.register_buffer("sigmas", self.schedule.sigmas.float(), persistent=False)

    @property
    def device(self):
        return self.sigmas.device

    @property
    def schedule(self):
        return FlowSchedule(self.flow_shift, self.num_timesteps)

    @property
    def cond_stage_model(self):
        """The text conditioning, by the name the rest of the code uses for every family."""
        return self.text_encoders

    # -- the stages -----------------------------------------------------------------------
    def encode_image(self, x, tile=None):
        """Image in [-1, 1] -> latents: (the posterior's mean - shift) * scale."""
        return (self.encode_first_stage(x, tile).mode() - self.shift_factor) * self.scale_factor

    def get_first_stage_encoding(self, posterior, generator=None):
        return (posterior.sample(generator) - self.shift_factor) * self.scale_factor

    def decode_first_stage(self, z, tile=None):
        return self.first_stage_model.decode(z / self.scale_factor + self.shift_factor, tile)

    def conditioning(self, prompts, values=None, negative=False):
        """{"crossattn": CLIP-L, CLIP-G and T5 states, "vector": the pooled CLIP
        embeddings} (``SD3TextEncoders.conditioning``); an empty negative prompt is encoded
        as any other, as Stability and diffusers do."""
        return self.text_encoders.conditioning(list(prompts))

    def apply_model(self, x_noisy, t, cond, c_concat=None, skip_layers=()):
        """The MMDiT's velocity (float32); ``skip_layers``: blocks left out (skip-layer
        guidance)."""
        if not skip_layers:
            return super().apply_model(x_noisy, t, cond, c_concat)
        return self.model.diffusion_model(x_noisy, t, cond["crossattn"], cond["vector"],
                                          skip_layers=tuple(skip_layers)).float()

    def q_sample(self, x_start, t, noise):
        raise ValueError("a rectified-flow model has no DDPM timesteps: use a sigma sampler")

    def eps_from_output(self, x_t, t, output):
        raise ValueError("a rectified-flow model has no DDPM timesteps: use a sigma sampler")

    # -- weights --------------------------------------------------------------------------
    def prepare_weights(self, sd, files=None):
        """A checkpoint's state dict made whole for a strict load. ``files``: the
        ``--clip_l``/``--clip_g``/``--t5xxl`` files ({"clip_l": path, ...}: bare encoders,
        or under any of our prefixes), which fill or replace the checkpoint's, and
        ``t5_tokenizer`` (``ldm.modules.encoders.t5.find_tokenizer``). The keys in
        ``EXTRA`` are dropped; a CLIP-L without ``text_projection`` gets the identity
        (Stability's reference leaves CLIP-L's pooled output unprojected). Without T5
        weights or its tokenizer the model runs without T5 (said in one line); without a
        CLIP encoder, a CheckpointError says which flag gives it."""
        from ldm.checkpoint import load_state_dict_file
        from ldm.errors import CheckpointError
        from ldm.modules.encoders.t5 import find_tokenizer
        files = dict(files or {})
        tokenizer_path = files.pop("t5_tokenizer", None)
        for name, path in files.items():
            prefix = f"{TEXT}{name}.transformer."
            sd = {k: v for k, v in sd.items() if not k.startswith(prefix)}
            given = {}
            for k, v in load_state_dict_file(path).items():
                for known in (prefix, f"{name}.transformer.", "transformer."):
                    if k.startswith(known):
                        k = k[len(known):]
                        break
                given[prefix + k] = v
            if prefix + SIGNATURE[name] not in given:
                raise CheckpointError(f"--{name} {path} does not hold {WHAT[name]} (no "
                                      f"{SIGNATURE[name]}): give the file of that encoder")
            sd.update(given)
        sd = {k: v for k, v in sd.items() if not (k.startswith(TEXT) and k[len(TEXT):] in EXTRA)}
        for name, file in (("clip_l", "clip_l.safetensors"), ("clip_g", "clip_g.safetensors")):
            if not any(k.startswith(f"{TEXT}{name}.") for k in sd):
                raise CheckpointError(f"the checkpoint has no {name.upper().replace('_', '-')} "
                                      f"text encoder: give it with --{name} FILE (Stability's "
                                      f"text_encoders/{file})")
        projection = f"{TEXT}clip_l.transformer.text_projection.weight"
        clip_l = f"{TEXT}clip_l.transformer.text_model.final_layer_norm.weight"
        if clip_l in sd and projection not in sd:
            sd[projection] = torch.eye(sd[clip_l].shape[0], dtype=sd[clip_l].dtype)
        encoders, t5 = self.text_encoders, f"{TEXT}t5xxl."
        if encoders.t5xxl is not None:
            if not any(k.startswith(t5) for k in sd):
                log.warning("no T5-XXL weights (none in the checkpoint, no --t5xxl): SD 3 "
                            "runs on its two CLIP encoders, T5's part zeros")
                encoders.drop_t5()
            elif (tokenizer := find_tokenizer(tokenizer_path)) is None:
                log.warning("T5-XXL's tokenizer is not here: SD 3 runs without T5 (give "
                            "--t5_tokenizer, a diffusers folder's tokenizer_3/, or put "
                            "spiece.model in models/t5/)")
                encoders.drop_t5()
            else:
                rows = sd[f"{t5}transformer.shared.weight"].shape[0]
                if tokenizer.size > rows:
                    raise CheckpointError(f"T5's tokenizer {tokenizer.path} has "
                                          f"{tokenizer.size:,} tokens, its weights {rows:,}: "
                                          "give the tokenizer of these weights (--t5_tokenizer)")
                encoders.t5xxl.tokenizer = tokenizer
        if encoders.t5xxl is None:   # its weights, if any, are not loaded
            sd = {k: v for k, v in sd.items() if not k.startswith(t5)}
        return sd
