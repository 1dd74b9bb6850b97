"""The SD x4 upscaler's low-resolution conditioning (Stability's ``upscaling.py`` names):
the low-resolution image, noised to a chosen level of its own DDPM schedule, goes beside
the latents as extra UNet input channels; the level goes in as a class label."""
import torch
from torch import nn

from ldm.modules.diffusionmodules.util import make_beta_schedule


class ImageConcatWithNoiseAugmentation(nn.Module):
    """Noise augmentation of the low-resolution image (``low_scale_model`` in the
    checkpoint, whose stored schedule buffers are derived here from the config instead):
    x -> sqrt(abar_l) x + sqrt(1 - abar_l) noise at level l in [0, max_noise_level]."""

    def __init__(self, noise_schedule_config=None, max_noise_level=1000, to_cuda=False):
        super().__init__()
        c = dict(noise_schedule_config or {})
        betas = make_beta_schedule(c.get("beta_schedule", "linear"), c.get("timesteps", 1000),
                                   c.get("linear_start", 1e-4), c.get("linear_end", 2e-2))
        abar = torch.cumprod(1.0 - betas, dim=0)
        self.register_buffer("sqrt_alphas_cumprod", abar.sqrt().float(), persistent=False)
        self.register_buffer("sqrt_one_minus_alphas_cumprod", (1.0 - abar).sqrt().float(),
                             persistent=False)
        self.max_noise_level = int(max_noise_level)

    def forward(self, x, noise_level, noise):
        """(the noised image, the level as a [B] long tensor); ``noise`` like ``x``."""
        level = torch.as_tensor(noise_level, device=x.device).long().expand(x.shape[0])
        a = self.sqrt_alphas_cumprod.to(x.device)[level].view(-1, 1, 1, 1)
        s = self.sqrt_one_minus_alphas_cumprod.to(x.device)[level].view(-1, 1, 1, 1)
        return a * x + s * noise, level
