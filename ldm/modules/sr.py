"""Pixel super-resolution networks that people download for A1111's and ComfyUI's
upscalers, in their published key names:

- ESRGAN's RRDBNet (Wang et al. 2018) as BasicSR and Real-ESRGAN save it (``conv_first``,
  ``body.N.rdbK.convJ``, ``conv_body``, ``conv_upN``, ``conv_hr``, ``conv_last``; x2 and x1
  models see the image pixel-unshuffled), and in the original ESRGAN numbering that
  community models keep (4x-UltraSharp, 4x_NMKD...: ``model.0``, ``model.1.sub.N.RDBK.
  convJ.0``, ``model.3``...), renamed to the first by ``esrgan_keys``;
- Real-ESRGAN's compact SRVGGNet (``body.2k`` convolutions, ``body.2k+1`` PReLUs; the
  output pixel-shuffled and added to the input upsampled by nearest neighbour).

``from_state_dict`` tells which and builds it; images are [B, 3, H, W] in [0, 1].
"""
import re

import torch
import torch.nn.functional as F
from torch import nn


def _lrelu(x):
    return F.leaky_relu(x, 0.2)


class ResidualDenseBlock(nn.Module):
    """Five 3x3 convolutions, each seeing the block's input and every output before it."""

    def __init__(self, nf, gc):
        super().__init__()
        for i in range(5):
            setattr(self, f"conv{i + 1}", nn.Conv2d(nf + i * gc, nf if i == 4 else gc, 3, 1, 1))

    def forward(self, x):
        feats = [x]
        for i in range(4):
            feats.append(_lrelu(getattr(self, f"conv{i + 1}")(torch.cat(feats, 1))))
        return self.conv5(torch.cat(feats, 1)) * 0.2 + x


class RRDB(nn.Module):
    def __init__(self, nf, gc):
        super().__init__()
        self.rdb1, self.rdb2, self.rdb3 = (ResidualDenseBlock(nf, gc) for _ in range(3))

    def forward(self, x):
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """ESRGAN. ``ups`` nearest-neighbour 2x upsamplings; ``unshuffle`` (1, 2 or 4) folds
    the input's pixels into channels first (Real-ESRGAN's x2 and x1 models): the scale is
    2 ** ups / unshuffle."""

    def __init__(self, in_ch=3, out_ch=3, nf=64, nb=23, gc=32, ups=2, unshuffle=1):
        super().__init__()
        self.ups, self.unshuffle = ups, unshuffle
        self.scale = 2 ** ups // unshuffle
        self.conv_first = nn.Conv2d(in_ch * unshuffle ** 2, nf, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(nf, gc) for _ in range(nb)))
        self.conv_body = nn.Conv2d(nf, nf, 3, 1, 1)
        for i in range(ups):
            setattr(self, f"conv_up{i + 1}", nn.Conv2d(nf, nf, 3, 1, 1))
        self.conv_hr = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_last = nn.Conv2d(nf, out_ch, 3, 1, 1)

    def forward(self, x):
        if self.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.unshuffle)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for i in range(self.ups):
            feat = _lrelu(getattr(self, f"conv_up{i + 1}")(
                F.interpolate(feat, scale_factor=2, mode="nearest")))
        return self.conv_last(_lrelu(self.conv_hr(feat)))


class SRVGGNetCompact(nn.Module):
    """Real-ESRGAN's compact network: ``num_conv`` 3x3 convolutions of ``nf`` channels
    between PReLUs, the last making ``scale`` ** 2 sub-pixels per output channel."""

    def __init__(self, in_ch=3, out_ch=3, nf=64, num_conv=16, scale=4):
        super().__init__()
        self.scale = scale
        layers = [nn.Conv2d(in_ch, nf, 3, 1, 1), nn.PReLU(nf)]
        for _ in range(num_conv):
            layers += [nn.Conv2d(nf, nf, 3, 1, 1), nn.PReLU(nf)]
        layers.append(nn.Conv2d(nf, out_ch * scale ** 2, 3, 1, 1))
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        out = F.pixel_shuffle(self.body(x), self.scale)
        return out + F.interpolate(x, scale_factor=self.scale, mode="nearest")


