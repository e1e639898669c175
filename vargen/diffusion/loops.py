"""The DDIM / DDPM sampling loop over a discrete VP grid, with a step hook.

:func:`ddim_sample` walks :func:`~vargen.diffusion.schedules.respaced_grid` and takes one
:func:`~vargen.diffusion.schedules.ddim_step` per step. A :class:`StepHook` may move, per sample,
the step the network sees, the step the coefficients use and the abar the step transfers to
(the TS-DPM exposure-bias time shift, :class:`vargen.diffusion.time_shift.ExposureBiasTimeShift`,
is one); without a hook every sample uses the scheduled steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from vargen.diffusion.schedules import ddim_step, linear_alphas_cumprod, respaced_grid

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x (B, ...), t (B,) long) -> eps


class StepHook(Protocol):
    def adjust_step(self, x, i: int, t: int, t_next: int, abar, t_B, a_next_B):
        """(t_net_B, t_coef_B, a_next_B) for step ``i`` (scheduled t -> t_next, t_next = -1 at the
        last step) of the state x (B, ...): the network's step, the step whose abar the
        coefficients use (both (B,) long) and the abar transferred to (B,). ``t_B`` (B,) and
        ``a_next_B`` (B,) are the unmoved values."""


def ddim_sample(
    eps_fn: EpsFn,
    shape: tuple,
    steps: int,
    generator: torch.Generator,
    abar: torch.Tensor | None = None,
    eta: float = 0.0,
    hook: StepHook | None = None,
    dtype: torch.dtype = torch.float64,
):
    """DDIM (eta=0) / DDPM-like (eta=1) sampling on an evenly respaced grid (Song et al. 2021, eq. 12).

    The state (and the noise) is kept in ``dtype``: float64 for analytic denoisers, the model's
    dtype for a network, on the generator's device. Returns x0 (shape) and stats
    {"target_forwards", "shifted_steps"} (steps where the hook moved any sample's step).
    """
    device = generator.device
    abar = (linear_alphas_cumprod() if abar is None else abar).to(device)
    T = abar.shape[0]
    grid = respaced_grid(T, steps)
    x = torch.randn(shape, generator=generator, dtype=dtype, device=device)
    B = shape[0]
    bshape = (B,) + (1,) * (len(shape) - 1)
    stats = {"target_forwards": 0, "shifted_steps": 0}
    for i, t in enumerate(grid):
        t_next = grid[i + 1] if i + 1 < len(grid) else -1
        t_net = torch.full((B,), t, dtype=torch.long, device=device)
        t_coef = t_net
        a_next = abar[t_next].expand(B) if t_next >= 0 else torch.ones(B, dtype=abar.dtype, device=device)
        if hook is not None:
            t_net, t_coef, a_next = hook.adjust_step(x, i, t, t_next, abar, t_net, a_next)
        stats["shifted_steps"] += int((t_coef != t).any() or (t_next >= 0 and (a_next != abar[t_next]).any()))
        eps = eps_fn(x, t_net)
        stats["target_forwards"] += 1
        a_t = abar[t_coef].view(bshape).to(dtype)
        a_n = a_next.view(bshape).to(dtype)
        if t_next < 0:
            x = ddim_step(x, eps, a_t, a_n, 0.0)  # a_n = 1: x = x0-estimate
            break
        noise = torch.randn(shape, generator=generator, dtype=dtype, device=device) if eta > 0 else None
        x = ddim_step(x, eps, a_t, a_n, eta, noise)
    return x, stats
