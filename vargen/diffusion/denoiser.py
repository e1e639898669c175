"""Denoiser parameterisations and exact conversions between them.

A denoiser maps (x_t, t, cond) to one of: eps (the noise), x0 (the clean sample), v
(alpha_t * eps - sigma_t * x0, Salimans & Ho 2022 eq. 4) or score (grad log q_t).
All use the Gaussian perturbation x_t = alpha_t * x0 + sigma_t * eps.
"""

from __future__ import annotations

import torch

PARAMETERISATIONS = ("eps", "x0", "v", "score")


def to_eps(pred: torch.Tensor, kind: str, x_t: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """Convert a prediction of ``kind`` to eps (same shape as x_t)."""
    if kind == "eps":
        return pred
    if kind == "x0":
        return (x_t - alpha * pred) / sigma
    if kind == "v":  # eps = alpha v + sigma x_t  (alpha^2 + sigma^2 = 1, VP only)
        return alpha * pred + sigma * x_t
    if kind == "score":  # s = -eps / sigma
        return -sigma * pred
    raise ValueError(f"parameterisation must be one of {PARAMETERISATIONS}, got {kind!r}")


def eps_to(eps: torch.Tensor, kind: str, x_t: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """Convert eps to a prediction of ``kind`` (inverse of :func:`to_eps`)."""
    if kind == "eps":
        return eps
    if kind == "x0":
        return (x_t - sigma * eps) / alpha
    if kind == "v":
        x0 = (x_t - sigma * eps) / alpha
        return alpha * eps - sigma * x0
    if kind == "score":
        return -eps / sigma
    raise ValueError(f"parameterisation must be one of {PARAMETERISATIONS}, got {kind!r}")
