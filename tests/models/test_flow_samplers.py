"""The samplers on rectified flow, against the exact answer.

A mixture of Gaussians has a rectified flow whose velocity is known in closed form, so it
stands in for a perfectly trained network: the ODE samplers must converge to the
1,000-step Euler solution as their steps grow, and the stochastic ones (in their
rectified-flow form) must draw from the mixture. The same check the sampler study makes
for SD 1.x, with no training noise in the way."""
import pytest
import torch

from ldm.models.diffusion.noise_model import PREDICTIONS, FlowSchedule
from ldm.models.diffusion.sampling import sample
from ldm.samplers import SAMPLERS, flow_samplers

MEANS = torch.tensor([[2.0, 0.5], [-1.5, -1.0]])   # two components, 2 channels
STD = 0.3


class MixtureFlow:
    """The exact velocity E[eps - x0 | x_s] of x_s = (1 - s) x0 + s eps towards an equal
    mixture of N(mean_k, STD^2 I), in the model interface the samplers call (timestep
    1000 s)."""
    prediction = PREDICTIONS["flow"]
    num_timesteps = 1000
    schedule = FlowSchedule(3.0)

    def apply_model(self, x, t, cond):
        s = (t.double() / 1000).view(-1, 1, 1, 1)
        x = x.double()
        var = (1 - s) ** 2 * STD ** 2 + s ** 2
        log_p, v = [], []
        for mean in MEANS.double():
            centred = x - (1 - s) * mean.view(1, -1, 1, 1)
            log_p.append(-(centred ** 2).sum(dim=(1, 2, 3), keepdim=True) / (2 * var))
            v.append(s / var * centred - (mean.view(1, -1, 1, 1)
                                          + (1 - s) * STD ** 2 / var * centred))
        w = torch.softmax(torch.cat(log_p, dim=1), dim=1)
        return sum(w[:, k:k + 1] * v[k] for k in range(len(v))).float()


def noise_of(seed, n):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 1, 1, generator=g), lambda shape: torch.randn(shape, generator=g)


@pytest.fixture(scope="module")
def exact():
    x, _ = noise_of(0, 256)
    return x, sample(MixtureFlow(), "euler", x, 1000, {}, disable=True)


@pytest.mark.parametrize("sampler", [s for s in flow_samplers() if not SAMPLERS[s].stochastic])
def test_ode_samplers_converge_to_the_1000_step_euler_solution(exact, sampler):
    """From the same noise, 8, 32 and 128 steps: the largest error to the 1,000-step Euler
    solution falls each time, and at 128 steps it is small (the mixture's narrow modes
    make the flow stiff near s = 0: multistep methods need the steps there)."""
    x, reference = exact
    errors = [float((sample(MixtureFlow(), sampler, x, n, {}, disable=True) - reference)
                    .abs().max()) for n in (8, 32, 128)]
    print(f"\n  {sampler}: 8, 32, 128 steps: " + ", ".join(f"{e:.1e}" for e in errors), end=" ")
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < (0.06 if sampler == "euler" else 0.03)


def mixture_statistics(z):
    """(share of samples nearer the first mean, each component's std about its mean)."""
    z = z.view(len(z), -1)
    d = torch.cdist(z, MEANS)
    near = d.argmin(dim=1)
    stds = [float((z[near == k] - MEANS[k]).std()) for k in range(len(MEANS))]
    return float((near == 0).float().mean()), stds


@pytest.mark.parametrize("sampler", [s.id for s in SAMPLERS.values()
                                     if s.stochastic and not s.timesteps])
def test_stochastic_samplers_draw_from_the_mixture(sampler):
    """4,000 draws: half of them near each mean at any step count, and each component's
    spread converging to its standard deviation (0.3) as the steps grow from 30 to 300:
    noise added in the variance-exploding way instead of rectified flow's would not."""
    share, off = [], []
    for steps in (30, 300):
        x, noise = noise_of(1, 4000)
        z = sample(MixtureFlow(), sampler, x, steps, {}, noise=noise, disable=True)
        s, stds = mixture_statistics(z)
        share.append(s)
        off.append(max(abs(v - STD) for v in stds))
    print(f"\n  {sampler}: shares {share[0]:.3f} {share[1]:.3f}, std off by "
          f"{off[0]:.3f} at 30 steps, {off[1]:.3f} at 300", end=" ")
    assert all(abs(s - 0.5) < 0.04 for s in share)
    assert off[1] < off[0] and off[1] < 0.025
