"""Discrete VP noise schedules and the pure DDIM step: the one schedule system of vargen.

A schedule is abar (T,) float64, the cumulative product of 1 - beta_t on the training grid
t = 0 .. T-1 (x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps). Samplers walk the evenly respaced
grid :func:`respaced_grid` and move between two of its steps with :func:`ddim_step`; the loops
that do so live in :mod:`vargen.diffusion.loops` (DDIM / DDPM) and :mod:`vargen.diffusion.fkc`
(FKC-CFG).
"""

from __future__ import annotations

import torch


def linear_alphas_cumprod(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """abar_t for the DDPM linear beta schedule (Ho et al. 2020), float64 (T,)."""
    return torch.cumprod(1 - torch.linspace(beta_start, beta_end, T, dtype=torch.float64), 0)


def cosine_alphas_cumprod(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """abar_t of the cosine schedule (Nichol & Dhariwal 2021, eq. 17), betas capped at max_beta."""
    f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * torch.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
    return torch.cumprod(1 - betas, 0)


def respaced_grid(T: int, steps: int) -> list[int]:
    """The ``steps`` training-grid steps a sampler visits, T-1 down to 0: linspace(T-1, 0, steps)
    rounded (DDIM's evenly respaced grid, Song et al. 2021 sec. 4.2)."""
    return torch.linspace(T - 1, 0, steps).round().long().tolist()


def ddim_step(x, eps, a_t, a_n, eta: float, noise=None):
    """One DDIM transfer abar_t -> abar_n (Song et al. 2021, eq. 12); a_t, a_n broadcast with x.

    x0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t), x' = sqrt(a_n) x0 + sqrt(1 - a_n - s^2) eps + s z with
    s = eta sqrt((1 - a_n) / (1 - a_t)) sqrt(1 - a_t / a_n); eta = 1 is the DDPM ancestral step
    on the respaced grid (posterior variance beta_tilde (1 - a_n) / (1 - a_t)).
    """
    x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    sig = eta * ((1 - a_n) / (1 - a_t)).sqrt() * (1 - a_t / a_n).clamp_min(0).sqrt()
    x = a_n.sqrt() * x0 + (1 - a_n - sig**2).clamp_min(0).sqrt() * eps
    return x if noise is None else x + sig * noise
