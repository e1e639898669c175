"""Datasets: embedded digits (16x16 gray), shapes (32x32 RGB), photos (64x64 crops of the photos
shipped in scikit-image), and user image folders."""

from vargen.data import digits, imagefolder, photos, shapes  # noqa: F401  (register)
from vargen.data.base import DataError, ImageSplits, check_images, seeded_split
from vargen.registry import DATASETS

__all__ = ["DATASETS", "DataError", "ImageSplits", "build_dataset", "check_images", "seeded_split"]

_CACHE: dict[str, ImageSplits] = {}


def build_dataset(cfg) -> ImageSplits:
    """Build (and memoise per process) the dataset described by a validated config section."""
    import json

    key = json.dumps(dict(cfg), sort_keys=True, default=str)
    if key not in _CACHE:
        _CACHE[key] = DATASETS.build(cfg)
    return _CACHE[key]
