"""Fused logits warper: CFG mix, temperature, top-k, top-p and Gumbel-max sampling in one pass.

Every autoregressive decoding step turns one row of logits per sample into one token id. Done as
separate torch ops, that is a CFG mix, a division, a full sort for top-k/top-p, a softmax, a
cumsum, two masks and an argmax, each reading and writing the whole (B, V) block. The Triton
kernel here does all of it with one program per row, reading the logits and the noise once and
writing one int64, and finds the top-k/top-p thresholds by bisection instead of sorting.

Semantics, per row (the torch reference :func:`warp_and_sample_reference` defines them). The kernel
returns the same ids; it can differ only where float rounding decides: a top-p cumulative mass
within an ulp of ``top_p`` (the sums run in another order) or two Gumbel scores within an ulp of
each other (on GPUs ``exp``/``log`` are also not bit-identical to torch's).

1. CFG on logits: ``l = u + s * (c - u)`` when unconditional logits are given and ``s != 1``
   (``s == 1`` skips the mix, so it is *exactly* the unguided result); else ``l = c``.
   Computed in fp32 whatever the input dtype.
2. Temperature: ``l = l / T`` with ``T > 0`` (greedy decoding is ``top_k=1``, not ``T=0``).
3. Top-k (``0`` = off): keep entries ``>=`` the k-th largest value; ties at the threshold are
   kept, so more than k entries may survive.
4. Top-p (``1.0`` = off): softmax over the kept entries, sorted descending; a sorted entry is kept
   iff the probability mass strictly before it is ``< top_p`` (the top entry always is). Ties are
   resolved on values: every entry ``>=`` the value of the last kept sorted entry is kept, so the
   result does not depend on how a sort orders equal values.
5. Gumbel-max sampling from the caller's uniform noise:
   ``ids = argmax(l_masked + g)``, ``g = -log(-log(clamp(u, U_EPS, 1 - U_EPS)))``, ties to the
   smallest index. Taking the noise as an input (the sampler draws
   ``torch.rand(B, V, generator=gen)``) keeps sampling reproducible from the caller's generator
   and identical across backends.

The kernel keeps the whole row in one program (``BLOCK_V = next_power_of_2(V)``, padding masked to
``-inf``), which suits codebook-sized vocabularies (thousands to tens of thousands of entries).
"""

from __future__ import annotations

import torch

from vargen_kernels.dispatch import TRITON_AVAILABLE, backend_for, check_kernel_mode

# Clamp for the uniform noise. 2**-24 is the fp32 spacing just below 1, so 1 - U_EPS is the largest
# fp32 value < 1 (exactly representable) and -log(-log(.)) stays finite at both ends: g lies in
# about [-2.8, 16.6]. torch.rand draws fp32 values on a 2**-24 grid in [0, 1 - 2**-24], so the
# clamp only ever changes an exact 0.
U_EPS = 2.0**-24


def _check_args(logits_cond_BV, logits_uncond_BV, uniform_BV, temperature, top_k, top_p) -> None:
    """Validate shapes and warper parameters (shared by every backend, so they fail alike)."""
    if logits_cond_BV.dim() != 2 or logits_cond_BV.shape[1] == 0 or not logits_cond_BV.is_floating_point():
        raise ValueError(
            f"logits_cond_BV must be a float (B, V >= 1) tensor, got {tuple(logits_cond_BV.shape)}"
        )
    for name, t in (("logits_uncond_BV", logits_uncond_BV), ("uniform_BV", uniform_BV)):
        if t is not None and (t.shape != logits_cond_BV.shape or not t.is_floating_point()):
            raise ValueError(f"{name} must be a float tensor of shape {tuple(logits_cond_BV.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (use top_k=1 for greedy), got {temperature}")
    if int(top_k) != top_k or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p}")


