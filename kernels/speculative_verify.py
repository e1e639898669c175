"""Fused speculative verification: acceptance test, first rejection and residual draw in one pass.

The verification step of speculative sampling (SD, draft model) and speculative Jacobi decoding
(SJD) is, per row of a batch, a chain of small torch ops over the (W, V) window: a Gumbel-max
sample of the target at every window position, a gather of p(x) and q(x) per draft, a ratio, a
cumulative product for the first rejection, two gathers of the rejected position's p and q, the
residual norm(max(0, p - q)) and one more Gumbel-max sample. The Triton kernel here does all of
it with one program per row, reading each probability row once (twice for the rejected position)
and writing four small integer outputs.

Semantics, per row (the torch reference :func:`verify_reference` defines them; it is exactly the
computation :func:`vargen.sampling.speculative.verify.accept_and_correct` does, so the
samplers draw the same tokens from the same generator whichever backend runs). ``W`` window
positions, ``g = W - 1`` drafts ``x_j`` drawn from ``q_j``:

1. ``y_j = argmax(log p_j + G(u_j))`` for every window position (the bonus token; Jacobi's next
   drafts), ``G(u) = -log(-log(clamp(u, 2**-24, 1 - 2**-24)))`` from the caller's uniforms
   ``u_BWV``; tokens with ``p = 0`` can never win; ties go to the smallest id.
2. ``cap = clamp(room - 1, 0, g)``: drafts the row may accept (the end of the sequence caps it).
3. Draft ``j`` passes iff ``a_j < min(1, r_j)`` and ``j < cap``, with ``r_j = p_j(x_j) / q_j(x_j)``
   (or the caller's ``ratio_Bg``, e.g. GSD's group ratio) and uniforms ``a_Bg``;
   ``n`` = the number of leading passes.
4. ``rejected = n < cap``; then ``z = argmax(log res + G(w))`` with
   ``res = max(0, p_n - q_{min(n, g-1)})`` normalised by its mass, or ``p_n`` itself when the mass
   is ``<= RESIDUAL_EPS`` (p ~ q numerically) or there are no drafts; ``w`` = the caller's
   uniforms ``u_res_BV``. Otherwise ``z = y_n``.

Outputs ``(n_B, z_B, y_BW, cap_B)``, int64. The kernel computes in fp32 and can differ from the
reference only where float rounding decides: two Gumbel scores within an ulp (``log`` is not
bit-identical across libraries) or a residual mass within an ulp of ``RESIDUAL_EPS`` (the sums run
in another order). The whole vocabulary row sits in one program (``BLOCK_V =
next_power_of_2(V)``), which suits codebook-sized vocabularies.
"""

from __future__ import annotations

import torch

from vargen_kernels.dispatch import TRITON_AVAILABLE, backend_for, check_kernel_mode

RESIDUAL_EPS = 1e-6  # residual mass below this means p ~ q numerically: sample p instead
U_EPS = 2.0**-24  # uniform clamp of the Gumbel noise (as the logits warper's)


def gumbel_argmax(probs_XV: torch.Tensor, uniform_XV: torch.Tensor) -> torch.Tensor:
    """One id per row of (..., V) probabilities by Gumbel-max on given uniforms; log(0) = -inf
    is never chosen."""
    neg_g = uniform_XV.clamp(U_EPS, 1.0 - U_EPS).log_().neg_().log_()  # -G(u), in place on the copy
    return probs_XV.log().sub_(neg_g).argmax(-1)  # log p - (-G) is log p + G bit for bit


