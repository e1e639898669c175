"""Exposure-bias time shift (TS-DPM, Li et al., ICLR'24) on DDPM / DDIM over a discrete VP grid.

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

from collections.abc import Callable
from dataclasses import dataclass

import torch

MODES = ("canonical", "pndm_target", "adm_target")
EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x (B, ...), t (B,) long) -> eps


def linear_alphas_cumprod(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """abar_t for the DDPM linear beta schedule (Ho et al. 2020), float64 (T,)."""
    return torch.cumprod(1 - torch.linspace(beta_start, beta_end, T, dtype=torch.float64), 0)


def cosine_alphas_cumprod(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """abar_t of the cosine schedule (Nichol & Dhariwal 2021, eq. 17), betas capped at max_beta."""
    f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * torch.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
    return torch.cumprod(1 - betas, 0)


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


def ddim_sample(
    eps_fn: EpsFn,
    shape: tuple,
    steps: int,
    generator: torch.Generator,
    abar: torch.Tensor | None = None,
    eta: float = 0.0,
    time_shift: ExposureBiasTimeShift | None = None,
    dtype: torch.dtype = torch.float64,
):
    """DDIM (eta=0) / DDPM-like (eta=1) sampling on an evenly respaced grid (Song et al. 2021, eq. 12).

    The state (and the noise) is kept in ``dtype``: float64 for analytic denoisers, the model's
    dtype for a network, on the generator's device. Returns x0 (shape) and stats
    {"target_forwards", "shifted_steps"} (steps where any sample shifted).
    """
    device = generator.device
    abar = (linear_alphas_cumprod() if abar is None else abar).to(device)
    T = abar.shape[0]
    grid = torch.linspace(T - 1, 0, steps).round().long().tolist()
    x = torch.randn(shape, generator=generator, dtype=dtype, device=device)
    B = shape[0]
    bshape = (B,) + (1,) * (len(shape) - 1)
    stats = {"target_forwards": 0, "shifted_steps": 0}
    for i, t in enumerate(grid):
        t_next = grid[i + 1] if i + 1 < len(grid) else -1
        t_net = torch.full((B,), t, dtype=torch.long, device=device)
        t_coef = t_net
        a_next = abar[t_next].expand(B) if t_next >= 0 else torch.ones(B, dtype=abar.dtype, device=device)
        shift = time_shift is not None and i > 0  # never at x_T: pure noise, as both references
        if shift and time_shift.mode == "canonical":
            t_net = t_coef = time_shift.shifted(x, t, abar)
        elif shift and t_next >= 0 and time_shift.mode == "pndm_target":
            a_next = abar[time_shift.shifted(x, t_next, abar)]  # the shifted next step is the target
        elif shift and t_next >= 0:  # adm_target: t_s - stride is the target
            a_next = abar[(time_shift.shifted(x, t, abar) - (t - t_next)).clamp(min=0)]
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


def ddim_step(x, eps, a_t, a_n, eta: float, noise=None):
    """One DDIM transfer abar_t -> abar_n (Song et al. 2021, eq. 12); a_t, a_n broadcast with x.

    x0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t), x' = sqrt(a_n) x0 + sqrt(1 - a_n - s^2) eps + s z with
    s = eta sqrt((1 - a_n) / (1 - a_t)) sqrt(1 - a_t / a_n); eta = 1 is the DDPM ancestral step
    on the respaced grid (posterior variance beta_tilde (1 - a_n) / (1 - a_t)).
    """
    x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    sig = eta * ((1 - a_n) / (1 - a_t)).sqrt() * (1 - a_t / a_n).clamp_min(0).sqrt()
    x = a_n.sqrt() * x0 + (1 - a_n - sig**2).clamp_min(0).sqrt() * eps
    return x if noise is None else x + sig * noise
