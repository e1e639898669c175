"""A user's folder of images, class-conditional when it holds one sub-folder per class.

Layouts:
  root/*.png                      -> one class (unconditional), label 0
  root/<class_name>/*.png         -> one class per sub-folder, sorted by name

Images are centre-cropped to a square, resized to ``resolution`` and kept in memory;
this is meant for the small sets a CPU can train on. A missing folder, or one without
images, fails with a message naming the path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from vargen.data.base import DataError, ImageSplits, seeded_split
from vargen.registry import DATASETS

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class ImageFolderConfig:
    name: str = "imagefolder"
    root: str = "???"  # required: path to the folder
    resolution: int = 32
    channels: int = 3  # 3 for RGB, 1 for grayscale
    heldout_fraction: float = 0.1
    split_seed: int = 0
    max_images: int = 0  # 0 = all


def _list_images(folder: str) -> list[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))


def _load(path: str, resolution: int, channels: int) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB" if channels == 3 else "L")
            w, h = im.size
            side = min(w, h)
            im = im.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
            im = im.resize((resolution, resolution), Image.BICUBIC)
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except Exception as e:
        raise DataError(f"cannot read image {path}: {e}") from e
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


@DATASETS.register("imagefolder", ImageFolderConfig)
def build_imagefolder(cfg) -> ImageSplits:
    root = os.path.expanduser(cfg["root"])
    if not os.path.isdir(root):
        raise DataError(f"image folder not found: {root} (set data.root to a folder of images)")
    subdirs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    files: list[tuple[str, int]] = [(p, 0) for p in _list_images(root)]
    class_names = ["all"]
    if subdirs:
        class_files = [(d, _list_images(os.path.join(root, d))) for d in subdirs]
        class_files = [(d, fs) for d, fs in class_files if fs]
        if class_files:
            if files:
                raise DataError(
                    f"{root} holds images both at the top level and in class sub-folders; use one layout"
                )
            class_names = [d for d, _ in class_files]
            files = [(p, k) for k, (_, fs) in enumerate(class_files) for p in fs]
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {root}")
    if cfg["max_images"] > 0:
        files = files[: cfg["max_images"]]
    x = torch.from_numpy(np.stack([_load(p, cfg["resolution"], cfg["channels"]) for p, _ in files]))
    y = torch.tensor([k for _, k in files], dtype=torch.int64)
    return seeded_split("imagefolder", x, y, cfg["heldout_fraction"], cfg["split_seed"], class_names)
