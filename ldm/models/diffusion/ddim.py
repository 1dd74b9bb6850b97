"""CompVis' ``DDIMSampler`` interface over ``ldm.models.diffusion.sampling``, so that CompVis'
own txt2img, img2img and inpainting code runs against this library unchanged:
``make_schedule``, ``sample(..., mask=, x0=)``, ``stochastic_encode`` and ``decode``, with
CompVis' semantics (not our scripts'): ``decode(stochastic_encode(x0, t_enc), c, t_enc)``
noises to DDIM step ``t_enc`` and denoises from step ``t_enc - 1``, and ``mask`` is 1 where
``x0`` is kept, blended in before every step with fresh noise. Noise comes from
``generator`` if given, else from torch's global generator, as in CompVis.
"""
import torch

from ldm.models.diffusion.sampling import ddim_schedule, sample, sampling_timesteps


class DDIMSampler:
    """``DDIMSampler(model).sample(S, batch_size, shape, conditioning, ...)`` as in CompVis;
    returns ``(samples, intermediates)`` with ``intermediates`` = {"x_inter", "pred_x0"}
    every ``log_every_t`` steps. Conditioning may be a tensor or, for a hybrid (inpainting)
    model, CompVis' ``{"c_concat": [...], "c_crossattn": [...]}``."""

    sampler = "ddim"

    def __init__(self, model, schedule="linear", **kwargs):
        if schedule != "linear":
            raise ValueError("only the CompVis 'linear' (uniform) discretisation is supported")
        self.model = model
        self.ddpm_num_timesteps = model.num_timesteps
        self.ddim_timesteps = None

    def make_schedule(self, ddim_num_steps, ddim_discretize="uniform", ddim_eta=0.0,
                      verbose=True):
        """CompVis' DDIM tables: ``ddim_timesteps``, ``ddim_alphas``, ``ddim_alphas_prev``,
        ``ddim_sigmas``, ``ddim_sqrt_one_minus_alphas``."""
        if ddim_discretize != "uniform":
            raise ValueError("only ddim_discretize='uniform' is supported")
        self.ddim_timesteps = sampling_timesteps(ddim_num_steps, self.ddpm_num_timesteps)
        self.ddim_eta = ddim_eta
        a, a_prev, sigma = ddim_schedule(self.model.alphas_cumprod.cpu(),
                                         torch.as_tensor(self.ddim_timesteps), ddim_eta)
        device = self.model.device
        self.ddim_alphas, self.ddim_alphas_prev = a.float().to(device), a_prev.float().to(device)
        self.ddim_sigmas = sigma.float().to(device)
        self.ddim_sqrt_one_minus_alphas = (1.0 - a).sqrt().float().to(device)
        self.ddim_num_steps = ddim_num_steps

    def _noise(self, generator):
        def draw(shape):
            g = generator
            return torch.randn(shape, generator=g, device=g.device if g else "cpu").to(
                self.model.device)
        return draw

    @staticmethod
    def _split(conditioning):
        """(cross-attention context, concat input or None) from CompVis' conditioning."""
        if isinstance(conditioning, dict):
            concat = conditioning.get("c_concat")
            cross = conditioning.get("c_crossattn")
            return (cross[0] if isinstance(cross, list) else cross,
                    concat[0] if isinstance(concat, list) else concat)
        return conditioning, None

    def _guidance(self, conditioning, unconditional_conditioning):
        cond, concat = self._split(conditioning)
        uncond, u_concat = self._split(unconditional_conditioning)
        if u_concat is not None and (concat is None or not torch.equal(u_concat, concat)):
            raise ValueError("the unconditional c_concat must be the conditional one (the "
                             "mask and masked image do not change under guidance)")
        return cond, uncond, concat

    @torch.no_grad()
    def sample(self, S, batch_size, shape, conditioning=None, callback=None,
               normals_sequence=None, img_callback=None, quantize_x0=False, eta=0.0,
               mask=None, x0=None, temperature=1.0, noise_dropout=0.0, score_corrector=None,
               corrector_kwargs=None, verbose=True, x_T=None, log_every_t=100,
               unconditional_guidance_scale=1.0, unconditional_conditioning=None,
               generator=None, noise=None):
        """CompVis' arguments; those it has for features this library does not implement
        (``quantize_x0``, ``temperature``, ``noise_dropout``, ``score_corrector``,
        ``normals_sequence``) must keep their defaults, and any other keyword is an error."""
        if (quantize_x0 or temperature != 1.0 or noise_dropout != 0.0
                or score_corrector is not None or normals_sequence is not None):
            raise ValueError("quantize_x0, temperature, noise_dropout, score_corrector and "
                             "normals_sequence are not supported: leave them at their defaults")
        if (mask is None) != (x0 is None):
            raise ValueError("mask and x0 go together (mask 1 = keep x0)")
        device = self.model.device
        draw = self._noise(generator)
        if x_T is None:
            x_T = draw((batch_size, *shape))
        if noise is None and eta > 0:
            noise = draw
        cond, uncond, concat = self._guidance(conditioning, unconditional_conditioning)
        intermediates = {"x_inter": [x_T], "pred_x0": [x_T]}

        def log(i, x, pred_x0):
            if i % log_every_t == 0 or i == S - 1:
                intermediates["x_inter"].append(x)
                intermediates["pred_x0"].append(pred_x0)
            if callback:
                callback(i)
            if img_callback:
                img_callback(pred_x0, i)

        blend, x = None, x_T.to(device)
        if mask is not None:
            keep = self._keep(mask.to(device), x0.to(device), draw)
            x = keep(x, sampling_timesteps(S, self.ddpm_num_timesteps)[-1])  # before step 1

            def blend(x, t_next):  # before each later step: after this one, at t_next
                return x if t_next is None else keep(x, t_next)
        samples = sample(self.model, self.sampler, x, S, cond, uncond,
                         unconditional_guidance_scale, eta=eta, noise=noise, callback=log,
                         disable=not verbose, blend=blend, concat=concat)
        return samples, intermediates

    def _keep(self, mask, x0, draw):
        """CompVis' blend: x0 noised to t (fresh noise) where mask is 1, x elsewhere."""
        def keep(x, t):
            ts = torch.full((x0.shape[0],), int(t), device=x0.device, dtype=torch.long)
            return mask * self.model.q_sample(x0, ts, draw(x0.shape)) + (1 - mask) * x
        return keep

    def _check_schedule(self):
        if self.ddim_timesteps is None:
            raise ValueError("call make_schedule(ddim_num_steps=...) first, as CompVis' "
                             "img2img.py does")

    @torch.no_grad()
    def stochastic_encode(self, x0, t, use_original_steps=False, noise=None, generator=None):
        """x0 noised to DDIM step ``t`` (a tensor of step indices, one per image):
        sqrt(abar) x0 + sqrt(1 - abar) noise at ``ddim_timesteps[t]``."""
        if use_original_steps:
            a = self.model.alphas_cumprod.to(x0.device)
        else:
            self._check_schedule()
            a = self.ddim_alphas.to(x0.device)
        if noise is None:
            noise = self._noise(generator)(x0.shape).to(x0.dtype)
        at = a[torch.as_tensor(t, device=x0.device).long()].view(-1, *[1] * (x0.dim() - 1))
        return at.sqrt() * x0 + (1 - at).sqrt() * noise

    @torch.no_grad()
    def decode(self, x_latent, cond, t_start, unconditional_guidance_scale=1.0,
               unconditional_conditioning=None, use_original_steps=False, generator=None):
        """Denoise ``x_latent`` over the first ``t_start`` DDIM steps, from step
        ``t_start - 1`` down, with ``make_schedule``'s eta (CompVis' img2img)."""
        if use_original_steps:
            raise ValueError("use_original_steps is not supported")
        self._check_schedule()
        c, uc, concat = self._guidance(cond, unconditional_conditioning)
        eta = self.ddim_eta if self.sampler == "ddim" else 0.0
        return sample(self.model, self.sampler, x_latent, self.ddim_num_steps, c, uc,
                      unconditional_guidance_scale, eta=eta,
                      noise=self._noise(generator) if eta > 0 else None,
                      run_steps=int(t_start), disable=True, concat=concat)

