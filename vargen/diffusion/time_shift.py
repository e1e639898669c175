"""Exposure-bias time shift (TS-DPM, Li et al., ICLR'24): a step hook of the DDPM / DDIM loop
(:func:`vargen.diffusion.loops.ddim_sample`) over a discrete VP grid.

At a noisy step t > cutoff, the network is evaluated at the step t_s of the full training grid,
inside the window |tau - t| <= window // 2, whose noise variance best matches the per-sample
variance of x_t (spec section 1a). ``variance="paper"`` matches 1 - abar_tau as the reference
code does; it ignores the data term and so shifts even *exact* marginal samples towards
noisier steps. ``variance="corrected"`` matches abar_tau * data_var + 1 - abar_tau instead,
which is a no-op on exact samples (the correct version we add). The first step (x_T, pure
noise) is never shifted, as in both reference repos.
``mode="canonical"``: network, x0-estimate and DDIM coefficients use t_s (paper Fig. 1).
``mode="pndm_target"``: the pnm_solver.py variant: the network sees the scheduled t, the
window is centred on the next step and the shifted step becomes the transfer target.
``mode="adm_target"``: the ADM repo's ``ddim_sample`` variant: the network and the x0-estimate
use the scheduled t, t_s is searched around the *current* step and the transfer goes to
t_s - stride (stride = t - t_next, clipped at 0). The reference compares the variance with the
flipped abar array, which approximates 1 - abar only for the cosine schedule; we compare with
the variance model above (1 - abar_tau, or its corrected form), the quantity it approximates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vargen.diffusion.loops import ddim_sample

MODES = ("canonical", "pndm_target", "adm_target")


@dataclass
class ExposureBiasTimeShift:
    window: int = 0  # on the full training grid; 0 disables; -1 = calibrate_window() per run
    cutoff: int = 300  # shift only where t > cutoff
    variance: str = "paper"  # paper | corrected
    data_var: float = 1.0  # Var(x0) per entry, used by variance="corrected"
    mode: str = "canonical"  # canonical | pndm_target | adm_target

    def __post_init__(self):
        if self.variance not in ("paper", "corrected"):
            raise ValueError(f"time_shift.variance must be paper|corrected, got {self.variance!r}")
        if self.mode not in MODES:
            raise ValueError(f"time_shift.mode must be {'|'.join(MODES)}, got {self.mode!r}")
        if self.window < -1:
            raise ValueError(f"time_shift.window must be >= 0 or -1 (calibrate), got {self.window}")

    def shifted(self, x: torch.Tensor, t: int, abar: torch.Tensor) -> torch.Tensor:
        """Per-sample coupled steps t_s (B,) long for the state x (B, ...) at scheduled step t."""
        if self.window < 0:
            raise ValueError("time_shift.window=-1 must be resolved with calibrate_window() first")
        B, T, h = x.shape[0], abar.shape[0], self.window // 2
        t_B = torch.full((B,), t, dtype=torch.long)
        if h == 0 or t <= self.cutoff:
            return t_B
        v_B = x.reshape(B, -1).double().var(dim=1)  # per-sample statistic (spec 1a.1)
        taus = torch.arange(max(t - h, 0), min(t + h, T - 1) + 1, device=abar.device)  # (W,)
        a = abar[taus]
        target_W = 1 - a if self.variance == "paper" else a * self.data_var + 1 - a
        return taus[(v_B[:, None] - target_W[None]).abs().argmin(1)]  # (B,)

    def adjust_step(self, x, i: int, t: int, t_next: int, abar, t_B, a_next_B):
        """The loop's :class:`~vargen.diffusion.loops.StepHook`: (t_net_B, t_coef_B, a_next_B) of
        step ``i`` as ``mode`` says; the first step (x_T, pure noise) is never shifted."""
        if i == 0:
            return t_B, t_B, a_next_B
        if self.mode == "canonical":
            t_s = self.shifted(x, t, abar)
            return t_s, t_s, a_next_B
        if t_next < 0:
            return t_B, t_B, a_next_B
        if self.mode == "pndm_target":  # the shifted next step is the target
            return t_B, t_B, abar[self.shifted(x, t_next, abar)]
        return (
            t_B,
            t_B,
            abar[(self.shifted(x, t, abar) - (t - t_next)).clamp(min=0)],
        )  # adm_target: t_s - stride


WINDOWS = (0, 5, 10, 20, 40, 80, 160, 320)  # candidates of :func:`calibrate_window`


def calibrate_window(
    abar: torch.Tensor,
    num_entries: int,
    steps: int,
    *,
    cutoff: int = 300,
    variance: str = "corrected",
    data_var: float = 1.0,
    mode: str = "canonical",
    eta: float = 0.0,
    candidates=WINDOWS,
    samples: int = 256,
    seed: int = 0,
) -> tuple[int, dict]:
    """The window for this schedule, image size and step count, and the sweep behind it.

    The reference's window (80) is its CIFAR-10 cosine DDIM-5 setting; elsewhere the per-sample
    variance estimate's spread (sd ~ v sqrt(2 / D) over D entries) and the schedule's slope
    change what a window means. Here every candidate runs DDIM with the *exact* denoiser of
    Gaussian data N(0, data_var) per entry (``samples`` images of ``num_entries`` entries, the
    same noise for every candidate), where the only error is the few-step discretisation's
    variance drift that the shift exists to correct; the window whose samples' variance is
    nearest ``data_var`` wins (ties: the smallest). Returns (window, {window: |var/data_var - 1|}).
    """
    v0 = float(data_var)

    def eps(x, t_B):
        a = abar[t_B].view(-1, *([1] * (x.dim() - 1)))
        return (1 - a).sqrt() * x / (a * v0 + 1 - a)

    errors = {}
    for w in candidates:
        ts = ExposureBiasTimeShift(w, cutoff, variance, v0, mode) if w > 0 else None
        g = torch.Generator().manual_seed(seed)
        x, _ = ddim_sample(eps, (samples, num_entries), steps, g, abar, eta, ts)
        errors[int(w)] = abs(float(x.var()) / v0 - 1)
    best = min(errors, key=lambda w: (errors[w], w))
    return best, errors
