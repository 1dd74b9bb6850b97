"""The SD denoising UNet (OpenAI's ADM UNet with cross-attention), CompVis key names.

Attribute paths equal the ``model.diffusion_model.*`` keys of official checkpoints, including
the positional slots of ``nn.Sequential`` (activations and Dropout) that those keys count.
"""
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.util import (Conv2d, normalization, timestep_embedding,
                                                zero_module)


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential that hands the timestep embedding to ResBlocks and the context to
    SpatialTransformers."""

    def forward(self, x, emb, context=None, output_size=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, output_size)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    def __init__(self, channels, use_conv=True, out_channels=None):
        super().__init__()
        self.conv = Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x, output_size=None):
        """Nearest 2x upsampling, or to ``output_size`` (the skip connection's size) so that
        latents whose sides are not multiples of 8 work too (CompVis would fail on them)."""
        if output_size is None:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        else:
            x = F.interpolate(x, size=output_size, mode="nearest")
        return self.conv(x)


class Downsample(nn.Module):
    def __init__(self, channels, use_conv=True, out_channels=None):
        super().__init__()
        self.op = Conv2d(channels, out_channels or channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class ResBlock(nn.Module):
    """Residual block with an additive timestep embedding (Ho et al. 2020, ADM)."""

    def __init__(self, channels, emb_channels, dropout=0.0, out_channels=None):
        super().__init__()
        out_channels = out_channels or channels
        # Index slots (norm 0, SiLU 1, conv 2 / SiLU 0, Linear 1 / norm 0, SiLU 1, Dropout 2,
        # conv 3) are kept for checkpoint compatibility.
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(),
                                       Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            normalization(out_channels), nn.SiLU(), nn.Dropout(dropout),
            zero_module(Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else Conv2d(channels, out_channels, 1))

    def forward(self, x, emb):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[..., None, None]
        return self.skip_connection(x) + self.out_layers(h)


class UNetModel(nn.Module):
    """eps/v-predicting UNet: ``forward(x, timesteps, context) -> prediction`` (same shape as x).

    Accepts the CompVis and Stability (``sgm``) config parameters; ``num_heads`` fixes the
    head count unless ``num_head_channels`` (SD 2.x, SDXL) fixes the width per head
    instead. SDXL's: ``transformer_depth`` per level (a list; the middle block takes the
    last level's unless ``transformer_depth_middle`` says), ``context_dim`` as a list of
    one width (the refiner's), and
    ``num_classes: sequential`` with ``adm_in_channels``: a vector ``y`` (the pooled text
    embedding and the size conditioning) through ``label_emb``, added to the timestep
    embedding. ``spatial_pos_emb`` (ours, for small models trained from scratch) gives the
    transformers pixel coordinates: ``true``/``"zero"`` zero-initialised, ``"random"``
    randomly (``SpatialTransformer``). ``time_cond_proj_dim`` (diffusers' name; latent
    consistency models with a guidance embedding): the guidance scale's embedding
    (``guidance_embedding``) is projected by ``time_embedding.cond_proj`` (the key
    diffusers' converter to the original layout leaves it under) and added to the
    timestep's before ``time_embed``. ``forward(control=...)``: a ControlNet's residuals
    (``ldm.modules.diffusionmodules.controlnet``), one added to each skip connection and
    the last to the middle block's output, as cldm's ``ControlledUnetModel`` and diffusers'
    ``down_block_additional_residuals`` do. ``use_checkpoint``, ``use_fp16`` and
    ``spatial_transformer_attn_type`` (training and kernel choices) are accepted and
    ignored.
    """

    def __init__(self, image_size=None, in_channels=4, model_channels=320, out_channels=4,
                 num_res_blocks=2,
                 attention_resolutions=(), dropout=0.0, channel_mult=(1, 2, 4, 8),
                 conv_resample=True, dims=2, num_classes=None, use_checkpoint=False,
                 use_fp16=False, num_heads=-1, num_head_channels=-1, num_heads_upsample=-1,
                 use_scale_shift_norm=False, resblock_updown=False, use_new_attention_order=False,
                 use_spatial_transformer=None, transformer_depth=1, context_dim=None,
                 n_embed=None, legacy=True, use_linear_in_transformer=False,
                 disable_self_attentions=None, num_attention_blocks=None, spatial_pos_emb=False,
                 adm_in_channels=None, transformer_depth_middle=None,
                 spatial_transformer_attn_type=None, disable_middle_self_attn=False,
                 disable_middle_transformer=False, time_cond_proj_dim=None):
        params = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        self.params = params   # what built it (a ControlNet copies its encoder from them)
        levels = len(channel_mult)
        if isinstance(transformer_depth, int):
            transformer_depth = [transformer_depth] * levels
        if len(transformer_depth) != levels:
            raise ValueError(f"transformer_depth needs one value per level of channel_mult "
                             f"({levels}), got {list(transformer_depth)}")
        if transformer_depth_middle is None:
            transformer_depth_middle = transformer_depth[-1]
        if context_dim is not None and not isinstance(context_dim, int):
            # sgm's list is per transformer block (the refiner's [1280] * 4): one width here
            if len(set(context_dim)) != 1:
                raise ValueError(f"context_dim of different widths {list(context_dim)} is not "
                                 f"supported")
            context_dim = list(context_dim)[0]
        unsupported = {"dims != 2": dims != 2,
                       "disable_middle_self_attn": disable_middle_self_attn,
                       "disable_middle_transformer": disable_middle_transformer,
                       "num_classes other than a count or 'sequential'": not (
                           num_classes in (None, "sequential") or isinstance(num_classes, int)),
                       "num_classes: sequential without adm_in_channels": (
                           num_classes == "sequential" and not adm_in_channels),
                       "use_scale_shift_norm": use_scale_shift_norm,
                       "resblock_updown": resblock_updown, "n_embed": n_embed is not None,
                       "use_spatial_transformer=False": use_spatial_transformer is False,
                       "num_attention_blocks": num_attention_blocks is not None,
                       "disable_self_attentions not one per level": (
                           disable_self_attentions is not None
                           and len(disable_self_attentions) != len(channel_mult))}
        bad = [name for name, on in unsupported.items() if on]
        if bad:
            raise ValueError(f"UNetModel options not supported by this implementation: {bad}")
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("set either num_heads or num_head_channels")
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.channel_mult = tuple(channel_mult)

        def transformer(ch, depth, context, level=None):
            if num_head_channels == -1:
                heads, dim_head = num_heads, ch // num_heads
            else:
                heads, dim_head = ch // num_head_channels, num_head_channels
            cross_only = bool(disable_self_attentions[level]) if (
                disable_self_attentions is not None and level is not None) else False
            return SpatialTransformer(ch, heads, dim_head, depth=depth, dropout=dropout,
                                      context_dim=context, use_linear=use_linear_in_transformer,
                                      pos_emb=spatial_pos_emb, disable_self_attn=cross_only)

        emb_dim = model_channels * 4
        # time_embed.1 is the SiLU slot between the two Linear layers.
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(),
                                        nn.Linear(emb_dim, emb_dim))
        self.time_cond_proj_dim = None
        if time_cond_proj_dim:
            self.add_guidance_projection(time_cond_proj_dim)
        self.adm_in_channels = adm_in_channels if num_classes == "sequential" else None
        if self.adm_in_channels:   # label_emb.0.{0,2}: sgm's Sequential in a Sequential
            self.label_emb = nn.Sequential(nn.Sequential(
                nn.Linear(adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)))
        self.num_classes = num_classes if isinstance(num_classes, int) else None
        if self.num_classes:   # class labels (the x4 upscaler's noise level): an embedding
            self.label_emb = nn.Embedding(num_classes, emb_dim)

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(
            Conv2d(in_channels, model_channels, 3, padding=1))])
        skip_channels = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, emb_dim, dropout, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(transformer(ch, transformer_depth[level], context_dim,
                                              level))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2

        self.skip_widths = tuple(skip_channels)   # each input block's output channels
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, dropout),
            transformer(ch, transformer_depth_middle, context_dim),
            ResBlock(ch, emb_dim, dropout))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, dropout,
                                   model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(transformer(ch, transformer_depth[level], context_dim,
                                              level))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        # out.1 is the SiLU slot.
        self.out = nn.Sequential(normalization(ch), nn.SiLU(),
                                 zero_module(Conv2d(model_channels, out_channels, 3, padding=1)))

    def add_guidance_projection(self, dim):
        """Make this UNet take the guidance scale as a ``dim``-wide embedding
        (``time_embedding.cond_proj``, weights to be loaded): also a latent consistency
        model's UNet given by ``--unet`` to the model it was distilled from."""
        ref = self.time_embed[0].weight
        self.time_embedding = nn.Module()
        self.time_embedding.cond_proj = nn.Linear(dim, self.model_channels, bias=False,
                                                  device=ref.device, dtype=ref.dtype)
        self.time_cond_proj_dim = dim

    @property
    def downsampling_factor(self):
        return 2 ** (len(self.channel_mult) - 1)

    def forward(self, x, timesteps, context=None, y=None, guidance=None, control=None):
        t_emb = timestep_embedding(timesteps, self.model_channels).to(x.dtype)
        if self.time_cond_proj_dim:
            if guidance is None or guidance.shape[-1] != self.time_cond_proj_dim:
                raise ValueError(f"this UNet (a consistency model) takes its guidance scale as "
                                 f"a {self.time_cond_proj_dim}-wide embedding, got "
                                 f"{None if guidance is None else tuple(guidance.shape)}")
            t_emb = t_emb + self.time_embedding.cond_proj(guidance.to(t_emb.dtype))
        emb = self.time_embed(t_emb)
        if self.adm_in_channels:
            if y is None or y.shape[-1] != self.adm_in_channels:
                raise ValueError(f"this UNet takes a {self.adm_in_channels}-wide vector y "
                                 f"(its ADM input), got {None if y is None else tuple(y.shape)}")
            emb = emb + self.label_emb(y.to(emb.dtype))
        elif self.num_classes:
            if y is None or y.dim() != 1:
                raise ValueError(f"this UNet takes a class label per image (y: [batch] "
                                 f"integers), got {None if y is None else tuple(y.shape)}")
            emb = emb + self.label_emb(y.long()).to(emb.dtype)
        cache = self.feature_cache
        reuse = cache is not None and cache.reuse(x)
        # with a feature cache, only the `keep` shallowest blocks of each side run on the
        # steps that reuse the deep features (DeepCache)
        keep = len(self.input_blocks) if cache is None else cache.branch + 1
        h, skips = x, []
        for block in self.input_blocks[:keep] if reuse else self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        first = len(self.output_blocks) - keep if reuse else 0
        h = cache.features if reuse else self.middle_block(h, emb, context)
        if control is not None:   # a ControlNet's residuals: one per skip, then the middle's
            if cache is not None:
                raise ValueError("a ControlNet's residuals need the whole UNet at every step: "
                                 "no feature cache (DeepCache)")
            h = h + control[-1]
            skips = [s + c for s, c in zip(skips, control[:-1])]
        for j, block in enumerate(self.output_blocks[first:], first):
            if cache is not None and not reuse and j == len(self.output_blocks) - keep:
                cache.features = h
            h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb, context, skips[-1].shape[-2:] if skips else None)
        return self.out(h)

    feature_cache = None  # a FeatureCache while one is in use (``caching``)

    @contextmanager
    def caching(self, interval, branch=1):
        """DeepCache (Ma et al. 2023, "DeepCache: Accelerating Diffusion Models for Free")
        for the calls made inside: every ``interval``-th call runs the whole UNet and keeps
        the features entering its ``branch + 1`` last output blocks; the calls between run
        only the ``branch + 1`` first input blocks and those last output blocks, on the
        kept features. ``branch=1`` (DeepCache's choice for SD v1: the skip branch after the
        first ResBlock and transformer) runs 2 of the 12 blocks on each side."""
        if interval < 1:
            raise ValueError(f"the cache interval must be at least 1, got {interval}")
        if not 0 <= branch < min(len(self.input_blocks), len(self.output_blocks)):
            raise ValueError(f"branch must be in [0, {len(self.output_blocks) - 1}]")
        self.feature_cache = FeatureCache(interval, branch) if interval > 1 else None
        try:
            yield self.feature_cache
        finally:
            self.feature_cache = None


class FeatureCache:
    """The deep features a UNet keeps between the calls of a ``UNetModel.caching`` block,
    and which calls reuse them: all but every ``interval``-th, counted from the first
    (which runs the whole UNet). A call with another batch size runs the whole UNet."""

    def __init__(self, interval, branch=1):
        self.interval, self.branch = interval, branch
        self.calls = 0      # UNet calls so far
        self.full = 0       # of which ran the whole UNet
        self.features = None

    def reuse(self, x):
        reuse = (self.calls % self.interval != 0 and self.features is not None
                 and self.features.shape[0] == x.shape[0])
        self.calls += 1
        self.full += not reuse
        return reuse
