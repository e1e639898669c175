"""Fused FKC-CFG weight update: log-weight increment, ESS and systematic resampling per group.

After each DDPM ancestral step, FKC-corrected classifier-free guidance
(:func:`vargen.diffusion.fkc.fkc_cfg_ddpm`) adds a log-weight increment per particle (a reduction
of ``|eps_c - eps_u|^2`` over the image), normalises the weights of each group of K particles,
computes the group's effective sample size and, where it is low, draws K ancestor indices by
systematic resampling. In torch that is a flatten, a subtraction, a square, a sum, an exp, two
more sums, a softmax, a cumsum, a searchsorted and some masking, each with its temporaries. The
Triton kernel here does all of it with one program per group.

Semantics, per group of K particles (the torch reference :func:`fkc_update_reference` defines
them; it is exactly what ``fkc_cfg_ddpm`` computes, so the sampler draws the same
particles whichever backend runs). Everything is float64.

1. Increment (when ``eps_c``/``eps_u`` are given):
   ``log_w += 0.5 w (w - 1) log(a_n / a_t) * |eps_c - eps_u|^2 / (1 - a_t)``, the squared norm
   over all but the first axis (see :func:`vargen.diffusion.fkc.cfg_ancestral_increment`).
2. ``ess = (sum v)^2 / sum v^2`` with ``v = exp(log_w - max log_w)``.
3. ``resample = ess < kappa K`` for ``kappa = ess_threshold < 1``, every group for ``kappa >= 1``.
4. With the caller's uniform ``u`` per group (when given), resampling groups get sorted ancestors
   ``searchsorted(cdf, (u + k) / K, right=True)`` clamped to K - 1, ``cdf = cumsum(softmax(log_w))``,
   as indices into the flat (G K) particle axis, and their log-weights reset to 0; the other
   groups keep identity indices and their log-weights.

Outputs ``(log_w_GK, ess_G, resample_G, idx_GK)`` (``idx_GK`` None without ``u``). The kernel's
sums run in another order, so its float outputs differ from the reference's by a few ulps and an
index can differ only when a stratum position is within that of a CDF step.
"""

from __future__ import annotations

import math

import torch

from vargen_kernels.dispatch import TRITON_AVAILABLE, backend_for, check_kernel_mode


def _check_args(log_w_GK, eps_c, eps_u, u_G) -> None:
    if log_w_GK.dim() != 2 or log_w_GK.dtype != torch.float64 or log_w_GK.shape[1] < 1:
        raise ValueError(
            f"log_w_GK must be float64 (G, K >= 1), got {log_w_GK.dtype} {tuple(log_w_GK.shape)}"
        )
    G, K = log_w_GK.shape
    if (eps_c is None) != (eps_u is None):
        raise ValueError("eps_c and eps_u must be given together")
    if eps_c is not None and (eps_c.shape != eps_u.shape or eps_c.shape[0] != G * K):
        raise ValueError(f"eps_c, eps_u must share a shape (G K = {G * K}, ...), got {tuple(eps_c.shape)}")
    if u_G is not None and tuple(u_G.shape) != (G,):
        raise ValueError(f"u_G must have shape ({G},), got {tuple(u_G.shape)}")


def increment_coefs(w: float, a_t: float, a_n: float) -> tuple[float, float]:
    """(numerator factor, denominator) of step 1, in the order the increment evaluates them."""
    return 0.5 * w * (w - 1) * math.log(a_n / a_t), 1 - a_t


