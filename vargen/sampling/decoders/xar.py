"""Sampling an :class:`~vargen.models.xar.XAR` model: one KV-cached backbone forward per entity.

Entity e: the backbone gives conditions z (B, n_e, C) from the class and the entities so far;
the head draws the entity's n_e tokens at once (flow head: Euler ODE / SDE; MAR head: respaced
DDPM), with classifier-free guidance on the head's prediction at the xAR ramp
g_e = 1 + (cfg_scale - 1) e / (E - 1) (the first entity unguided, ``cfg_scale`` at the last).
The conditional and unconditional rows run as one batch of 2B rows (rows B..2B-1 carry the
null class), and both halves share the head's noise. The generated entity, clean (t = 0), is
the next entity's context. Returns raster tokens (B, N, C) for the tokenizer's decoder.

Stats: ``target_forwards`` counts backbone forwards (E), ``head_evals`` counts head network
evaluations per row (steps per entity, doubled under guidance).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from vargen.models.xar import cfg_ramp
from vargen.registry import SAMPLERS
from vargen.sampling.base import Sampler
from vargen.sampling.stats import new_stats


@dataclass
class XARSamplerConfig:
    name: str = "xar"
    cfg_scale: float = 1.0
    temperature: float = 1.0  # scales the head's initial (and injected) noise
    num_steps: int = 0  # head sampling steps; 0 = the head's num_sampling_steps


@torch.no_grad()
def sample_xar(model, cond_B, *, generator, cfg_scale=1.0, temperature=1.0, num_steps=0, progress=False):
    t0 = time.perf_counter()
    device = model.device
    cond_B = cond_B.to(device)
    B, E = cond_B.shape[0], model.num_entities
    guided = cfg_scale != 1.0
    cond_in = model.guidance_labels(cond_B, guided)  # (2B,) guided: labels, then the null class
    cache = model.new_cache(cond_in.shape[0])
    steps = int(num_steps or model.head.num_sampling_steps)
    stats = new_stats()
    stats["head_evals"] = 0
    entities, prev = [], None
    for e in tqdm(range(E), desc="entities", disable=not progress, leave=False):
        ctx = None if prev is None else (torch.cat([prev, prev]) if guided else prev)
        z = model.forward_entity(e, ctx, cond_in, cache)  # (rows, n_e, C)
        n = z.shape[1]
        z_c = z[:B].flatten(0, 1)  # (B n_e, C)
        z_u = z[B:].flatten(0, 1) if guided else None
        w = cfg_ramp(e, E, cfg_scale) if guided else 1.0
        x = model.head.sample(z_c, generator, steps, temperature, w, z_u)  # (B n_e, D)
        prev = x.view(B, n, -1)  # (B, n_e, D)
        entities.append(prev)
        stats["target_forwards"] += 1
        stats["positions_computed"] += z.shape[0] * n
        stats["head_evals"] += steps * (2 if guided and w != 1.0 else 1)
    tokens_BND = model.entities.unclusterify(torch.cat(entities, dim=1))  # (B, N, D) raster
    stats["tokens"] = stats["accepted"] = stats["proposed"] = B * model.length
    stats["seconds"] = time.perf_counter() - t0
    return tokens_BND, stats


@SAMPLERS.register("xar", XARSamplerConfig)
class XARSampler(Sampler):
    """Entity-by-entity decoding with the model's head (:func:`sample_xar`)."""

    def __call__(self, model, cond_B, generator, progress=False, slots=0):
        return sample_xar(model, cond_B, generator=generator, progress=progress, **self.options())
