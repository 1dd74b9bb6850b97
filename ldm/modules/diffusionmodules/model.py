"""Encoder and decoder of the KL autoencoder (``first_stage_model.encoder/decoder.*`` keys)."""
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.diffusionmodules.util import Conv2d


def Normalize(channels, groups=32):
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels, out_channels=None, dropout=0.0, temb_channels=0,
                 norm_groups=32):
        super().__init__()
        if temb_channels:
            raise ValueError("the autoencoder's ResnetBlock takes no timestep embedding")
        out_channels = out_channels or in_channels
        self.norm1 = Normalize(in_channels, norm_groups)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = Conv2d(in_channels, out_channels, 1)
        else:
            self.nin_shortcut = None

    def forward(self, x):
        if torch.is_grad_enabled():
            h = self.conv1(F.silu(self.norm1(x)))
            h = self.conv2(self.dropout(F.silu(self.norm2(h))))
            return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h
        # inference: the same values with in-place activations, one full-resolution tensor
        # fewer alive at a time (the decoder's 512x512 stages dominate peak memory)
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(self.dropout(F.silu(self.norm2(h), inplace=True)))
        return h.add_(x if self.nin_shortcut is None else self.nin_shortcut(x))


class AttnBlock(nn.Module):
    """Single-head self-attention over pixels, with 1x1-conv projections."""

    def __init__(self, in_channels, norm_groups=32):
        super().__init__()
        self.norm = Normalize(in_channels, norm_groups)
        self.q = Conv2d(in_channels, in_channels, 1)
        self.k = Conv2d(in_channels, in_channels, 1)
        self.v = Conv2d(in_channels, in_channels, 1)
        self.proj_out = Conv2d(in_channels, in_channels, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)
        # [b, 1, h*w, c], contiguous: SDPA's fused kernels need the channel stride to be 1;
        # a transposed view sends it to the path that holds the (h*w)^2 score matrix
        # (256 GiB for a 2048x2048 decode at f=4)
        q, k, v = (p(y).view(b, c, h * w).transpose(1, 2).contiguous().unsqueeze(1)
                   for p in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(out.squeeze(1).transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, in_channels, with_conv=True):
        super().__init__()
        self.conv = Conv2d(in_channels, in_channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as trained


class Upsample(nn.Module):
    def __init__(self, in_channels, with_conv=True):
        super().__init__()
        self.conv = Conv2d(in_channels, in_channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _check_vanilla(attn_type, use_linear_attn, resamp_with_conv):
    """Plain attention (sgm's "vanilla-xformers" is the same arithmetic by another kernel)."""
    if attn_type not in ("vanilla", "vanilla-xformers") or use_linear_attn or not resamp_with_conv:
        raise ValueError("only attn_type='vanilla' with resamp_with_conv=True is supported")


class Encoder(nn.Module):
    def __init__(self, *, ch, ch_mult=(1, 2, 4, 8), num_res_blocks, attn_resolutions,
                 dropout=0.0, resamp_with_conv=True, in_channels, resolution, z_channels,
                 double_z=True, use_linear_attn=False, attn_type="vanilla", out_ch=None,
                 norm_groups=32, **ignore_kwargs):
        super().__init__()
        _check_vanilla(attn_type, use_linear_attn, resamp_with_conv)
        resnet = partial(ResnetBlock, dropout=dropout, norm_groups=norm_groups)
        self.conv_in = Conv2d(in_channels, ch, 3, padding=1)
        in_mult = (1,) + tuple(ch_mult)
        res = resolution
        self.down = nn.ModuleList()
        for level in range(len(ch_mult)):
            block_in, block_out = ch * in_mult[level], ch * ch_mult[level]
            stage = nn.Module()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(num_res_blocks):
                stage.block.append(resnet(block_in, block_out))
                block_in = block_out
                if res in attn_resolutions:
                    stage.attn.append(AttnBlock(block_in, norm_groups))
            if level != len(ch_mult) - 1:
                stage.downsample = Downsample(block_in)
                res //= 2
            self.down.append(stage)
        self.mid = nn.Module()
        self.mid.block_1 = resnet(block_in, block_in)
        self.mid.attn_1 = AttnBlock(block_in, norm_groups)
        self.mid.block_2 = resnet(block_in, block_in)
        self.norm_out = Normalize(block_in, norm_groups)
        self.conv_out = Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3,
                                  padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for stage in self.down:
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if hasattr(stage, "downsample"):  # every level but the last
                h = stage.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, *, ch, out_ch, ch_mult=(1, 2, 4, 8), num_res_blocks, attn_resolutions,
                 dropout=0.0, resamp_with_conv=True, in_channels, resolution, z_channels,
                 give_pre_end=False, tanh_out=False, use_linear_attn=False,
                 attn_type="vanilla", norm_groups=32, **ignore_kwargs):
        super().__init__()
        _check_vanilla(attn_type, use_linear_attn, resamp_with_conv)
        resnet = partial(ResnetBlock, dropout=dropout, norm_groups=norm_groups)
        self.give_pre_end, self.tanh_out = give_pre_end, tanh_out
        block_in = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = resnet(block_in, block_in)
        self.mid.attn_1 = AttnBlock(block_in, norm_groups)
        self.mid.block_2 = resnet(block_in, block_in)
        # ``up[i]`` is resolution level i (0 = full size), though it runs last: checkpoint order.
        self.up = nn.ModuleList()
        for level in reversed(range(len(ch_mult))):
            block_out = ch * ch_mult[level]
            stage = nn.Module()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                stage.block.append(resnet(block_in, block_out))
                block_in = block_out
                if res in attn_resolutions:
                    stage.attn.append(AttnBlock(block_in, norm_groups))
            if level != 0:
                stage.upsample = Upsample(block_in)
                res *= 2
            self.up.insert(0, stage)
        self.norm_out = Normalize(block_in, norm_groups)
        self.conv_out = Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for stage in reversed(self.up):
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if hasattr(stage, "upsample"):  # every level but the full-size one
                h = stage.upsample(h)
        if self.give_pre_end:
            return h
        h = self.conv_out(F.silu(self.norm_out(h)))
        return torch.tanh(h) if self.tanh_out else h
