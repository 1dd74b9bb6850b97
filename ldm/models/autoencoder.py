"""The KL-regularised autoencoder that maps images to SD's latent space."""
from torch import nn

from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution


class AutoencoderKL(nn.Module):
    """``encode(x) -> posterior``, ``decode(z) -> x``; x in [-1, 1], z unscaled.

    Accepts the CompVis config; ``lossconfig`` and the other training-only parameters are
    accepted for config compatibility and used only by the trainer (``ldm.lightning``).
    """

    def __init__(self, ddconfig, embed_dim, lossconfig=None, ckpt_path=None, ignore_keys=(),
                 image_key="image", colorize_nlabels=None, monitor=None, **training_kwargs):
        super().__init__()
        if not ddconfig.get("double_z", True):
            raise ValueError("AutoencoderKL needs ddconfig.double_z=True (mean and log-variance)")
        self.image_key = image_key
        self.embed_dim = embed_dim
        self.lossconfig = lossconfig
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.quant_conv = nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self.downsampling_factor = 2 ** (len(ddconfig["ch_mult"]) - 1)

    def encode(self, x):
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x, sample_posterior=True, generator=None):
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior
