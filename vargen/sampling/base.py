"""The sampler protocol: what every registered sampler implements and what it is given.

A sampler is built from its validated config section (``SAMPLERS.build(cfg)``), prepared once
per run with :meth:`Sampler.setup` (a :class:`SamplerContext`: the model it will draw from,
the device, the run's config, a checkpoint loader, the run's dataset built on first use), then
called as many times as there are batches::

    sampler = SAMPLERS.build({"name": "speculative", "draft_ckpt": "runs/draft"})
    sampler.setup(SamplerContext(model, device, run_cfg))  # loads the draft
    out, stats = sampler(model, cond_B, generator)

``out`` is what the model's tokenizer decodes (ids, ids per scale, continuous tokens) or images
for a pixel generator; ``stats`` a record from :mod:`vargen.sampling.stats`. A sampler with
``continuous = True`` does its own continuous batching: :func:`~vargen.sampling.generate.generate`
hands it every label at once with ``slots`` rows in flight, and it refills finished rows itself.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch

from vargen.checkpoint import load_cached


def inference(fn: Callable) -> Callable:
    """Decorator for a sampling loop: run it under ``torch.inference_mode()`` and hand back its
    tensors as ordinary ones.

    Inference mode skips autograd's per-op bookkeeping (version counters, view tracking) that
    ``no_grad`` keeps; decoding at batch 1 is bound by per-op overhead, and a window forward of
    the photos target ran ~10% faster (CPU, one thread). Tensors made in inference mode cannot
    be modified in place or enter autograd outside it, so the output's tensors (top level and
    inside tuples/lists) are copied outside; the draws are the same as under ``no_grad``."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with torch.inference_mode():
            out = fn(*args, **kwargs)
        return _ordinary(out)

    return run


def _ordinary(out):
    """``out`` with inference tensors (also in tuples and lists) replaced by ordinary copies."""
    if isinstance(out, torch.Tensor):
        return out.clone() if out.is_inference() else out
    if isinstance(out, (tuple, list)):
        return type(out)(_ordinary(o) for o in out)
    return out


def load_checkpoint(ckpt: str, device) -> tuple[Any, Any]:
    """(model in eval mode, run config) of a checkpoint (weights file or run dir) on ``device``,
    through :func:`vargen.checkpoint.load_cached` (the one memo of helper models: a draft or
    classifier loaded for one run is shared with the next on the same file and device)."""
    model, cfg = load_cached(ckpt, device)
    return model.eval(), cfg


class SamplerContext:
    """What one run gives its sampler at :meth:`Sampler.setup`.

    ``model``: the generator being sampled; ``device``: where it runs (default: the model's);
    ``run_cfg``: the generator's run config (its ``data`` section names the dataset);
    ``loader(ckpt, device) -> (model, run config)``: how checkpoints named in the sampler
    config (drafts, classifiers) are loaded, :func:`load_checkpoint` unless a caller (a test)
    hands its own models in.
    """

    def __init__(self, model, device=None, run_cfg=None, loader: Callable | None = None):
        self.model = model
        self.device = torch.device(device) if device is not None else model.device
        self.run_cfg = run_cfg
        self.loader = loader or load_checkpoint
        self._dataset = None

    def load(self, ckpt: str):
        """(model, run config) of ``ckpt`` on the run's device."""
        return self.loader(ckpt, self.device)

    @property
    def dataset(self):
        """The run's dataset (:class:`~vargen.data.ImageSplits`), built on first use."""
        if self._dataset is None:
            from vargen.data import build_dataset

            if self.run_cfg is None:
                raise ValueError("this sampler reads the run's dataset: give the context a run config")
            self._dataset = build_dataset(self.run_cfg.data)
        return self._dataset

    def real_batch(self, n: int = 256, seed: int = 0):
        """``n`` training images and their labels picked with a fixed seed, on the run's device."""
        data = self.dataset
        pick = torch.randperm(len(data.train_images), generator=torch.Generator().manual_seed(seed))[:n]
        return data.train_images[pick].to(self.device), data.train_labels[pick].to(self.device)


class Sampler(ABC):
    """Base class of every registered sampler: ``cfg`` is its validated config section."""

    continuous: bool = False  # True: gets every label at once with ``slots`` rows in flight

    def __init__(self, cfg):
        self.cfg = cfg

    def setup(self, ctx: SamplerContext) -> None:
        """Prepare for a run (load drafts or classifiers, read data); the default needs nothing."""
        return None

    @abstractmethod
    def __call__(self, model, cond_B: torch.Tensor, generator: torch.Generator, progress=False, slots=0):
        """Draw for the labels ``cond_B`` with ``generator``; returns (out, stats)."""

    def options(self) -> dict:
        """The config fields but ``name``, as keywords for the sampler's function."""
        return {k: v for k, v in dict(self.cfg).items() if k != "name"}


class FunctionSampler(Sampler):
    """A plain function ``fn(model, cond_B, generator) -> (out, stats)`` as a sampler (benchmarks
    that compare hand-set sampler calls); never continuous, nothing to set up."""

    def __init__(self, fn):
        super().__init__({"name": getattr(fn, "__name__", "function")})
        self.fn = fn

    def __call__(self, model, cond_B, generator, progress=False, slots=0):
        return self.fn(model, cond_B, generator)


def as_sampler(sampler) -> Sampler:
    """``sampler`` itself when it implements the protocol, else the function wrapped."""
    return sampler if isinstance(sampler, Sampler) else FunctionSampler(sampler)
