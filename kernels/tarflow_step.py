"""Fused TarFlow Jacobi step: the affine coupling update and each token's move in one pass.

A Jacobi pass of TarFlow inversion (:mod:`vargen.sampling.decoders.tarflow`) turns the block's
log-scale ``a`` and shift ``b`` at a window of tokens into new token values
``u = clamp(z * exp(a) + b)`` and then measures how far each token moved since the previous pass,
``max_c |u - u_old|``, to decide which tokens converged. In torch that is an exp, a multiply, an
add, a clamp, a subtraction, an abs and a max-reduction, each a pass over the (rows, C) block
with its temporaries. The Triton kernel here reads z, a, b and the old values once and writes the
new values and one float per token.

Semantics (the torch reference :func:`tarflow_step_reference` defines them; it is exactly the
sampler's computation, so the sampler is unchanged whichever backend runs): for inputs of shape
(..., C), ``new = z * exp(a) + b``, clamped to ``[-clamp, clamp]`` when ``clamp`` is given, and
``moved = max over C of |new - old|``, shape (...). The kernel computes in fp64 for fp64
inputs (TarFlow's exactness tests run in fp64), else in fp32, and stores in the inputs' dtype;
``exp`` is not bit-identical across libraries, so its outputs match the reference to float
rounding (a convergence test at a tolerance can only flip for a token whose move is within an ulp
of it).
"""

from __future__ import annotations

import torch

from vargen_kernels.dispatch import TRITON_AVAILABLE, backend_for, check_kernel_mode


def _check_args(z, a, b, old) -> None:
    for name, t in (("a", a), ("b", b), ("old", old)):
        if t.shape != z.shape or t.dtype != z.dtype:
            raise ValueError(f"{name} must match z's shape {tuple(z.shape)} and dtype {z.dtype}")
    if z.dim() < 1 or z.shape[-1] < 1 or not z.is_floating_point():
        raise ValueError(f"z must be a float (..., C >= 1) tensor, got {tuple(z.shape)}")


def tarflow_step_reference(z, a, b, old, clamp: float | None = None):
    """Torch reference of :func:`tarflow_step`: ``(new (..., C), moved (...))``."""
    _check_args(z, a, b, old)
    new = z * torch.exp(a) + b
    new = new if clamp is None else new.clamp(-clamp, clamp)
    return new, (new - old).abs().amax(-1)


if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def _tarflow_step_kernel(
        z_ptr,
        a_ptr,
        b_ptr,
        old_ptr,
        new_ptr,
        moved_ptr,
        X,
        C,
        clamp,
        HAS_CLAMP: tl.constexpr,
        ACC: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """BLOCK_R token rows per program, each of C values held in registers (contiguous rows)."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cs = tl.arange(0, BLOCK_C)
        m = (rows < X)[:, None] & (cs < C)[None, :]
        off = rows[:, None] * C + cs[None, :]
        z = tl.load(z_ptr + off, mask=m, other=0.0).to(ACC)
        a = tl.load(a_ptr + off, mask=m, other=0.0).to(ACC)
        b = tl.load(b_ptr + off, mask=m, other=0.0).to(ACC)
        new = z * tl.exp(a) + b
        if HAS_CLAMP:
            new = tl.minimum(tl.maximum(new, -clamp), clamp)
        new = new.to(new_ptr.dtype.element_ty)
        tl.store(new_ptr + off, new, mask=m)
        old = tl.load(old_ptr + off, mask=m, other=0.0).to(ACC)
        d = tl.where(m, tl.abs(new.to(ACC) - old), 0.0)
        moved = tl.max(d, axis=1).to(moved_ptr.dtype.element_ty)
        tl.store(moved_ptr + rows, moved, mask=rows < X)


def tarflow_step(z, a, b, old, clamp: float | None = None, *, backend: str = "auto"):
    """One Jacobi update of TarFlow tokens: ``(new (..., C), moved (...))`` (module docstring).

    ``z``, ``a``, ``b``, ``old``: same shape and float dtype. ``backend``: ``"auto"``
    (:func:`vargen_kernels.dispatch.backend_for`) or forced.
    """
    which = backend_for(z, a, b, old, backend=backend)
    if which == "torch":
        return tarflow_step_reference(z, a, b, old, clamp)
    _check_args(z, a, b, old)
    check_kernel_mode(_tarflow_step_kernel, which)
    C = z.shape[-1]
    z2, a2, b2, o2 = (t.reshape(-1, C).contiguous() for t in (z, a, b, old))
    X = z2.shape[0]
    new = torch.empty_like(z2)
    moved = torch.empty(X, dtype=z.dtype, device=z.device)
    if X > 0:
        block_c = triton.next_power_of_2(C)
        block_r = max(1, min(64, 4096 // block_c))
        _tarflow_step_kernel[(triton.cdiv(X, block_r),)](
            z2,
            a2,
            b2,
            o2,
            new,
            moved,
            X,
            C,
            float(clamp) if clamp is not None else 0.0,
            HAS_CLAMP=clamp is not None,
            ACC=tl.float64 if z.dtype == torch.float64 else tl.float32,
            BLOCK_R=block_r,
            BLOCK_C=block_c,
        )
    return new.view(z.shape), moved.view(z.shape[:-1])
