"""Random crops of the natural photographs that ship inside scikit-image's wheel, one class per photo.

Why: digits has 16 tokens per image, too short for the accelerated samplers (their speed-ups live at
256+ tokens); a 64x64 crop through a stride-4 tokenizer is a 16x16 grid of 256 tokens, on real
photographic statistics, with nothing downloaded (the files are read straight from
``skimage/data/``; scikit-image's download helpers are never called).

| class id | photo | source size (H x W) | kind |
|---|---|---|---|
| 0 | astronaut.png | 512 x 512 | RGB |
| 1 | chelsea.png (the cat) | 300 x 451 | RGB |
| 2 | coffee.png | 400 x 600 | RGB |
| 3 | rocket.jpg | 427 x 640 | RGB |
| 4 | motorcycle_left.png | 500 x 741 | RGB |
| 5 | motorcycle_right.png | 500 x 741 | RGB |
| 6 | retina.jpg | 1411 x 1411 | RGB |
| 7 | hubble_deep_field.jpg | 872 x 1000 | RGB |
| 8 | ihc.png (immunohistochemistry) | 512 x 512 | RGB |
| 9 | brick.png | 512 x 512 | gray -> RGB |
| 10 | grass.png | 512 x 512 | gray -> RGB |
| 11 | gravel.png | 512 x 512 | gray -> RGB |
| 12 | camera.png | 512 x 512 | gray -> RGB |
| 13 | coins.png | 303 x 384 | gray -> RGB |
| 14 | moon.png | 512 x 512 | gray -> RGB |

Held-out pixels are never seen in training: the right-most ``heldout_fraction`` of each photo's
columns is reserved, held-out crops lie inside that strip and training crops entirely left of it.
A crop is a square whose side is ``scale`` times the photo's shorter side, ``scale`` uniform in
``[scale_min, scale_max]`` (capped so it fits in its region), at a uniform position, flipped
horizontally with probability 1/2, and resized (antialiased bilinear) to ``resolution``. All crops
are drawn once from ``seed`` and held in memory: the same seed gives the same crops everywhere.
Grayscale photos are broadcast to three equal channels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from vargen.data.base import DataError, ImageSplits
from vargen.registry import DATASETS

PHOTOS = (
    ("astronaut", "astronaut.png"),
    ("chelsea", "chelsea.png"),
    ("coffee", "coffee.png"),
    ("rocket", "rocket.jpg"),
    ("motorcycle_left", "motorcycle_left.png"),
    ("motorcycle_right", "motorcycle_right.png"),
    ("retina", "retina.jpg"),
    ("hubble_deep_field", "hubble_deep_field.jpg"),
    ("ihc", "ihc.png"),
    ("brick", "brick.png"),
    ("grass", "grass.png"),
    ("gravel", "gravel.png"),
    ("camera", "camera.png"),
    ("coins", "coins.png"),
    ("moon", "moon.png"),
)


@dataclass
class PhotosConfig:
    name: str = "photos"
    resolution: int = 64
    train_per_class: int = 400  # crops per photo from the training region
    heldout_per_class: int = 70  # crops per photo from the held-out strip
    scale_min: float = 0.15  # crop side / the photo's shorter side
    scale_max: float = 0.3
    heldout_fraction: float = 0.3  # right-most fraction of each photo's columns, held out
    seed: int = 0


def photo_dir() -> str:
    """scikit-image's shipped data folder (inside the installed wheel)."""
    try:
        import skimage.data
    except ImportError as e:  # a declared dependency; say how to get it
        raise DataError("dataset 'photos' needs scikit-image: pip install scikit-image") from e
    return os.path.dirname(skimage.data.__file__)


