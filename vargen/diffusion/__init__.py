"""Diffusion samplers (issue 8): schedules, analytic denoisers, Feynman-Kac correctors."""

from vargen.diffusion import analytic, denoiser, fkc, minority, minority_classifier, schedules, time_shift

__all__ = ["analytic", "denoiser", "fkc", "minority", "minority_classifier", "schedules", "time_shift"]
