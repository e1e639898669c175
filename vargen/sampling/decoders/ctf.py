"""CTF sampling (arXiv 2503.16194): stage 1 draws the coarse labels next-token by next-token
(KV cache, CFG on logits, temperature tau1), then one stage-2 pass draws all fine ids at once
(temperature tau2, top-k; cluster-masked when the model was built with mask_to_cluster)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from vargen.registry import SAMPLERS
from vargen.sampling.base import Sampler
from vargen.sampling.decoders.ar import complete, sample_ar


@dataclass
class CTFSamplerConfig:
    name: str = "ctf"
    cfg_scale: float = 1.0
    temperature: float = 1.0  # stage 1
    fine_temperature: float = 1.0  # stage 2
    fine_top_k: int = 0  # 0 = all


@torch.no_grad()
def sample_ctf(
    model,
    cond_B,
    *,
    generator,
    cfg_scale=1.0,
    temperature=1.0,
    fine_temperature=1.0,
    fine_top_k=0,
    progress=False,
):
    """Stage 1 (coarse labels, next-token with CFG) then one stage-2 pass for the fine ids.

    Returns (ids_BN, stats); stats count stage-1 forwards plus the one stage-2 forward.
    ``progress`` is accepted for the sampler protocol; there is no bar.
    """
    t0 = time.perf_counter()
    coarse_BN, stats = sample_ar(
        model.stage1, cond_B, generator=generator, cfg_scale=cfg_scale, temperature=temperature
    )
    ids_BN, stats = complete(model, coarse_BN, cond_B, generator, stats, fine_temperature, fine_top_k)
    stats["seconds"] = time.perf_counter() - t0
    return ids_BN, stats


@SAMPLERS.register("ctf", CTFSamplerConfig)
class CTFSampler(Sampler):
    """Stage 1 next-token, then one stage-2 pass (:func:`sample_ctf`)."""

    def __call__(self, model, cond_B, generator, progress=False, slots=0):
        return sample_ctf(model, cond_B, generator=generator, progress=progress, **self.options())
