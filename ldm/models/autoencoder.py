"""The KL-regularised autoencoder that maps images to SD's latent space."""
import math

import torch
from torch import nn

from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution


class AutoencoderKL(nn.Module):
    """``encode(x) -> posterior``, ``decode(z) -> x``; x in [-1, 1], z unscaled.

    Accepts the CompVis config; ``lossconfig`` and the other training-only parameters are
    accepted for config compatibility and used only by the trainer (``ldm.lightning``).
    ``use_quant_conv=False`` (diffusers' name): no 1x1 convolutions around the latents
    (SD 3's 16-channel autoencoder has none).
    """

    def __init__(self, ddconfig, embed_dim, lossconfig=None, ckpt_path=None, ignore_keys=(),
                 image_key="image", colorize_nlabels=None, monitor=None, use_quant_conv=True,
                 **training_kwargs):
        super().__init__()
        if not ddconfig.get("double_z", True):
            raise ValueError("AutoencoderKL needs ddconfig.double_z=True (mean and log-variance)")
        self.image_key = image_key
        self.embed_dim = embed_dim
        self.lossconfig = lossconfig
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        if use_quant_conv:
            self.quant_conv = nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
            self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        else:
            self.quant_conv, self.post_quant_conv = nn.Identity(), nn.Identity()
        self.downsampling_factor = 2 ** (len(ddconfig["ch_mult"]) - 1)

    def encode(self, x, tile=None):
        """Image -> posterior; ``tile`` (latent pixels, see ``tiled``): in overlapping
        tiles of ``tile * factor`` pixels, blended."""
        def moments(x):
            return self.quant_conv(self.encoder(x))
        f = self.downsampling_factor
        return DiagonalGaussianDistribution(
            moments(x) if tile is None else tiled(moments, x, tile, f, 1))

    def decode(self, z, tile=None):
        """Latents -> image; ``tile``: in overlapping tiles of ``tile`` latent pixels
        (``tiled``), for images too large to decode at once."""
        def pixels(z):
            return self.decoder(self.post_quant_conv(z))
        return pixels(z) if tile is None else tiled(pixels, z, tile, 1,
                                                    self.downsampling_factor)

    def forward(self, x, sample_posterior=True, generator=None):
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior


def tile_starts(length, tile, overlap):
    """Offsets of tiles of ``tile`` that cover [0, length), spread evenly with at least
    ``overlap`` between neighbours (one tile if ``length <= tile``)."""
    if length <= tile:
        return [0]
    n = math.ceil((length - overlap) / (tile - overlap))
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def tile_ramp(size, fade, first, last, device=None):
    """A tile's blending weight along one axis: 1 inside, rising over ``fade`` at an edge
    shared with a neighbour (not at the image's own edges, ``first``/``last``) as a
    smoothstep, which gives the last pixels of a tile, where its edge shows, less weight
    than a linear ramp (on the built-in autoencoder: the worst column next to a tile edge
    1.7 grey levels off the whole decode against 2.4)."""
    w = torch.ones(size, device=device)
    r = (torch.arange(fade, device=device) + 0.5) / fade
    r = r * r * (3 - 2 * r)
    if not first:
        w[:fade] = r
    if not last:
        w[size - fade:] = torch.minimum(w[size - fade:], r.flip(0))
    return w


def tiled(fn, x, tile, scale_in, scale_out, overlap=None):
    """``fn`` (a map from [B, C, h * scale_in, w * scale_in] to
    [B, C', h * scale_out, w * scale_out]) applied in overlapping tiles of ``tile`` units of
    the latent grid (``overlap``, default a quarter tile, between neighbours) and
    blended: each output pixel is the weighted mean of the tiles that cover it, with
    weights that fall smoothly to the tile edges over the overlap (``tile_ramp``), so that no tile's edge
    shows (``tests/test_speedups.py`` checks a tiled decode against the whole one). Peak
    memory is one tile's; the decoder's GroupNorm then sees one tile's statistics, so the
    result is close to the whole decode, not equal to it."""
    overlap = max(tile // 4, 1) if overlap is None else overlap
    if not 0 < overlap < tile:
        raise ValueError(f"tile overlap must be in [1, {tile - 1}], got {overlap}")
    h, w = x.shape[-2] // scale_in, x.shape[-1] // scale_in
    ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    if len(ys) == len(xs) == 1:
        return fn(x)
    out = weight = None
    fade = overlap * scale_out
    th, tw = min(tile, h), min(tile, w)
    for y in ys:
        wy = tile_ramp(th * scale_out, fade, y == 0, y + th == h, x.device)
        for x0 in xs:
            part = fn(x[..., y * scale_in:(y + th) * scale_in, x0 * scale_in:(x0 + tw) * scale_in])
            if out is None:
                out = part.new_zeros(*part.shape[:2], h * scale_out, w * scale_out,
                                     dtype=torch.float32)  # summed in float32
                weight = out.new_zeros(h * scale_out, w * scale_out)
            wx = tile_ramp(tw * scale_out, fade, x0 == 0, x0 + tw == w, x.device)
            wt = wy[:, None] * wx[None]
            rows = slice(y * scale_out, (y + th) * scale_out)
            cols = slice(x0 * scale_out, (x0 + tw) * scale_out)
            out[..., rows, cols] += part.float() * wt
            weight[rows, cols] += wt
    return (out / weight).to(part.dtype)
