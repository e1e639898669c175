"""Forward SDE schedules (VP, VE) in continuous time t in [0, 1], and ScheduleShift.

Each schedule gives the Gaussian perturbation x_t = alpha(t) x0 + sigma(t) eps and the SDE
dx = f(x, t) dt + g(t) dW with f linear in x: f = -coef_f(t) x, so div f = -coef_f(t) D.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class VPSchedule:
    """Variance preserving: beta(t) = beta_min + t (beta_max - beta_min) (Song et al. 2021, eq. 11)."""

    beta_min: float = 0.1
    beta_max: float = 20.0

    def beta(self, t):
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def alpha(self, t):
        return math.exp(-0.5 * (self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t))

    def sigma(self, t):
        return math.sqrt(1.0 - self.alpha(t) ** 2)

    def drift_coef(self, t):  # f = -1/2 beta(t) x
        return 0.5 * self.beta(t)

    def g2(self, t):
        return self.beta(t)


@dataclass
class VESchedule:
    """Variance exploding: sigma(t) = s_min (s_max / s_min)^t, f = 0, g^2 = d sigma^2 / dt."""

    sigma_min: float = 0.01
    sigma_max: float = 10.0

    def alpha(self, t):
        return 1.0

    def sigma(self, t):
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def drift_coef(self, t):
        return 0.0

    def g2(self, t):
        return 2.0 * self.sigma(t) ** 2 * math.log(self.sigma_max / self.sigma_min)


@dataclass
class ScheduleShift:
    """Resolution-dependent shift of flow-matching sigmas, applied exactly once.

    ``kind="sd3"``: sigma' = s sigma / (1 + (s - 1) sigma) (SD3, Esser et al. 2024, eq. 23).
    ``kind="exponential"`` / ``"linear"``: diffusers' dynamic shifting with mu:
    exp(mu) / (exp(mu) + 1/sigma - 1) and mu / (mu + 1/sigma - 1).
    There is deliberately no bare ``shift`` argument: the value is named by its kind.
    """

    kind: str = "sd3"
    value: float = 1.0

    def __post_init__(self):
        if self.kind not in ("sd3", "exponential", "linear"):
            raise ValueError(f"ScheduleShift.kind must be sd3|exponential|linear, got {self.kind!r}")
        if self.kind != "exponential" and self.value <= 0:
            raise ValueError(f"ScheduleShift.value must be > 0 for kind {self.kind!r}, got {self.value}")

    def __call__(self, sigmas: torch.Tensor) -> torch.Tensor:
        if self.kind == "sd3":
            return self.value * sigmas / (1 + (self.value - 1) * sigmas)
        m = math.exp(self.value) if self.kind == "exponential" else self.value
        inner = torch.where(sigmas > 0, 1 / sigmas.clamp_min(1e-30) - 1, torch.full_like(sigmas, math.inf))
        return m / (m + inner)

    @staticmethod
    def mu_for_resolution(seq_len: int, base_len=256, max_len=4096, base_shift=0.5, max_shift=1.15) -> float:
        """Linear interpolation of mu in the image sequence length (diffusers' calculate_shift)."""
        slope = (max_shift - base_shift) / (max_len - base_len)
        return base_shift + slope * (seq_len - base_len)


@dataclass
class RectifiedFlowSchedule:
    """Rectified flow x = (1 - sigma) x0 + sigma eps (v = eps - x0) in sigma-time (spec 2a).

    In sigma-time the forward SDE has f = -x / (1 - sigma) (d log alpha / d sigma with
    alpha = 1 - sigma) and g^2 = d sigma^2/d sigma - 2 (d log alpha/d sigma) sigma^2
    = 2 sigma / (1 - sigma); both blow up at sigma = 1. The schedule's time t in [0, 1] is
    therefore sigma-time scaled to stop at ``sigma_max`` < 1: sigma(t) = sigma_max t, and by the
    chain rule f = -sigma_max x / (1 - sigma), g^2 = sigma_max 2 sigma / (1 - sigma) per unit t.
    Samplers start from N(0, sigma_max^2 / sum beta), which ignores the remaining
    alpha = 1 - sigma_max of signal (a 1e-3 error at the default). The score of a velocity
    model is s = -(x + (1 - sigma) v) / sigma (spec 2a).
    """

    sigma_max: float = 0.999

    def __post_init__(self):
        if not 0 < self.sigma_max < 1:
            raise ValueError(f"RectifiedFlowSchedule.sigma_max must be in (0, 1), got {self.sigma_max}")

    def alpha(self, t):
        return 1.0 - self.sigma(t)

    def sigma(self, t):
        return self.sigma_max * t

    def drift_coef(self, t):  # f = -c x with c = sigma_max / (1 - sigma)
        return self.sigma_max / (1.0 - self.sigma(t))

    def g2(self, t):
        s = self.sigma(t)
        return self.sigma_max * 2.0 * s / (1.0 - s)
