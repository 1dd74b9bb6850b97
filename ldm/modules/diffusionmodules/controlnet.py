"""ControlNet (Zhang, Rao and Agrawala 2023) in lllyasviel's layout (``cldm.cldm.ControlNet``,
its checkpoints' ``control_model.*`` keys): a trainable copy of the UNet's encoder (the
time embedding, the input blocks and the middle block, built by ``UNetModel`` itself so the
copy cannot drift from it), the hint encoder (``input_hint_block``: eight 3x3 convolutions
taking the control image down 8x to the first block's width, the last one zero-initialised),
one zero 1x1 convolution per input block (``zero_convs.N.0``) and one after the middle block
(``middle_block_out.0``). Its output is one residual per UNet skip connection plus one for
the middle block, which ``UNetModel.forward(control=...)`` adds."""
from torch import nn

from ldm.modules.diffusionmodules.openaimodel import TimestepEmbedSequential, UNetModel
from ldm.modules.diffusionmodules.util import Conv2d, timestep_embedding, zero_module

HINT_WIDTHS = (16, 16, 32, 32, 96, 96, 256)   # the hint encoder's convolutions, cldm's
HINT_STRIDES = (1, 1, 2, 1, 2, 1, 2)


class ControlNet(UNetModel):
    """``hint_channels``: the control image's channels (3); the rest are the UNet's own
    parameters (``UNetModel``), as cldm's configs give them."""

    def __init__(self, hint_channels=3, **unet_params):
        unet_params.pop("out_channels", None)
        super().__init__(**unet_params)
        del self.output_blocks, self.out   # the encoder alone
        layers, ch = [], hint_channels
        for width, stride in zip(HINT_WIDTHS, HINT_STRIDES):
            layers += [Conv2d(ch, width, 3, padding=1, stride=stride), nn.SiLU()]
            ch = width
        layers.append(zero_module(Conv2d(ch, self.model_channels, 3, padding=1)))
        self.input_hint_block = TimestepEmbedSequential(*layers)
        self.zero_convs = nn.ModuleList(
            TimestepEmbedSequential(zero_module(Conv2d(w, w, 1))) for w in self.skip_widths)
        middle = self.skip_widths[-1]
        self.middle_block_out = TimestepEmbedSequential(zero_module(Conv2d(middle, middle, 1)))

    def forward(self, x, hint, timesteps, context=None, y=None):
        """The residuals: one per input block (shallowest first), then the middle block's."""
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        if self.adm_in_channels:
            emb = emb + self.label_emb(y.to(emb.dtype))
        h = self.input_blocks[0](x, emb, context) + self.input_hint_block(
            hint.to(x.dtype), emb, context)
        outs = [self.zero_convs[0](h, emb, context)]
        for block, zero_conv in zip(self.input_blocks[1:], self.zero_convs[1:]):
            h = block(h, emb, context)
            outs.append(zero_conv(h, emb, context))
        h = self.middle_block(h, emb, context)
        outs.append(self.middle_block_out(h, emb, context))
        return outs


def residual_scales(n, mode="balanced", guess=False):
    """Each of ``n`` residuals' factor (shallowest first, the middle block's last): 1 for
    A1111's "balanced" mode; its "prompt" and "control" modes' soft weights 0.825 ** (n - 1
    - i) (lllyasviel's guess mode's); diffusers' guess mode logspace(-1, 0, n)."""
    import torch
    if guess:
        return torch.logspace(-1, 0, n).tolist()
    if mode in ("prompt", "control"):
        return [0.825 ** float(n - 1 - i) for i in range(n)]
    return [1.0] * n


def control_residuals(units, progress, x, t, cond):
    """The sum over ``units`` of each ControlNet's residuals times its weight, for the UNet
    at latents ``x``, timestep ``t`` and conditioning ``cond`` (its ``hint``: the units'
    images along the channels), as diffusers' ``MultiControlNetModel`` sums them; units
    outside their steps add nothing (None when none acts). A unit's ``mode`` and ``guess``
    scale the residuals (``residual_scales``); A1111's "control" mode and guess mode give
    them to the conditional half of a guided batch alone (``cond_mark``: 1 there, 0 in the
    unconditional half), as A1111's cfg injection and diffusers' guess mode do."""
    step, steps = (progress["step"], progress["steps"]) if progress else (0, 1)
    total, first = None, 0
    for unit in units:
        channels = unit.net.input_hint_block[0].in_channels
        hint = cond["hint"][:, first:first + channels]
        first += channels
        if not unit.acts(step, steps):
            continue
        res = unit.net(x, hint, t, cond.get("crossattn"), cond.get("vector"))
        scales = residual_scales(len(res), unit.mode, unit.guess)
        res = [r * (unit.weight * s) for r, s in zip(res, scales)]
        if (unit.guess or unit.mode == "control") and "cond_mark" in cond:
            mark = cond["cond_mark"].to(res[0].dtype)[:, None, None, None]
            res = [r * mark for r in res]
        total = res if total is None else [a + b for a, b in zip(total, res)]
    return total
