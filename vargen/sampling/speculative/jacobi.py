"""Speculative Jacobi decoding (SJD, Teng et al. ICLR 2025): a self-speculative sampler, no
draft model.

SJD: arXiv:2410.01699. A window of L-1 draft tokens, each with the
distribution q it was drawn from (one-hot for the random initial tokens), is verified in one
target call; the test and residual are those of :mod:`vargen.sampling.speculative.verify`.
Jacobi update: the next drafts are the target's own samples at the uncommitted window
positions, with q = that position's p, padded with fresh random tokens. GSD
(:mod:`vargen.sampling.speculative.gsd`) runs this loop with its group ratio. The model only
needs the token-AR contract (:mod:`vargen.models.generator`).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vargen.registry import SAMPLERS
from vargen.sampling.base import Sampler, inference
from vargen.sampling.decoders.ar import complete
from vargen.sampling.speculative.cost_plan import CostPlanOptions, check_cost_options, plain_decoding, planned
from vargen.sampling.speculative.verify import (
    CountLog,
    RowQueue,
    WindowScorer,
    token_ratio,
    token_residual,
    verification_draws,
    verify_drawn,
    warp_kwargs,
)
from vargen.sampling.stats import finish_speculative, new_stats
from vargen_kernels.dispatch import backend_for


@inference
def sample_jacobi(
    model,
    cond_B,
    *,
    generator,
    window=16,
    ratio_fn=token_ratio,
    residual_fn=token_residual,
    use_cache=True,
    slots=0,
    backend="auto",
    compile=False,
    cuda_graph=False,
    graph_noise="eager",
    **warp,
):
    """SJD with window L = ``window`` (L-1 drafts + 1); ``ratio_fn(p, q, x)`` is the acceptance
    ratio (token-level for SJD, a GSD group ratio for GSD), ``residual_fn(p, q)`` what a
    rejection resamples from (token-level, or GSD's group-exact one). ``use_cache``: KV-cached
    windows on a ragged cache rolled back to each row's committed length (1b(a).5 "delete the
    rejected KV entries"), else full prefix recompute; both draw the same tokens.
    ``slots``: rows run at a time (continuous batching as in :mod:`vargen.sampling.speculative`;
    0 = every sample at once); a refilled row restarts from random drafts with one-hot q.
    ``backend``: how the verification (:func:`accept_and_correct`) and the cached windows'
    attention run; all draw the same ids (to float rounding of the attention). ``compile``:
    ``torch.compile`` the cached windows (:meth:`ARTransformer.compile_decode`) and, where the
    verification runs the torch reference (the CPU), each iteration's verification and Jacobi
    update (:func:`compiled_jacobi_step`); same ids to float rounding, slow to start.
    ``cuda_graph`` (CUDA models): each iteration replays one captured static-shape iteration
    (:mod:`~vargen.sampling.speculative.jacobi_graph`; the same draws, so the same ids to float
    rounding); it runs chunks of ``slots`` samples without refilling. ``graph_noise="chunk"`` draws
    its random numbers one call per kind and chunk of iterations instead (other ids, the same
    sampler, less host time: :meth:`~vargen.sampling.speculative.jacobi_graph.StaticJacobi.draw`).

    Random draws per iteration, all (slots, ...): :func:`accept_and_correct`'s, then (slots, g)
    random ids that pad the Jacobi update and restart refilled rows; (slots, g) random initial
    drafts before the first iteration. Returns (ids_NT in input order, stats)."""
    t0 = time.perf_counter()
    cond_N = cond_B  # every pending sample (the keyword keeps its historical name)
    if window < 1:
        raise ValueError(f"sampler.window must be >= 1, got {window}")
    if cuda_graph:
        if not use_cache or compile:
            raise ValueError(
                "cuda_graph=True replaces the cached eager windows: it needs use_cache=True and compile=False"
            )
        static_kw = dict(window=window, ratio_fn=ratio_fn, residual_fn=residual_fn, backend=backend)
        return _graph_chunks(model, cond_N, generator, slots, noise=graph_noise, **static_kw, **warp)
    warp = {"cfg_scale": 1.0, "temperature": 1.0, "top_k": 0, "top_p": 1.0, **warp}
    T, V = model.num_tokens, model.vocab_size
    device = cond_N.device
    g = window - 1
    rows = RowQueue(cond_N, slots, T, window)
    B = rows.R
    rand_ids = lambda: torch.randint(V, (B, g), generator=generator, device=generator.device).to(device)  # noqa: E731
    draft_Bg = rand_ids()  # random initial tokens with one-hot q (1b(a) state)
    q_BgV = F.one_hot(draft_Bg, V).float()
    stats = {**new_stats(), "syncs": 0}
    counts = CountLog(0, device)
    scorer = WindowScorer(model, rows.cond_B, warp, stats, use_cache, window, backend, compile)
    ar_g = torch.arange(g, device=device)
    fused = fused_pair(ratio_fn, residual_fn)
    step = jacobi_step
    if compile and backend_for(cond_N, backend=backend) == "torch":  # CUDA: the fused kernels instead
        step, backend = compiled_jacobi_step(), "torch"
    for _ in rows.iterations(window, stats, (scorer,)):
        active_B = rows.active()
        len_B, ids_BX = rows.len_B, rows.ids_BX
        ids_BX.scatter_(1, len_B[:, None] + ar_g, draft_Bg)  # drafts at len .. len+g-1 (padded)
        p_BWV = scorer.window(ids_BX, len_B, window)  # inputs: last committed token + drafts
        stats["target_forwards"] += 1
        draws = verification_draws(p_BWV.shape, generator, device)
        fresh_Bg = rand_ids()
        n_B, cap_B, rows.len_B, draft_Bg, q_BgV = step(
            p_BWV,
            q_BgV,
            draft_Bg,
            len_B,
            active_B,
            ids_BX,
            T,
            draws,
            fresh_Bg,
            ratio_fn,
            residual_fn,
            fused,
            backend,
        )
        counts.add(n_B, cap_B, active_B)
        if rows.R < rows.N:  # a refilled row restarts from random drafts (one-hot q) with its own class
            restart_B1 = rows.refill()[:, None]
            scorer.set_cond(rows.cond_B)
            draft_Bg = torch.where(restart_B1, fresh_Bg, draft_Bg)
            q_BgV = torch.where(restart_B1[..., None], F.one_hot(fresh_Bg, V).to(q_BgV.dtype), q_BgV)
        scorer.commit(rows.len_B)
    return rows.ids(), finish_speculative(stats, rows.N, rows.N * T, t0, counts.total())


def _graph_chunks(model, cond_N, generator, slots, **static_kw):
    """:func:`sample_jacobi` with ``cuda_graph``: chunks of ``slots`` samples (all at once for 0)
    through :func:`~vargen.sampling.speculative.jacobi_graph.sample_jacobi_static`, stats summed."""
    from vargen.sampling.speculative.jacobi_graph import sample_jacobi_static  # imports this module
    from vargen.sampling.stats import add_stats, derived_stats

    step = len(cond_N) if slots <= 0 else int(slots)
    outs, total = [], {}
    for i in range(0, len(cond_N), step):
        ids, stats = sample_jacobi_static(model, cond_N[i : i + step], generator=generator, **static_kw)
        outs.append(ids)
        add_stats(total, stats)
    return torch.cat(outs), derived_stats(total, len(cond_N))


def fused_pair(ratio_fn, residual_fn) -> bool:
    """Whether the verification computes ``ratio_fn`` itself (the matching token pair, or GSD's
    group-exact pair of one group size): :func:`jacobi_step` then passes it no ratio."""
    group = getattr(residual_fn, "group", None)
    return (ratio_fn is token_ratio and residual_fn is token_residual) or (
        group is not None and getattr(ratio_fn, "group", None) == group
    )


def jacobi_step(
    p_BWV,
    q_BgV,
    draft_Bg,
    len_B,
    active_B,
    ids_BX,
    T: int,
    draws,
    fresh_Bg,
    ratio_fn,
    residual_fn,
    fused,
    backend,
):
    """What an SJD / GSD iteration does after its window forward, as one function of tensors
    (so that ``compile=True`` can run it through ``torch.compile``): the verification
    (:func:`verify_drawn` on the caller's uniforms ``draws``), the emitted token written into
    ``ids_BX`` (in place), the committed lengths (``T`` tokens per sample), and the Jacobi
    update (1b(a).5): slot j of the next window is window position n + 1 + j, drawn from that
    position's p; slots past the window take the caller's random ids ``fresh_Bg`` with one-hot q.

    ``fused``: the ratio that goes with ``residual_fn`` is computed inside the verification.
    Returns (n_B, cap_B, len_B, draft_Bg, q_BgV) of the next iteration."""
    B, W, V = p_BWV.shape
    g = W - 1
    # matching token or group-exact pairs: the ratio is computed inside the fused verification
    ratio_Bg = None if fused else ratio_fn(p_BWV[:, :g], q_BgV, draft_Bg)
    n_B, z_B, y_BW, cap_B = verify_drawn(
        p_BWV, q_BgV, draft_Bg, ratio_Bg, T - len_B, draws, residual_fn, backend
    )
    ids_BX.scatter_(1, (len_B + n_B)[:, None], z_B[:, None])
    len_B = len_B + (n_B + 1) * active_B
    ar_g = torch.arange(g, device=p_BWV.device)
    src_Bg = n_B[:, None] + 1 + ar_g
    has_Bg = src_Bg < W
    src_Bg = src_Bg.clamp(max=W - 1)
    draft_Bg = torch.where(has_Bg, y_BW.gather(1, src_Bg), fresh_Bg)
    fresh_Bg1 = ~has_Bg[..., None]  # one-hot q for the random drafts
    q_BgV = p_BWV.gather(1, src_Bg[..., None].expand(B, g, V)).masked_fill_(fresh_Bg1, 0.0)
    q_BgV.scatter_add_(2, fresh_Bg[..., None], fresh_Bg1.to(q_BgV.dtype))
    return n_B, cap_B, len_B, draft_Bg, q_BgV


@functools.cache
def compiled_jacobi_step():
    """:func:`jacobi_step` through ``torch.compile``, for the torch verification on the CPU,
    where an iteration's 40-100 small eager ops cost ~0.3-0.7 ms next to a ~2.5 ms compiled
    window forward (photos_ar, W=16; ``benchmarks/compile_window.py``). Its random numbers come
    in as arguments (drawn outside from the caller's generator, in the eager order), so it draws
    the same tokens as the eager step up to float rounding. Built once per process; static
    shapes: each (batch, window, vocabulary, dtype, ratio and its constants) compiles once, on
    first use, in 1-3 s. It compiles to one graph (tested); not ``fullgraph``, so that past
    Dynamo's recompile limit (8 variants) the step runs eagerly instead of raising."""
    return torch.compile(jacobi_step, dynamic=False)


# the windows speculate_by="cost" times: the CPU's best lie at 2-6 (batch 1), the GPU's with
# graphs at 16-24 (spec_sweep*.json)
COST_WINDOWS = (2, 4, 6, 8, 16, 24)


@dataclass
class SJDConfig(CostPlanOptions):
    name: str = "sjd"
    window: int = 16  # L (reference max_num_new_tokens)
    use_cache: bool = True  # False: recompute the whole prefix every call (baseline)
    cfg_scale: float = 1.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    backend: str = "auto"  # verification kernel: auto | triton | interpret | torch (vargen_kernels.dispatch)
    compile: bool = False  # torch.compile the cached windows and the CPU verification step; slow to start
    cuda_graph: bool = False  # replay one static-shape iteration as a CUDA graph (jacobi_graph.py); CUDA only
    graph_noise: str = "eager"  # with cuda_graph: eager (sample_jacobi's ids) | chunk (fewer host calls)
    # fixed: speculate at `window`; cost: the measured fastest of plain decoding and SJD at each
    # of cost_windows, at the batch that runs (cost_plan.py; named in stats["plan_widths"])
    cost_windows: list[int] = field(default_factory=lambda: list(COST_WINDOWS))


def check_window(cfg):
    """The options SJD and GSD share, checked before any work."""
    if cfg.window < 1:
        raise ValueError(f"sampler.window must be >= 1, got {cfg.window}")
    if cfg.graph_noise not in ("eager", "chunk"):
        raise ValueError(f"sampler.graph_noise must be 'eager' or 'chunk', got {cfg.graph_noise!r}")
    check_cost_options(cfg, "cost_windows", least=2)


def run_jacobi_sampler(
    model, cfg, cond_B, generator, slots, ratio_fn=token_ratio, residual_fn=token_residual
):
    """What the SJD and GSD samplers run: :func:`sample_jacobi` at ``cfg.window``, or, with
    ``speculate_by="cost"``, at the measured plan (:mod:`~vargen.sampling.speculative.cost_plan`:
    a window of ``cost_windows``, or plain decoding where no window pays); then
    :func:`~vargen.sampling.decoders.ar.complete`."""
    ar, c = model.next_token_model, cfg
    cond_B = cond_B.to(ar.device)
    warp = warp_kwargs(c)

    def run(window, cond_N, g, rows):
        if window == 0:
            return plain_decoding(ar, cond_N, g, rows, c, warp)
        return sample_jacobi(
            ar,
            cond_N,
            generator=g,
            window=window,
            ratio_fn=ratio_fn,
            residual_fn=residual_fn,
            use_cache=c.use_cache,
            slots=rows,
            backend=c.backend,
            compile=c.compile,
            cuda_graph=c.cuda_graph,
            graph_noise=c.graph_noise,
            **warp,
        )

    ids, stats = planned(ar, c, c.window, c.cost_windows, cond_B, generator, slots, run)
    return complete(model, ids, cond_B, generator, stats)


@SAMPLERS.register("sjd", SJDConfig)
class SJDSampler(Sampler):
    """SJD (:func:`sample_jacobi`); continuous: every label at once with ``slots`` rows."""

    continuous = True

    def __init__(self, cfg):
        super().__init__(cfg)
        check_window(cfg)

    def __call__(self, model, cond_B, generator, progress=False, slots=0):
        return run_jacobi_sampler(model, self.cfg, cond_B, generator, slots)
