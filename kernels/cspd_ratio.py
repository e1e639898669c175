"""Fused CSpD last-step verification: density ratio and acceptance, and the residual's proposals.

Continuous speculative decoding (:mod:`vargen.sampling.speculative.cspd_verify`) tests each
continuous draft token x0 on the last reverse step of the diffusion head, where draft and target
(run with the same noise) are diagonal Gaussians N(mu_q, s_q^2) and N(mu_p, s_p^2). In torch, the
ratio and the leading-acceptance count are a dozen passes over the (B, g, C) block (a subtraction, a division,
a square, two logs, the sums over C, twice; then a log of the uniforms, a clamp, a compare, a
cumulative product and a sum), and each round of the residual sampler does as many again over
(K, B, C) proposals. The two Triton kernels here read every input once per token.

Semantics (the torch references define them; they are exactly the computations
:mod:`vargen.sampling.speculative.cspd_verify` does, so the CSpD sampler draws the same tokens
from the same generator whichever backend runs). ``logN(x; m, s) = sum_C (-z^2 / 2 - log s - log(2 pi) / 2)``
with ``z = (x - m) / s``.

:func:`cspd_accept`: for drafts ``x0_BgC`` and last-step means / stds (each broadcastable to
(B, g, C); the heads' std is one value per token, (B, g, 1)), the paper factor ``log_sigma_Bg``
(0 in exact mode), uniforms ``u_Bg`` and caps ``cap_B``:

1. ``log_r = logN(x0; mu_p, s_p) + log_sigma - logN(x0; mu_q, s_q)``, (B, g);
2. draft j passes iff ``log u_j < min(0, log r_j)``; ``n`` = leading passes, at most ``cap``.

Returns ``(log_r_Bg, n_B)`` (n int64).

:func:`cspd_propose`: a round of the residual's acceptance-rejection at each row's rejected
position, with the target's and draft's last-step Gaussians ``(mp, sp)``, ``(mq, sq)`` (B, C)
(broadcastable), ``log_sigma_B`` and standard normal noise ``e_KBC``:

1. proposals ``y = mp + sp * e`` (K, B, C), draws from p;
2. ``log_qp = logN(y; mq, sq) - logN(y; mp, sp) - log_sigma``, (K, B): the residual accepts y
   with probability ``max(0, 1 - exp(log_qp))``
   (:func:`vargen.sampling.speculative.cspd_verify.residual_rounds`).

Returns ``(y_KBC, log_qp_KB)``.

The kernels compute in fp64 for fp64 inputs, else fp32, and store in the inputs' dtype. Sums over
C run in another order and ``log`` is not bit-identical across libraries, so float outputs match
the references to rounding, and ``n`` can differ only where ``log u`` is within rounding of
``log r`` (probability ~1e-7 per draft in fp32).
"""

from __future__ import annotations

import math

import torch

from vargen_kernels.dispatch import TRITON_AVAILABLE, backend_for, check_kernel_mode

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def gaussian_logpdf(x_NC, mean_NC, std_NC):
    """Diagonal Gaussian log density summed over the last (token) dim, (N,)."""
    z = (x_NC - mean_NC) / std_NC
    return (-0.5 * z.pow(2) - std_NC.log() - HALF_LOG_2PI).sum(-1)


def _broadcasts(t: torch.Tensor, shape) -> bool:
    """Whether ``t`` broadcasts to exactly ``shape``."""
    try:
        return torch.broadcast_shapes(t.shape, shape) == torch.Size(shape)
    except RuntimeError:
        return False