def warp_logits_reference(
    logits_cond_BV: torch.Tensor,
    logits_uncond_BV: torch.Tensor | None = None,
    *,
    cfg_scale: float = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> torch.Tensor:
    """Steps 1-4 of the module docstring: fp32 (B, V) logits, ``-inf`` outside the kept set.

    Plain torch and vectorised over rows. There is no fused kernel for this: speculative samplers
    need the whole warped distribution (:func:`warped_probs`), not one sample from it.
    """
    _check_args(logits_cond_BV, logits_uncond_BV, None, temperature, top_k, top_p)
    if logits_uncond_BV is not None and cfg_scale != 1.0:
        u_BV = logits_uncond_BV.float()
        l_BV = (logits_cond_BV.float() - u_BV).mul_(cfg_scale).add_(u_BV)  # u + s (c - u), a new tensor
        if temperature != 1.0:  # l / 1 is l: the pass is skipped, not the rounding
            l_BV.div_(temperature)
    else:
        l_BV = logits_cond_BV.float() / temperature  # (B, V), a new tensor: the inputs are never modified
    V = l_BV.shape[-1]
    use_top_k, use_top_p = 0 < top_k < V, top_p < 1.0
    if not (use_top_k or use_top_p):
        return l_BV
    sorted_BV = l_BV.sort(dim=-1, descending=True).values
    if use_top_k:
        thr_B1 = sorted_BV[:, top_k - 1 : top_k]  # k-th largest value
        sorted_BV = sorted_BV.masked_fill(sorted_BV < thr_B1, float("-inf"))
    if use_top_p:
        p_BV = torch.softmax(sorted_BV, dim=-1)
        before_BV = p_BV.cumsum(dim=-1) - p_BV  # mass strictly before each sorted entry
        keep_BV = (before_BV < top_p) & (sorted_BV > float("-inf"))
        keep_BV[:, 0] = True
        thr_B1 = sorted_BV.masked_fill(~keep_BV, float("inf")).amin(dim=-1, keepdim=True)
    return l_BV.masked_fill(l_BV < thr_B1, float("-inf"))


warp_logits = warp_logits_reference  # public name: torch only, see the docstring


def warped_probs(
    logits_cond_BV: torch.Tensor,
    logits_uncond_BV: torch.Tensor | None = None,
    *,
    cfg_scale: float = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> torch.Tensor:
    """The distribution :func:`warp_and_sample` samples from: ``softmax(warp_logits(...))``, (B, V)."""
    warp = dict(cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p)
    return torch.softmax(warp_logits_reference(logits_cond_BV, logits_uncond_BV, **warp), dim=-1)


def gumbel_from_uniform(uniform_BV: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise ``-log(-log(u))`` in fp32, ``u`` clamped so that it stays finite."""
    u_BV = uniform_BV.float().clamp(U_EPS, 1.0 - U_EPS)
    return -torch.log(-torch.log(u_BV))


def warp_and_sample_reference(
    logits_cond_BV: torch.Tensor,
    logits_uncond_BV: torch.Tensor | None = None,
    *,
    cfg_scale: float = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    uniform_BV: torch.Tensor,
) -> torch.Tensor:
    """Torch reference of :func:`warp_and_sample`: int64 ids (B,).

    ``argmax(l + g)`` with Gumbel ``g`` is an exact sample of ``softmax(l)`` (the Gumbel-max trick),
    and entries at ``-inf`` can never win, so this samples the warped distribution.
    ``torch.argmax`` returns the first maximal index, the same tie rule as the kernel.
    """
    _check_args(logits_cond_BV, logits_uncond_BV, uniform_BV, temperature, top_k, top_p)
    V = logits_cond_BV.shape[-1]
    if not 0 < top_k < V and top_p == 1.0 and (logits_uncond_BV is None or cfg_scale == 1.0):
        # Plain sampling (the common decode step): the same values in fewer ops and temporaries.
        # l - log(-log u) equals l + (-log(-log u)) exactly (negation is exact), l / 1 is l.
        neg_g_BV = uniform_BV.float().clamp(U_EPS, 1.0 - U_EPS).log_().neg_().log_()  # -Gumbel
        l_BV = logits_cond_BV.float()
        if temperature != 1.0:
            l_BV = l_BV / temperature
        return torch.sub(l_BV, neg_g_BV).argmax(dim=-1)
    warp = dict(cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p)
    l_BV = warp_logits_reference(logits_cond_BV, logits_uncond_BV, **warp)  # (B, V)
    return (l_BV + gumbel_from_uniform(uniform_BV)).argmax(dim=-1)


if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def _order_key(bits):
        """fp32 bit pattern (int32) <-> int32 key ordered like the floats (an involution).

        Negative floats order backwards as integers, so their 31 low bits are flipped.
        """
        return bits ^ ((bits >> 31) & 0x7FFFFFFF)

    @triton.jit
    def _min_value_with_tail_below(x, w, target):
        """Smallest value ``v`` of the row ``x`` with ``sum(w[x > v]) < target``.

        Top-k is ``w = 1, target = k`` (the k-th largest value) and top-p is ``w = probs,
        target = top_p`` (the value of the last kept sorted entry): the same threshold the
        reference reads off a sorted row. The tail sum only changes at values present in ``x``, so
        the smallest key (float in int order) that passes is such a value, and bisection over the
        keys between ``min(x)`` and ``max(x)`` finds it exactly in 32 steps. This replaces a bitonic
        ``tl.sort`` of the row (~log2(V)**2 / 2 compare-swap stages; slower, see the README's
        "Fused kernels") by 32 reductions. The predicate must hold at ``max(x)``: ``k >= 1``,
        ``top_p > 0``.
        """
        key = _order_key(x.to(tl.int32, bitcast=True)).to(tl.int64)  # int64: hi - lo may overflow int32
        lo = tl.min(key, axis=0)
        hi = tl.max(key, axis=0)
        for _ in range(32):
            mid = lo + (hi - lo) // 2
            ok = tl.sum(tl.where(key > mid, w, 0.0), axis=0) < target
            hi = tl.where(ok, mid, hi)
            lo = tl.where(ok, lo, mid + 1)
        return _order_key(hi.to(tl.int32)).to(tl.float32, bitcast=True)

    @triton.jit
    def _warp_sample_kernel(
        cond_ptr,
        uncond_ptr,
        uniform_ptr,
        ids_ptr,
        V,
        stride_cond,
        stride_uncond,
        stride_uniform,
        cfg_scale,
        temperature,
        top_k,
        top_p,
        HAS_UNCOND: tl.constexpr,
        USE_TOP_K: tl.constexpr,
        USE_TOP_P: tl.constexpr,
        U_LO: tl.constexpr,
        U_HI: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        """One program per row: steps 1-5 of the module docstring on a row held in registers.

        Top-k and top-p each find a value threshold (:func:`_min_value_with_tail_below`) and mask
        the row with it, so nothing is sorted and no permutation is carried along.
        """
        row = tl.program_id(0).to(tl.int64)  # int64: row * stride may exceed 2**31
        offs = tl.arange(0, BLOCK_V)  # (BLOCK_V,)
        in_row = offs < V
        l = tl.load(cond_ptr + row * stride_cond + offs, mask=in_row, other=0.0).to(tl.float32)
        if HAS_UNCOND:
            u = tl.load(uncond_ptr + row * stride_uncond + offs, mask=in_row, other=0.0).to(tl.float32)
            l = u + cfg_scale * (l - u)
        # div_rn: IEEE division like torch; a plain `/` compiles to an approximate division on GPUs.
        l = tl.math.div_rn(l, temperature)
        l = tl.where(in_row, l, float("-inf"))  # padding can never be kept or sampled
        if USE_TOP_K:
            l = tl.where(l < _min_value_with_tail_below(l, 1.0, top_k), float("-inf"), l)
        if USE_TOP_P:
            e = tl.exp(l - tl.max(l, axis=0))
            p = e / tl.sum(e, axis=0)  # softmax over the entries top-k kept
            l = tl.where(l < _min_value_with_tail_below(l, p, top_p), float("-inf"), l)
        noise = tl.load(uniform_ptr + row * stride_uniform + offs, mask=in_row, other=0.5).to(tl.float32)
        noise = tl.minimum(tl.maximum(noise, U_LO), U_HI)
        score = l - tl.log(-tl.log(noise))  # l + Gumbel
        tl.store(ids_ptr + row, tl.argmax(score, axis=0, tie_break_left=True).to(tl.int64))


def _row_major(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dimension is unit-stride (rows may be strided), else a copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def warp_and_sample(
    logits_cond_BV: torch.Tensor,
    logits_uncond_BV: torch.Tensor | None = None,
    *,
    cfg_scale: float = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    uniform_BV: torch.Tensor,
    backend: str = "auto",
) -> torch.Tensor:
    """Sample one token id per row from the warped logits; int64 (B,).

    ``logits_*_BV``: fp32/fp16/bf16 (B, V), any V; ``uniform_BV``: noise in [0, 1), (B, V), e.g.
    ``torch.rand(B, V, generator=gen)``. ``backend``: ``"auto"`` (see
    :func:`vargen_kernels.dispatch.backend_for`), or force ``"triton"``, ``"interpret"``, ``"torch"``.
    """
    warp = dict(cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p)
    which = backend_for(logits_cond_BV, logits_uncond_BV, uniform_BV, backend=backend)
    if which == "torch":
        return warp_and_sample_reference(logits_cond_BV, logits_uncond_BV, uniform_BV=uniform_BV, **warp)
    _check_args(logits_cond_BV, logits_uncond_BV, uniform_BV, temperature, top_k, top_p)
    check_kernel_mode(_warp_sample_kernel, which)
    B, V = logits_cond_BV.shape
    cond_BV = _row_major(logits_cond_BV)
    has_uncond = logits_uncond_BV is not None and cfg_scale != 1.0
    uncond_BV = _row_major(logits_uncond_BV) if has_uncond else cond_BV  # unread when not has_uncond
    uniform_BV = _row_major(uniform_BV)
    ids_B = torch.empty(B, dtype=torch.int64, device=cond_BV.device)
    if B == 0:
        return ids_B
    block_v = triton.next_power_of_2(V)
    _warp_sample_kernel[(B,)](
        cond_BV,
        uncond_BV,
        uniform_BV,
        ids_B,
        V,
        cond_BV.stride(0),
        uncond_BV.stride(0),
        uniform_BV.stride(0),
        float(cfg_scale),
        float(temperature),
        int(top_k),
        float(top_p),
        HAS_UNCOND=has_uncond,
        USE_TOP_K=0 < top_k < V,
        USE_TOP_P=top_p < 1.0,
        U_LO=U_EPS,
        U_HI=1.0 - U_EPS,
        BLOCK_V=block_v,
        num_warps=4 if block_v < 2048 else (8 if block_v < 8192 else 16),
    )
    return ids_B
