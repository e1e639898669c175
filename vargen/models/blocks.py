"""Transformer building blocks shared by every model: one attention function, RMSNorm,
SwiGLU, 2D rotary embeddings and a preallocated KV cache.

Attention goes through :func:`attention` only: xformers' memory-efficient kernel when it
imports, its compiled ops loaded and the tensors are on CUDA; otherwise PyTorch's
``scaled_dot_product_attention`` (which has CPU, flash and memory-efficient backends).
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

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


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if x.dtype == torch.float32:  # the same ops in one call (no casts), bit-identical in fp32
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


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


def rope_2d_angles(rows_T: torch.Tensor, cols_T: torch.Tensor, head_dim: int, base: float = 10000.0):
    """cos/sin tables (T, head_dim/2) for 2D RoPE at the given (row, col) of each position.

    Half of the rotated pairs carry row frequencies, half column frequencies (LlamaGen /
    EVA style). Coordinates may be fractional (a coarse scale's cell centres on the fine grid).
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    freqs = 1.0 / base ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (d/4,)
    rows, cols = rows_T.double(), cols_T.double()
    angles = torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=1)  # (T, d/2)
    return angles.cos().float(), angles.sin().float()


def rope_2d_table(grid_h: int, grid_w: int, head_dim: int, n_prefix: int = 1, base: float = 10000.0):
    """cos/sin tables (n_prefix + h*w, head_dim/2) for 2D RoPE in raster order.

    Prefix tokens (the class token) get zero rotation: cos 1, sin 0.
    """
    rows = torch.arange(grid_h)[:, None].expand(grid_h, grid_w).reshape(-1)
    cols = torch.arange(grid_w)[None, :].expand(grid_h, grid_w).reshape(-1)
    cos, sin = rope_2d_angles(rows, cols, head_dim, base)  # raises on a bad head_dim
    one, zero = torch.ones(n_prefix, head_dim // 2), torch.zeros(n_prefix, head_dim // 2)
    return torch.cat([one, cos]), torch.cat([zero, sin])


def apply_rope(x_BHTd, cos_Td2, sin_Td2):
    """Rotate consecutive pairs (x0, x1) of the head dim by the angles of each position."""
    x = x_BHTd.float().unflatten(-1, (-1, 2))  # (B, H, T, d/2, 2)
    x0, x1 = x[..., 0], x[..., 1]
    out = torch.stack([x0 * cos_Td2 - x1 * sin_Td2, x0 * sin_Td2 + x1 * cos_Td2], dim=-1)
    return out.flatten(-2).type_as(x_BHTd)


def rope_pair_tables(cos_Td2: torch.Tensor, sin_Td2: torch.Tensor):
    """Tables for :func:`rotate_pairs` from :func:`apply_rope`'s (T, d/2) cos/sin: cos and sin
    (T, d), each value repeated for both members of its pair, and the (d, d) matrix that maps
    each pair (x0, x1) to (-x1, x0)."""
    d = 2 * cos_Td2.shape[-1]
    swap_dd = torch.zeros(d, d, dtype=cos_Td2.dtype, device=cos_Td2.device)
    even = torch.arange(0, d, 2, device=cos_Td2.device)
    swap_dd[even + 1, even] = -1.0  # out[2j] = -x[2j+1]
    swap_dd[even, even + 1] = 1.0  # out[2j+1] = x[2j]
    return cos_Td2.repeat_interleave(2, dim=-1), sin_Td2.repeat_interleave(2, dim=-1), swap_dd


def rotate_pairs(x_Td: torch.Tensor, cos_Td: torch.Tensor, sin_Td: torch.Tensor, swap_dd: torch.Tensor):
    """:func:`apply_rope` in four ops, on fp32 ``x`` of any leading shape whose last dim is the
    head dim (tables from :func:`rope_pair_tables`, cos/sin broadcast against ``x``).

    ``x * cos + (x @ swap) * sin`` is ``(x0 cos - x1 sin, x1 cos + x0 sin)`` per pair:
    bit-identical to :func:`apply_rope`, since ``x @ swap`` only multiplies by +-1 and adds zeros
    (exact), and the sums are the same two rounded products (no fused multiply-add).
    """
    out = x_Td * cos_Td
    return out.add_((x_Td @ swap_dd).mul_(sin_Td))


class KVCache:
    """Preallocated keys/values per layer, (B, H, T_max, d); ``length`` tokens are valid.

    ``crop(n)`` rolls the cache back to its first n tokens (speculative decoding).
    """

    def __init__(self, depth, batch, heads, max_len, head_dim, device, dtype):
        shape = (batch, heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(depth)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(depth)]
        self.length = 0
        self.max_len = max_len
        self.weights = None  # the model's prepared decode weights for this run (ARTransformer.forward_step)

    def append(self, layer: int, k_BHtd, v_BHtd):
        """Write new keys/values after the valid prefix; return the full valid K, V."""
        t = k_BHtd.shape[2]
        end = self.length + t
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} > {self.max_len}")
        self.k[layer][:, :, self.length : end] = k_BHtd
        self.v[layer][:, :, self.length : end] = v_BHtd
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, t: int):
        self.length += t

    def crop(self, n: int):
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot crop a cache of length {self.length} to {n}")
        self.length = n

    def select_rows(self, rows: torch.Tensor) -> KVCache:
        """A new cache of the given batch rows (repeats allowed), same valid length."""
        out = copy.copy(self)
        out.k = [t[rows] for t in self.k]  # (len(rows), H, T_max, d)
        out.v = [t[rows] for t in self.v]
        return out


