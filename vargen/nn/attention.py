"""Attention: the one softmax-attention function every model calls, and LLaMA's rotary
self-attention layer.

:func:`attention` uses xformers' memory-efficient kernel when it imports, its compiled ops loaded
and the tensors are on CUDA; otherwise PyTorch's ``scaled_dot_product_attention`` (which has CPU,
flash and memory-efficient backends).
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn as nn
import torch.nn.functional as F

from vargen.nn.kv_cache import KVCache, RaggedKVCache
from vargen.nn.rope import apply_rope
from vargen_kernels.ragged_attention import ragged_attention


@functools.lru_cache(maxsize=1)
def _xformers_ops():
    """xformers.ops if it imports and its C++/CUDA ops loaded, else None (checked once)."""
    if importlib.util.find_spec("xformers") is None:
        return None
    try:
        import xformers
        import xformers.ops as xops

        if not getattr(xformers, "_has_cpp_library", False):
            return None
        return xops
    except Exception:  # a broken build (wrong CUDA/torch) must never break attention
        return None


def attention(q_BHTd, k_BHSd, v_BHSd, mask_TS: torch.Tensor | None = None, causal: bool = False, cache=None):
    """Softmax attention. ``mask_TS`` is a boolean "may attend" mask broadcast over (B, H),
    (T, S), or an additive float mask (B, 1, T, S) for per-row masks (the ragged cache's).

    ``causal`` aligns the causal mask to the bottom-right (query t sees keys <= S - T + t),
    which is what cached decoding needs; it is ignored when ``mask_TS`` is given. With a
    :class:`RaggedKVCache` ``cache`` and its window mask, the attention runs as
    :func:`vargen_kernels.ragged_attention.ragged_attention` under ``cache.backend`` (the fused
    kernel, which needs no mask, on CUDA; this same SDPA call on the reference path).
    """
    if mask_TS is not None and isinstance(cache, RaggedKVCache):
        if cache.reference_attention:  # ragged_attention's torch reference, without its dispatch
            return F.scaled_dot_product_attention(q_BHTd, k_BHSd, v_BHSd, attn_mask=mask_TS)
        return ragged_attention(q_BHTd, k_BHSd, v_BHSd, cache.length_B, mask_TS, backend=cache.backend)
    T, S = q_BHTd.shape[-2], k_BHSd.shape[-2]
    if causal and mask_TS is None and T > 1:
        mask_TS = torch.ones(T, S, dtype=torch.bool, device=q_BHTd.device).tril(S - T)
    xops = _xformers_ops() if q_BHTd.is_cuda else None
    if xops is not None and mask_TS is None:
        # xformers wants (B, T, H, d)
        out = xops.memory_efficient_attention(
            q_BHTd.transpose(1, 2), k_BHSd.transpose(1, 2), v_BHSd.transpose(1, 2)
        )
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q_BHTd, k_BHSd, v_BHSd, attn_mask=mask_TS)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} not divisible by heads {heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x_BTC, cos, sin, cache: KVCache | RaggedKVCache | None = None, layer=0, mask_TS=None):
        B, T, C = x_BTC.shape
        q, k, v = (
            self.qkv(x_BTC).view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        )  # 3x (B, H, T, d)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.append(layer, k, v)  # (B, H, S, d) with S = cached + T
        y = attention(q, k, v, mask_TS=mask_TS, causal=mask_TS is None, cache=cache)  # (B, H, T, d)
        return self.drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))  # (B, T, C)
