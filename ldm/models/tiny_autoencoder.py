"""The tiny autoencoder (TAESD, Ollin Boer Bohan 2023): a 1.2-million-parameter encoder and
decoder of conv blocks, distilled to map a model's latents to images and back, a few
percent of the work of the KL autoencoder's decode. One per latent space: TAESD (SD 1.x and
2.x), TAESDXL (SDXL), TAESD3 (SD 3, 16 channels).

Module names are the author's ``taesd.py`` (``Encoder``/``Decoder`` as ``nn.Sequential``),
so his ``taesd_encoder.pth``/``taesd_decoder.pth`` (and their ``.safetensors``) load as
they are; diffusers' ``AutoencoderTiny`` files name the same layers ``encoder.layers.N``
and ``decoder.layers.N - 1`` (its decoder leaves the clamp out of the Sequential):
``tiny_state_dict`` reads every form.

TAESD works on the latents the UNet sees (the KL posterior times the model's scale, minus
its shift for SD 3) and on images in [0, 1]; ``TinyAutoencoder`` takes the KL
autoencoder's place in a model, so it speaks the same language: ``decode`` takes the
unscaled latents and gives images in [-1, 1], ``encode`` the reverse (through ``mode()``).
"""
import torch
from torch import nn

from ldm.families.known import TINY_DIFFUSERS, is_tiny_autoencoder as is_tiny  # noqa: F401


def conv(n_in, n_out, **kwargs):
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Clamp(nn.Module):
    """A soft clamp of the latents to [-3, 3]."""

    def forward(self, x):
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    def __init__(self, n_in, n_out):
        super().__init__()
        self.conv = nn.Sequential(conv(n_in, n_out), nn.ReLU(), conv(n_out, n_out), nn.ReLU(),
                                  conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x):
        return self.fuse(self.conv(x) + self.skip(x))


def encoder(latent_channels=4, width=64):
    """Images in [0, 1] -> latents, three stride-2 stages of three blocks."""
    stages = []
    for _ in range(3):
        stages += [conv(width, width, stride=2, bias=False), Block(width, width),
                   Block(width, width), Block(width, width)]
    return nn.Sequential(conv(3, width), Block(width, width), *stages,
                         conv(width, latent_channels))


def decoder(latent_channels=4, width=64):
    """Latents -> images in [0, 1]: a clamp, then three 2x nearest upsamplings."""
    stages = []
    for _ in range(3):
        stages += [Block(width, width), Block(width, width), Block(width, width),
                   nn.Upsample(scale_factor=2), conv(width, width, bias=False)]
    return nn.Sequential(Clamp(), conv(latent_channels, width), nn.ReLU(), *stages,
                         Block(width, width), conv(width, 3))


class Posterior:
    """What ``encode`` gives, as the KL autoencoder's posterior is read: its ``mode()``
    (TAESD's encoder is deterministic, so ``sample()`` is the same)."""

    def __init__(self, z):
        self.z = z

    def mode(self):
        return self.z

    def sample(self, generator=None):
        return self.z


class TinyAutoencoder(nn.Module):
    """TAESD in the KL autoencoder's place. ``scale``/``shift``: the model's latent scale
    and shift (UNet latents = (posterior - shift) * scale). ``encoder`` is None when only
    the decoder was given (then encoding says what is missing)."""
    downsampling_factor = 8

    def __init__(self, latent_channels=4, scale=0.18215, shift=0.0, with_encoder=True):
        super().__init__()
        self.latent_channels = latent_channels
        self.scale, self.shift = float(scale), float(shift)
        self.encoder = encoder(latent_channels) if with_encoder else None
        self.decoder = decoder(latent_channels)

    def decode(self, z, tile=None):
        """Unscaled latents -> images in [-1, 1] (``tile`` is the KL autoencoder's
        option; TAESD needs none)."""
        return self.decoder((z - self.shift) * self.scale).mul(2).sub(1)

    def encode(self, x, tile=None):
        """Images in [-1, 1] -> a ``Posterior`` of unscaled latents."""
        if self.encoder is None:
            from ldm.errors import UsageError
            raise UsageError("this tiny autoencoder has no encoder: give --vae the TAESD "
                             "file that holds both, or put its taesd*_encoder file beside "
                             "the decoder file")
        return Posterior(self.encoder(x.add(1).div(2)) / self.scale + self.shift)


# -- its weights, in the forms people download -------------------------------------------
TINY_PREFIXES = ("taesd_encoder.", "taesd_decoder.", "encoder.", "decoder.")


def _strip(key):
    for prefix in TINY_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def tiny_state_dict(parts):
    """{"encoder.N...", "decoder.N..."} from the state dicts ``parts`` (one file's, or a
    decoder file's and its encoder file's): the author's bare files (a decoder starts at
    layer 1, after its clamp; an encoder at 0), ComfyUI's ``taesd_encoder.``/
    ``taesd_decoder.`` prefixes, ours, or diffusers' ``AutoencoderTiny`` (its decoder's
    layers one lower). Raises ValueError for what is none of them."""
    out = {}
    for sd in parts:
        if sd and all(TINY_DIFFUSERS.match(k) for k in sd):
            for k, v in sd.items():
                side, n, rest = TINY_DIFFUSERS.match(k).groups()
                out[f"{side}.{int(n) + (side == 'decoder')}.{rest}"] = v
            continue
        if not is_tiny(sd):
            raise ValueError("these are not a tiny autoencoder's (TAESD's) weights")
        for k, v in sd.items():
            if k.startswith(("encoder.", "taesd_encoder.")):
                out["encoder." + _strip(k)] = v
            elif k.startswith(("decoder.", "taesd_decoder.")):
                out["decoder." + _strip(k)] = v
            else:   # a bare file: the decoder's first weight is layer 1 (the clamp is 0)
                side = "decoder" if "0.weight" not in sd else "encoder"
                out[f"{side}.{k}"] = v
    return out


def latent_channels_of(sd):
    """The latent channels of a ``tiny_state_dict``: the decoder's first convolution's
    input channels."""
    return int(sd["decoder.1.weight"].shape[1])
