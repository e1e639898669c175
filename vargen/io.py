"""Writing what a person looks at: PNG image grids and .npz sample archives."""

from __future__ import annotations

import math
import os

import numpy as np
import torch


def to_uint8(images_BCHW: torch.Tensor) -> np.ndarray:
    """Float images in [0, 1] -> uint8 array (B, H, W, C)."""
    x = (images_BCHW.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images_BCHW: torch.Tensor, nrow: int = 0, pad: int = 1, pad_value: float = 1.0) -> np.ndarray:
    """Tile images into one (H', W', C) uint8 array, ``nrow`` images per row (0 = square)."""
    B, C, H, W = images_BCHW.shape
    nrow = nrow or math.ceil(math.sqrt(B))
    rows = math.ceil(B / nrow)
    grid = torch.full((C, rows * (H + pad) + pad, nrow * (W + pad) + pad), pad_value)
    for i in range(B):
        r, c = divmod(i, nrow)
        y, x = pad + r * (H + pad), pad + c * (W + pad)
        grid[:, y : y + H, x : x + W] = images_BCHW[i].detach().float().cpu()
    return to_uint8(grid[None])[0]


def save_grid(images_BCHW: torch.Tensor, path: str, nrow: int = 0, scale: int = 4) -> str:
    """Save a PNG grid, upscaled ``scale`` x with nearest neighbour so small images are visible."""
    from PIL import Image

    arr = make_grid(images_BCHW, nrow)
    img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)
    return path
