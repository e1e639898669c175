"""In-memory labelled image sets with a fixed, seeded train / held-out split.

Every dataset yields images as float tensors (N, C, H, W) in [0, 1] and labels (N,)
int64 (all zeros for an unconditional set). The embedded sets are small enough to live
in memory, which keeps training loops free of worker processes on a 2-core machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class DataError(RuntimeError):
    """Data that cannot be used; the message says what to do."""


@dataclass
class ImageSplits:
    name: str
    train_images: torch.Tensor  # (N, C, H, W) float32 in [0, 1]
    train_labels: torch.Tensor  # (N,) int64
    heldout_images: torch.Tensor  # (M, C, H, W)
    heldout_labels: torch.Tensor  # (M,)
    num_classes: int  # 1 for an unconditional set
    class_names: list[str]
    report: str = ""  # what was loaded and skipped (image folders); tasks print it

    @property
    def channels(self) -> int:
        return self.train_images.shape[1]

    @property
    def resolution(self) -> int:
        return self.train_images.shape[-1]

    def split(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        if which == "train":
            return self.train_images, self.train_labels
        if which == "heldout":
            return self.heldout_images, self.heldout_labels
        raise ValueError(f"split must be 'train' or 'heldout', got {which!r}")


def seeded_split(
    name: str,
    images: torch.Tensor,
    labels: torch.Tensor,
    heldout_fraction: float,
    split_seed: int,
    class_names: list[str],
) -> ImageSplits:
    """Split by a permutation drawn from ``split_seed``: the same split on every machine."""
    if not 0.0 < heldout_fraction < 1.0:
        raise DataError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    n = images.shape[0]
    n_held = max(1, int(round(n * heldout_fraction)))
    if n - n_held < 1:
        raise DataError(f"dataset '{name}' has {n} images: too few to hold out {n_held}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    held, train = perm[:n_held].sort().values, perm[n_held:].sort().values
    return ImageSplits(
        name=name,
        train_images=images[train].contiguous(),
        train_labels=labels[train].contiguous(),
        heldout_images=images[held].contiguous(),
        heldout_labels=labels[held].contiguous(),
        num_classes=len(class_names),
        class_names=class_names,
    )


def check_images(images: torch.Tensor, resolution: int, channels: int, where: str) -> None:
    """Fail with a message when images do not have the shape a model was built for."""
    want = (channels, resolution, resolution)
    if images.dim() != 4 or tuple(images.shape[1:]) != want:
        raise DataError(
            f"{where}: images have shape {tuple(images.shape)}, expected (N, {channels}, "
            f"{resolution}, {resolution}); set data.resolution / data.channels to match the model"
        )
