"""Transformer blocks: LLaMA's pre-norm block (RMSNorm, rotary self-attention, SwiGLU), DiT's
adaLN-Zero block conditioned on a vector (VAR, xAR), and GPT-2's initialisation."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from vargen.nn.attention import SelfAttention, attention
from vargen.nn.kv_cache import KVCache, RaggedKVCache
from vargen.nn.norm import RMSNorm
from vargen.nn.rope import apply_rope, rotate_pairs


class SwiGLU(nn.Module):
    """LLaMA's gated MLP: W2(silu(W1 x) * W3 x), hidden = 8/3 * dim rounded up to 16."""

    def __init__(self, dim: int, mult: float = 8 / 3, dropout: float = 0.0):
        super().__init__()
        hidden = 16 * ((int(dim * mult) + 15) // 16)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class Block(nn.Module):
    """Pre-norm LLaMA block: x + attn(norm(x)); x + swiglu(norm(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 8 / 3, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
        self.attn = SelfAttention(dim, heads, dropout)
        self.mlp = SwiGLU(dim, mlp_ratio, dropout)

    def forward(self, x_BTC, cos, sin, cache=None, layer=0, mask_TS=None):
        x_BTC = x_BTC + self.attn(self.norm1(x_BTC), cos, sin, cache, layer, mask_TS)
        return x_BTC + self.mlp(self.norm2(x_BTC))

    def decode_weights(self) -> tuple[torch.Tensor, ...]:
        """The weights :meth:`forward_cached` multiplies by, as (in, out) matrices: qkv, proj,
        w1 and w3 side by side, w2. On CPU they are contiguous copies: MKL multiplies a few
        rows by a (in, out) matrix faster than by the transpose of an nn.Linear weight (README,
        "Benchmarks"); elsewhere they are transposed views, and only w1|w3 is a copy (one
        product instead of two)."""
        a, m = self.attn, self.mlp
        w = (a.qkv.weight, a.proj.weight, torch.cat([m.w1.weight, m.w3.weight]), m.w2.weight)
        if w[0].device.type != "cpu":
            return tuple(t.t() for t in w)
        return tuple(t.detach().t().contiguous() for t in w)

    def forward_cached(self, x_BTC, rope, cache: KVCache | RaggedKVCache, layer: int, weights, mask=None):
        """:meth:`forward` for KV-cached decoding of fp32 activations in eval mode (dropout off),
        with ``rope`` = (cos, sin, swap_dd) from :func:`rope_pair_tables` and ``weights`` from
        :meth:`decode_weights`: the same math in fewer, faster ops.

        Decoding one token at batch 1 is bound by per-op overhead, not arithmetic, so this
        multiplies 2D rows by prepared weights (``mm``: no module calls, no ``matmul`` folding,
        w1 and w3 in one product), normalises with the functional RMSNorm, rotates q and k in one
        :func:`rotate_pairs` on a view of the qkv output (the pair swap as one 2D product over
        every head of q, k and v: no strided copy), and adds into the residual in place:
        ``x_BTC`` is overwritten (the caller's own embeddings or block output). Equal to
        :meth:`forward` up to float rounding (tested) and, op for op, to the earlier form of this
        path bit for bit (the same products, sums and rotations; only views and dispatch differ).
        The rope tables broadcast against (B, H, T, d): (T, d), or (B, 1, T, d) for per-row
        positions with ``mask`` (B, 1, T, S) (a :class:`RaggedKVCache`).
        """
        B, T, C = x_BTC.shape
        H, d = self.attn.heads, self.attn.head_dim
        w_qkv, w_proj, w_13, w_2 = weights
        n1, n2 = self.norm1, self.norm2
        x_MC = x_BTC.view(B * T, C)  # M = B*T rows
        qkv = torch.mm(F.rms_norm(x_MC, (C,), n1.weight, n1.eps), w_qkv)  # (M, 3C)
        cos, sin, swap_dd = rope
        swapped = torch.mm(qkv.view(-1, d), swap_dd).view(B, T, 3, H, d)  # every head's pairs swapped
        qkv_3BHTd = qkv.view(B, T, 3, H, d).permute(2, 0, 3, 1, 4)  # views
        qk_2BHTd = qkv_3BHTd[:2]
        swapped_2BHTd = swapped.permute(2, 0, 3, 1, 4)[:2]
        q, k = rotate_pairs(qk_2BHTd, cos, sin, swap_dd, swapped_2BHTd).unbind(0)  # 2x (B, H, T, d)
        k, v = cache.append(layer, k, qkv_3BHTd[2])  # (B, H, S, d)
        y_BHTd = attention(q, k, v, mask, causal=mask is None, cache=cache)
        x_MC.add_(torch.mm(y_BHTd.transpose(1, 2).reshape(B * T, C), w_proj))
        g1, g3 = torch.mm(F.rms_norm(x_MC, (C,), n2.weight, n2.eps), w_13).chunk(2, dim=-1)  # 2x (M, hidden)
        x_MC.add_(torch.mm(F.silu(g1).mul_(g3), w_2))
        return x_BTC


def modulate(x_BTC, shift_BC, scale_BC):
    return x_BTC * (1 + scale_BC[:, None]) + shift_BC[:, None]


class AdaLNBlock(nn.Module):
    """x + g1 * attn(mod(LN(x))); x + g2 * mlp(mod(LN(x))), modulation from the condition."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float, attn_l2_norm: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} not divisible by heads {heads}")
        self.heads, self.head_dim = heads, dim // heads
        if attn_l2_norm:  # VAR's log-scale per head, init log 4, clamped at log 100 in use
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, heads, 1, 1), 4.0).log())
        else:
            self.scale_mul_1H11 = None
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.drop = nn.Dropout(dropout)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x_BTC, cond_BC, cache: KVCache | None, layer: int, mask_TS, rope=None):
        """``rope`` = (cos, sin) tables (T, d/2) of these positions, or None (VAR: absolute embeddings)."""
        B, T, C = x_BTC.shape
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(cond_BC).chunk(6, dim=-1)  # 6x (B, C)
        h = modulate(self.norm1(x_BTC), sh1, sc1)  # (B, T, C)
        q, k, v = self.qkv(h).view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3x (B,H,T,d)
        if rope is not None:  # rotate before caching: cached keys keep their own positions
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.scale_mul_1H11 is not None:  # cosine attention (VAR), normalised before caching
            # logits = scale_mul * cos(q, k); the sqrt(d) cancels attention()'s 1/sqrt(d)
            scale_mul = self.scale_mul_1H11.clamp_max(math.log(100.0)).exp() * math.sqrt(self.head_dim)
            q, k = F.normalize(q, dim=-1) * scale_mul, F.normalize(k, dim=-1)  # (B, H, T, d)
        if cache is not None:
            k, v = cache.append(layer, k, v)  # (B, H, S, d): earlier scales + this one
        y = attention(q, k, v, mask_TS=mask_TS, cache=cache)  # (B, H, T, d)
        y = self.drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))  # (B, T, C)
        x_BTC = x_BTC + g1[:, None] * y
        h = modulate(self.norm2(x_BTC), sh2, sc2)
        return x_BTC + g2[:, None] * self.drop(self.mlp(h))  # (B, T, C)


def gpt2_init_(model: nn.Module, depth: int) -> None:
    """GPT-2 initialisation: N(0, 0.02) for Linear and Embedding weights, and residual output
    projections (``proj`` / ``w2``) scaled by 1 / sqrt(2 depth) (Radford et al. 2019)."""
    model.apply(
        lambda m: nn.init.normal_(m.weight, std=0.02) if isinstance(m, (nn.Linear, nn.Embedding)) else None
    )
    for name, p in model.named_parameters():
        if name.endswith(("proj.weight", "w2.weight")):
            nn.init.normal_(p, std=0.02 / math.sqrt(2 * depth))
