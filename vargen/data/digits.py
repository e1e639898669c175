"""scikit-learn's 8x8 handwritten digits, bilinearly upsampled, 10 classes.

Why 16x16: the source images are 8x8 (1797 of them, 4 bits per pixel); 16x16 is the
smallest size that a stride-4 tokenizer turns into a 4x4 grid of 16 tokens, which keeps
an AR transformer fast on 2 CPU cores while the bilinear upsampling adds no information
the tokenizer must spend codes on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vargen.data.base import ImageSplits, seeded_split
from vargen.registry import DATASETS


@dataclass
class DigitsConfig:
    name: str = "digits"
    resolution: int = 16  # 8 (native) or any larger size; bilinear upsampling
    heldout_fraction: float = 0.15
    split_seed: int = 0


@DATASETS.register("digits", DigitsConfig)
def build_digits(cfg) -> ImageSplits:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    if cfg["resolution"] != 8:
        x = F.interpolate(x, size=cfg["resolution"], mode="bilinear", align_corners=False)
    x = x.clamp(0, 1)
    y = torch.tensor(d.target, dtype=torch.int64)
    names = [str(i) for i in range(10)]
    return seeded_split("digits", x, y, cfg["heldout_fraction"], cfg["split_seed"], names)
