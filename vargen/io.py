"""Files a person looks at: PNG image grids, .npz sample archives, a run's ``log.jsonl``."""

from __future__ import annotations

import json
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


def log_path(out_dir: str) -> str:
    """The training log of a run: one JSON object per line (step, loss, ...)."""
    return os.path.join(out_dir, "log.jsonl")


def read_log(out_dir: str) -> list[dict]:
    """The rows of a run's training log, oldest first; [] before the first row."""
    path = log_path(out_dir)
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line torn by a kill mid-append: dropped on resume
                continue
    return rows
