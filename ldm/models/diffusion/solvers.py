"""Samplers over a denoiser in Karras et al.'s form, one step function each.

Every sampler here sees ``denoise(x, sigma) -> x0``: the model as a denoiser of
``x = x0 + sigma * eps`` (Karras et al. 2022, "Elucidating the design space", sec. 2; the
latents of the DDPM chain times ``sqrt(1 + sigma^2)``, see ``sampling.Denoiser``), and a
descending list of noise levels ``sigmas`` ending in 0. A sampler is a *step*:
``step(denoise, x, sigmas, i, state, noise) -> (x at sigmas[i + 1], x0 estimate)``, where
``state`` is a dict the step may keep history in (multistep methods) and ``noise(shape)``
gives fresh standard-normal noise from each image's own generator (ancestral and SDE
methods). ``run`` is the one loop that drives any step for all three tasks: progress,
latent blending (inpainting) and the callback.

Written from the papers: Euler, Heun and DPM2 (Karras et al. 2022, alg. 1-2 with the
DPM-Solver-2 midpoint of Lu et al. 2022a), ancestral steps (``ancestral``), LMS (linear
multistep on sigma), DPM-Solver++ 2S / 2M / SDE / 2M SDE (Lu et al. 2022b), UniPC with
B(h) = e^h - 1 ("bh2", Zhao et al. 2023). ``lambda = -log(sigma)`` is the half log-SNR
these solvers step in.
"""
import math

import torch

from ldm.progress import progress


def run(step, denoise, x, sigmas, noise=None, callback=None, blend=None, disable=False,
        name="sampling"):
    """Drive ``step`` over ``sigmas`` from ``x`` (at ``sigmas[0]``): after each step
    ``blend(x, sigma_next)`` if given (known latents put back, inpainting), then
    ``callback(i, x, x0 estimate)``. Returns x at ``sigmas[-1]``."""
    state = {}
    with progress(len(sigmas) - 1, name, disable=disable) as bar:
        for i in range(len(sigmas) - 1):
            x, denoised = step(denoise, x, sigmas, i, state, noise)
            if blend is not None:
                x = blend(x, float(sigmas[i + 1]))
            bar.update()
            if callback:
                callback(i, x, denoised)
    return x


def _levels(sigmas, i):
    return float(sigmas[i]), float(sigmas[i + 1])


def _lam(sigma):
    """lambda = -log sigma (half the log signal-to-noise ratio); +inf at sigma = 0."""
    return math.inf if sigma == 0 else -math.log(sigma)


def ancestral(sigma, sigma_next, eta=1.0):
    """Split a step to ``sigma_next`` into a deterministic one to ``sigma_down`` and fresh
    noise of size ``sigma_up``, sigma_down^2 + sigma_up^2 = sigma_next^2 (the DDPM
    posterior's share of new noise at eta = 1)."""
    if sigma_next == 0 or eta == 0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * math.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2)
                                         / sigma ** 2))
    return math.sqrt(sigma_next ** 2 - up ** 2), up


def _renoise(x, scale, up, noise):
    """After an ancestral step's deterministic part: x * scale + up * fresh noise (scale 1
    in the variance-exploding space; rectified flow's rescales the signal)."""
    if scale != 1.0:
        x = x * scale
    return x + noise(x.shape) * up if up > 0 else x


def _d(x, denoised, sigma):
    """The probability-flow ODE's derivative dx/dsigma = (x - D(x)) / sigma."""
    return (x - denoised) / sigma


# -- first and second order, on sigma --------------------------------------------------
def euler(denoise, x, sigmas, i, state, noise):
    s, s_next = _levels(sigmas, i)
    denoised = denoise(x, s)
    return x + _d(x, denoised, s) * (s_next - s), denoised


