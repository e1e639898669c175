"""Next-token decoding of an :class:`ARTransformer`, KV-cached or by full recompute.

One step = one model forward on a batch of 2B rows when classifier-free guidance is on
(conditional rows, then the same rows with the null class), followed by the fused
logits warper (CFG mix on logits, temperature, top-k, top-p, Gumbel-max sampling from
uniform noise drawn from the caller's generator). The uniform noise is (B, V) per step in
token order (on a CPU generator drawn a chunk of steps at a time: the same numbers, see
:class:`_StepNoise`), so cached and uncached decoding draw identical tokens from the same
generator: caching changes only the cost. On the warper's torch reference (CPU) the loop runs
the reference's own ops with the Gumbel transform of the noise done per chunk, and skips the
CFG mix / top-k / top-p pass when they are off: the same ids, fewer ops per step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from vargen.registry import SAMPLERS
from vargen.sampling.base import Sampler, inference
from vargen.sampling.stats import new_stats
from vargen_kernels.dispatch import backend_for
from vargen_kernels.logits_warper import U_EPS, warp_and_sample, warp_logits


@dataclass
class ARSamplerConfig:
    name: str = "ar"
    cfg_scale: float = 1.0  # 1 = no guidance (one forward of B rows per step)
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    use_cache: bool = True  # False recomputes the whole prefix every step (the baseline)
    compile: bool = False  # torch.compile the cached step (ARTransformer.compile_decode); slow to start
    cuda_graph: bool = False  # replay one static step as a CUDA graph (ar_graph.py); CUDA models only


@inference
def sample_ar(
    model,
    cond_B: torch.Tensor,
    *,
    generator: torch.Generator,
    cfg_scale: float = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    use_cache: bool = True,
    compile: bool = False,
    cuda_graph: bool = False,
    progress: bool = False,
):
    """Draw ids (B, N) for class labels ``cond_B``; returns (ids_BN, stats).

    ``compile`` turns on :meth:`ARTransformer.compile_decode` for the model (it stays on, and
    compiles once, on the first call) before decoding; it changes the cost, not the tokens,
    up to float rounding.

    ``cuda_graph`` decodes with a static-shape step (a full-length cache written at a device-held
    position, attention masked past it) captured once as a CUDA graph and replayed for every
    further token (:mod:`vargen.sampling.decoders.ar_graph`): fewer launches per token, the same
    noise in the same order, so the same tokens up to float rounding. It needs a CUDA model
    (ValueError otherwise: there is no silent fallback), ``use_cache`` and not ``compile``.
    """
    warp = dict(cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p)
    if cuda_graph:  # sample_ar_static refuses a model off CUDA
        if not use_cache or compile:
            raise ValueError(
                "cuda_graph=True replaces the cached eager step: it needs use_cache=True and compile=False"
            )
        from vargen.sampling.decoders.ar_graph import sample_ar_static  # it imports this module

        return sample_ar_static(model, cond_B, generator=generator, capture=True, progress=progress, **warp)
    t0 = time.perf_counter()
    B, N, V = cond_B.shape[0], model.num_tokens, model.vocab_size
    device = model.device
    cond_B = cond_B.to(device)
    guided = cfg_scale != 1.0
    cond_in = model.guidance_labels(cond_B, guided)  # (2B,) guided: labels, then the null class
    rows = cond_in.shape[0]
    ids_BN = torch.empty(B, N, dtype=torch.long, device=device)
    stats = new_stats()
    cache = model.new_cache(rows) if use_cache else None
    if compile and use_cache and getattr(model, "_compiled_step", None) is None:
        model.compile_decode()
    noise = _StepNoise(generator, N, B, V, device, torch_warper=backend_for(ids_BN) == "torch")
    if noise.torch_warper:
        warp_logits(torch.zeros(1, V, device=device), **warp)  # the warper's argument checks, once
    plain = not 0 < top_k < V and top_p == 1.0 and not guided  # the warper only divides by T
    reps = rows // B
    for i in tqdm(range(N), desc="decode", disable=not progress, leave=False):
        if use_cache:
            prev = None if i == 0 else ids_BN[:, i - 1 : i]  # (B, 1)
            if reps > 1 and prev is not None:
                prev = prev.repeat(reps, 1)  # (rows, 1)
            logits = model.forward_step(prev, cond_in, cache)[:, -1]  # (rows, V)
            stats["positions_computed"] += rows
        else:
            prefix = ids_BN[:, :i].repeat(rows // B, 1)  # (rows, i)
            logits = model.logits(prefix, cond_in)[:, -1]  # (rows, V)
            stats["positions_computed"] += rows * (i + 1)
        stats["target_forwards"] += 1
        if noise.torch_warper:  # warp_and_sample_reference's ops, the noise transformed per chunk
            if plain:
                l_BV = logits[:B].float() if temperature == 1.0 else logits[:B].float() / temperature
            else:
                l_BV = warp_logits(logits[:B], logits[B:] if guided else None, **warp)  # (B, V)
            ids_BN[:, i] = torch.sub(l_BV, noise(i)).argmax(dim=-1)
        else:
            ids_BN[:, i] = warp_and_sample(
                logits[:B], logits[B:] if guided else None, uniform_BV=noise(i), **warp
            )
    stats["tokens"] = stats["accepted"] = stats["proposed"] = B * N
    stats["seconds"] = time.perf_counter() - t0
    return ids_BN, stats


def complete(model, ids_BN, cond_B, generator, stats, temperature=1.0, top_k=0):
    """The model's output from the sequence drawn from its ``next_token_model``: the ids
    themselves, or, when the model has completion logits (CTF's stage 2: fine ids given the
    coarse sequence), one draw per position from them (temperature, top-k), which counts one
    target forward. The speculative samplers end with this, so they draw from every token-AR
    model of the contract (:mod:`vargen.models.generator`)."""
    logits_BNV = model.completion_logits(ids_BN, cond_B.to(ids_BN.device))
    if logits_BNV is None:
        return ids_BN, stats
    B, N, V = logits_BNV.shape
    u = torch.rand(B * N, V, generator=generator, device=generator.device).to(logits_BNV.device)
    out_BN = warp_and_sample(
        logits_BNV.reshape(B * N, V), None, temperature=temperature, top_k=top_k, uniform_BV=u
    ).reshape(B, N)
    stats["target_forwards"] += 1
    stats["positions_computed"] += B * N
    return out_BN, stats


class _StepNoise:
    """The uniform noise (B, V) of each decoding step, drawn from ``generator`` in step order.

    A CPU generator draws ``torch.rand(n, B, V)`` as the same numbers, in the same order and to
    the same final state, as n draws of (B, V) (it fills tensors serially), so the noise of up
    to ``CHUNK`` values is drawn in one call: one draw and one transfer per chunk instead of
    per step. Other generators (CUDA's Philox advances its offset per call) draw per step.
    With ``torch_warper`` (the warper runs its torch reference) the chunk is turned into
    ``log(-log(clamp(u)))``, the negated Gumbel noise of :func:`warp_and_sample_reference`, at
    once: the same elementwise ops on the same values as per step, so the same ids.
    """

    CHUNK = 1 << 20  # uniforms per draw (4 MiB of fp32)

    def __init__(self, generator, steps, B, V, device, torch_warper: bool):
        self.generator, self.steps, self.device = generator, steps, device
        self.shape = (B, V)
        self.per_draw = max(1, self.CHUNK // max(1, B * V)) if generator.device.type == "cpu" else 1
        self.torch_warper = torch_warper
        self.first, self.chunk_nBV = 0, None

    def __call__(self, step: int) -> torch.Tensor:
        """The noise (B, V) of ``step`` (asked for in step order): uniform in [0, 1), or with
        ``torch_warper`` its ``log(-log(clamp(u)))`` (the sample is ``argmax(warped - this)``)."""
        if self.chunk_nBV is None or step >= self.first + self.chunk_nBV.shape[0]:
            n = min(self.per_draw, self.steps - step)
            g = self.generator
            self.first = step
            self.chunk_nBV = torch.rand(n, *self.shape, generator=g, device=g.device).to(self.device)
            if self.torch_warper:
                self.chunk_nBV = self.chunk_nBV.float().clamp_(U_EPS, 1.0 - U_EPS).log_().neg_().log_()
        return self.chunk_nBV[step - self.first]


@SAMPLERS.register("ar", ARSamplerConfig)
class ARSampler(Sampler):
    """Next-token decoding (:func:`sample_ar`)."""

    def __call__(self, model, cond_B, generator, progress=False, slots=0):
        return sample_ar(model, cond_B, generator=generator, progress=progress, **self.options())
