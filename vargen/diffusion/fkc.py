"""Feynman-Kac correctors (FKC, Skreta et al., ICML'25) with SMC resampling.

Target path p_tau proportional to prod_i (q^i_{1-tau})^{beta_i}: annealing (one expert, beta),
product of experts (beta_i = 1), CFG as a geometric average (betas (w, 1 - w)).
One unified rule covers every case (spec sampling-diffusion.md section 2a), for any noise
multiplier b > 0 and any linear-drift schedule f = -c(t) x:

    dx     = [-f + (1+b)/2 g^2 S] dtau + sqrt(b) g dW,        S = sum_i beta_i s_i
    dlog w = [(sum beta - 1) div f + g^2/2 (|S|^2 - sum_i beta_i |s_i|^2)] dtau

The reference code has one hand-derived weight per case (notebook / molecules / EDM).
vargen samples the CFG case, to which the rule reduces as w(w-1)/2 g^2 |s_c - s_u|^2, on the
DDPM ancestral steps of a discrete VP grid (:func:`fkc_cfg_ddpm`, the ``fkc_cfg`` sampler).
Weights are accumulated at the pre-step x (Euler), kept in float64, reset after resampling.
"""

from __future__ import annotations

import math

import torch

from vargen.diffusion.schedules import ddim_step, respaced_grid
from vargen_kernels.fkc import fkc_update


def ess(log_w: torch.Tensor) -> torch.Tensor:
    """Effective sample size (sum w)^2 / sum w^2 over the last axis, in [1, K]; shift invariant."""
    w = torch.exp(log_w - log_w.max(-1, keepdim=True).values)
    return w.sum(-1) ** 2 / (w * w).sum(-1)