_OLD_BLOCK = re.compile(r"^model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)$")
_OLD_LAYER = re.compile(r"^model\.(\d+)\.(weight|bias)$")


def esrgan_keys(sd):
    """An ESRGAN state dict in the original numbering renamed to BasicSR's names (others
    as they are): model.0 is conv_first, model.1.sub.N.RDBK.convJ.0 the blocks, the last
    model.1.sub.N conv_body; after it, every third layer an upsampling convolution, then
    conv_hr and conv_last."""
    if "model.0.weight" not in sd:
        return sd
    out, tail = {}, {}
    blocks = [int(m.group(1)) for k in sd if (m := _OLD_BLOCK.match(k))]
    nb = max(blocks) + 1 if blocks else 0
    for k, v in sd.items():
        if m := _OLD_BLOCK.match(k):
            out[f"body.{m[1]}.rdb{m[2]}.conv{m[3]}.{m[4]}"] = v
        elif k.startswith(f"model.1.sub.{nb}."):
            out["conv_body." + k.rsplit(".", 1)[1]] = v
        elif (m := _OLD_LAYER.match(k)) and m[1] != "1":
            tail.setdefault(int(m[1]), {})[m[2]] = v
        else:
            out[k] = v   # left for the strict load to name
    layers = sorted(tail)
    if layers and layers[0] == 0:
        out.update({f"conv_first.{t}": v for t, v in tail.pop(0).items()})
        layers = layers[1:]
    names = [f"conv_up{i + 1}" for i in range(len(layers) - 2)] + ["conv_hr", "conv_last"]
    for name, layer in zip(names, layers):
        out.update({f"{name}.{t}": v for t, v in tail[layer].items()})
    return out


def from_state_dict(sd):
    """(network with ``sd`` loaded, architecture name) for an ESRGAN / Real-ESRGAN or
    compact Real-ESRGAN state dict (``params_ema``/``params`` wrappers unwrapped by the
    caller); ValueError naming what is missing for anything else."""
    sd = esrgan_keys(sd)
    if "conv_first.weight" in sd and "body.0.rdb1.conv1.weight" in sd:
        nf, in_ch = sd["conv_first.weight"].shape[:2]
        gc = sd["body.0.rdb1.conv1.weight"].shape[0]
        nb = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("body."))
        ups = sum(1 for k in sd if re.fullmatch(r"conv_up\d+\.weight", k))
        out_ch = sd["conv_last.weight"].shape[0]
        unshuffle = {1: 1, 4: 2, 16: 4}.get(in_ch // out_ch) if in_ch % out_ch == 0 else None
        if unshuffle is None:
            raise ValueError(f"an ESRGAN with {in_ch} input and {out_ch} output channels is "
                             "not one this runs")
        net = RRDBNet(in_ch // unshuffle ** 2, out_ch, nf, nb, gc, ups, unshuffle)
        name = "ESRGAN"
    elif "body.0.weight" in sd and "body.1.weight" in sd and sd["body.1.weight"].dim() == 1:
        convs = sorted(int(k.split(".")[1]) for k in sd
                       if k.startswith("body.") and sd[k].dim() == 4 and k.endswith("weight"))
        nf, in_ch = sd["body.0.weight"].shape[:2]
        last = sd[f"body.{convs[-1]}.weight"].shape[0]
        scale = round((last / in_ch) ** 0.5)
        if scale ** 2 * in_ch != last:
            raise ValueError(f"a compact Real-ESRGAN whose last layer makes {last} channels "
                             "is not one this runs")
        net = SRVGGNetCompact(in_ch, in_ch, nf, len(convs) - 2, scale)
        name = "RealESRGAN Compact"
    else:
        raise ValueError("not an ESRGAN, Real-ESRGAN or compact Real-ESRGAN state dict")
    missing, unexpected = net.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{name} weights do not fit: missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]}")
    return net.eval().requires_grad_(False), name
