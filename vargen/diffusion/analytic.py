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


class GaussianMixtureDenoiser:
    """The exact eps-denoiser of per-dimension iid mixture data on a discrete VP grid.

    Implements :class:`vargen.diffusion.denoiser.Denoiser`: ``abar`` (T,), per-sample steps
    t_B (B,), any data shape (B, ...). ``cond_B`` is ignored (unconditional data).
    """

    prediction = "eps"

    def __init__(self, weights, means, variances, abar: torch.Tensor):
        self.w = torch.as_tensor(weights, dtype=torch.float64)
        self.mu = torch.as_tensor(means, dtype=torch.float64)
        self.var = torch.as_tensor(variances, dtype=torch.float64)
        self.abar = abar.double()

    def score(self, x: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor:
        a = self.abar[t_B].view((-1,) + (1,) * x.dim())  # (B, 1.., 1) broadcast over x and M
        var_t = a * self.var + 1 - a  # (B, 1.., M)
        diff = x.double()[..., None] - a.sqrt() * self.mu  # (B, ..., M)
        logp = torch.log(self.w) - 0.5 * torch.log(var_t) - 0.5 * diff**2 / var_t
        resp = torch.softmax(logp, dim=-1)
        return (resp * (-diff / var_t)).sum(-1).to(x.dtype)

    def __call__(self, x_t: torch.Tensor, t_B: torch.Tensor, cond_B=None) -> torch.Tensor:
        sigma = (1 - self.abar[t_B]).sqrt().view((-1,) + (1,) * (x_t.dim() - 1)).to(x_t.dtype)
        return -sigma * self.score(x_t, t_B)
