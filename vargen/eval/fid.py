"""Frechet distance between real and generated images, on torchmetrics.

Two feature spaces:
- a dataset's own classifier (:mod:`vargen.eval.feature_net`): offline, seconds to train,
  meaningful at 16x16 and 32x32; the default everywhere in vargen;
- Inception-v3 pool features, only from a weights file the user already has
  (``inception_weights=PATH``). torchmetrics would otherwise download them, which fails
  offline; this module never attempts a download. That path needs torch-fidelity.

FID from a few hundred images is noisy (see the ± std over seeds in the README's tables):
compare methods over several seeds, against the same real set and feature net.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os

import torch
import torch.nn as nn

from vargen.data import build_dataset
from vargen.eval.feature_net import _full_data_config, get_feature_net


def _check_images(images: torch.Tensor, which: str) -> None:
    if not torch.is_tensor(images) or images.dim() != 4:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"{which} images must be a tensor (N, C, H, W), got {shape}")
    if not images.is_floating_point():
        raise ValueError(
            f"{which} images must be float in [0, 1], got dtype {images.dtype}; "
            "convert uint8 images with x.float() / 255"
        )
    if images.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 {which} images (a covariance), got {images.shape[0]}")
    lo, hi = images.min().item(), images.max().item()
    if not (0.0 <= lo and hi <= 1.0):
        raise ValueError(
            f"{which} images must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]; "
            "clamp decoder outputs with x.clamp(0, 1)"
        )


def _check_same_shape(real_shape: tuple, fake: torch.Tensor) -> None:
    if tuple(fake.shape[1:]) != real_shape:
        raise ValueError(
            f"real and fake images differ in shape: real (C, H, W) = {real_shape}, "
            f"fake (C, H, W) = {tuple(fake.shape[1:])}"
        )


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    """Extract features in eval mode (dropout / batch-norm off), then restore the caller's mode."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class _Fid:
    """One torchmetrics FID metric plus the batching, device and channel handling around it."""

    def __init__(self, feature_net, inception_weights, *, reset_real_features: bool, batch_size: int, device):
        # imported here, not at module load: torchmetrics pulls in transformers (seconds), and
        # every command line imports this module to register components
        from torchmetrics.image.fid import FrechetInceptionDistance

        if (feature_net is None) == (inception_weights is None):
            raise ValueError("pass exactly one of feature_net or inception_weights")
        self.batch_size, self.device = batch_size, torch.device(device)
        # Local stats only: without this, under torch.distributed, compute() would all-reduce
        # and hang when only one rank evaluates.
        common = dict(normalize=True, reset_real_features=reset_real_features, sync_on_compute=False)
        if feature_net is not None:
            if not isinstance(getattr(feature_net, "num_features", None), int):
                raise TypeError("feature_net needs an integer `num_features` attribute (its output width)")
            param = next(iter(feature_net.parameters()), None)
            if param is not None and param.device != self.device:
                feature_net = copy.deepcopy(feature_net)  # moved below; the caller's net stays where it is
            self.net, self.rgb = feature_net, False
            self.metric = FrechetInceptionDistance(feature=feature_net, **common)
        else:
            path = os.fspath(inception_weights)
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"Inception weights file not found: {path} "
                    "(vargen never downloads them; pass the path of a local copy)"
                )
            if importlib.util.find_spec("torch_fidelity") is None:
                raise ImportError(
                    "Inception FID needs torch-fidelity: pip install torch-fidelity "
                    "(the weights come from your local file; nothing is downloaded)"
                )
            # torch-fidelity reads this file with torch.load: pass only files you trust.
            self.metric = FrechetInceptionDistance(
                feature=2048, feature_extractor_weights_path=path, **common
            )
            self.net, self.rgb = self.metric.inception, True
        self.metric.to(self.device)

    @torch.no_grad()
    def update(self, images: torch.Tensor, real: bool) -> None:
        with _eval_mode(self.net):
            for start in range(0, images.shape[0], self.batch_size):
                x = images[start : start + self.batch_size].to(self.device, torch.float32)  # (b, C, H, W)
                if self.rgb and x.shape[1] == 1:
                    x = x.expand(-1, 3, -1, -1)  # (b, 3, H, W): Inception takes RGB
                self.metric.update(x, real=real)

    def compute(self) -> float:
        return float(self.metric.compute())


def compute_fid(
    real_BCHW: torch.Tensor,
    fake_BCHW: torch.Tensor,
    feature_net: nn.Module | None = None,
    *,
    inception_weights: str | os.PathLike | None = None,
    batch_size: int = 256,
    device=None,
) -> float:
    """FID between two image sets (N, C, H, W), float in [0, 1].

    Args:
        feature_net: a module mapping images to (N, F) features with an integer
            ``num_features``, e.g. :func:`~vargen.eval.feature_net.get_feature_net`.
        inception_weights: instead of ``feature_net``, a local Inception-v3 weights file
            (torch-fidelity format); grayscale images are repeated to 3 channels.
        device: where features are computed; defaults to the device of ``real_BCHW``.
    """
    _check_images(real_BCHW, "real")
    _check_images(fake_BCHW, "fake")
    _check_same_shape(tuple(real_BCHW.shape[1:]), fake_BCHW)
    fid = _Fid(
        feature_net,
        inception_weights,
        reset_real_features=True,
        batch_size=batch_size,
        device=real_BCHW.device if device is None else device,
    )
    fid.update(real_BCHW, real=True)
    fid.update(fake_BCHW, real=False)
    return fid.compute()


class FIDEvaluator:
    """FID of many fake sets against one real set whose feature statistics are computed once.

    Holds a torchmetrics metric with ``reset_real_features=False``: each :meth:`score`
    resets only the fake statistics. Equal to :func:`compute_fid` for the same inputs.
    """

    def __init__(
        self,
        real_BCHW: torch.Tensor,
        feature_net: nn.Module | None = None,
        *,
        inception_weights: str | os.PathLike | None = None,
        batch_size: int = 256,
        device=None,
    ):
        _check_images(real_BCHW, "real")
        self.image_shape = tuple(real_BCHW.shape[1:])  # (C, H, W)
        self.num_real = real_BCHW.shape[0]
        self._fid = _Fid(
            feature_net,
            inception_weights,
            reset_real_features=False,
            batch_size=batch_size,
            device=real_BCHW.device if device is None else device,
        )
        self._fid.update(real_BCHW, real=True)

    @classmethod
    def for_dataset(
        cls, data_cfg, split: str = "train", inception_weights=None, *, batch_size: int = 256, device="cpu"
    ) -> FIDEvaluator:
        """Against a dataset split, in the feature space of its cached feature net (or Inception)."""
        images, _ = build_dataset(_full_data_config(data_cfg)).split(split)  # (N, C, H, W)
        net = None if inception_weights is not None else get_feature_net(data_cfg, device)
        return cls(images, net, inception_weights=inception_weights, batch_size=batch_size, device=device)

    def score(self, fake_BCHW: torch.Tensor) -> float:
        """FID of ``fake_BCHW`` (N, C, H, W), float in [0, 1], against the real set."""
        _check_images(fake_BCHW, "fake")
        _check_same_shape(self.image_shape, fake_BCHW)
        self._fid.metric.reset()  # keeps the real statistics
        self._fid.update(fake_BCHW, real=False)
        return self._fid.compute()