def token_residual(p_BV: torch.Tensor, q_BV: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)); p itself when the residual mass vanishes."""
    res = (p_BV - q_BV).clamp_(min=0)
    mass = res.sum(-1, keepdim=True)
    return torch.where(mass > RESIDUAL_EPS, res / mass.clamp(min=RESIDUAL_EPS), p_BV)


def _check_args(p_BWV, q_BgV, x_Bg, room_B, u_BWV, a_Bg, u_res_BV, ratio_Bg) -> None:
    """Validate shapes (shared by every backend, so they fail alike)."""
    if p_BWV.dim() != 3 or p_BWV.shape[1] < 1 or p_BWV.shape[2] < 1:
        raise ValueError(f"p_BWV must be (B, W >= 1, V >= 1), got {tuple(p_BWV.shape)}")
    B, W, V = p_BWV.shape
    want = {
        "q_BgV": (q_BgV, (B, W - 1, V)),
        "x_Bg": (x_Bg, (B, W - 1)),
        "room_B": (room_B, (B,)),
        "u_BWV": (u_BWV, (B, W, V)),
        "a_Bg": (a_Bg, (B, W - 1)),
        "u_res_BV": (u_res_BV, (B, V)),
        "ratio_Bg": (ratio_Bg, (B, W - 1)),
    }
    for name, (t, shape) in want.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


def verify_reference(
    p_BWV: torch.Tensor,
    q_BgV: torch.Tensor,
    x_Bg: torch.Tensor,
    room_B: torch.Tensor,
    u_BWV: torch.Tensor,
    a_Bg: torch.Tensor,
    u_res_BV: torch.Tensor,
    ratio_Bg: torch.Tensor | None = None,
    residual_fn=token_residual,
    all_y: bool = True,
):
    """Torch reference of :func:`verify` (steps 1-4 of the module docstring), vectorised.

    ``residual_fn(p_BV, q_BV)`` may replace the token residual (GSD's group residual); the
    kernel only does the token one. Returns int64 ``(n_B, z_B, y_BW, cap_B)``. ``all_y=False``
    (a caller that only needs z, such as SD): y is drawn at the one position n from the same
    uniforms (the same z), and ``y_BW`` is None.
    """
    _check_args(p_BWV, q_BgV, x_Bg, room_B, u_BWV, a_Bg, u_res_BV, ratio_Bg)
    B, W, V = p_BWV.shape
    g = W - 1
    if ratio_Bg is None:
        x = x_Bg[..., None]
        ratio_Bg = p_BWV[:, :g].gather(2, x)[..., 0] / q_BgV.gather(2, x)[..., 0]
    y_BW = gumbel_argmax(p_BWV, u_BWV) if all_y else None
    cap_B = (room_B - 1).clamp(min=0, max=g)
    j = torch.arange(g, device=p_BWV.device)
    acc_Bg = (a_Bg < ratio_Bg.clamp(max=1.0)) & (j[None] < cap_B[:, None])
    n_B = acc_Bg.long().cumprod(1).sum(1)  # leading accepted drafts
    rejected_B = n_B < cap_B  # a real rejection, not the end-of-window / end-of-sequence cap
    p_n = p_BWV.gather(1, n_B[:, None, None].expand(B, 1, V))[:, 0]  # (B, V)
    if g > 0:
        q_n = q_BgV.gather(1, n_B.clamp(max=g - 1)[:, None, None].expand(B, 1, V))[:, 0]  # (B, V)
        res = residual_fn(p_n, q_n)
    else:
        res = p_n
    z_res = gumbel_argmax(res, u_res_BV)
    if all_y:
        y_n = y_BW.gather(1, n_B[:, None])[:, 0]
    else:  # the same elementwise ops on the one row: the same y_n
        y_n = gumbel_argmax(p_n, u_BWV.gather(1, n_B[:, None, None].expand(B, 1, V))[:, 0])
    z_B = torch.where(rejected_B, z_res, y_n)
    return n_B, z_B, y_BW, cap_B


if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def _gumbel_argmax_row(p, u, U_LO: tl.constexpr, U_HI: tl.constexpr):
        """argmax(log p + Gumbel(u)) of a row in registers; p = 0 (and padding) never wins."""
        u = tl.minimum(tl.maximum(u, U_LO), U_HI)
        # log of p clamped to the smallest subnormal: the same value for every p > 0, and no
        # log(0) evaluated (the interpreter's numpy would warn)
        logp = tl.where(p > 0, tl.log(tl.maximum(p, 1.401298464324817e-45)), float("-inf"))
        score = logp - tl.log(-tl.log(u))
        return tl.argmax(score, axis=0, tie_break_left=True).to(tl.int64)

    @triton.jit
    def _verify_kernel(
        p_ptr,
        q_ptr,
        x_ptr,
        room_ptr,
        u_ptr,
        a_ptr,
        ures_ptr,
        ratio_ptr,
        n_ptr,
        z_ptr,
        y_ptr,
        cap_ptr,
        W,
        V,
        sp_b,
        sp_w,
        sq_b,
        sq_w,
        sx_b,
        su_b,
        su_w,
        sa_b,
        sures_b,
        sr_b,
        HAS_RATIO: tl.constexpr,
        EPS: tl.constexpr,
        U_LO: tl.constexpr,
        U_HI: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        """One program per row: steps 1-4 of the module docstring."""
        b = tl.program_id(0).to(tl.int64)  # int64: b * stride may exceed 2**31
        offs = tl.arange(0, BLOCK_V)
        in_row = offs < V
        g = W - 1
        for j in range(W):  # 1. a target sample at every window position
            p = tl.load(p_ptr + b * sp_b + j * sp_w + offs, mask=in_row, other=0.0).to(tl.float32)
            u = tl.load(u_ptr + b * su_b + j * su_w + offs, mask=in_row, other=0.5).to(tl.float32)
            tl.store(y_ptr + b * W + j, _gumbel_argmax_row(p, u, U_LO, U_HI))
        room = tl.load(room_ptr + b).to(tl.int64)
        cap = tl.minimum(tl.maximum(room - 1, 0), g)  # 2.
        n = tl.zeros((), dtype=tl.int64)
        alive = tl.full((), 1, dtype=tl.int64)
        for j in range(g):  # 3. leading passes
            if HAS_RATIO:
                r = tl.load(ratio_ptr + b * sr_b + j).to(tl.float32)
            else:
                x = tl.load(x_ptr + b * sx_b + j)
                px = tl.load(p_ptr + b * sp_b + j * sp_w + x).to(tl.float32)
                qx = tl.load(q_ptr + b * sq_b + j * sq_w + x).to(tl.float32)
                r = tl.math.div_rn(px, qx)  # IEEE division, as torch
            a = tl.load(a_ptr + b * sa_b + j).to(tl.float32)
            ok = (a < tl.minimum(r, 1.0, propagate_nan=tl.PropagateNan.ALL)) & (j < cap)
            alive = alive * ok.to(tl.int64)
            n += alive
        # 4. the token after the accepted drafts: a residual draw on rejection, else y_n
        p_n = tl.load(p_ptr + b * sp_b + n * sp_w + offs, mask=in_row, other=0.0).to(tl.float32)
        res = p_n
        if g > 0:
            q_n = tl.load(q_ptr + b * sq_b + tl.minimum(n, g - 1) * sq_w + offs, mask=in_row, other=0.0)
            diff = tl.maximum(p_n - q_n.to(tl.float32), 0.0)
            mass = tl.sum(diff, axis=0)
            res = tl.where(mass > EPS, tl.math.div_rn(diff, tl.maximum(mass, EPS)), p_n)
        w = tl.load(ures_ptr + b * sures_b + offs, mask=in_row, other=0.5).to(tl.float32)
        z_res = _gumbel_argmax_row(res, w, U_LO, U_HI)
        # y_n again from the row already loaded (a load of y_ptr here would race its store on GPUs)
        u_n = tl.load(u_ptr + b * su_b + n * su_w + offs, mask=in_row, other=0.5).to(tl.float32)
        y_n = _gumbel_argmax_row(p_n, u_n, U_LO, U_HI)
        tl.store(n_ptr + b, n)
        tl.store(z_ptr + b, tl.where(n < cap, z_res, y_n))
        tl.store(cap_ptr + b, cap)


def _row_major(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dimension is unit-stride, else a copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def verify(
    p_BWV: torch.Tensor,
    q_BgV: torch.Tensor,
    x_Bg: torch.Tensor,
    room_B: torch.Tensor,
    u_BWV: torch.Tensor,
    a_Bg: torch.Tensor,
    u_res_BV: torch.Tensor,
    ratio_Bg: torch.Tensor | None = None,
    *,
    backend: str = "auto",
    all_y: bool = True,
):
    """Verify a window of drafts per row; int64 ``(n_B, z_B, y_BW, cap_B)`` (module docstring).

    ``p_BWV`` target probabilities at the W = g + 1 window positions, ``q_BgV`` the draft
    distributions, ``x_Bg`` the drafts, ``room_B`` tokens each row still has to emit, ``u_BWV``,
    ``a_Bg``, ``u_res_BV`` uniforms in [0, 1) (``torch.rand`` of those shapes, in that order, is
    what the samplers draw), ``ratio_Bg`` an acceptance ratio replacing p(x)/q(x).
    ``backend``: ``"auto"`` (:func:`vargen_kernels.dispatch.backend_for`) or forced.
    ``all_y=False``: the caller needs no ``y_BW`` (the torch path then returns None for it and
    draws y only at n; the kernel, which reads every row anyway, returns it whole).
    """
    args = (p_BWV, q_BgV, x_Bg, room_B, u_BWV, a_Bg, u_res_BV, ratio_Bg)
    which = backend_for(*args, backend=backend)
    if which == "torch":
        return verify_reference(*args, all_y=all_y)
    _check_args(*args)
    check_kernel_mode(_verify_kernel, which)
    B, W, V = p_BWV.shape
    dev = p_BWV.device
    n_B, z_B, cap_B = (torch.empty(B, dtype=torch.int64, device=dev) for _ in range(3))
    y_BW = torch.empty(B, W, dtype=torch.int64, device=dev)
    if B == 0:
        return n_B, z_B, y_BW, cap_B
    p_BWV, u_BWV, u_res_BV = _row_major(p_BWV), _row_major(u_BWV), _row_major(u_res_BV)
    if W > 1:
        q_BgV, x_Bg, a_Bg = _row_major(q_BgV), _row_major(x_Bg), _row_major(a_Bg)
    else:  # no drafts: nothing of them is read (pass any tensor with valid strides)
        q_BgV, x_Bg, a_Bg = p_BWV, room_B[:, None], u_res_BV
    has_ratio = ratio_Bg is not None and W > 1
    ratio_Bg = _row_major(ratio_Bg) if has_ratio else a_Bg
    room_B = room_B.contiguous()
    block_v = triton.next_power_of_2(V)
    _verify_kernel[(B,)](
        p_BWV,
        q_BgV,
        x_Bg,
        room_B,
        u_BWV,
        a_Bg,
        u_res_BV,
        ratio_Bg,
        n_B,
        z_B,
        y_BW,
        cap_B,
        W,
        V,
        p_BWV.stride(0),
        p_BWV.stride(1),
        q_BgV.stride(0),
        q_BgV.stride(1),
        x_Bg.stride(0),
        u_BWV.stride(0),
        u_BWV.stride(1),
        a_Bg.stride(0),
        u_res_BV.stride(0),
        ratio_Bg.stride(0),
        HAS_RATIO=has_ratio,
        EPS=RESIDUAL_EPS,
        U_LO=U_EPS,
        U_HI=1.0 - U_EPS,
        BLOCK_V=block_v,
        num_warps=4 if block_v < 2048 else (8 if block_v < 8192 else 16),
    )
    return n_B, z_B, y_BW, cap_B
