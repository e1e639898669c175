"""Feynman-Kac correctors (FKC, Skreta et al., ICML'25) with SMC resampling.

Target path p_tau proportional to prod_i (q^i_{1-tau})^{beta_i}: annealing (one expert, beta),
product of experts (beta_i = 1), CFG as a geometric average (betas (w, 1 - w)).
One unified rule covers every case (spec sampling-diffusion.md section 2a), for any noise
multiplier b > 0 and any linear-drift schedule f = -c(t) x:

    dx     = [-f + (1+b)/2 g^2 S] dtau + sqrt(b) g dW,        S = sum_i beta_i s_i
    dlog w = [(sum beta - 1) div f + g^2/2 (|S|^2 - sum_i beta_i |s_i|^2)] dtau

The reference code has one hand-derived weight per case (notebook / molecules / EDM);
we build the single rule, which reduces to each of them (CFG: w(w-1)/2 g^2 |s_c - s_u|^2).
Weights are accumulated at the pre-step x (Euler), kept in float64, reset after resampling.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

ScoreFn = Callable[[torch.Tensor, float], torch.Tensor]


def ess(log_w: torch.Tensor) -> torch.Tensor:
    """Effective sample size (sum w)^2 / sum w^2, in [1, K]; invariant to shifting log_w."""
    w = torch.exp(log_w - log_w.max())
    return w.sum() ** 2 / (w * w).sum()


def systematic_resample(log_w: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Sorted ancestor indices (K,): one uniform u, positions (u + k) / K, inverse CDF."""
    K = log_w.shape[0]
    cdf = torch.cumsum(torch.softmax(log_w.double(), 0), 0)  # (K,)
    u = torch.rand((), generator=generator, dtype=torch.float64)
    pos = (u + torch.arange(K, dtype=torch.float64)) / K
    return torch.searchsorted(cdf, pos, right=True).clamp(max=K - 1)


def multinomial_resample(log_w: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """K iid ancestor indices from softmax(log_w), sorted."""
    p = torch.softmax(log_w.double(), 0)
    return torch.multinomial(p, log_w.shape[0], replacement=True, generator=generator).sort().values


RESAMPLERS = {"systematic": systematic_resample, "multinomial": multinomial_resample}


def log_weight_rate(scores: Sequence[torch.Tensor], betas: Sequence[float], div_f, g2: float) -> torch.Tensor:
    """The unified FKC rate per particle (K,); scores: list of (K, D); div_f: scalar div of f."""
    S = sum(b * s for b, s in zip(betas, scores, strict=True))  # (K, D)
    quad = (S * S).sum(-1) - sum(b * (s * s).sum(-1) for b, s in zip(betas, scores, strict=True))  # (K,)
    return (sum(betas) - 1.0) * div_f + 0.5 * g2 * quad


def fkc_sample(
    experts: Sequence[ScoreFn],
    betas: Sequence[float],
    schedule,
    num_particles: int,
    dim: int,
    steps: int,
    generator: torch.Generator,
    noise_mult: float = 1.0,
    weighted: bool = True,
    resampler: str = "systematic",
    ess_threshold: float = 1.0,
    final_resample: bool = True,
    t_end: float = 1e-3,
):
    """Reverse-time Euler-Maruyama of the weighted SDE with SMC resampling.

    ``ess_threshold`` kappa: resample when ESS < kappa K (kappa >= 1: every step).
    ``weighted=False`` runs the same SDE without weights (the biased baseline).
    Returns x (K, D), log_w (K,) and a stats dict (forwards = steps * len(experts)).
    """
    if resampler not in RESAMPLERS:
        raise ValueError(f"resampler must be one of {sorted(RESAMPLERS)}, got {resampler!r}")
    if noise_mult <= 0:
        raise ValueError(f"noise_mult must be > 0, got {noise_mult}")
    K, D, b = num_particles, dim, noise_mult
    x = torch.randn(K, D, generator=generator, dtype=torch.float64)
    x = x * schedule.sigma(1.0) / math.sqrt(sum(betas))  # p_T ~ N(0, sigma_T^2 / sum beta)
    log_w = torch.zeros(K, dtype=torch.float64)
    ts = torch.linspace(1.0, t_end, steps + 1, dtype=torch.float64).tolist()
    stats = {"target_forwards": 0, "resamples": 0, "min_ess": float(K)}
    for k in range(steps):
        t, dt = ts[k], ts[k] - ts[k + 1]
        scores = [e(x, t) for e in experts]  # each (K, D)
        stats["target_forwards"] += len(experts)
        c, g2 = schedule.drift_coef(t), schedule.g2(t)
        if weighted:
            log_w = log_w + log_weight_rate(scores, betas, -c * D, g2) * dt
        S = sum(bi * s for bi, s in zip(betas, scores, strict=True))  # (K, D)
        z = torch.randn(K, D, generator=generator, dtype=torch.float64)
        x = x + (c * x + 0.5 * (1 + b) * g2 * S) * dt + math.sqrt(b * g2 * dt) * z
        last = k == steps - 1
        if weighted and not last:
            e_now = float(ess(log_w))
            stats["min_ess"] = min(stats["min_ess"], e_now)
            if ess_threshold >= 1.0 or e_now < ess_threshold * K:
                idx = RESAMPLERS[resampler](log_w, generator)
                x, log_w = x[idx], torch.zeros_like(log_w)
                stats["resamples"] += 1
    if weighted and final_resample:
        x, log_w = x[RESAMPLERS[resampler](log_w, generator)], torch.zeros_like(log_w)
    return x, log_w, stats