def load_photo(filename: str) -> torch.Tensor:
    """One shipped photo as uint8 (3, H, W); grayscale broadcast to three equal channels."""
    from PIL import Image

    path = os.path.join(photo_dir(), filename)
    if not os.path.isfile(path):
        raise DataError(
            f"dataset 'photos': {path} is missing; reinstall scikit-image (pip install -U scikit-image)"
        )
    with Image.open(path) as im:
        arr = np.asarray(im.convert("L") if im.mode in ("L", "I;16", "1") else im.convert("RGB"))
    x = torch.from_numpy(arr.copy())
    return x[None].expand(3, -1, -1).contiguous() if x.dim() == 2 else x.permute(2, 0, 1).contiguous()


def crop_boxes(h: int, w: int, num: int, region: tuple[int, int], cfg, g: torch.Generator) -> torch.Tensor:
    """``num`` square boxes (top, left, side) inside columns [region[0], region[1]) of an h x w photo."""
    x0, x1 = region
    short = min(h, w)
    side_max = min(int(cfg["scale_max"] * short), x1 - x0, h)
    side_min = min(int(cfg["scale_min"] * short), side_max)
    if side_min < 8:
        raise DataError(f"dataset 'photos': crops of {side_min} px are too small; raise data.scale_min")
    side = torch.randint(side_min, side_max + 1, (num,), generator=g)
    top = (torch.rand(num, generator=g) * (h - side + 1)).long()
    left = x0 + (torch.rand(num, generator=g) * (x1 - x0 - side + 1)).long()
    return torch.stack([top, left, side], 1)  # (num, 3)


def render_crops(photo_3HW: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, res: int) -> torch.Tensor:
    """Crop, flip and resize: float (num, 3, res, res) in [0, 1]."""
    out = []
    for (top, left, side), flip in zip(boxes.tolist(), flips.tolist()):
        c = photo_3HW[:, top : top + side, left : left + side].float()[None] / 255.0  # (1, 3, s, s)
        c = F.interpolate(c, size=(res, res), mode="bilinear", antialias=True, align_corners=False)
        out.append(c.flip(-1) if flip else c)
    return torch.cat(out).clamp(0, 1)


def photo_split_boxes(h: int, w: int, cfg, g: torch.Generator):
    """(train boxes, held-out boxes) of one photo; the held-out strip starts at column ``split``."""
    split = int(round(w * (1.0 - cfg["heldout_fraction"])))
    train = crop_boxes(h, w, cfg["train_per_class"], (0, split), cfg, g)
    held = crop_boxes(h, w, cfg["heldout_per_class"], (split, w), cfg, g)
    return train, held, split


@DATASETS.register("photos", PhotosConfig)
def build_photos(cfg) -> ImageSplits:
    if not 0.0 < cfg["heldout_fraction"] < 1.0:
        raise DataError(f"data.heldout_fraction must be in (0, 1), got {cfg['heldout_fraction']}")
    if not 0.0 < cfg["scale_min"] <= cfg["scale_max"] <= 1.0:
        raise DataError(
            f"need 0 < data.scale_min <= data.scale_max <= 1, got {cfg['scale_min']}, {cfg['scale_max']}"
        )
    g = torch.Generator().manual_seed(cfg["seed"])
    res = cfg["resolution"]
    parts = {"train": ([], []), "heldout": ([], [])}
    for label, (_, filename) in enumerate(PHOTOS):
        photo = load_photo(filename)  # (3, H, W) uint8
        train, held, _ = photo_split_boxes(photo.shape[1], photo.shape[2], cfg, g)
        for split, boxes in (("train", train), ("heldout", held)):
            flips = torch.rand(len(boxes), generator=g) < 0.5
            parts[split][0].append(render_crops(photo, boxes, flips, res))
            parts[split][1].append(torch.full((len(boxes),), label, dtype=torch.int64))
    (tx, ty), (hx, hy) = ([torch.cat(t) for t in parts[s]] for s in ("train", "heldout"))
    return ImageSplits("photos", tx, ty, hx, hy, len(PHOTOS), [name for name, _ in PHOTOS])
