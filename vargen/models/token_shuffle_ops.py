"""Token-Shuffle's merge / split of s x s token windows (arXiv 2504.17789).

`shuffle_windows` / `unshuffle_windows` are the pure rearrangement: a (B, H*W, D) raster sequence
becomes (B, (H/s)*(W/s), s*s*D), each merged token holding its window's tokens concatenated along
channels in raster order inside the window. `TokenShuffle` adds the paper's per-token MLP: by default
compress each token D -> D/s^2 and then concatenate (the paper's order, width stays D); "concat_first"
concatenates first and projects s^2*D -> D. `TokenUnshuffle` splits a merged feature back into s^2
sub-token features and lifts each to D with an MLP, ready for the shared output head.
"""

import torch
from torch import nn


def _check(h: int, w: int, s: int):
    if s < 1 or h % s or w % s:
        raise ValueError(f"token_shuffle.window: s={s} must divide the token grid {h}x{w}")


def shuffle_windows(x_BND: torch.Tensor, h: int, w: int, s: int) -> torch.Tensor:
    """(B, h*w, D) raster -> (B, (h/s)*(w/s), s*s*D), windows in raster order."""
    _check(h, w, s)
    b, _, d = x_BND.shape
    x = x_BND.reshape(b, h // s, s, w // s, s, d)  # (B, h', s, w', s, D)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, (h // s) * (w // s), s * s * d)


def unshuffle_windows(x_BMK: torch.Tensor, h: int, w: int, s: int) -> torch.Tensor:
    """Inverse of shuffle_windows: (B, (h/s)*(w/s), s*s*D) -> (B, h*w, D)."""
    _check(h, w, s)
    b, _, k = x_BMK.shape
    d = k // (s * s)
    x = x_BMK.reshape(b, h // s, w // s, s, s, d)  # (B, h', w', s, s, D)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h * w, d)


def window_order(h: int, w: int, s: int) -> torch.Tensor:
    """Raster token indices in window order: position k of the shuffled sub-token sequence."""
    idx = torch.arange(h * w).reshape(1, h * w, 1)
    return shuffle_windows(idx, h, w, s).reshape(-1)


def _mlp(d_in: int, d_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, d_out), nn.GELU(), nn.Linear(d_out, d_out))


class TokenShuffle(nn.Module):
    def __init__(self, dim: int, grid: tuple[int, int], s: int = 2, order: str = "compress_first"):
        super().__init__()
        _check(*grid, s)
        if order not in ("compress_first", "concat_first"):
            raise ValueError(f"token_shuffle.order: expected compress_first or concat_first, got {order!r}")
        if order == "compress_first" and dim % (s * s):
            raise ValueError(f"token_shuffle.window: s*s={s * s} must divide dim {dim}")
        self.grid, self.s, self.order = grid, s, order
        self.mlp = _mlp(dim, dim // (s * s)) if order == "compress_first" else _mlp(dim * s * s, dim)

    def merge(self, x_BMKD):
        """Window-grouped token features (B, M, s*s, D) -> merged tokens (B, M, D)."""
        b, m, k, d = x_BMKD.shape
        if self.order == "compress_first":
            return self.mlp(x_BMKD).reshape(b, m, d)  # s*s chunks of D/s^2, concatenated
        return self.mlp(x_BMKD.reshape(b, m, k * d))

    def forward(self, x_BND):
        b, _, d = x_BND.shape
        grouped = shuffle_windows(x_BND, *self.grid, self.s).reshape(b, -1, self.s * self.s, d)
        return self.merge(grouped)  # (B, M, D)


class TokenUnshuffle(nn.Module):
    """(B, M, D) merged features -> (B, M, s*s, D) sub-token features, window-internal raster order."""

    def __init__(self, dim: int, s: int = 2):
        super().__init__()
        self.s = s
        self.split = nn.Linear(dim, dim * s * s)
        self.mlp = _mlp(dim, dim)

    def forward(self, x_BMD):
        b, m, d = x_BMD.shape
        return self.mlp(self.split(x_BMD).reshape(b, m, self.s * self.s, d))  # (B, M, s*s, D)
