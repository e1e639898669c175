"""Fused ragged-window attention over a KV cache with one length per row (windowed decoding).

Speculative and CSpD decoding run a window of W new positions per row on a
:class:`vargen.nn.kv_cache.RaggedKVCache`, where row b has its own committed length L_b. With
``scaled_dot_product_attention`` that needs a materialised additive mask (B, 1, W, S) over every
slot any row may use, and every row pays for S = max_b L_b + W slots, including the stale slots
past its own window. The Triton kernel here builds the mask from the lengths in registers and
stops each row at its own last visible slot, with a streaming (online) softmax over blocks of
slots: no mask tensor, no (B, H, W, S) score tensor, and no read of a slot no query may see.

Semantics (the torch reference :func:`ragged_attention_reference` defines them: it is exactly the
attention the models have always run on a ragged cache, so forwards, hence samplers, are unchanged
on the reference path): for queries q (B, H, W, d), keys and values (B, H, S, d) and lengths
``length_B``, query i of row b attends to the slots ``s < S`` with ``s <= L_b + i`` (its committed
prefix and its own causal window, :func:`ragged_window_mask`), softmax of ``q.k / sqrt(d)``;
output (B, H, W, d) in q's dtype. Slot 0 is always visible, so no query is empty.

The kernel reads only slots ``s < min(S, L_b + W)``; slots past a row's window (stale entries of
a rolled-back cache) never enter, even if they hold NaN. It computes in fp32 (tensor-core dots in
full fp32 precision, not tf32), in fp64 for fp64 inputs (the exactness tests' models; products
summed in registers, no dot), and matches the reference to float rounding (sums in another order).
It has no backward: with autograd recording, ``auto`` picks the reference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vargen_kernels.dispatch import TRITON_AVAILABLE, backend_for, check_kernel_mode


def ragged_window_mask(length_B: torch.Tensor, width: int, slots: int, dtype=torch.float32) -> torch.Tensor:
    """Additive mask (B, 1, W, S): 0 where query i of row b may attend to slot s (s <= L_b + i),
    -inf elsewhere; what :meth:`RaggedKVCache.begin` builds for ``scaled_dot_product_attention``."""
    s_S = torch.arange(slots, device=length_B.device)
    slot_BW = length_B[:, None] + torch.arange(width, device=length_B.device)  # the window's slots
    allowed_BWS = s_S[None, None, :] <= slot_BW[:, :, None]
    mask_BWS = torch.zeros(allowed_BWS.shape, dtype=dtype, device=length_B.device)
    return mask_BWS.masked_fill_(~allowed_BWS, float("-inf"))[:, None]


def _check_args(q, k, v, length_B, mask_B1WS) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"q must be (B, H, W, d) and k, v (B, H, S, d), got {q.shape}, {k.shape}, {v.shape}")
    B, H, W, d = q.shape
    if k.shape[:2] != (B, H) or k.shape[3] != d or k.shape[2] < 1:
        raise ValueError(f"k, v must be (B, H, S >= 1, d) = ({B}, {H}, S, {d}), got {tuple(k.shape)}")
    if tuple(length_B.shape) != (B,) or length_B.is_floating_point():
        raise ValueError(f"length_B must be an integer (B,) = ({B},) tensor, got {tuple(length_B.shape)}")
    if mask_B1WS is not None and tuple(mask_B1WS.shape) != (B, 1, W, k.shape[2]):
        raise ValueError(f"mask_B1WS must be {(B, 1, W, k.shape[2])}, got {tuple(mask_B1WS.shape)}")


def ragged_attention_reference(q_BHWd, k_BHSd, v_BHSd, length_B, mask_B1WS=None):
    """Torch reference of :func:`ragged_attention` (module docstring): SDPA with the window mask.

    ``mask_B1WS``: that mask already built (the cache builds it once per forward, not per layer);
    it must equal ``ragged_window_mask(length_B, W, S)``."""
    _check_args(q_BHWd, k_BHSd, v_BHSd, length_B, mask_B1WS)
    if mask_B1WS is None:
        mask_B1WS = ragged_window_mask(length_B, q_BHWd.shape[2], k_BHSd.shape[2], q_BHWd.dtype)
    return F.scaled_dot_product_attention(q_BHWd, k_BHSd, v_BHSd, attn_mask=mask_B1WS)


if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def _ragged_attention_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        len_ptr,
        o_ptr,
        H,
        W,
        S,
        D,
        scale,
        sq_b,
        sq_h,
        sq_w,
        sk_b,
        sk_h,
        sk_s,
        sv_b,
        sv_h,
        sv_s,
        ACC: tl.constexpr,
        BLOCK_W: tl.constexpr,
        BLOCK_S: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """One program per (row, head): the W queries against the row's visible slots, in blocks
        of BLOCK_S slots with a running max and sum (flash-attention style)."""
        pid = tl.program_id(0).to(tl.int64)
        b, h = pid // H, pid % H
        ws = tl.arange(0, BLOCK_W)
        ds = tl.arange(0, BLOCK_D)
        md = ds < D
        L = tl.load(len_ptr + b).to(tl.int64)
        q = tl.load(
            q_ptr + b * sq_b + h * sq_h + ws[:, None] * sq_w + ds[None, :],
            mask=(ws < W)[:, None] & md[None, :],
            other=0.0,
        ).to(ACC)
        q = q * scale
        m_i = tl.full((BLOCK_W,), float("-inf"), dtype=ACC)
        l_i = tl.zeros((BLOCK_W,), dtype=ACC)
        acc = tl.zeros((BLOCK_W, BLOCK_D), dtype=ACC)
        hi = tl.minimum(S, L + W)  # the last query sees slot L + W - 1
        for s0 in range(0, hi, BLOCK_S):
            ss = s0 + tl.arange(0, BLOCK_S)
            ms = ss < hi
            kv_m = ms[:, None] & md[None, :]
            k = tl.load(k_ptr + b * sk_b + h * sk_h + ss[:, None] * sk_s + ds[None, :], mask=kv_m, other=0.0)
            k = k.to(ACC)
            if ACC == tl.float64:
                scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # (BLOCK_W, BLOCK_S)
            else:
                scores = tl.dot(q, tl.trans(k), input_precision="ieee")
            allowed = ms[None, :] & (ss[None, :] <= L + ws[:, None])
            scores = tl.where(allowed, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))  # finite: slot 0 is in the first block
            alpha = tl.exp(m_i - m_new)
            p = tl.where(allowed, tl.exp(scores - m_new[:, None]), 0.0)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_ptr + b * sv_b + h * sv_h + ss[:, None] * sv_s + ds[None, :], mask=kv_m, other=0.0)
            v = v.to(ACC)
            if ACC == tl.float64:
                pv = tl.sum(p[:, :, None] * v[None, :, :], axis=1)  # (BLOCK_W, BLOCK_D)
            else:
                pv = tl.dot(p, v, input_precision="ieee")
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        out = acc / l_i[:, None]
        o_off = ((b * H + h) * W + ws[:, None]) * D + ds[None, :]
        tl.store(o_ptr + o_off, out.to(o_ptr.dtype.element_ty), mask=(ws < W)[:, None] & md[None, :])


def ragged_attention(q_BHWd, k_BHSd, v_BHSd, length_B, mask_B1WS=None, *, backend: str = "auto"):
    """Attention of a window of W queries per row over a ragged KV cache (module docstring):
    (B, H, W, d). ``length_B``: each row's committed length (its window's first slot);
    ``mask_B1WS``: the reference path's prebuilt window mask (ignored by the kernel).
    ``backend``: ``"auto"`` (:func:`vargen_kernels.dispatch.backend_for`; the reference whenever
    autograd records, the kernel has no backward) or forced."""
    tensors = (q_BHWd, k_BHSd, v_BHSd, length_B)
    if backend == "auto" and torch.is_grad_enabled() and any(t.requires_grad for t in tensors[:3]):
        backend = "torch"
    which = backend_for(*tensors, backend=backend)
    if which == "torch":
        return ragged_attention_reference(q_BHWd, k_BHSd, v_BHSd, length_B, mask_B1WS)
    _check_args(q_BHWd, k_BHSd, v_BHSd, length_B, mask_B1WS)
    check_kernel_mode(_ragged_attention_kernel, which)
    B, H, W, d = q_BHWd.shape
    S = k_BHSd.shape[2]
    out = torch.empty(B, H, W, d, dtype=q_BHWd.dtype, device=q_BHWd.device)
    if B * H * W == 0:
        return out
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q_BHWd, k_BHSd, v_BHSd))
    _ragged_attention_kernel[(B * H,)](
        q,
        k,
        v,
        length_B.contiguous(),
        out,
        H,
        W,
        S,
        d,
        1.0 / math.sqrt(d),
        *q.stride()[:3],
        *k.stride()[:3],
        *v.stride()[:3],
        ACC=tl.float64 if q.dtype == torch.float64 else tl.float32,
        BLOCK_W=max(16, triton.next_power_of_2(W)),
        BLOCK_S=32,
        BLOCK_D=max(16, triton.next_power_of_2(d)),
    )
    return out
