"""2D rotary position embeddings (RoPE, Su et al. 2021; LlamaGen / EVA's 2D split): the angle
tables, the rotation, and the four-op form that cached decoding uses."""

from __future__ import annotations

import torch


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


def rotate_pairs(
    x_Td: torch.Tensor,
    cos_Td: torch.Tensor,
    sin_Td: torch.Tensor,
    swap_dd: torch.Tensor,
    x_swapped: torch.Tensor | None = None,
):
    """:func:`apply_rope` in four ops, on fp32 ``x`` of any leading shape whose last dim is the
    head dim (tables from :func:`rope_pair_tables`, cos/sin broadcast against ``x``).

    ``x * cos + (x @ swap) * sin`` is ``(x0 cos - x1 sin, x1 cos + x0 sin)`` per pair:
    bit-identical to :func:`apply_rope`, since ``x @ swap`` only multiplies by +-1 and adds zeros
    (exact), and the sums are the same two rounded products (no fused multiply-add).
    ``x_swapped``: ``x @ swap`` already computed by the caller (e.g. one 2D product over every
    head of a qkv output, where ``x`` is a strided view that ``@`` would first copy); it is
    overwritten.
    """
    x_swapped = x_Td @ swap_dd if x_swapped is None else x_swapped
    out = x_Td * cos_Td
    return out.add_(x_swapped.mul_(sin_Td))
