"""Sampling a masked diffusion model: Euler / tau-leaping on the absorbing CTMC from all-mask at
t = 1 to t = eps (vargen/diffusion/absorbing.py), one model forward per step.

- ``mdm``: the base sampler, ``steps`` uniform steps, on an ``mdm`` checkpoint.
- ``lsd``: an LSD / LSD+ student (``lsd_student`` checkpoint): the teacher's network with the
  distilled per-step coefficients c_i and (LSD+) learned times; its step count is the student's.

Guidance mixes conditional and null-class logits (one batched call of 2B rows, counted as one
forward), then ``temperature`` divides the logits. Stats: ``target_forwards`` = steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from vargen.diffusion.absorbing import all_mask, sample_chain, uniform_times
from vargen.registry import SAMPLERS
from vargen.sampling.base import Sampler
from vargen.sampling.stats import new_stats


@dataclass
class MDMSamplerConfig:
    name: str = "mdm"
    steps: int = 64
    cfg_scale: float = 1.0
    temperature: float = 1.0


@dataclass
class LSDSamplerConfig:
    name: str = "lsd"
    cfg_scale: float = 1.0  # use the guidance the student was distilled at (its run's cfg_scale)
    temperature: float = 1.0


def _chain(net, cond_B, times, coefs, generator, cfg_scale, temperature):
    t0 = time.perf_counter()
    device = net.device
    cond_B = cond_B.to(device)
    B, N = cond_B.shape[0], net.num_tokens
    x = all_mask(B, N, net.vocab_size, device)  # (B, N)
    ids = sample_chain(
        lambda x_BN: net.log_p0(x_BN, cond_B, cfg_scale, temperature), x, times, net.eps, generator, coefs
    )
    stats = new_stats()
    stats["target_forwards"] = times.shape[0] - 1
    stats["tokens"] = stats["accepted"] = stats["proposed"] = B * N
    stats["positions_computed"] = (times.shape[0] - 1) * B * N * (2 if cfg_scale != 1.0 else 1)
    stats["seconds"] = time.perf_counter() - t0
    return ids, stats


@torch.no_grad()
def sample_mdm(model, cond_B, *, generator, steps=64, cfg_scale=1.0, temperature=1.0, progress=False):
    """Draw ids (B, N) with ``steps`` uniform Euler steps; returns (ids, stats)."""
    if steps < 1:
        raise ValueError(f"sampler.steps must be >= 1, got {steps}")
    return _chain(model, cond_B, uniform_times(steps, model.eps), None, generator, cfg_scale, temperature)


@torch.no_grad()
def sample_lsd(model, cond_B, *, generator, cfg_scale=1.0, temperature=1.0, progress=False):
    """Draw ids (B, N) with an LSD student's coefficients and times; returns (ids, stats)."""
    return _chain(model.base, cond_B, model.times(), model.coef, generator, cfg_scale, temperature)


@SAMPLERS.register("mdm", MDMSamplerConfig)
class MDMSampler(Sampler):
    """The absorbing reverse chain (:func:`sample_mdm`)."""

    def __call__(self, model, cond_B, generator, progress=False, slots=0):
        return sample_mdm(model, cond_B, generator=generator, progress=progress, **self.options())


@SAMPLERS.register("lsd", LSDSamplerConfig)
class LSDSampler(Sampler):
    """The distilled student's few steps (:func:`sample_lsd`)."""

    def __call__(self, model, cond_B, generator, progress=False, slots=0):
        return sample_lsd(model, cond_B, generator=generator, progress=progress, **self.options())