def euler_ancestral(denoise, x, sigmas, i, state, noise, eta=1.0):
    s, s_next = _levels(sigmas, i)
    denoised = denoise(x, s)
    down, scale, up = denoise.schedule.ancestral(s, s_next, eta)
    x = x + _d(x, denoised, s) * (down - s)
    return _renoise(x, scale, up, noise), denoised


def heun(denoise, x, sigmas, i, state, noise):
    """Heun's method (Karras et al. alg. 1, no churn); the last step, to sigma = 0, is
    Euler's (the correction would divide by zero)."""
    s, s_next = _levels(sigmas, i)
    denoised = denoise(x, s)
    d = _d(x, denoised, s)
    x_euler = x + d * (s_next - s)
    if s_next == 0:
        return x_euler, denoised
    d_next = _d(x_euler, denoise(x_euler, s_next), s_next)
    return x + (d + d_next) / 2 * (s_next - s), denoised


def _dpm2_to(denoise, x, denoised, s, target):
    """DPM-Solver-2's step from ``s`` to ``target``: the derivative taken again at the
    log-midpoint of the two levels."""
    mid = math.exp((math.log(s) + math.log(target)) / 2)
    x_mid = x + _d(x, denoised, s) * (mid - s)
    return x + _d(x_mid, denoise(x_mid, mid), mid) * (target - s)


def dpm2(denoise, x, sigmas, i, state, noise):
    s, s_next = _levels(sigmas, i)
    denoised = denoise(x, s)
    if s_next == 0:
        return x + _d(x, denoised, s) * (s_next - s), denoised
    return _dpm2_to(denoise, x, denoised, s, s_next), denoised


def dpm2_ancestral(denoise, x, sigmas, i, state, noise, eta=1.0):
    s, s_next = _levels(sigmas, i)
    denoised = denoise(x, s)
    down, scale, up = denoise.schedule.ancestral(s, s_next, eta)
    if down == 0:
        x = x + _d(x, denoised, s) * (down - s)
    else:
        x = _dpm2_to(denoise, x, denoised, s, down)
    return _renoise(x, scale, up, noise), denoised


# -- linear multistep -----------------------------------------------------------------
def lms_coefficient(sigmas, i, j, order):
    """The integral over [sigmas[i], sigmas[i + 1]] of the Lagrange basis polynomial that
    is 1 at sigmas[i - j] and 0 at the other ``order - 1`` recent levels: exact polynomial
    integration (the same number as k-diffusion's and diffusers' quadrature)."""
    import numpy as np
    nodes = [float(sigmas[i - k]) for k in range(order)]
    poly = np.polynomial.Polynomial([1.0])
    for k in range(order):
        if k != j:
            poly *= np.polynomial.Polynomial([-nodes[k], 1.0]) / (nodes[j] - nodes[k])
    antiderivative = poly.integ()
    return float(antiderivative(float(sigmas[i + 1])) - antiderivative(float(sigmas[i])))


def lms(denoise, x, sigmas, i, state, noise, order=4):
    """Linear multistep on dx/dsigma with up to ``order`` stored derivatives."""
    s, _ = _levels(sigmas, i)
    denoised = denoise(x, s)
    ds = state.setdefault("d", [])
    ds.insert(0, _d(x, denoised, s))
    del ds[order:]
    for j, d in enumerate(ds):
        x = x + lms_coefficient(sigmas, i, j, len(ds)) * d
    return x, denoised


# -- DPM-Solver++ (data prediction, in lambda) --------------------------------------
def _first_order(x, denoised, s, s_next):
    """DPM-Solver++ 1 (= DDIM): exact for a constant x0 estimate over the step."""
    if s_next == 0:
        return denoised
    h = _lam(s_next) - _lam(s)
    return (s_next / s) * x - math.expm1(-h) * denoised


