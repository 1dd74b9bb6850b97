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


@pytest.mark.parametrize("sampler", flow_samplers())
def test_ode_samplers_converge_to_the_1000_step_euler_solution(exact, sampler):
    """From the same noise, 8 and 32 steps: the error to the 1,000-step Euler solution
    falls, and at 32 steps it is small (second-order methods smaller than Euler's)."""
    x, reference = exact
    errors = [(sample(MixtureFlow(), sampler, x, n, {}, disable=True) - reference).abs().max()
              for n in (8, 32)]
    print(f"\n  {sampler}: 8 steps {errors[0]:.1e}, 32 steps {errors[1]:.1e}", end=" ")
    assert errors[1] < errors[0]
    assert errors[1] < (0.05 if sampler == "euler" else 0.02)


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
    """4,000 draws at 30 steps: half of them near each mean, each spread by the
    components' standard deviation, as the exact ODE's draws are."""
    x, noise = noise_of(1, 4000)
    z = sample(MixtureFlow(), sampler, x, 30, {}, noise=noise, disable=True)
    share, stds = mixture_statistics(z)
    ode_share, ode_stds = mixture_statistics(sample(MixtureFlow(), "euler", x, 200, {},
                                                    disable=True))
    print(f"\n  {sampler}: share {share:.3f} (ODE {ode_share:.3f}), stds "
          f"{stds[0]:.3f} {stds[1]:.3f} (ODE {ode_stds[0]:.3f} {ode_stds[1]:.3f})", end=" ")
    assert abs(share - 0.5) < 0.04 and abs(ode_share - 0.5) < 0.04
    assert all(abs(s - STD) < 0.04 for s in stds + ode_stds)
