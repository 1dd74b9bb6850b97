"""CompVis' ``DDIMSampler`` interface over ``ldm.models.diffusion.sampling``."""
import torch

from ldm.models.diffusion.sampling import sample


class DDIMSampler:
    """``DDIMSampler(model).sample(S, batch_size, shape, conditioning, ...)`` as in CompVis;
    returns ``(samples, intermediates)`` with ``intermediates`` = {"x_inter", "pred_x0"}
    every ``log_every_t`` steps."""

    sampler = "ddim"

    def __init__(self, model, schedule="linear", **kwargs):
        if schedule != "linear":
            raise ValueError("only the CompVis 'linear' (uniform) discretisation is supported")
        self.model = model

    @torch.no_grad()
    def sample(self, S, batch_size, shape, conditioning=None, callback=None, eta=0.0,
               x_T=None, verbose=True, unconditional_guidance_scale=1.0,
               unconditional_conditioning=None, log_every_t=100, generator=None,
               noise=None, img_callback=None, **unused):
        device = self.model.device
        if x_T is None:
            x_T = torch.randn((batch_size, *shape), generator=generator,
                              device=generator.device if generator else "cpu").to(device)
        if noise is None and eta > 0:
            noise = lambda s: torch.randn(s, generator=generator, device=generator.device
                                          if generator else "cpu").to(device)
        intermediates = {"x_inter": [x_T], "pred_x0": [x_T]}

        def log(i, x, pred_x0):
            if i % log_every_t == 0 or i == S - 1:
                intermediates["x_inter"].append(x)
                intermediates["pred_x0"].append(pred_x0)
            for cb in (callback, img_callback):
                if cb:
                    cb(pred_x0, i) if cb is img_callback else cb(i)

        samples = sample(self.model, self.sampler, x_T.to(device), S, conditioning,
                         unconditional_conditioning, unconditional_guidance_scale, eta=eta,
                         noise=noise, callback=log, disable=not verbose)
        return samples, intermediates
