"""Analytic denoisers: Gaussian and Gaussian-mixture data with closed-form noisy scores.

Data N(mu, v) perturbed by x_t = sqrt(abar) x0 + sqrt(1 - abar) eps has marginal
N(sqrt(abar) mu, abar v + 1 - abar), so score(x, t) = -(x - sqrt(abar) mu) / (abar v + 1 - abar); a
mixture's score is the responsibility-weighted sum of its components' scores. Used as exact
experts in tests.
"""

from __future__ import annotations

import torch


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
