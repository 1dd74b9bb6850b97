"""Two models denoising one schedule: the first above a switch timestep, the second below
it (Balaji et al. 2022, eDiff-I's ensemble of expert denoisers; SDXL's base and refiner,
diffusers' ``denoising_end`` / ``denoising_start``).

``Experts`` stands where a ``LatentDiffusion`` stands for the samplers: they call
``apply_model`` at each step, and it hands the call to the model whose share of the
schedule the timestep is in, with that model's own conditioning. So every sampler, the
three tasks and guidance run the hand-over in one loop, nothing written twice. The two
conditionings travel in one dict (what guidance batches key by key): the first model's
keys as they are, the second's under ``PREFIX``.

For first-order samplers (DDIM, Euler, the ancestral ones) this is exactly diffusers'
two-pipeline hand-over; multistep samplers (DPM++ 2M, PLMS, UniPC) keep their history
across the switch where diffusers starts the second pipeline's scheduler afresh.
"""
import torch

PREFIX = "second."


def switch_timestep(fraction, timesteps=1000):
    """The first timestep the second model takes when the first denoises ``fraction`` of
    the schedule (diffusers' ``discrete_timestep_cutoff``: 0.8 of 1000 -> below 200)."""
    return int(round(timesteps - fraction * timesteps))


class Experts:
    """``first`` for timesteps >= ``switch`` (a training timestep, ``switch_timestep``),
    ``second`` below. Both must share the noise schedule and what they predict."""

    def __init__(self, first, second, switch):
        if first.num_timesteps != second.num_timesteps or not torch.allclose(
                first.alphas_cumprod.cpu(), second.alphas_cumprod.cpu()):
            raise ValueError("the two models have different noise schedules")
        if first.parameterization != second.parameterization:
            raise ValueError(f"the two models predict different things "
                             f"({first.parameterization}, {second.parameterization})")
        if not 0 < switch < first.num_timesteps:
            raise ValueError(f"the switch timestep must be in (0, {first.num_timesteps}), "
                             f"got {switch}")
        self.first, self.second, self.switch = first, second, switch

    def __getattr__(self, name):
        # the schedule, the noise model, the device: the first model's (the second's agree)
        return getattr(self.first, name)

    @staticmethod
    def conditioning(first, second):
        """One dict of the two models' conditioning dicts (None: no guidance)."""
        if first is None or second is None:
            return None
        return {**first, **{PREFIX + k: v for k, v in second.items()}}

    def apply_model(self, x, t, cond, c_concat=None):
        ours = {k: v for k, v in cond.items() if not k.startswith(PREFIX)}
        theirs = {k[len(PREFIX):]: v for k, v in cond.items() if k.startswith(PREFIX)}
        if float(t.max()) >= self.switch:
            return self.first.apply_model(x, t, ours)
        return self.second.apply_model(x, t, theirs)
