"""Diffusion building blocks, split as diffusers does: noise schedules and the pure DDIM step
(``schedules``), the sampling loop with step hooks (``loops``), the TS-DPM time shift as a hook
(``time_shift``), Feynman-Kac corrected CFG (``fkc``), eps/v/x0 conversions (``denoiser``),
analytic denoisers for tests (``analytic``), minority guidance (``minority``) and masked
(absorbing) diffusion with its distillation (``absorbing``, ``lsd``). Models live in
:mod:`vargen.models`, samplers in :mod:`vargen.sampling`."""

from vargen.diffusion import (
    absorbing,
    analytic,
    denoiser,
    fkc,
    loops,
    lsd,
    minority,
    schedules,
    time_shift,
)

__all__ = [
    "absorbing",
    "analytic",
    "denoiser",
    "fkc",
    "loops",
    "lsd",
    "minority",
    "schedules",
    "time_shift",
]
