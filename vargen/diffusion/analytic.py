"""Analytic denoisers: Gaussian and Gaussian-mixture data with closed-form noisy scores.

Data N(mu, v) perturbed by x_t = alpha x0 + sigma eps has marginal N(alpha mu, alpha^2 v + sigma^2),
so score(x, t) = -(x - alpha mu) / (alpha^2 v + sigma^2); a mixture's score is the
responsibility-weighted sum of its components' scores. Used as exact experts in tests.
"""

from __future__ import annotations

import torch


class GaussianMixture1D:
    """Mixture of 1-D (per-dimension iid) Gaussians; one component gives a plain Gaussian."""

    def __init__(self, weights, means, variances, schedule):
        self.w = torch.as_tensor(weights, dtype=torch.float64)
        self.mu = torch.as_tensor(means, dtype=torch.float64)
        self.var = torch.as_tensor(variances, dtype=torch.float64)
        self.schedule = schedule

    def score(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """grad log q_t(x), x: (K, D) -> (K, D)."""
        a, s = self.schedule.alpha(t), self.schedule.sigma(t)
        var_t = a * a * self.var + s * s  # (M,)
        diff = x[..., None] - a * self.mu  # (K, D, M)
        logp = torch.log(self.w) - 0.5 * torch.log(var_t) - 0.5 * diff**2 / var_t  # (K, D, M)
        resp = torch.softmax(logp, dim=-1)
        return (resp * (-diff / var_t)).sum(-1)

    def eps(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """The eps-parameterised denoiser: eps = -sigma * score."""
        return -self.schedule.sigma(t) * self.score(x, t)
