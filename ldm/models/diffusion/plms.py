"""CompVis' ``PLMSSampler`` interface over ``ldm.models.diffusion.sampling``."""
from ldm.models.diffusion.ddim import DDIMSampler


class PLMSSampler(DDIMSampler):
    """Same interface as ``DDIMSampler``; PLMS is deterministic, so ``eta`` must be 0."""

    sampler = "plms"

