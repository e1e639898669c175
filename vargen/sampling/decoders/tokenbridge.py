"""TokenBridge sampler: next-token backbone features, feature-space CFG, dimension-wise head.

Per token position: one cached backbone forward (a CFG pair batched as one call), guidance on
the features g = z_u + w (z_c - z_u) (TokenBridge applies CFG to backbone features, not to
logits; arXiv 2503.16430), then the head draws the token's C channels one by one at
temperature tau. The reference's linearly growing CFG weight belongs to MAR's unmasking
schedule; for a fixed raster order we use a constant w. Randomness: one ``generator`` stream,
consumed position by position, channel by channel.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from vargen.heads.dimwise import guide_features
from vargen.registry import SAMPLERS
from vargen.sampling.base import Sampler
from vargen.sampling.stats import new_stats


@dataclass
class TokenBridgeSamplerConfig:
    name: str = "tokenbridge"
    cfg_scale: float = 1.0
    temperature: float = 1.0


@torch.no_grad()
def sample_tokenbridge(
    model, cond_B, *, generator, cfg_scale: float = 1.0, temperature: float = 1.0, progress: bool = False
):
    """Draw per-dimension ids (B, N, C) for class labels ``cond_B``; returns (ids_BNC, stats)."""
    t0 = time.perf_counter()
    B, N, C = cond_B.shape[0], model.num_tokens, model.cfg.code_dim
    device = model.device
    cond_B = cond_B.to(device)
    guided = cfg_scale != 1.0
    cond_in = model.guidance_labels(cond_B, guided)  # (2B,) guided: labels, then the null class
    rows = cond_in.shape[0]
    cache = model.new_cache(rows)
    ids_BNC = torch.empty(B, N, C, dtype=torch.long, device=device)
    stats = new_stats()
    stats["head_steps"] = 0
    for i in range(N):
        prev = None if i == 0 else ids_BNC[:, i - 1 : i].repeat(rows // B, 1, 1)  # (rows, 1, C)
        z = model.forward_step(prev, cond_in, cache)[:, -1]  # (rows, D)
        stats["target_forwards"] += 1
        stats["positions_computed"] += rows
        if guided:
            z = guide_features(z[:B], z[B:], cfg_scale)  # (B, D)
        ids_BNC[:, i] = model.head.sample(z, generator=generator, temperature=temperature)
        stats["head_steps"] += C
    stats["tokens"] = stats["accepted"] = stats["proposed"] = B * N
    stats["seconds"] = time.perf_counter() - t0
    return ids_BNC, stats


@SAMPLERS.register("tokenbridge", TokenBridgeSamplerConfig)
class TokenBridgeSampler(Sampler):
    """Next-token decoding with the dimension-wise head (:func:`sample_tokenbridge`)."""

    def __call__(self, model, cond_B, generator, progress=False, slots=0):
        return sample_tokenbridge(model, cond_B, generator=generator, progress=progress, **self.options())