def fkc_update_reference(
    log_w_GK: torch.Tensor,
    eps_c: torch.Tensor | None = None,
    eps_u: torch.Tensor | None = None,
    *,
    w: float = 1.0,
    a_t: float = 0.5,
    a_n: float = 1.0,
    ess_threshold: float = 1.0,
    u_G: torch.Tensor | None = None,
):
    """Torch reference of :func:`fkc_update` (steps 1-4 of the module docstring), vectorised."""
    _check_args(log_w_GK, eps_c, eps_u, u_G)
    G, K = log_w_GK.shape
    if eps_c is not None:
        num, den = increment_coefs(w, a_t, a_n)
        diff2 = (eps_c.double() - eps_u.double()).pow(2).flatten(1).sum(1)  # (G K,)
        log_w_GK = log_w_GK + (num * diff2 / den).view(G, K)
    v = torch.exp(log_w_GK - log_w_GK.max(-1, keepdim=True).values)
    ess_G = v.sum(-1) ** 2 / (v * v).sum(-1)
    every = torch.ones(G, dtype=torch.bool, device=log_w_GK.device)
    resample_G = ess_G < ess_threshold * K if ess_threshold < 1.0 else every
    if u_G is None:
        return log_w_GK, ess_G, resample_G, None
    cdf = torch.cumsum(torch.softmax(log_w_GK.double(), -1), -1)  # (G, K)
    k = torch.arange(K, dtype=torch.float64, device=log_w_GK.device)
    pos = (u_G.double()[:, None] + k) / K
    base = torch.arange(G * K, device=log_w_GK.device).view(G, K)
    idx = base[:, :1] + torch.searchsorted(cdf, pos, right=True).clamp(max=K - 1)
    idx_GK = torch.where(resample_G[:, None], idx, base)
    log_w_GK = torch.where(resample_G[:, None], torch.zeros_like(log_w_GK), log_w_GK)
    return log_w_GK, ess_G, resample_G, idx_GK


