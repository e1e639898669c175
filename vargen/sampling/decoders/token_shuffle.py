"""Window-by-window decoding of a Token-Shuffle model (arXiv 2504.17789).

Each step is one KV-cached forward that yields the logits of the next window's s^2 ids; they are drawn
independently given the prefix with the fused logits warper, then embedded and merged as the next
input. Classifier-free guidance follows the "half-linear" schedule (the exact formula is unpublished;
we use w_i = 1 + (w - 1) * min(1, 2 i / N) with i the index of the window's first visual
token and N the number of visual tokens), so the first tokens are sampled almost unguided.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from vargen.registry import SAMPLERS
from vargen.sampling.base import Sampler
from vargen.sampling.stats import new_stats
from vargen_kernels.logits_warper import warp_and_sample


@dataclass
class TokenShuffleSamplerConfig:
    name: str = "token_shuffle"
    cfg_scale: float = 1.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


def half_linear_cfg(i: int, n: int, w: float) -> float:
    """Guidance scale for visual token i of n: ramps 1 -> w over the first half, then stays w."""
    return 1.0 + (w - 1.0) * min(1.0, 2.0 * i / n)


@torch.no_grad()
def sample_token_shuffle(
    model, cond_B, *, generator, cfg_scale=1.0, temperature=1.0, top_k=0, top_p=1.0, progress=False
):
    """Draw raster ids (B, h*w); returns (ids_BN, stats). One forward per window."""
    t0 = time.perf_counter()
    B, M, K, V = cond_B.shape[0], model.num_tokens, model.s * model.s, model.vocab_size
    device = model.device
    cond_B = cond_B.to(device)
    guided = cfg_scale != 1.0
    cond_in = model.guidance_labels(cond_B, guided)  # (2B,) guided: labels, then the null class
    rows = cond_in.shape[0]
    win_BMK = torch.empty(B, M, K, dtype=torch.long, device=device)
    cache = model.new_cache(rows)
    stats = new_stats()
    for m in range(M):
        prev = None if m == 0 else win_BMK[:, m - 1 : m].repeat(rows // B, 1, 1)  # (rows, 1, K)
        logits = model.forward_step(prev, cond_in, cache)[:, -1]  # (rows, K, V)
        stats["target_forwards"] += 1
        stats["positions_computed"] += rows
        u = torch.rand(B * K, V, generator=generator, device=generator.device).to(device)
        win_BMK[:, m] = warp_and_sample(
            logits[:B].reshape(B * K, V),
            logits[B:].reshape(B * K, V) if guided else None,
            cfg_scale=half_linear_cfg(m * K, model.num_image_tokens, cfg_scale),
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            uniform_BV=u,
        ).reshape(B, K)
    stats["tokens"] = stats["accepted"] = stats["proposed"] = B * M * K
    stats["seconds"] = time.perf_counter() - t0
    return model.ungroup(win_BMK), stats


@SAMPLERS.register("token_shuffle", TokenShuffleSamplerConfig)
class TokenShuffleSampler(Sampler):
    """Window-by-window decoding (:func:`sample_token_shuffle`)."""

    def __call__(self, model, cond_B, generator, progress=False, slots=0):
        return sample_token_shuffle(model, cond_B, generator=generator, progress=progress, **self.options())
