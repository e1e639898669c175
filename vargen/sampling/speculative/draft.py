"""Exact speculative sampling with a draft model (Leviathan et al. 2023; Chen et al. 2023).

As arXiv:2211.17192 Algorithm 1 and arXiv:2302.01318 Algorithm 2: per iteration the draft model samples gamma
tokens ``x`` from its warped conditionals ``q``; one target call gives the warped target
conditionals ``p`` at the gamma draft positions plus the bonus position; draft i is accepted
with probability min(1, p(x_i)/q(x_i)) and the first rejection is replaced by a sample of
norm(max(0, p - q)), so every row emits n_b + 1 tokens and the output is distributed exactly as
the target's (arXiv:2211.17192 appendix A.1; arXiv:2302.01318 Theorem 1).

The shared machinery (ragged windows, continuous batching, the verification kernels, the
stats) is :mod:`vargen.sampling.speculative.verify`'s. The model only needs the token-AR
contract (:mod:`vargen.models.generator`): SD draws the ``next_token_model`` of the target
with the one of the draft and ends with :func:`~vargen.sampling.decoders.ar.complete`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from vargen.registry import SAMPLERS
from vargen.sampling.base import Sampler, inference
from vargen.sampling.decoders.ar import complete
from vargen.sampling.speculative.cost_plan import CostPlanOptions, check_cost_options, plain_decoding, planned
from vargen.sampling.speculative.verify import (
    CountLog,
    RowQueue,
    WindowScorer,
    accept_and_correct,
    sample_probs,
    warp_kwargs,
)
from vargen.sampling.stats import finish_speculative, new_stats


@dataclass
class SpeculativeConfig(CostPlanOptions):
    name: str = "speculative"
    draft_ckpt: str = ""  # run dir of a smaller llamagen trained on the same tokenizer
    gamma: int = 4  # draft tokens per target call
    use_cache: bool = True  # False: both models recompute the whole prefix every call (baseline)
    cfg_scale: float = 1.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    backend: str = "auto"  # verification kernel: auto | triton | interpret | torch (vargen_kernels.dispatch)
    compile: bool = False  # torch.compile both models' cached windows (ARTransformer.compile_decode)
    # fixed: speculate at `gamma`; cost: the measured fastest of plain decoding and SD at each of
    # cost_gammas, at the batch that runs (cost_plan.py; named in stats["plan_widths"])
    cost_gammas: list[int] = field(default_factory=lambda: [1, 2, 3, 4])


@inference
def sample_speculative(
    target,
    draft,
    cond_B,
    *,
    generator,
    gamma=4,
    use_cache=True,
    slots=0,
    backend="auto",
    compile=False,
    **warp,
):
    """Draw ids (N, T) for the N classes ``cond_B`` from ``target`` with ``draft`` proposals,
    ``slots`` rows at a time (continuous batching; 0 = all at once); returns (ids_NT, stats).
    ``backend``: how the verification (:func:`accept_and_correct`) and the cached windows'
    attention run; all draw the same ids (to float rounding of the attention). ``compile``:
    ``torch.compile`` both models' cached windows (widths gamma + 1, 2 and 1 compile once each)."""
    t0 = time.perf_counter()
    cond_N = cond_B  # every pending sample (the keyword keeps its historical name)
    if gamma < 1:
        raise ValueError(f"sampler.gamma must be >= 1, got {gamma}")
    warp = {"cfg_scale": 1.0, "temperature": 1.0, "top_k": 0, "top_p": 1.0, **warp}
    T = target.num_tokens
    rows = RowQueue(cond_N, slots, T, gamma + 1)
    stats = {**new_stats(), "syncs": 0}
    draft_stats = new_stats()
    counts = CountLog(gamma, cond_N.device)
    p_model = WindowScorer(target, rows.cond_B, warp, stats, use_cache, gamma + 1, backend, compile)
    q_model = WindowScorer(draft, rows.cond_B, warp, draft_stats, use_cache, gamma + 1, backend, compile)
    for _ in rows.iterations(gamma + 1, stats, (p_model, q_model)):
        active_B = rows.active()
        len_B, ids_BX = rows.len_B, rows.ids_BX
        qs, xs = [], []
        for j in range(gamma):  # autoregressive drafting: a loop over draft steps, not rows
            q_BV = q_model.draft_step(ids_BX, len_B, j)
            x_B = sample_probs(q_BV, generator)
            ids_BX.scatter_(1, (len_B + j)[:, None], x_B[:, None])  # padded: never out of bounds
            qs.append(q_BV)
            xs.append(x_B)
        q_BgV, x_Bg = torch.stack(qs, 1), torch.stack(xs, 1)
        p_BWV = p_model.window(ids_BX, len_B, gamma + 1)
        stats["draft_forwards"] += gamma
        stats["target_forwards"] += 1
        # ratio None: the token ratio p(x)/q(x), computed inside the verification; y only at n
        n_B, z_B, _, cap_B = accept_and_correct(
            p_BWV, q_BgV, x_Bg, None, T - len_B, generator, backend=backend, all_y=False
        )
        ids_BX.scatter_(1, (len_B + n_B)[:, None], z_B[:, None])
        counts.add(n_B, cap_B, active_B)
        rows.len_B = len_B + (n_B + 1) * active_B
        if rows.R < rows.N:  # refills happen: new classes, caches of new rows back to 0
            rows.refill()  # SD keeps no draft state across iterations: nothing else to restart
            p_model.set_cond(rows.cond_B)
            q_model.set_cond(rows.cond_B)
        p_model.commit(rows.len_B)
        q_model.commit(rows.len_B)
    stats["draft_positions_computed"] = draft_stats["positions_computed"]
    return rows.ids(), finish_speculative(stats, rows.N, rows.N * T, t0, counts.total())


