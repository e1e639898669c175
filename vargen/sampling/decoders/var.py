"""Next-scale decoding of a :class:`NextScaleTransformer`: one forward per scale, KV-cached.

Scale k (0-based, K scales): one cached forward of that scale's n_k inputs gives logits
(B, n_k, V); every id of the scale is drawn at once (the n_k ids of a scale are
conditionally independent given the earlier scales, VAR's factorisation); the ids are
embedded, upsampled and added to ``f_hat`` by the tokenizer's quantizer, whose
area-downsampled ``f_hat`` is the next scale's input.

Classifier-free guidance grows with the scale (VAR eq. in ``autoregressive_infer_cfg``):
at scale k the warper mixes ``uncond + g_k (cond - uncond)`` with
``g_k = 1 + (cfg_scale - 1) * k / (K - 1)``: no guidance at the coarsest scale and
``cfg_scale`` at the finest. ``cfg_scale`` therefore means what it means for the
next-token sampler (1 = off); VAR's ``cfg=w`` (logits ``(1 + t) cond - t uncond`` with
``t = w k / (K - 1)``) is ``cfg_scale = 1 + w`` here. The conditional and unconditional
rows run as one batch of 2B rows (rows B..2B-1 carry the null class).

The sampler state (:class:`VARState`: ids so far, ``f_hat``, next input, KV cache,
labels) gathers by batch index with :meth:`VARState.gather`, which test-time search
(TTS-VAR) uses to keep, drop or duplicate candidates. Noise comes from one generator for
the batch, or from one generator per row (a list): then row j's ids depend only on its
own generator, so a candidate continues the same way whatever batch it sits in.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from vargen.nn import KVCache
from vargen.registry import SAMPLERS
from vargen.sampling.base import Sampler
from vargen.sampling.stats import new_stats
from vargen_kernels.logits_warper import warp_and_sample


@dataclass
class VARSamplerConfig:
    name: str = "var"
    cfg_scale: float = 1.0  # guidance at the finest scale (1 = off); ramps up from 1 at scale 0
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off


@dataclass
class VARState:
    """Everything needed to continue sampling a batch of B images after ``k`` scales."""

    cond_B: torch.Tensor  # (B,) class labels
    guided: bool  # whether the cache holds 2B rows (cond, then null class)
    cache: KVCache
    k: int = 0  # scales done
    ids: list = field(default_factory=list)  # ids of scales 0..k-1, (B, n_i) each
    f_hat: torch.Tensor | None = None  # (B, D, S, S) running sum of scale contributions
    next_tokens: torch.Tensor | None = None  # (B, n_k, D) input of scale k (None at k = 0)

    @property
    def batch(self) -> int:
        return self.cond_B.shape[0]

    def gather(self, index_M: torch.Tensor) -> VARState:
        """A new state of M rows: row m is a copy of row ``index_M[m]`` (repeats allowed)."""
        B = self.batch
        index_M = index_M.to(self.cond_B.device)
        rows = torch.cat([index_M, index_M + B]) if self.guided else index_M  # cache rows
        return VARState(
            cond_B=self.cond_B[index_M],
            guided=self.guided,
            cache=self.cache.select_rows(rows),
            k=self.k,
            ids=[i[index_M] for i in self.ids],
            f_hat=None if self.f_hat is None else self.f_hat[index_M],
            next_tokens=None if self.next_tokens is None else self.next_tokens[index_M],
        )


def guidance_at(k: int, num_scales: int, cfg_scale: float) -> float:
    """g_k = 1 + (cfg_scale - 1) * k / (K - 1): 1 at the first scale, cfg_scale at the last."""
    if num_scales == 1:
        return cfg_scale
    return 1.0 + (cfg_scale - 1.0) * k / (num_scales - 1)


def start_state(model, cond_B: torch.Tensor, cfg_scale: float = 1.0) -> VARState:
    """An empty state for labels ``cond_B``: nothing decoded, an empty cache."""
    device = model.device
    cond_B = cond_B.to(device)
    guided = cfg_scale != 1.0
    rows = 2 * cond_B.shape[0] if guided else cond_B.shape[0]
    return VARState(cond_B=cond_B, guided=guided, cache=model.new_cache(rows))


def _uniform(generator, B: int, n: int, V: int, device) -> torch.Tensor:
    """Noise (B * n, V): from one generator, or row by row from a list of B generators."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != B:
            raise ValueError(f"got {len(generator)} generators for a batch of {B}")
        u = torch.stack([torch.rand(n, V, generator=g, device=g.device) for g in generator])  # (B, n, V)
        return u.flatten(0, 1).to(device)
    return torch.rand(B * n, V, generator=generator, device=generator.device).to(device)


@torch.no_grad()
def decode_scale(
    model,
    state: VARState,
    generator,
    *,
    cfg_scale: float = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> torch.Tensor:
    """Decode scale ``state.k`` in place (ids, f_hat, next input, cache); returns its ids (B, n_k)."""
    k, K, B = state.k, len(model.scales), state.batch
    if k >= K:
        raise ValueError(f"all {K} scales are already decoded")
    tokens = state.next_tokens
    cond_in = model.guidance_labels(state.cond_B, state.guided)  # (2B,) guided: then the null class
    if state.guided:
        tokens = None if tokens is None else tokens.repeat(2, 1, 1)  # (2B, n_k, D)
    logits = model.forward_scale(k, tokens, cond_in, state.cache)  # (rows, n_k, V)
    n, V = logits.shape[1], logits.shape[2]
    u = _uniform(generator, B, n, V, logits.device)  # (B * n_k, V)
    ids = warp_and_sample(
        logits[:B].flatten(0, 1),
        logits[B:].flatten(0, 1) if state.guided else None,
        cfg_scale=guidance_at(k, K, cfg_scale),
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        uniform_BV=u,
    ).view(B, n)  # (B, n_k)
    state.f_hat, state.next_tokens = model.quantizer.next_input(state.f_hat, ids, k)
    state.ids.append(ids)
    state.k += 1
    return ids


@torch.no_grad()
def sample_var(
    model,
    cond_B: torch.Tensor,
    *,
    generator,
    cfg_scale: float = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    progress: bool = False,
):
    """Draw multi-scale ids for labels ``cond_B``; returns (list of (B, n_k) ids, stats)."""
    t0 = time.perf_counter()
    state = start_state(model, cond_B, cfg_scale)
    stats = {**new_stats(), "candidate_forwards": 0, "token_forwards": 0}
    warp = dict(cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p)
    for _ in tqdm(range(len(model.scales)), desc="scales", disable=not progress, leave=False):
        decode_scale(model, state, generator, **warp)
        stats["target_forwards"] += 1
        stats["positions_computed"] += state.cache.k[0].shape[0] * state.ids[-1].shape[1]
        stats["candidate_forwards"] += state.batch  # images pushed through this scale
        stats["token_forwards"] += state.batch * state.ids[-1].shape[1]
    B = state.batch
    stats["tokens"] = stats["accepted"] = stats["proposed"] = B * model.num_tokens
    stats["seconds"] = time.perf_counter() - t0
    return state.ids, stats


@SAMPLERS.register("var", VARSamplerConfig)
class VARSampler(Sampler):
    """Next-scale decoding (:func:`sample_var`)."""

    def __call__(self, model, cond_B, generator, progress=False, slots=0):
        return sample_var(model, cond_B, generator=generator, progress=progress, **self.options())