def dpmpp_2s_step(denoise, x, denoised, s, s_mid, s_next):
    """DPM-Solver++(2S) from ``s`` to ``s_next`` with the second evaluation at ``s_mid``
    (Lu et al. 2022b, alg. 1): x0 for the full step is (1 - 1/2r) D(s) + 1/2r D(s_mid),
    r = the intermediate's share of the step in lambda."""
    if s_next == 0:
        return denoised
    h = _lam(s_next) - _lam(s)
    r = (_lam(s_mid) - _lam(s)) / h
    x_mid = _first_order(x, denoised, s, s_mid)
    d_mid = denoise(x_mid, s_mid)
    mix = (1 - 1 / (2 * r)) * denoised + 1 / (2 * r) * d_mid
    return (s_next / s) * x - math.expm1(-h) * mix


def dpmpp_2s_ancestral(denoise, x, sigmas, i, state, noise, eta=1.0):
    """DPM++ 2S a: a 2S step to the ancestral ``sigma_down`` with the intermediate at its
    lambda midpoint, then fresh noise (k-diffusion's arrangement, as A1111 runs it)."""
    s, s_next = _levels(sigmas, i)
    denoised = denoise(x, s)
    down, scale, up = denoise.schedule.ancestral(s, s_next, eta)
    if down == 0:
        x = denoised
    else:
        mid = math.exp(-(_lam(s) + _lam(down)) / 2)
        x = dpmpp_2s_step(denoise, x, denoised, s, mid, down)
    return _renoise(x, scale, up, noise), denoised


def dpmpp_2m(denoise, x, sigmas, i, state, noise):
    """DPM-Solver++(2M): the second-order multistep update from the last two x0
    estimates; first order at the first step and into sigma = 0."""
    s, s_next = _levels(sigmas, i)
    denoised = denoise(x, s)
    old = state.get("old")
    state["old"] = (denoised, s)
    if old is None or s_next == 0:
        return _first_order(x, denoised, s, s_next), denoised
    h = _lam(s_next) - _lam(s)
    r = (_lam(s) - _lam(old[1])) / h
    mix = (1 + 1 / (2 * r)) * denoised - 1 / (2 * r) * old[0]
    return (s_next / s) * x - math.expm1(-h) * mix, denoised


def dpmpp_2m_sde(denoise, x, sigmas, i, state, noise, eta=1.0):
    """DPM-Solver++(2M) SDE, midpoint form: the 2M update of the SDE (the exponential
    integrator of the reverse SDE with ``eta`` times its noise), fresh noise every step.
    In the schedule's half log-SNR lambda and signal scale alpha (-log sigma and 1 in the
    variance-exploding space; rectified flow's log((1 - s) / s) and 1 - s)."""
    s, s_next = _levels(sigmas, i)
    denoised = denoise(x, s)
    old = state.get("old")
    state["old"] = (denoised, s)
    if s_next == 0:
        return denoised, denoised
    space = denoise.schedule
    lam, lam_next, alpha_next = space.lam(s), space.lam(s_next), space.alpha(s_next)
    h = lam_next - lam
    eta_h = eta * h if eta else 0.0   # (rectified flow's first h is infinite)
    x = (s_next / s) * math.exp(-eta_h) * x - alpha_next * math.expm1(-h - eta_h) * denoised
    if old is not None:
        r = (lam - space.lam(old[1])) / h
        x = x - alpha_next * 0.5 * math.expm1(-h - eta_h) / r * (denoised - old[0])
    if eta:
        x = x + noise(x.shape) * s_next * math.sqrt(-math.expm1(-2 * eta_h))
    return x, denoised