def _check_accept(x0, mu_p, s_p, mu_q, s_q, log_sigma, u, cap) -> None:
    if x0.dim() != 3 or not x0.is_floating_point():
        raise ValueError(f"x0_BgC must be a float (B, g, C) tensor, got {tuple(x0.shape)}")
    B, g, C = x0.shape
    for name, t in (("mu_p", mu_p), ("s_p", s_p), ("mu_q", mu_q), ("s_q", s_q)):
        if not _broadcasts(t, (B, g, C)):
            raise ValueError(f"{name} must broadcast to x0's shape {(B, g, C)}, got {tuple(t.shape)}")
    for name, t, shape in (("log_sigma_Bg", log_sigma, (B, g)), ("u_Bg", u, (B, g)), ("cap_B", cap, (B,))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


def cspd_accept_reference(x0_BgC, mu_p, s_p, mu_q, s_q, log_sigma_Bg, u_Bg, cap_B):
    """Torch reference of :func:`cspd_accept`: ``(log_r_Bg, n_B)`` (module docstring)."""
    _check_accept(x0_BgC, mu_p, s_p, mu_q, s_q, log_sigma_Bg, u_Bg, cap_B)
    x0 = x0_BgC
    mu_p, s_p, mu_q, s_q = (t.expand_as(x0) for t in (mu_p, s_p, mu_q, s_q))
    log_r = gaussian_logpdf(x0, mu_p, s_p) + log_sigma_Bg - gaussian_logpdf(x0, mu_q, s_q)
    n_B = (u_Bg.log() < log_r.clamp(max=0)).long().cumprod(1).sum(1)
    return log_r, torch.minimum(n_B, cap_B)


def _check_propose(mp, sp, mq, sq, log_sigma, e) -> None:
    if e.dim() != 3 or not e.is_floating_point():
        raise ValueError(f"e_KBC must be a float (K, B, C) tensor, got {tuple(e.shape)}")
    K, B, C = e.shape
    if tuple(mp.shape) != (B, C):
        raise ValueError(f"mp_BC must have shape {(B, C)}, got {tuple(mp.shape)}")
    for name, t in (("sp", sp), ("mq", mq), ("sq", sq)):
        if not _broadcasts(t, (B, C)):
            raise ValueError(f"{name} must broadcast to {(B, C)}, got {tuple(t.shape)}")
    if tuple(log_sigma.shape) != (B,):
        raise ValueError(f"log_sigma_B must have shape {(B,)}, got {tuple(log_sigma.shape)}")


def cspd_propose_reference(mp_BC, sp, mq, sq, log_sigma_B, e_KBC):
    """Torch reference of :func:`cspd_propose`: ``(y_KBC, log_qp_KB)`` (module docstring)."""
    _check_propose(mp_BC, sp, mq, sq, log_sigma_B, e_KBC)
    y = mp_BC + sp * e_KBC  # (K, B, C)
    return y, gaussian_logpdf(y, mq, sq) - gaussian_logpdf(y, mp_BC, sp) - log_sigma_B


if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def _logpdf_terms(x, m, s, ACC: tl.constexpr, HALF_LOG_2PI: tl.constexpr):
        """Per-dimension Gaussian log density terms (summed by the caller)."""
        if ACC == tl.float32:
            z = tl.math.div_rn(x - m, s)  # IEEE division, as torch (fp64 division always is)
        else:
            z = (x - m) / s
        return -0.5 * (z * z) - tl.log(s) - HALF_LOG_2PI

    @triton.jit
    def _accept_kernel(
        x_ptr,
        mp_ptr,
        sp_ptr,
        mq_ptr,
        sq_ptr,
        ls_ptr,
        u_ptr,
        cap_ptr,
        logr_ptr,
        n_ptr,
        g,
        C,
        sx_b,
        sx_g,
        smp_b,
        smp_g,
        smp_c,
        ssp_b,
        ssp_g,
        ssp_c,
        smq_b,
        smq_g,
        smq_c,
        ssq_b,
        ssq_g,
        ssq_c,
        sls_b,
        su_b,
        ACC: tl.constexpr,
        HALF_LOG_2PI: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """One program per row: the g ratios in order, then the leading-pass count."""
        b = tl.program_id(0).to(tl.int64)
        cs = tl.arange(0, BLOCK_C)
        mc = cs < C
        n = tl.zeros((), dtype=tl.int64)
        alive = tl.full((), 1, dtype=tl.int64)
        for j in range(g):
            x = tl.load(x_ptr + b * sx_b + j * sx_g + cs, mask=mc, other=0.0).to(ACC)
            mp = tl.load(mp_ptr + b * smp_b + j * smp_g + cs * smp_c, mask=mc, other=0.0).to(ACC)
            sp = tl.load(sp_ptr + b * ssp_b + j * ssp_g + cs * ssp_c, mask=mc, other=1.0).to(ACC)
            mq = tl.load(mq_ptr + b * smq_b + j * smq_g + cs * smq_c, mask=mc, other=0.0).to(ACC)
            sq = tl.load(sq_ptr + b * ssq_b + j * ssq_g + cs * ssq_c, mask=mc, other=1.0).to(ACC)
            lp = tl.sum(tl.where(mc, _logpdf_terms(x, mp, sp, ACC, HALF_LOG_2PI), 0.0), axis=0)
            lq = tl.sum(tl.where(mc, _logpdf_terms(x, mq, sq, ACC, HALF_LOG_2PI), 0.0), axis=0)
            log_r = lp + tl.load(ls_ptr + b * sls_b + j).to(ACC) - lq
            tl.store(logr_ptr + b * g + j, log_r.to(logr_ptr.dtype.element_ty))
            u = tl.load(u_ptr + b * su_b + j).to(ACC)
            ok = tl.log(u) < tl.minimum(log_r, 0.0, propagate_nan=tl.PropagateNan.ALL)
            alive = alive * ok.to(tl.int64)
            n += alive
        tl.store(n_ptr + b, tl.minimum(n, tl.load(cap_ptr + b).to(tl.int64)))

    @triton.jit
    def _propose_kernel(
        mp_ptr,
        sp_ptr,
        mq_ptr,
        sq_ptr,
        ls_ptr,
        e_ptr,
        y_ptr,
        lqp_ptr,
        X,
        B,
        C,
        smp_b,
        smp_c,
        ssp_b,
        ssp_c,
        smq_b,
        smq_c,
        ssq_b,
        ssq_c,
        ACC: tl.constexpr,
        HALF_LOG_2PI: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """BLOCK_R proposals (k, b) per program, each of C values in registers."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cs = tl.arange(0, BLOCK_C)
        in_r = rows < X
        m = in_r[:, None] & (cs < C)[None, :]
        b = (rows % B)[:, None]
        c = cs[None, :]
        e = tl.load(e_ptr + rows[:, None] * C + c, mask=m, other=0.0).to(ACC)
        mp = tl.load(mp_ptr + b * smp_b + c * smp_c, mask=m, other=0.0).to(ACC)
        sp = tl.load(sp_ptr + b * ssp_b + c * ssp_c, mask=m, other=1.0).to(ACC)
        mq = tl.load(mq_ptr + b * smq_b + c * smq_c, mask=m, other=0.0).to(ACC)
        sq = tl.load(sq_ptr + b * ssq_b + c * ssq_c, mask=m, other=1.0).to(ACC)
        y = (mp + sp * e).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + rows[:, None] * C + c, y, mask=m)
        y = y.to(ACC)  # the stored proposal is the one whose densities are compared
        lq = tl.sum(tl.where(m, _logpdf_terms(y, mq, sq, ACC, HALF_LOG_2PI), 0.0), axis=1)
        lp = tl.sum(tl.where(m, _logpdf_terms(y, mp, sp, ACC, HALF_LOG_2PI), 0.0), axis=1)
        ls = tl.load(ls_ptr + rows % B, mask=in_r, other=0.0).to(ACC)
        tl.store(lqp_ptr + rows, (lq - lp - ls).to(lqp_ptr.dtype.element_ty), mask=in_r)


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def cspd_accept(x0_BgC, mu_p, s_p, mu_q, s_q, log_sigma_Bg, u_Bg, cap_B, *, backend: str = "auto"):
    """Last-step density ratios and leading acceptances: ``(log_r_Bg, n_B)`` (module docstring).

    ``u_Bg``: uniforms in [0, 1) (``torch.rand(B, g)``, what the sampler draws); ``cap_B``: the
    most drafts each row may accept. ``backend``: ``"auto"``
    (:func:`vargen_kernels.dispatch.backend_for`) or forced.
    """
    args = (x0_BgC, mu_p, s_p, mu_q, s_q, log_sigma_Bg, u_Bg, cap_B)
    which = backend_for(*args, backend=backend)
    if which == "torch":
        return cspd_accept_reference(*args)
    _check_accept(*args)
    check_kernel_mode(_accept_kernel, which)
    B, g, C = x0_BgC.shape
    log_r = torch.empty(B, g, dtype=x0_BgC.dtype, device=x0_BgC.device)
    n_B = torch.empty(B, dtype=torch.int64, device=x0_BgC.device)
    if B == 0:
        return log_r, n_B
    x0 = x0_BgC if x0_BgC.stride(-1) == 1 else x0_BgC.contiguous()
    mp, sp, mq, sq = (t.expand_as(x0) for t in (mu_p, s_p, mu_q, s_q))  # stride 0 where broadcast
    ls, u, cap = log_sigma_Bg.contiguous(), u_Bg.contiguous(), cap_B.contiguous()
    _accept_kernel[(B,)](
        x0,
        mp,
        sp,
        mq,
        sq,
        ls,
        u,
        cap,
        log_r,
        n_B,
        g,
        C,
        x0.stride(0),
        x0.stride(1),
        *mp.stride(),
        *sp.stride(),
        *mq.stride(),
        *sq.stride(),
        ls.stride(0),
        u.stride(0),
        ACC=_acc(x0.dtype),
        HALF_LOG_2PI=HALF_LOG_2PI,
        BLOCK_C=triton.next_power_of_2(max(C, 1)),
    )
    return log_r, n_B


def cspd_propose(mp_BC, sp, mq, sq, log_sigma_B, e_KBC, *, backend: str = "auto"):
    """Residual proposals from p and their log q / (Sigma p): ``(y_KBC, log_qp_KB)`` (module
    docstring). ``e_KBC``: standard normal noise (``torch.randn(K, B, C)``, what the sampler
    draws). ``backend``: ``"auto"`` (:func:`vargen_kernels.dispatch.backend_for`) or forced."""
    args = (mp_BC, sp, mq, sq, log_sigma_B, e_KBC)
    which = backend_for(*args, backend=backend)
    if which == "torch":
        return cspd_propose_reference(*args)
    _check_propose(*args)
    check_kernel_mode(_propose_kernel, which)
    K, B, C = e_KBC.shape
    e = e_KBC.contiguous()
    y = torch.empty_like(e)
    lqp = torch.empty(K, B, dtype=e.dtype, device=e.device)
    X = K * B
    if X == 0:
        return y, lqp
    mp, sp, mq, sq = (t.expand(B, C) for t in (mp_BC, sp, mq, sq))
    block_c = triton.next_power_of_2(max(C, 1))
    block_r = max(1, min(64, 4096 // block_c))
    _propose_kernel[(triton.cdiv(X, block_r),)](
        mp,
        sp,
        mq,
        sq,
        log_sigma_B.contiguous(),
        e,
        y,
        lqp,
        X,
        B,
        C,
        *mp.stride(),
        *sp.stride(),
        *mq.stride(),
        *sq.stride(),
        ACC=_acc(e.dtype),
        HALF_LOG_2PI=HALF_LOG_2PI,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
    )
    return y, lqp
