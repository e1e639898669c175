"""Minority guidance (Um et al., ICLR'24): minority score, quantile levels, guided sampling.

Minority score of clean x0 (spec 3a.1): mean over n_iter noisings at step t of d(x0, x0_hat(x_t)),
with d = squared L2 or a perceptual distance (any callable (B, ...) x2 -> (B,), e.g. the
digits feature net). Levels are quantile bins (higher = more unique). Guidance toward level c*
(score form): eps_tilde = eps - sqrt(1 - abar_t) w grad log p(c* | x_t, t) (a v-model is
converted to eps first, see denoiser.py). ``QuadratureOracle`` gives the exact classifier
gradient for 1-D data by quadrature, for tests without training.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vargen.diffusion.denoiser import to_eps


def minority_score(x0, x0_hat_fn, abar, t: int, generator, n_iter: int = 5, distance=None):
    """(B,) mean distance between x0 (B, ...) and its Tweedie reconstruction from x_t."""
    a = abar[t]
    total = torch.zeros(x0.shape[0], dtype=torch.float64)
    for _ in range(n_iter):
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        rec = x0_hat_fn(x_t, t)
        d = ((x0 - rec) ** 2).flatten(1).sum(1) if distance is None else distance(x0, rec)
        total += d.double()
    return total / n_iter


def quantile_levels(scores: torch.Tensor, num_levels: int):
    """Labels in [0, L-1] (label k: q_{k-1} < l <= q_k, q_k = quantile((k+1)/L)) and thresholds (L,)."""
    q = torch.quantile(scores.double(), torch.arange(1, num_levels + 1, dtype=torch.float64) / num_levels)
    return assign_levels(scores, q), q


def assign_levels(scores: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    return torch.searchsorted(thresholds, scores.double().contiguous()).clamp(max=len(thresholds) - 1)


class QuadratureOracle:
    """Exact grad_x log p(c | x_t, t) for 1-D data with density on a grid (spec 3c):
    (sqrt(abar)/(1-abar)) (E[x0 | x_t, x0 in A_c] - E[x0 | x_t])."""

    def __init__(self, grid, density, grid_levels, abar):
        self.grid, self.logp0 = grid.double(), density.double().clamp_min(1e-300).log()
        self.levels, self.abar = grid_levels, abar

    def grad_log_p(self, x: torch.Tensor, t: int, level: int) -> torch.Tensor:
        a = self.abar[t]
        loglik = -0.5 * (x.reshape(-1, 1) - a.sqrt() * self.grid) ** 2 / (1 - a)  # (N, G)
        post = torch.softmax(self.logp0 + loglik, dim=1)  # (N, G) p(x0 | x_t)
        mask = (self.levels == level).double()
        post_c = post * mask / (post * mask).sum(1, keepdim=True).clamp_min(1e-300)
        diff = (post_c * self.grid).sum(1) - (post * self.grid).sum(1)
        return (a.sqrt() / (1 - a) * diff).reshape(x.shape)


def guided_eps_fn(
    model_fn: Callable, kind: str, grad_fn: Callable, level: int, w: float, abar: torch.Tensor
) -> Callable:
    """An eps function (x, t (B,) long) -> eps with minority guidance toward ``level`` at scale w."""

    def eps(x, t_B):
        t = int(t_B[0])
        a, s = abar[t].sqrt(), (1 - abar[t]).sqrt()
        e = to_eps(model_fn(x, t_B), kind, x, a, s)
        return e if w == 0 else e - s * w * grad_fn(x, t, level)

    return eps
