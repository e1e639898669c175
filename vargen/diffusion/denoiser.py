"""The denoiser protocol and exact conversions between parameterisations.

A denoiser maps (x_t, t, cond) to one of: eps (the noise), x0 (the clean sample), v
(alpha_t * eps - sigma_t * x0, Salimans & Ho 2022 eq. 4) or score (grad log q_t).
All use the Gaussian perturbation x_t = alpha_t * x0 + sigma_t * eps.

Every diffusion sampler in vargen talks to a :class:`Denoiser`: an object with

- ``prediction``: which of :data:`PARAMETERISATIONS` ``__call__`` returns;
- ``abar``: (T,) float64, the cumulative alpha-bar of its discrete VP training grid
  (alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t));
- ``__call__(x_t, t_B, cond_B)``: x_t (B, ...), t_B (B,) long steps on that grid,
  cond_B (B,) long class labels or None; returns a prediction shaped like x_t;
- ``num_classes`` and ``null_class`` when it is class-conditional (``null_class`` is the
  label of the unconditional branch for classifier-free guidance).

Samplers convert through :func:`predict_eps` / :func:`predict_x0`, so trained models
(:mod:`vargen.models.diffusion_unet`) and the analytic denoisers of
:mod:`vargen.diffusion.analytic` are interchangeable.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

PARAMETERISATIONS = ("eps", "x0", "v", "score")


@runtime_checkable
class Denoiser(Protocol):
    prediction: str
    abar: torch.Tensor

    def __call__(self, x_t: torch.Tensor, t_B: torch.Tensor, cond_B: torch.Tensor | None) -> torch.Tensor: ...


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


def coefficients(abar: torch.Tensor, t_B: torch.Tensor, x_t: torch.Tensor):
    """alpha_t, sigma_t of a discrete VP grid at per-sample steps, shaped to broadcast with x_t."""
    a_B = abar.to(x_t.device)[t_B].to(x_t.dtype)  # (B,)
    shape = (-1,) + (1,) * (x_t.dim() - 1)
    return a_B.sqrt().view(shape), (1 - a_B).sqrt().view(shape)


def predict_eps(den: Denoiser, x_t: torch.Tensor, t_B: torch.Tensor, cond_B=None) -> torch.Tensor:
    """eps_theta(x_t, t) of any denoiser, whatever it predicts."""
    alpha, sigma = coefficients(den.abar, t_B, x_t)
    return to_eps(den(x_t, t_B, cond_B), den.prediction, x_t, alpha, sigma)


def predict_x0(den: Denoiser, x_t: torch.Tensor, t_B: torch.Tensor, cond_B=None) -> torch.Tensor:
    """The Tweedie estimate E[x0 | x_t] of any denoiser."""
    alpha, sigma = coefficients(den.abar, t_B, x_t)
    eps = to_eps(den(x_t, t_B, cond_B), den.prediction, x_t, alpha, sigma)
    return eps_to(eps, "x0", x_t, alpha, sigma)