class RaggedKVCache:
    """Preallocated keys/values per layer, (B, H, T_max, d), where row b has its own length L_b.

    For speculative decoding with ragged rows: :meth:`begin` opens a window of W new positions
    L_b .. L_b+W-1 per row, whose keys/values :meth:`append` scatters into those slots; query i
    of row b may attend to slots <= L_b + i (its committed prefix and its own causal window).
    :meth:`rollback` then sets each row's length to its committed length; slots past it are
    stale, masked in every later window and overwritten when the row gets there. Allocate
    T_max = sequence length + the widest window, so a finished row's window stays in bounds.

    No host synchronisation: the lengths stay on the device, and the attended width S comes
    from a host-side upper bound on max_b L_b (grown by every window, not lowered by a
    rollback, capped at T_max; a caller that reads the lengths anyway may lower it), not from
    reading the lengths. Slots past a row's length are masked, so a wider S changes only the
    cost, not the result.
    """

    def __init__(self, depth, batch, heads, max_len, head_dim, device, dtype):
        shape = (batch, heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(depth)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(depth)]
        self.length_B = torch.zeros(batch, dtype=torch.long, device=device)
        self.max_len = max_len
        self.bound = 0  # host-side upper bound on max(length_B)
        self._slot_S = torch.arange(max_len, device=device)  # (T_max,) reused by every window
        self._slots_BW = None
        self._used = 0
        self.weights = None  # the model's prepared decode weights for this run (forward_window)
        self.backend = "auto"  # how attention over it runs (vargen_kernels.dispatch.backend_for)

    def positions(self, width: int) -> torch.Tensor:
        """(B, W) sequence positions L_b .. L_b+W-1 of the next window (= its cache slots)."""
        return self.length_B[:, None] + self._slot_S[:width]

    def begin(self, width: int, used: int | None = None) -> torch.Tensor:
        """Open a window of ``width`` positions after each row's length; returns the per-row
        attention mask (B, 1, W, S) over the first S slots any row may use, additive (0 where
        query i of row b may attend to a slot, -inf elsewhere): built once per forward, where a
        boolean mask would be converted to this again in every layer's attention.

        S = ``used`` when the caller tracks its own host-side bound on max(length) + width,
        else ``bound + width`` (capped at T_max). A caller that sets ``length_B`` directly
        (not through :meth:`advance`) must keep ``bound`` >= max(length_B) itself."""
        if width > self.max_len:
            raise ValueError(f"KV cache overflow: a window of {width} > {self.max_len}")
        self._slots_BW = self.positions(width)  # (B, W) slot = sequence position
        self._used = min(self.bound + width, self.max_len) if used is None else int(used)
        if self._used > self.max_len:
            raise ValueError(f"KV cache overflow: {self._used} > {self.max_len}")
        s_S = self._slot_S[: self._used]
        allowed_BWS = s_S[None, None, :] <= self._slots_BW[:, :, None]
        mask_BWS = torch.zeros(allowed_BWS.shape, dtype=self.k[0].dtype, device=s_S.device)
        return mask_BWS.masked_fill_(~allowed_BWS, float("-inf"))[:, None]  # (B, 1, W, S)

    def append(self, layer: int, k_BHWd, v_BHWd):
        """Scatter the window's keys/values into its slots; return K, V (B, H, S, d)."""
        B, H, W, d = k_BHWd.shape
        idx = self._slots_BW[:, None, :, None].expand(B, H, W, d)
        self.k[layer].scatter_(2, idx, k_BHWd)
        self.v[layer].scatter_(2, idx, v_BHWd)
        return self.k[layer][:, :, : self._used], self.v[layer][:, :, : self._used]

    def advance(self, width: int):
        """Count the window as written: every row's length grows by ``width``."""
        self.length_B = self.length_B + width
        self.bound = min(self.bound + width, self.max_len)

    def rollback(self, length_B: torch.Tensor):
        """Keep at most ``length_B`` positions per row (a row keeps fewer if it has fewer)."""
        self.length_B = torch.minimum(self.length_B, length_B)

    def select_rows(self, rows: torch.Tensor) -> RaggedKVCache:
        """A new cache of the given batch rows (their lengths kept): drops finished rows."""
        out = copy.copy(self)
        out.k = [t[rows] for t in self.k]  # (len(rows), H, T_max, d)
        out.v = [t[rows] for t in self.v]
        out.length_B = self.length_B[rows]
        return out


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
        rows by a (in, out) matrix 1.5-2x faster than by the transpose of an nn.Linear weight
        (measured at 1 and 16 rows); elsewhere they are transposed views, and only w1|w3 is a
        copy (one product instead of two)."""
        a, m = self.attn, self.mlp
        w = (a.qkv.weight, a.proj.weight, torch.cat([m.w1.weight, m.w3.weight]), m.w2.weight)
        if w[0].device.type != "cpu":
            return tuple(t.t() for t in w)
        return tuple(t.detach().t().contiguous() for t in w)

    def forward_cached(self, x_BTC, rope, cache: KVCache | RaggedKVCache, layer: int, weights, mask=None):
        """:meth:`forward` for KV-cached decoding of fp32 activations in eval mode (dropout off),
        with ``rope`` = (cos_Td, sin_Td, swap_dd) from :func:`rope_pair_tables` and ``weights`` from
        :meth:`decode_weights`: the same math in fewer, faster ops.

        Decoding one token at batch 1 is bound by per-op overhead, not arithmetic, so this
        multiplies by prepared weights (no module calls, w1 and w3 in one product), rotates q
        and k in one :func:`rotate_pairs` on the qkv output, and adds into the residual in place.
        Equal to :meth:`forward` up to float rounding (tested). The rope tables are (T, d), or
        (B, T, d) for per-row positions with ``mask`` (B, 1, T, S) (a :class:`RaggedKVCache`).
        """
        B, T, C = x_BTC.shape
        H, d = self.attn.heads, self.attn.head_dim
        w_qkv, w_proj, w_13, w_2 = weights
        qkv = (self.norm1(x_BTC) @ w_qkv).view(B, T, 3, H, d)  # (B, T, 3, H, d)
        cos_Td, sin_Td, swap_dd = rope
        cos, sin = cos_Td.unsqueeze(-2).unsqueeze(-2), sin_Td.unsqueeze(-2).unsqueeze(-2)  # ([B,] T, 1, 1, d)
        qk = rotate_pairs(qkv[:, :, :2], cos, sin, swap_dd)  # (B, T, 2, H, d)
        q, k, v = qk[:, :, 0].transpose(1, 2), qk[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)
        k, v = cache.append(layer, k, v)  # (B, H, S, d)
        y_BTC = attention(q, k, v, mask, causal=mask is None, cache=cache).transpose(1, 2).reshape(B, T, C)
        x_BTC = x_BTC + y_BTC @ w_proj
        g1, g3 = (self.norm2(x_BTC) @ w_13).chunk(2, dim=-1)  # (B, T, hidden) x 2
        return x_BTC.add_(F.silu(g1).mul_(g3) @ w_2)


def gpt2_init_(model: nn.Module, depth: int) -> None:
    """GPT-2 initialisation: N(0, 0.02) for Linear and Embedding weights, and residual output
    projections (``proj`` / ``w2``) scaled by 1 / sqrt(2 depth) (Radford et al. 2019)."""
    model.apply(
        lambda m: nn.init.normal_(m.weight, std=0.02) if isinstance(m, (nn.Linear, nn.Embedding)) else None
    )
    for name, p in model.named_parameters():
        if name.endswith(("proj.weight", "w2.weight")):
            nn.init.normal_(p, std=0.02 / math.sqrt(2 * depth))