def dpmpp_sde(denoise, x, sigmas, i, state, noise, eta=1.0, r=0.5):
    """DPM-Solver++ SDE (k-diffusion's ``sample_dpmpp_sde``): a 2S step whose two halves
    are each ancestral, the intermediate at fraction ``r`` of the step in lambda. Noise is
    drawn fresh for each half (independent Gaussian increments) rather than from a
    Brownian tree: the same distribution, with no torchsde."""
    s, s_next = _levels(sigmas, i)
    denoised = denoise(x, s)
    if s_next == 0:
        return denoised, denoised
    lam, h = _lam(s), _lam(s_next) - _lam(s)
    s_mid = math.exp(-(lam + h * r))
    schedule = denoise.schedule
    down, scale, up = schedule.ancestral(s, s_mid, eta)
    x_mid = _renoise(_first_order(x, denoised, s, down), scale, up, noise)
    d_mid = denoise(x_mid, s_mid)
    down, scale, up = schedule.ancestral(s, s_next, eta)
    mix = (1 - 1 / (2 * r)) * denoised + 1 / (2 * r) * d_mid
    x = _first_order(x, mix, s, down)
    return _renoise(x, scale, up, noise), denoised


# -- UniPC ------------------------------------------------------------------------------
def _unipc_update(x, m0, s0, s_t, history, m_t=None):
    """One UniPC update from ``x`` at level ``s0`` (x0 estimate ``m0``) to ``s_t``, B(h) =
    e^h - 1 (bh2), data prediction. ``history``: earlier (x0 estimate, level) pairs, newest
    first, giving the divided differences. Without ``m_t`` the predictor UniP; with the x0
    estimate at ``s_t`` the corrector UniC (Zhao et al. 2023, alg. 1-2)."""
    if s_t == 0:
        return m0
    h = _lam(s_t) - _lam(s0)
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = h_phi_1
    rks = [(_lam(s_k) - _lam(s0)) / h for _, s_k in history]
    d1s = [(m_k - m0) / r for (m_k, _), r in zip(history, rks)]
    order = len(history) + 1
    # b_k = k! * h*phi_{k+1}(h) / B(h), with phi from the recursion phi_{k+1} = (phi_k - 1/k!) / h
    b, h_phi_k, fact = [], h_phi_1 / hh - 1, 1
    for k in range(1, order + 1):
        b.append(h_phi_k * fact / b_h)
        fact *= k + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    x_t = (s_t / s0) * x - h_phi_1 * m0
    if m_t is None:  # predictor: the order - 1 stored differences
        if not d1s:
            return x_t
        if len(d1s) == 1:
            rhos = [0.5]
        else:
            rk = torch.tensor(rks, dtype=torch.float64)
            R = torch.stack([rk ** k for k in range(order - 1)])
            rhos = torch.linalg.solve(R, torch.tensor(b[:-1], dtype=torch.float64)).tolist()
        return x_t - b_h * sum(rho * d for rho, d in zip(rhos, d1s))
    rk = torch.tensor(rks + [1.0], dtype=torch.float64)
    if order == 1:
        rhos = [0.5]
    else:
        R = torch.stack([rk ** k for k in range(order)])
        rhos = torch.linalg.solve(R, torch.tensor(b, dtype=torch.float64)).tolist()
    corr = sum(rho * d for rho, d in zip(rhos[:-1], d1s))
    return x_t - b_h * (corr + rhos[-1] * (m_t - m0))


def unipc(denoise, x, sigmas, i, state, noise, order=2):
    """UniPC-``order`` (bh2): each step first corrects the previous update with the new x0
    estimate (UniC, no extra evaluation), then predicts the next (UniP); orders ramp up
    from 1 as estimates accumulate and fall back to 1 for the last step."""
    s, s_next = _levels(sigmas, i)
    m = denoise(x, s)
    hist = state.setdefault("hist", [])  # (x0 estimate, level), newest first
    last = state.get("last")
    if last is not None:  # corrector: redo the last step with the x0 estimate at its end
        x_prev, s_prev, used = last
        x = _unipc_update(x_prev, hist[0][0], s_prev, s, hist[1:used], m_t=m)
    hist.insert(0, (m, s))
    del hist[order:]
    steps_left = len(sigmas) - 1 - i
    p = min(order, steps_left, len(hist))
    state["last"] = (x, s, p)
    return _unipc_update(x, m, s, s_next, hist[1:p]), m
