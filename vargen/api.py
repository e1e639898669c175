"""The Python API: ``vargen.load(ckpt)`` -> :class:`Pipeline` and ``vargen.train(config)``.

What ``sample.py`` and ``train.py`` do, callable from a notebook or script in any working
directory: the same checkpoint loading (:func:`vargen.sampling.generate.load_generator`), the
same sampler construction and validation (:func:`~vargen.sampling.generate.build_sampler`), the
same batched drawing (:func:`~vargen.sampling.generate.generate`) and the same training entry
(:func:`vargen.train.entry.train`, which runs :func:`vargen.train.tasks.run`); images come back
as tensors instead of files.
"""

from __future__ import annotations

import os

import torch

from vargen.eval.fid import FIDEvaluator
from vargen.registry import import_components
from vargen.sampling.generate import (
    build_sampler,
    class_labels,
    counting,
    default_sampler_for,
    generate,
    load_generator,
)
from vargen.train.entry import config_path, train  # noqa: F401  (vargen.api.train: the training entry)


def _device(device) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Pipeline:
    """A trained generator, its tokenizer (None for pixel generators) and its run config.

    ``sample`` draws images as tensors; ``fid`` scores images against the run's dataset.
    """

    def __init__(self, model, tokenizer, run_cfg, ckpt: str, device: torch.device):
        self.model, self.tokenizer, self.config = model, tokenizer, run_cfg
        self.ckpt, self.device = ckpt, device
        self._fid = {}  # (split, inception_weights) -> FIDEvaluator: real statistics computed once

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def default_sampler(self) -> str:
        return default_sampler_for(self.config.model.name)

    def sample(
        self,
        labels=None,
        *,
        num_samples: int | None = None,
        sampler: str | None = None,
        seed: int = 0,
        batch_size: int = 64,
        progress: bool = False,
        **sampler_options,
    ) -> tuple[torch.Tensor, dict]:
        """Draw one image per label with ``sampler`` (default: the model's own sampler).

        ``labels``: class ids (list or tensor); None draws ``num_samples`` images cycling through
        every class. ``sampler_options`` are the sampler's config keys (``cfg_scale=2.0``,
        ``top_k=20``, ``window=4``); unknown ones raise ``ConfigError`` naming them. Same seed,
        same images: the draw is what ``sample.py`` with that seed, batch size and labels writes.
        Returns (images (N, C, H, W) float in [0, 1] on the CPU, sampler stats summed over batches).
        """
        if labels is None:
            labels_B = class_labels(num_samples or self.num_classes, self.num_classes, [])
        else:
            labels_B = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
            if num_samples is not None and num_samples != labels_B.numel():
                raise ValueError(f"num_samples={num_samples} but {labels_B.numel()} labels were given")
            class_labels(1, self.num_classes, labels_B.tolist())  # range check, same message as sample.py
        cfg = {"name": sampler or self.default_sampler, **sampler_options}
        draw = build_sampler(cfg, self.model, self.config, self.device)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        images, _, stats = generate(
            self.model, self.tokenizer, labels_B, counting(draw, []), generator, batch_size, progress
        )
        return images.clamp(0, 1), stats

    def fid(self, images: torch.Tensor, split: str = "heldout", inception_weights: str | None = None):
        """FID of ``images`` (N, C, H, W) in [0, 1] against a split of the run's dataset, in the
        features ``sample.py fid=true`` uses (the dataset's cached classifier, or Inception when
        a local weights file is given). Only comparable between image sets of equal size."""
        key = (split, inception_weights)
        if key not in self._fid:
            self._fid[key] = FIDEvaluator.for_dataset(
                dict(self.config.data), split=split, inception_weights=inception_weights
            )
        return self._fid[key].score(images.cpu())

    def __repr__(self) -> str:
        tok = "" if self.tokenizer is None else f", tokenizer={self.config.tokenizer_ckpt!r}"
        return f"Pipeline({self.config.model.name!r} from {self.ckpt!r}{tok}, device={self.device})"


def load(path: str, device: str | None = "auto", tokenizer_ckpt: str = "", log=None) -> Pipeline:
    """A generator checkpoint (weights file, run directory or ``checkpoints/step_N``) as a
    :class:`Pipeline`. Its tokenizer is the one recorded at training time (absolute path,
    sha256-checked), found next to the run when both were moved together, or ``tokenizer_ckpt``."""
    import_components()
    dev = _device(device)
    path = os.path.abspath(os.path.expanduser(str(path)))
    model, run_cfg, tokenizer = load_generator(path, dev, tokenizer_ckpt, log or (lambda m: None))
    return Pipeline(model, tokenizer, run_cfg, path, dev)