def systematic_resample(log_w: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Sorted ancestor indices (..., K): one uniform u per row, positions (u + k) / K, inverse CDF."""
    K = log_w.shape[-1]
    cdf = torch.cumsum(torch.softmax(log_w.double(), -1), -1)  # (..., K)
    u = torch.rand(log_w.shape[:-1], generator=generator, dtype=torch.float64, device=generator.device)
    pos = (u.to(log_w.device)[..., None] + torch.arange(K, dtype=torch.float64, device=log_w.device)) / K
    return torch.searchsorted(cdf, pos, right=True).clamp(max=K - 1)


def multinomial_resample(log_w: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """K iid ancestor indices per row from softmax(log_w) over the last axis, sorted."""
    p = torch.softmax(log_w.double(), -1)
    return torch.multinomial(p, log_w.shape[-1], replacement=True, generator=generator).sort(-1).values


RESAMPLERS = {"systematic": systematic_resample, "multinomial": multinomial_resample}


# --------------------------------------------------------------------------------------
# FKC-CFG on discrete DDPM ancestral steps (spec sections 2a and 5)
# --------------------------------------------------------------------------------------


def cfg_ancestral_increment(eps_c, eps_u, w: float, a_t: float, a_n: float) -> torch.Tensor:
    """Log-weight increment (N,) of one VP ancestral step abar_t -> abar_n under CFG scale w.

    Derivation from the unified rule (module docstring) with betas (w, 1 - w): sum beta = 1, so
    the div f term vanishes, and |S|^2 - sum_i beta_i |s_i|^2 = w (w - 1) |s_c - s_u|^2, giving
    the rate w (w - 1) / 2 g^2 |s_c - s_u|^2. On the discrete VP grid s = -eps / sigma_t with
    sigma_t^2 = 1 - abar_t, so |s_c - s_u|^2 = |eps_c - eps_u|^2 / (1 - abar_t). The VP SDE with
    the same abar has g^2 = beta(tau) = -d log abar / d tau, so over the step (scores frozen at
    the pre-step x, Euler as in the module) the rate integrates to

        dlog w = w (w - 1) / 2 * log(abar_n / abar_t) * |eps_c - eps_u|^2 / (1 - abar_t),

    with log(abar_n / abar_t) = -log(1 - beta_tilde_t), beta_tilde_t = 1 - abar_t / abar_n; to
    first order this is spec section 5's 0.5 w (w-1) beta_tilde_t |eps_c - eps_u|^2 / (1 - abar_t).
    b = 1 makes the drift the usual CFG reverse SDE, whose discretisation is the DDPM ancestral
    step on the guided eps, so only weights and resampling are added.
    """
    g2_dt = math.log(a_n / a_t)
    diff2 = (eps_c.double() - eps_u.double()).pow(2).flatten(1).sum(1)  # (N,)
    return 0.5 * w * (w - 1) * g2_dt * diff2 / (1 - a_t)


def resample_groups(log_w_GK: torch.Tensor, generator: torch.Generator, resampler: str, mask_G=None):
    """Ancestor indices (G, K) into the flat (G K) particle axis, resampling within each group.

    Every group draws; groups with ``mask_G`` False keep their particles (identity indices).
    """
    G, K = log_w_GK.shape
    base = torch.arange(G * K, device=log_w_GK.device).view(G, K)
    out = base[:, :1] + RESAMPLERS[resampler](log_w_GK, generator)  # (G, K)
    return out if mask_G is None else torch.where(mask_G[:, None], out, base)


def _update_and_resample(log_w, inc: dict, generator, resampler, ess_threshold, stats, backend):
    """Add the increment ``inc`` (keywords of :func:`fkc_update`; empty: none), then resample
    every group whose ESS < kappa K (every group for kappa >= 1). Returns (log_w, flat-axis
    ancestor indices (G, K) or None when no group resampled). ``stats`` (None: not recorded)
    gets ``min_ess`` and ``resamples`` (two host reads, as before the kernel).

    One float64 uniform per group is drawn only when some group resamples (systematic), or the
    multinomial draws: the draws of :func:`resample_groups`, so every path draws alike.
    """
    G = log_w.shape[0]
    every = ess_threshold >= 1.0
    u_G = None
    if resampler == "systematic" and every:  # every group resamples: the uniforms are certain
        u_G = torch.rand(G, generator=generator, dtype=torch.float64, device=generator.device)
        u_G = u_G.to(log_w.device)
    log_w, ess_G, mask, idx = fkc_update(log_w, **inc, ess_threshold=ess_threshold, u_G=u_G, backend=backend)
    if stats is not None:
        stats["min_ess"] = min(stats["min_ess"], float(ess_G.min()))
    if idx is None and (every or bool(mask.any())):
        if resampler == "systematic":  # the update once more, now with the uniforms
            u_G = torch.rand(G, generator=generator, dtype=torch.float64, device=generator.device)
            log_w, _, _, idx = fkc_update(
                log_w, ess_threshold=ess_threshold, u_G=u_G.to(log_w.device), backend=backend
            )
        else:
            idx = resample_groups(log_w, generator, resampler, mask)
            log_w = torch.where(mask[:, None], torch.zeros_like(log_w), log_w)
    if stats is not None and idx is not None:
        stats["resamples"] += int(mask.sum())
    return log_w, idx


def fkc_cfg_ddpm(
    eps_pair_fn,
    shape: tuple,
    particles: int,
    abar: torch.Tensor,
    steps: int,
    w: float,
    generator: torch.Generator,
    resampler: str = "systematic",
    ess_threshold: float = 1.0,
    weighted: bool = True,
    dtype: torch.dtype = torch.float64,
    keep_all: bool = False,
    backend: str = "auto",
):
    """FKC-corrected classifier-free guidance on DDPM ancestral steps (Skreta et al. 2025).

    ``shape`` = (G K, ...): G groups of K = ``particles`` consecutive particles, each group one
    condition. ``eps_pair_fn(x, t_B) -> (eps_c, eps_u)``. Per step on the grid of
    :func:`vargen.diffusion.loops.ddim_sample` (linspace(T-1, 0, steps) rounded):
    accumulate :func:`cfg_ancestral_increment` at the pre-step x, take the ancestral step
    (eta = 1) on eps_u + w (eps_c - eps_u), then resample every group whose ESS < kappa K
    (kappa = ``ess_threshold`` >= 1: every step), log-weights reset to 0; never after the last
    step. The final step (t = 0) returns the x0-estimate. Output: one particle per group,
    (G, ...): the group is resampled once more and a uniformly random position is kept. (Keeping
    position 0 would be biased: with sorted systematic indices it is always the ancestor of the
    lowest CDF stratum [0, 1/K), not a draw from the weights once earlier resampling has
    ordered the particles; a uniform position is exactly one draw from softmax(log_w).)
    ``weighted=False`` runs the same chain without weights (plain CFG, first particle kept).
    ``keep_all=True`` returns every particle (G K, ...) after that final resampling (analytic tests).
    Stats: ``particles`` = G K simulated, ``resamples`` = group resampling events, ``min_ess``.
    Increment, ESS and systematic resampling run as :func:`vargen_kernels.fkc.fkc_update` (the
    fused kernel under ``backend``, see :func:`vargen_kernels.dispatch.backend_for`); every backend
    draws the same particles.
    """
    if resampler not in RESAMPLERS:
        raise ValueError(f"resampler must be one of {sorted(RESAMPLERS)}, got {resampler!r}")
    K = particles
    N = shape[0]
    if N % K:
        raise ValueError(f"{N} particles are not a whole number of groups of {K}")
    G, T = N // K, abar.shape[0]
    grid = respaced_grid(T, steps)
    bshape = (N,) + (1,) * (len(shape) - 1)
    device = generator.device
    x = torch.randn(shape, generator=generator, dtype=dtype, device=device)  # p_T ~ N(0, 1): sum beta = 1
    log_w = torch.zeros(G, K, dtype=torch.float64, device=device)
    stats = {"target_forwards": 0, "resamples": 0, "min_ess": float(K), "particles": N}
    for i, t in enumerate(grid):
        t_next = grid[i + 1] if i + 1 < len(grid) else -1
        a_t = float(abar[t])
        a_n = float(abar[t_next]) if t_next >= 0 else 1.0
        eps_c, eps_u = eps_pair_fn(x, torch.full((N,), t, dtype=torch.long, device=device))
        stats["target_forwards"] += 1
        # the increment at the pre-step x, added by the fused update below (after the step)
        inc = dict(eps_c=eps_c, eps_u=eps_u, w=w, a_t=a_t, a_n=a_n) if weighted and w != 1.0 else {}
        eps = eps_u + w * (eps_c - eps_u)
        at = torch.full(bshape, a_t, dtype=dtype, device=device)
        an = torch.full(bshape, a_n, dtype=dtype, device=device)
        if t_next < 0:
            x = ddim_step(x, eps, at, an, 0.0)  # a_n = 1: the x0-estimate
            if inc:
                log_w = fkc_update(log_w, **inc, backend=backend)[0]
            break
        x = ddim_step(
            x, eps, at, an, 1.0, torch.randn(shape, generator=generator, dtype=dtype, device=device)
        )
        if weighted:
            log_w, idx = _update_and_resample(log_w, inc, generator, resampler, ess_threshold, stats, backend)
            if idx is not None:
                x = x[idx.flatten()]
    if weighted:
        idx = _update_and_resample(log_w, {}, generator, resampler, 1.0, None, backend)[1]  # (G, K)
    if not weighted:
        return (x if keep_all else x.view(G, K, *shape[1:])[:, 0]), stats
    if keep_all:
        return x[idx.flatten()], stats
    pos = torch.randint(K, (G,), generator=generator, device=device)
    return x[idx[torch.arange(G, device=device), pos]], stats