if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def _fkc_kernel(
        logw_ptr,
        c_ptr,
        u_ptr,
        unif_ptr,
        coef_ptr,
        logw_out_ptr,
        ess_ptr,
        mask_ptr,
        idx_ptr,
        K,
        D,
        s_c,
        s_u,
        HAS_INC: tl.constexpr,
        RESAMPLE: tl.constexpr,
        EVERY: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """One program per group: steps 1-4 of the module docstring. ``coef_ptr`` holds the fp64
        scalars (increment factor, denominator, kappa K): Python floats would arrive as fp32."""
        grp = tl.program_id(0).to(tl.int64)
        ks = tl.arange(0, BLOCK_K)
        in_k = ks < K
        lw = tl.load(logw_ptr + grp * K + ks, mask=in_k, other=0.0)
        if HAS_INC:
            rows = grp * K + ks  # particle rows of this group
            acc = tl.zeros((BLOCK_K,), dtype=tl.float64)
            for d0 in range(0, D, BLOCK_D):
                ds = d0 + tl.arange(0, BLOCK_D)
                m = in_k[:, None] & (ds < D)[None, :]
                c = tl.load(c_ptr + rows[:, None] * s_c + ds[None, :], mask=m, other=0.0).to(tl.float64)
                u = tl.load(u_ptr + rows[:, None] * s_u + ds[None, :], mask=m, other=0.0).to(tl.float64)
                acc += tl.sum((c - u) * (c - u), axis=1)
            lw = lw + tl.load(coef_ptr) * acc / tl.load(coef_ptr + 1)
        lw_m = tl.where(in_k, lw, float("-inf"))
        v = tl.exp(lw_m - tl.max(lw_m, axis=0))  # 0 on padding
        sv = tl.sum(v, axis=0)
        ess = sv * sv / tl.sum(v * v, axis=0)
        if EVERY:
            resample = tl.full((), 1, tl.int1)
        else:
            resample = ess < tl.load(coef_ptr + 2)
        tl.store(ess_ptr + grp, ess)
        tl.store(mask_ptr + grp, resample.to(tl.int8))
        if RESAMPLE:
            cdf = tl.cumsum(v / sv, axis=0)  # (BLOCK_K,), padding repeats the last value
            pos = (tl.load(unif_ptr + grp).to(tl.float64) + ks.to(tl.float64)) / K  # (BLOCK_K,)
            below = (cdf[None, :] <= pos[:, None]) & in_k[None, :]  # [k, i]: cdf_i <= pos_k
            anc = tl.minimum(tl.sum(below.to(tl.int64), axis=1), K - 1)
            tl.store(idx_ptr + grp * K + ks, grp * K + tl.where(resample, anc, ks), mask=in_k)
            lw = tl.where(resample, 0.0, lw)
        tl.store(logw_out_ptr + grp * K + ks, lw, mask=in_k)


def fkc_update(
    log_w_GK: torch.Tensor,
    eps_c: torch.Tensor | None = None,
    eps_u: torch.Tensor | None = None,
    *,
    w: float = 1.0,
    a_t: float = 0.5,
    a_n: float = 1.0,
    ess_threshold: float = 1.0,
    u_G: torch.Tensor | None = None,
    backend: str = "auto",
):
    """One FKC-CFG weight update of G groups of K particles (module docstring).

    ``log_w_GK`` float64 (G, K); ``eps_c``, ``eps_u`` (G K, ...) the guided pair at the pre-step x
    (None: no increment); ``w`` the CFG scale, ``a_t``, ``a_n`` abar before/after the step;
    ``u_G`` uniforms in [0, 1) (float64), one per group (None: no resampling). Returns
    ``(log_w_GK, ess_G, resample_G, idx_GK or None)``; the input is never modified.
    ``backend``: ``"auto"`` (:func:`vargen_kernels.dispatch.backend_for`) or forced.
    """
    kw = dict(w=w, a_t=a_t, a_n=a_n, ess_threshold=ess_threshold, u_G=u_G)
    which = backend_for(log_w_GK, eps_c, eps_u, u_G, backend=backend)
    if which == "torch":
        return fkc_update_reference(log_w_GK, eps_c, eps_u, **kw)
    _check_args(log_w_GK, eps_c, eps_u, u_G)
    check_kernel_mode(_fkc_kernel, which)
    G, K = log_w_GK.shape
    dev = log_w_GK.device
    out_GK = torch.empty(G, K, dtype=torch.float64, device=dev)
    ess_G = torch.empty(G, dtype=torch.float64, device=dev)
    mask_G = torch.empty(G, dtype=torch.int8, device=dev)
    idx_GK = torch.empty(G, K, dtype=torch.int64, device=dev) if u_G is not None else None
    if G == 0:
        return out_GK, ess_G, mask_G.bool(), idx_GK
    has_inc = eps_c is not None
    c_ND = eps_c.reshape(G * K, -1) if has_inc else log_w_GK
    u_ND = eps_u.reshape(G * K, -1) if has_inc else log_w_GK
    c_ND = c_ND if c_ND.stride(-1) == 1 else c_ND.contiguous()
    u_ND = u_ND if u_ND.stride(-1) == 1 else u_ND.contiguous()
    num, den = increment_coefs(w, a_t, a_n) if has_inc else (0.0, 1.0)
    coef = torch.tensor([num, den, ess_threshold * K], dtype=torch.float64, device=dev)
    D = c_ND.shape[1] if has_inc else 1
    _fkc_kernel[(G,)](
        log_w_GK.contiguous(),
        c_ND,
        u_ND,
        u_G.double().contiguous() if u_G is not None else log_w_GK,
        coef,
        out_GK,
        ess_G,
        mask_G,
        idx_GK if idx_GK is not None else out_GK,
        K,
        D,
        c_ND.stride(0),
        u_ND.stride(0),
        HAS_INC=has_inc,
        RESAMPLE=u_G is not None,
        EVERY=ess_threshold >= 1.0,
        BLOCK_K=triton.next_power_of_2(K),
        BLOCK_D=min(1024, triton.next_power_of_2(D)),
    )
    return out_GK, ess_G, mask_G.bool(), idx_GK