@SAMPLERS.register("speculative", SpeculativeConfig)
class SpeculativeSampler(Sampler):
    """SD with the draft ``draft_ckpt`` (loaded in :meth:`setup`); continuous: :func:`generate`
    passes every label at once with ``slots``."""

    continuous = True

    def __init__(self, cfg):
        super().__init__(cfg)
        if not cfg.draft_ckpt:
            raise ValueError("sampler.draft_ckpt must name a trained draft llamagen run for 'speculative'")
        if cfg.gamma < 1:
            raise ValueError(f"sampler.gamma must be >= 1, got {cfg.gamma}")
        check_cost_options(cfg, "cost_gammas", least=1)
        self.draft = None

    def setup(self, ctx):
        draft, _ = ctx.load(self.cfg.draft_ckpt)
        ar, target = draft.next_token_model, ctx.model.next_token_model
        if ar.vocab_size != target.vocab_size or ar.num_tokens != target.num_tokens:
            raise ValueError("sampler.draft_ckpt: draft and target must share the tokenizer")
        self.draft = draft.eval()

    def __call__(self, model, cond_N, generator, progress=False, slots=0):
        if self.draft is None:
            raise RuntimeError("the speculative sampler loads its draft in setup(ctx): call it first")
        target, draft = model.next_token_model, self.draft.next_token_model
        cond_N = cond_N.to(target.device)
        c = self.cfg
        warp = warp_kwargs(c)

        def run(gamma, cond, g, rows):
            if gamma == 0:
                return plain_decoding(target, cond, g, rows, c, warp)
            return sample_speculative(
                target,
                draft,
                cond,
                generator=g,
                gamma=gamma,
                use_cache=c.use_cache,
                slots=rows,
                backend=c.backend,
                compile=c.compile,
                **warp,
            )

        ids_NT, stats = planned(target, c, c.gamma, c.cost_gammas, cond_N, generator, slots, run, id(draft))
        return complete(model, ids_NT, cond_N, generator, stats)
