"""Diffusion samplers (issue 8): schedules, analytic denoisers, Feynman-Kac correctors."""

from vargen.diffusion import (
    absorbing,
    analytic,
    denoiser,
    fkc,
    lsd,
    minority,
    minority_classifier,
    schedules,
    time_shift,
)

__all__ = [
    "absorbing",
    "analytic",
    "denoiser",
    "fkc",
    "lsd",
    "minority",
    "minority_classifier",
    "schedules",
    "time_shift",
]
