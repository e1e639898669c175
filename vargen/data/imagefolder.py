"""A user's folder of images, class-conditional when it holds one sub-folder per class.

Layouts:
  root/*.png                      -> one class (unconditional), label 0
  root/<class_name>/*.png         -> one class per sub-folder, sorted by name

Images are EXIF-transposed, converted from any PIL mode to floats in [0, 1] (16-bit
images scaled by 65535, palette images expanded, alpha composited on white),
centre-cropped to a square, resized to ``resolution`` and kept in memory; this is meant
for the small sets a CPU can train on. Nothing is dropped silently: unreadable files,
other files and nested folders are listed in the dataset's ``report`` together with the
image count of every class. A missing folder, one without images, or an empty class
folder fails with a message naming the path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from vargen.config import ranged
from vargen.data.base import DataError, ImageSplits, seeded_split
from vargen.registry import DATASETS

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


@dataclass
class ImageFolderConfig:
    name: str = "imagefolder"
    root: str = "???"  # required: path to the folder
    resolution: int = ranged(32, ge=1)
    channels: int = ranged(3, choices=(1, 3))  # 3 for RGB, 1 for grayscale
    heldout_fraction: float = ranged(0.1, gt=0, lt=1)
    split_seed: int = 0
    max_images: int = ranged(0, ge=0)  # 0 = all; otherwise split across classes in proportion to their sizes


def _scan(folder: str) -> tuple[list[str], list[str], list[str]]:
    """(image files, other files, sub-folders) of ``folder``, sorted; hidden entries ignored."""
    images, others, dirs = [], [], []
    for name in sorted(os.listdir(folder)):
        if name.startswith("."):
            continue
        path = os.path.join(folder, name)
        if os.path.isdir(path):
            dirs.append(path)
        elif name.lower().endswith(IMAGE_EXTENSIONS):
            images.append(path)
        else:
            others.append(path)
    return images, others, dirs


def _high_depth_gray(im) -> np.ndarray:
    """(H, W) float64 in [0, 1] of a 16-bit, 32-bit integer or float grayscale image."""
    a = np.asarray(im, dtype=np.float64)
    if im.mode in _SIXTEEN_BIT:
        return a / 65535.0
    lo, hi = float(a.min()), float(a.max())
    if im.mode == "F" and lo >= 0.0 and hi <= 1.0:
        return a
    if im.mode == "I" and lo >= 0.0 and hi <= 65535.0:  # 16-bit data Pillow opened as 32-bit
        return a / 65535.0
    return (a - lo) / max(hi - lo, 1e-12)  # anything else: its own value range


def _composite_on_white(im):
    from PIL import Image

    rgba = im.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _load(path: str, resolution: int, channels: int) -> np.ndarray:
    """(C, H, W) float32 in [0, 1] of one image file."""
    from PIL import Image, ImageOps

    with Image.open(path) as raw:
        raw.load()
        im = ImageOps.exif_transpose(raw)
    w, h = im.size
    side = min(w, h)
    box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    if im.mode in _SIXTEEN_BIT + ("I", "F"):
        # Resample in float so 16 bits of precision survive; bicubic may overshoot: clip.
        gray = Image.fromarray(_high_depth_gray(im).astype(np.float32), mode="F")
        gray = gray.crop(box).resize((resolution, resolution), Image.BICUBIC)
        arr = np.clip(np.asarray(gray, dtype=np.float32), 0.0, 1.0)
        return np.repeat(arr[None], channels, axis=0)
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        im = _composite_on_white(im)
    im = im.convert("RGB" if channels == 3 else "L")  # palette, CMYK, YCbCr, 1-bit, ...
    im = im.crop(box).resize((resolution, resolution), Image.BICUBIC)
    arr = np.asarray(im, dtype=np.float32) / 255.0
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def _stratified(class_files: list[list[str]], limit: int, seed: int) -> list[list[str]]:
    """At most ``limit`` files in all, split across classes in proportion to their sizes
    (largest remainder, at least one each), chosen within a class by a seeded permutation."""
    total = sum(len(fs) for fs in class_files)
    if limit >= total:
        return class_files
    if limit < len(class_files):
        raise DataError(
            f"data.max_images={limit} is fewer than the {len(class_files)} classes; raise it to at least "
            f"{len(class_files)} or set it to 0 (all images)"
        )
    exact = [limit * len(fs) / total for fs in class_files]
    quota = [max(1, int(q)) for q in exact]
    by_remainder = sorted(range(len(exact)), key=lambda k: int(exact[k]) - exact[k])
    for k in by_remainder:
        if sum(quota) >= limit:
            break
        if quota[k] < len(class_files[k]):
            quota[k] += 1
    for k in reversed(by_remainder):  # the minimum of one may have overshot
        if sum(quota) <= limit:
            break
        if quota[k] > 1:
            quota[k] -= 1
    g = torch.Generator().manual_seed(seed)
    out = []
    for fs, q in zip(class_files, quota):
        pick = torch.randperm(len(fs), generator=g)[:q].sort().values
        out.append([fs[i] for i in pick])
    return out


def _few(paths: list[str], root: str, n: int = 5) -> str:
    names = [os.path.relpath(p, root) for p in paths[:n]]
    return ", ".join(names) + (f", ... ({len(paths)} in all)" if len(paths) > n else "")


@DATASETS.register("imagefolder", ImageFolderConfig)
def build_imagefolder(cfg) -> ImageSplits:
    root = os.path.expanduser(cfg["root"])
    if not os.path.isdir(root):
        raise DataError(f"image folder not found: {root} (set data.root to a folder of images)")
    top_images, other_files, subdirs = _scan(root)
    skipped_dirs: list[str] = []
    if subdirs and not top_images:  # one class per sub-folder
        scans = {d: _scan(d) for d in subdirs}
        if not any(imgs for imgs, _, _ in scans.values()):
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {root} or its sub-folders")
        empty = [d for d, (imgs, _, _) in scans.items() if not imgs]
        if empty:
            raise DataError(
                f"class folder {empty[0]} holds no images ({', '.join(IMAGE_EXTENSIONS)}); add images "
                "to it or remove it (each sub-folder of data.root is one class)"
            )
        class_names = [os.path.basename(d) for d in subdirs]
        class_files = [scans[d][0] for d in subdirs]
        for _, others, nested in scans.values():
            other_files += others
            skipped_dirs += nested
    else:
        if subdirs:
            with_images = [d for d in subdirs if _scan(d)[0]]
            if with_images:
                raise DataError(
                    f"{root} holds images both at the top level and in class sub-folders "
                    f"({_few(with_images, root)}); use one layout"
                )
            skipped_dirs += subdirs
        class_names, class_files = ["all"], [top_images]
    if not any(class_files):
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {root}")
    if cfg["max_images"] > 0:
        class_files = _stratified(class_files, cfg["max_images"], cfg["split_seed"])

    arrays, labels, unreadable = [], [], []
    for k, files in enumerate(class_files):
        for path in files:
            try:
                arrays.append(_load(path, cfg["resolution"], cfg["channels"]))
                labels.append(k)
            except Exception as e:  # PIL raises many kinds for a broken file
                unreadable.append(f"{os.path.relpath(path, root)} ({type(e).__name__}: {e})")
    counts = [labels.count(k) for k in range(len(class_names))]
    if 0 in counts:
        name = class_names[counts.index(0)]
        raise DataError(
            f"no readable image in class '{name}' of {root} (unreadable: {'; '.join(unreadable[:3])}); "
            "fix or remove those files"
        )
    lines = [
        f"{sum(counts)} images in {len(class_names)} class(es) from {root}: "
        + ", ".join(f"{n} {c}" for n, c in zip(class_names, counts))
    ]
    if cfg["max_images"] > 0:
        lines.append(f"data.max_images={cfg['max_images']} (taken from every class in proportion)")
    if unreadable:
        lines.append(f"skipped {len(unreadable)} unreadable image(s): {'; '.join(unreadable[:5])}")
    if other_files:
        lines.append(f"skipped {len(other_files)} non-image file(s): {_few(other_files, root)}")
    if skipped_dirs:
        lines.append(f"skipped {len(skipped_dirs)} nested folder(s) (not read): {_few(skipped_dirs, root)}")
    x = torch.from_numpy(np.stack(arrays))
    y = torch.tensor(labels, dtype=torch.int64)
    data = seeded_split("imagefolder", x, y, cfg["heldout_fraction"], cfg["split_seed"], class_names)
    data.report = "; ".join(lines)
    return data
