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

