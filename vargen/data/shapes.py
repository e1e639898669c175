"""Procedurally rendered coloured shapes at 32x32 RGB, 6 classes.

Why procedural shapes rather than crops of scikit-image's photos: the class of every
image is exact (crops of a dozen photos have no meaningful classes), nothing beyond
torch is needed, and the set is regenerated bit for bit from a seed. Each image has one
shape (circle, square, triangle, ring, cross, half disk) with a random size, position,
rotation and colour on a random darker background; edges are anti-aliased by 4x
supersampling, so a tokenizer sees smooth colour gradients as well as flat regions.
At 32x32 a stride-4 tokenizer gives 64 tokens, for methods that need longer sequences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vargen.data.base import ImageSplits, seeded_split
from vargen.registry import DATASETS

SHAPES = ("circle", "square", "triangle", "ring", "cross", "half_disk")


@dataclass
class ShapesConfig:
    name: str = "shapes"
    resolution: int = 32
    num_images: int = 6000
    seed: int = 0  # seed of the rendering
    heldout_fraction: float = 0.15
    split_seed: int = 0


def _mask(kind: int, u: torch.Tensor, v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Inside-test for one shape in its own rotated frame; u, v: (B, S, S), r: (B, 1, 1)."""
    name = SHAPES[kind]
    if name == "circle":
        return u**2 + v**2 <= r**2
    if name == "square":
        return (u.abs() <= 0.8 * r) & (v.abs() <= 0.8 * r)
    if name == "triangle":  # equilateral, apex up, inscribed in radius r
        return (v >= -0.5 * r) & (math.sqrt(3) * u + v <= r) & (-math.sqrt(3) * u + v <= r)
    if name == "ring":
        d2 = u**2 + v**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    if name == "cross":
        w = 0.3 * r
        return ((u.abs() <= w) & (v.abs() <= r)) | ((v.abs() <= w) & (u.abs() <= r))
    if name == "half_disk":
        return (u**2 + v**2 <= r**2) & (v >= -0.2 * r)
    raise ValueError(name)


def render_shapes(num: int, resolution: int, seed: int, supersample: int = 4):
    """Render ``num`` images (N, 3, R, R) in [0, 1] and labels (N,), deterministically."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(SHAPES), (num,), generator=g)
    radius = 0.22 + 0.16 * torch.rand(num, generator=g)  # fraction of the image side
    centre = 0.5 + (0.5 - radius - 0.04).unsqueeze(1) * (2 * torch.rand(num, 2, generator=g) - 1)
    angle = 2 * math.pi * torch.rand(num, generator=g)
    hue = torch.rand(num, generator=g)
    fg = _hsv_to_rgb(
        hue, 0.6 + 0.4 * torch.rand(num, generator=g), 0.75 + 0.25 * torch.rand(num, generator=g)
    )
    bg_hue = (hue + 0.3 + 0.4 * torch.rand(num, generator=g)) % 1.0
    bg = _hsv_to_rgb(
        bg_hue, 0.3 + 0.4 * torch.rand(num, generator=g), 0.1 + 0.3 * torch.rand(num, generator=g)
    )

    s = resolution * supersample
    coords = (torch.arange(s, dtype=torch.float32) + 0.5) / s  # (S,)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")  # (S, S)
    images = torch.empty(num, 3, resolution, resolution)
    for start in range(0, num, 512):
        sl = slice(start, min(num, start + 512))
        dx = xx - centre[sl, 0, None, None]  # (b, S, S)
        dy = yy - centre[sl, 1, None, None]
        c, sn = torch.cos(angle[sl])[:, None, None], torch.sin(angle[sl])[:, None, None]
        u, v = c * dx + sn * dy, -sn * dx + c * dy
        r = radius[sl, None, None]
        inside = torch.zeros_like(u, dtype=torch.bool)
        for k in range(len(SHAPES)):
            sel = labels[sl] == k
            if sel.any():
                inside[sel] = _mask(k, u[sel], -v[sel], r[sel])
        cover = F.avg_pool2d(inside.float().unsqueeze(1), supersample)  # (b, 1, R, R)
        images[sl] = cover * fg[sl, :, None, None] + (1 - cover) * bg[sl, :, None, None]
    return images.clamp(0, 1), labels


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], dim=1)  # (N, 3)
    return v[:, None] - v[:, None] * s[:, None] * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


@DATASETS.register("shapes", ShapesConfig)
def build_shapes(cfg) -> ImageSplits:
    x, y = render_shapes(cfg["num_images"], cfg["resolution"], cfg["seed"])
    return seeded_split("shapes", x, y, cfg["heldout_fraction"], cfg["split_seed"], list(SHAPES))
