"""Sampling an :class:`~vargen.models.xar.XAR` model, entity by entity.

``denoiser: backbone`` (xAR): entity e starts from eps ~ N(0, I) of shape (B, n_e, D) and a flow
solver (:mod:`vargen.heads.flow`: ``solver: sde``, the reference's Euler-Maruyama, or ``ode``)
integrates the backbone's velocity; every solver step is one backbone forward over e's positions
against the KV cache of the clean earlier entities (:meth:`XAR.denoise_step`). The finished,
clean entity rides along in the next entity's first step and is committed to the cache there.
``use_cache=False`` recomputes the whole prefix at every step instead (the reference the cached
loop must equal). Noise order: per entity, its start noise, then the solver's step noises.

``denoiser: head`` (MAR's design): one KV-cached backbone forward per entity gives conditions z
(B, n_e, C); the head draws the entity's n_e tokens at once, each token alone (flow head: its
own solver and steps; MAR head: respaced DDPM).

Both: classifier-free guidance on the velocity (or the head's prediction) at the xAR ramp
g_e = 1 + (cfg_scale - 1) e / (E - 1) (the first entity unguided, ``cfg_scale`` at the last);
the conditional and unconditional rows run as one batch of 2B rows (rows B..2B-1 carry the null
class) and share the noise. ``temperature`` multiplies every Gaussian draw (start and injected
noise), one meaning for every solver and head (:mod:`vargen.heads.flow`). Returns raster tokens
(B, N, C) for the tokenizer's decoder.

Stats: ``target_forwards`` counts backbone forwards (backbone: E x steps; head: E),
``ar_steps`` the entities E, ``solver_steps`` the solver steps summed over entities and
``head_evals`` the head network evaluations per row (head design; steps per entity, doubled under
guidance).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from vargen.heads.flow import DEFAULT_STEPS, integrate
from vargen.models.xar import cfg_ramp
from vargen.registry import SAMPLERS
from vargen.sampling.base import Sampler
from vargen.sampling.stats import new_stats


@dataclass
class XARSamplerConfig:
    name: str = "xar"
    cfg_scale: float = 1.0
    temperature: float = 1.0  # multiplies every Gaussian draw: start and injected noise
    num_steps: int = 0  # solver (or head) steps per entity; 0 = DEFAULT_STEPS[solver] / the head's own
    solver: str = "sde"  # backbone design: sde (Euler-Maruyama, xAR's) | ode (Euler)


@torch.no_grad()
def sample_xar(
    model,
    cond_B,
    *,
    generator,
    cfg_scale=1.0,
    temperature=1.0,
    num_steps=0,
    solver="sde",
    use_cache=True,
    progress=False,
):
    t0 = time.perf_counter()
    cond_B = cond_B.to(model.device)
    if model.backbone_flow:
        steps = int(num_steps or DEFAULT_STEPS[solver])
        tokens_BND, stats = _sample_backbone(
            model, cond_B, generator, cfg_scale, temperature, steps, solver, use_cache, progress
        )
    else:
        tokens_BND, stats = _sample_head(
            model, cond_B, generator, cfg_scale, temperature, num_steps, progress
        )
    B = cond_B.shape[0]
    stats["ar_steps"] = model.num_entities
    stats["tokens"] = stats["accepted"] = stats["proposed"] = B * model.length
    stats["seconds"] = time.perf_counter() - t0
    return tokens_BND, stats


def _sample_backbone(model, cond_B, generator, cfg_scale, temperature, steps, solver, use_cache, progress):
    B, E, D = cond_B.shape[0], model.num_entities, model.cfg.code_dim
    guided = cfg_scale != 1.0
    cond_in = model.guidance_labels(cond_B, guided)  # (2B,) guided: labels, then the null class
    double = (lambda x: torch.cat([x, x])) if guided else (lambda x: x)  # noqa: E731
    cache = model.new_cache(cond_in.shape[0]) if use_cache else None
    stats = new_stats()
    stats["solver_steps"] = 0
    kw = {"generator": generator, "device": cond_B.device, "dtype": model.dtype}
    entities = []  # clean generated entities, (B, n_e, D) each
    for e in tqdm(range(E), desc="entities", disable=not progress, leave=False):
        n = model.sizes[e]
        w = cfg_ramp(e, E, cfg_scale) if guided else 1.0
        prev = [double(entities[-1])] if (use_cache and entities) else [None]  # consumed by step 1
        prefix = double(torch.cat(entities, dim=1)) if (entities and not use_cache) else None

        def velocity(x_BnD, t, e=e, n=n, w=w, prev=prev, prefix=prefix):
            x = double(x_BnD)  # (rows, n, D)
            m = 0 if prev[0] is None else prev[0].shape[1]  # the clean entity riding along
            if use_cache:
                v = model.denoise_step(e, x, t, cond_in, cache, prev[0])
                prev[0] = None
            else:
                seq = x if prefix is None else torch.cat([prefix, x], dim=1)
                t_BT = torch.zeros(seq.shape[:2], device=x.device, dtype=x.dtype)
                t_BT[:, -n:] = t
                v = model.prefix_velocity(seq, t_BT, cond_in)[:, -n:]
            stats["target_forwards"] += 1
            stats["positions_computed"] += v.shape[0] * (n + m)
            if not guided:
                return v
            v_c, v_u = v.chunk(2)
            return v_u + w * (v_c - v_u)

        eps = torch.randn((B, n, D), **kw)
        entities.append(integrate(velocity, eps, steps, solver, generator, temperature))
        stats["solver_steps"] += steps
    return model.entities.unclusterify(torch.cat(entities, dim=1)), stats  # (B, N, D) raster


def _sample_head(model, cond_B, generator, cfg_scale, temperature, num_steps, progress):
    B, E = cond_B.shape[0], model.num_entities
    guided = cfg_scale != 1.0
    cond_in = model.guidance_labels(cond_B, guided)  # (2B,) guided: labels, then the null class
    cache = model.new_cache(cond_in.shape[0])
    steps = int(num_steps or model.head.num_sampling_steps)
    stats = new_stats()
    stats["head_evals"] = stats["solver_steps"] = 0
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
        stats["solver_steps"] += steps
    return model.entities.unclusterify(torch.cat(entities, dim=1)), stats  # (B, N, D) raster


@SAMPLERS.register("xar", XARSamplerConfig)
class XARSampler(Sampler):
    """Entity-by-entity decoding with the model's head (:func:`sample_xar`)."""

    def __call__(self, model, cond_B, generator, progress=False, slots=0):
        return sample_xar(model, cond_B, generator=generator, progress=progress, **self.options())
