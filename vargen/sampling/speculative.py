"""Exact speculative sampling with a draft model (Leviathan et al. 2023; Chen et al. 2023).

Spec: specs/sampling-speculative.md section 1. Per iteration the draft model samples gamma
tokens ``x`` from its warped conditionals ``q``; one target call gives the warped target
conditionals ``p`` at the gamma draft positions plus the bonus position; draft i is accepted
with probability min(1, p(x_i)/q(x_i)) (eq. in section 1(a).3) and the first rejection is
replaced by a sample of norm(max(0, p - q)) (1(a).4), so every row emits n_b + 1 tokens and the
output is distributed exactly as the target's (proof in section 1).

Rows are ragged: each row keeps its own committed length and its window starts at its own
position, without a Python loop over rows or positions. Both models are driven through a
:class:`WindowScorer`: by default KV-cached (:meth:`ARTransformer.forward_window` on a
:class:`RaggedKVCache`, whose per-row lengths are rolled back to the committed lengths after
each verification), or with ``use_cache=False`` by full recompute of the prefix through
``model.logits``; both draw the same tokens from the same generator. The same warpers (CFG,
temperature, top-k, top-p) are applied to draft and target logits through
:func:`vargen_kernels.logits_warper.warped_probs`, since the test needs the warped p and q.
Near the end of the sequence a row may have less room than gamma: acceptance is capped there,
and the capped position is drawn from p directly (a truncation that does not depend on the
drafted tokens keeps the sampler exact).

Continuous batching (:class:`RowQueue`): the sampler takes every pending condition ``cond_N``
and runs ``slots`` rows at a time. A row whose sample is complete is refilled at once with the
next pending sample (input order; its own class), its cache rows are rolled back to length 0 and
its draft state restarts, so the batch stays full until the work runs out and no row waits for
the slowest one. Each sample's tokens depend only on its own rows' draws, so refilling keeps
the exact samplers exact. ``slots`` = 0 or >= N runs every sample at once (no refill), which
draws exactly what the samplers drew before continuous batching.

Random draws, in this order from the one generator, each iteration, all of shape (slots, ...)
whatever rows are idle or refilled: the gamma draft samples (slots, V) in draft order, then
:func:`accept_and_correct`'s (slots, W, V) target samples, (slots, g) uniforms and (slots, V)
residual samples. Refilling draws nothing, so the same seed and ``slots`` give the same ids.

Host synchronisations: the loop reads how many tokens the furthest-behind row still needs and
runs the iterations that certainly remain before it reads again (:meth:`RowQueue.iterations`),
plus one read of the stats (accumulated on the device) at the end; ``stats["syncs"]`` counts
them. Nothing else in an iteration waits for the device.

Stats (besides :func:`vargen.sampling.ar_decode.new_stats`'s): ``row_target_forwards`` (sum
over target calls of the rows working in that call), ``target_calls_per_image`` (that / N),
the same for the draft; ``acceptance`` = accepted / proposed drafts, where every draft the row
had room for counts as proposed, also those after the first rejection (so with gamma > 1 it is
below the papers' alpha); ``alpha`` = the papers' acceptance rate, the fraction of first drafts
accepted over verifications that could accept at least one draft (its expectation is
sum_x min(p, q) for the draft model's q); ``mean_accepted_length`` = mean tokens emitted per
verification per row (accepted drafts + 1).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from vargen.checkpoint import load_cached
from vargen.registry import SAMPLERS
from vargen.sampling.ar_decode import new_stats
from vargen_kernels.group_verify import group_verify
from vargen_kernels.logits_warper import warped_probs
from vargen_kernels.speculative_verify import (  # noqa: F401  (RESIDUAL_EPS, token_residual: re-exported)
    RESIDUAL_EPS,
    gumbel_argmax,
    token_residual,
    verify,
    verify_reference,
)

# Device-side counters, read once at the end (one host sync): index -> stats key.
COUNTERS = (
    "accepted",
    "proposed",
    "row_target_forwards",
    "row_draft_forwards",
    "first_accepted",
    "first_proposed",
)


def _uniform(shape, generator: torch.Generator, device) -> torch.Tensor:
    """Uniforms in [0, 1) of ``shape`` from ``generator`` (on its device), moved to ``device``."""
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def sample_probs(probs_XV: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One id per row of (..., V) probabilities by Gumbel-max on the generator's uniforms."""
    return gumbel_argmax(probs_XV, _uniform(probs_XV.shape, generator, probs_XV.device))


def window_probs(model, ids_BN, cond_B, pos_BW, warp: dict) -> torch.Tensor:
    """Warped next-token distributions (B, W, V) at per-row positions ``pos_BW`` (one model call)."""
    N = ids_BN.shape[1]
    ids_in = ids_BN[:, : N - 1]  # logits at position t predict token t from ids < t
    guided = warp["cfg_scale"] != 1.0
    if guided:
        null_B = torch.full_like(cond_B, model.null_class)
        logits = model.logits(torch.cat([ids_in, ids_in]), torch.cat([cond_B, null_B]))  # (2B, N, V)
        cond_BNV, unc_BNV = logits.chunk(2)
    else:
        cond_BNV, unc_BNV = model.logits(ids_in, cond_B), None  # (B, N, V)
    B, W = pos_BW.shape
    V = cond_BNV.shape[-1]
    idx = pos_BW[..., None].expand(B, W, V)
    c = cond_BNV.gather(1, idx).reshape(B * W, V)
    u = unc_BNV.gather(1, idx).reshape(B * W, V) if guided else None
    return warped_probs(c, u, **warp).view(B, W, V)  # (B, W, V)


def window_inputs(ids_BX, start_B, width: int) -> torch.Tensor:
    """Model inputs (B, W) at positions start_b .. start_b+W-1: image token position - 1 (the
    class token stands at position 0, so index -1 is a placeholder), clamped to the buffer."""
    X = ids_BX.shape[1]
    idx = start_B[:, None] - 1 + torch.arange(width, device=ids_BX.device)  # (B, W)
    return ids_BX.gather(1, idx.clamp(0, X - 1))


class WindowScorer:
    """Warped next-token distributions of one model over per-row windows, KV-cached or not.

    With ``use_cache`` the model runs :meth:`forward_window` on a :class:`RaggedKVCache` of the
    (CFG-doubled) batch; callers keep the cache at each row's committed length with
    :meth:`commit`. Without it every call recomputes the whole prefix (:func:`window_probs`).
    ``ids_BX`` may be wider than the sequence (padding that absorbs writes past the end);
    ``stats["positions_computed"]`` counts the sequence positions pushed through the model.
    ``backend``: how the cached forward's attention runs
    (:func:`vargen_kernels.ragged_attention.ragged_attention`).
    """

    def __init__(self, model, cond_B, warp: dict, stats: dict, use_cache: bool, window: int, backend="auto"):
        self.model, self.warp, self.stats = model, warp, stats
        self.N = model.num_tokens
        self.guided = warp["cfg_scale"] != 1.0
        self.set_cond(cond_B)
        self.cache = model.new_ragged_cache(len(self.cond_in), window) if use_cache else None
        if self.cache is not None:
            self.cache.backend = backend

    def set_cond(self, cond_B):
        """The class of every row (after a refill); the CFG rows keep the null class."""
        self.cond_B = cond_B
        null_B = torch.full_like(cond_B, self.model.null_class)
        self.cond_in = torch.cat([cond_B, null_B]) if self.guided else cond_B  # (R,) R = B or 2B

    def window(self, ids_BX, start_B, width: int) -> torch.Tensor:
        """(B, W, V) at positions start_b .. start_b+W-1 (cached: start_B must be the cache's
        length; positions past the sequence are meaningless, the caller never uses them)."""
        R, N = len(self.cond_in), self.N
        if self.cache is None:
            pos_BW = (start_B[:, None] + torch.arange(width, device=ids_BX.device)).clamp(max=N - 1)
            self.stats["positions_computed"] += R * N
            return window_probs(self.model, ids_BX[:, :N], self.cond_B, pos_BW, self.warp)
        inputs_BW = window_inputs(ids_BX, start_B, width)
        inputs_RW = torch.cat([inputs_BW, inputs_BW]) if self.guided else inputs_BW
        logits_RWV = self.model.forward_window(inputs_RW, self.cond_in, self.cache)
        self.stats["positions_computed"] += R * width
        B, V = len(start_B), logits_RWV.shape[-1]
        c = logits_RWV[:B].reshape(B * width, V)
        u = logits_RWV[B:].reshape(B * width, V) if self.guided else None
        return warped_probs(c, u, **self.warp).view(B, width, V)  # (B, W, V)

    def draft_step(self, ids_BX, len_B, j: int) -> torch.Tensor:
        """(B, V) at position len_b + j (the draft's j-th autoregressive step of an iteration).

        Cached, the draft's cache holds len_b - 1 or len_b positions when an iteration starts
        (it never ran on the last token when every draft was accepted), so step 0 runs a window
        of two positions from len_b - 1: a fixed width, so no host sync to find the widest lag.
        Afterwards the cache holds len_b + j + 1 positions."""
        pos_B = len_B + j
        if self.cache is None:
            return self.window(ids_BX, pos_B, 1)[:, 0]
        if j > 0:
            probs_BWV = self.window(ids_BX, pos_B, 1)
            self.commit(pos_B + 1)
            return probs_BWV[:, 0]
        start_B = (len_B - 1).clamp(min=0)
        self.commit(start_B)
        probs_BWV = self.window(ids_BX, start_B, 2)  # (B, 2, V)
        self.commit(pos_B + 1)
        lag_B = pos_B - start_B  # 0 (a row at position 0) or 1
        B, V = probs_BWV.shape[0], probs_BWV.shape[-1]
        return probs_BWV.gather(1, lag_B[:, None, None].expand(B, 1, V))[:, 0]

    def commit(self, len_B):
        """Roll each row's cache back to (at most) its committed length ``len_B``."""
        if self.cache is not None:
            self.cache.rollback(torch.cat([len_B, len_B]) if self.guided else len_B)


class RowQueue:
    """Continuous batching over ``slots`` rows for N samples (see the module docstring).

    Device-side bookkeeping (the only host sync is in :meth:`iterations`): ``sample_B`` is the
    sample each row works on (-1 when the work ran out), ``len_B`` its committed length,
    ``ids_BX`` its tokens (T = num_tokens plus ``pad`` columns that absorb window writes past
    the end, so no write is clamped or masked), ``cond_B`` its class. :meth:`refill` stores
    finished rows in ``out_NT`` and restarts them on the next pending samples in input order.
    """

    def __init__(self, cond_N, slots: int, T: int, pad: int):
        N = len(cond_N)
        R = N if slots <= 0 or slots >= N else int(slots)
        device = cond_N.device
        self.N, self.R, self.T = N, R, T
        self.cond_N = cond_N
        self.sample_B = torch.arange(R, device=device)
        self.cond_B = cond_N[:R].clone()
        self.len_B = torch.zeros(R, dtype=torch.long, device=device)
        self.ids_BX = torch.zeros(R, T + pad, dtype=torch.long, device=device)
        self.out_NT = torch.zeros(N + 1 if R < N else 0, T, dtype=torch.long, device=device)  # row N: a sink
        self.next = torch.tensor(R, device=device)  # first pending sample

    def iterations(self, most: int, stats: dict, scorers=()):
        """Yield once per sampler iteration until the work runs out, with a host sync only when
        the last one's guarantee expires: after a sync that finds ``left`` tokens still to draw
        in the furthest-behind row (T when a sample is pending), at least ceil(left / most)
        more iterations are certain, since an iteration emits at most ``most`` tokens per row.
        The iterations run are exactly those of a check before each one (same draws). The same
        read gives the longest working row, which tightens the attended width of the
        ``scorers``' caches (committed at that point; idle rows' windows are never used)."""
        while True:
            working_B = self.len_B < self.T
            left_B = (self.T - self.len_B).max()
            longest_B = torch.where(working_B, self.len_B, 0).max()
            left, pend, longest = torch.stack([left_B, self.N - self.next, longest_B]).tolist()  # one sync
            stats["syncs"] += 1
            for scorer in scorers:
                if scorer.cache is not None:
                    scorer.cache.bound = min(scorer.cache.bound, longest)
            if pend > 0:
                left = max(left, self.T)
            if left <= 0:
                return
            for _ in range(-(-left // most)):
                yield

    def active(self) -> torch.Tensor:
        """(B,) rows still drawing a sample (a row whose work ran out keeps len = T)."""
        return self.len_B < self.T

    def refill(self) -> torch.Tensor:
        """Store the rows that completed their sample; give them the next pending samples in
        order (len 0, their own class). Returns the (B,) mask of rows that got a new sample."""
        done_B = (self.len_B >= self.T) & (self.sample_B >= 0)
        dest_B = torch.where(done_B, self.sample_B, self.N)  # unfinished rows write to the sink
        self.out_NT.index_copy_(0, dest_B, self.ids_BX[:, : self.T])
        new_B = self.next + done_B.long().cumsum(0) - 1  # (B,) next samples in row order
        fresh_B = done_B & (new_B < self.N)
        self.sample_B = torch.where(done_B, torch.where(fresh_B, new_B, -1), self.sample_B)
        self.next = self.next + done_B.sum()
        self.len_B = torch.where(fresh_B, 0, self.len_B)
        self.cond_B = torch.where(fresh_B, self.cond_N[new_B.clamp(max=self.N - 1)], self.cond_B)
        return fresh_B

    def ids(self) -> torch.Tensor:
        """(N, T) in input order. With a row per sample nothing is ever refilled (callers then
        skip :meth:`refill`): the rows are the samples."""
        return self.ids_BX[:, : self.T] if self.R == self.N else self.out_NT[: self.N]


def accept_and_correct(
    p_BWV, q_BgV, x_Bg, ratio_Bg, room_B, generator, residual_fn=token_residual, backend="auto"
):
    """The verification step shared by SD, SJD and GSD, vectorised over batch and window.

    ``p_BWV`` holds the target at the g = W-1 draft positions plus the bonus one, ``ratio_Bg``
    the acceptance ratio of each draft (None: the ratio that goes with ``residual_fn``, computed
    in the fused kernel: p(x)/q(x) for the token residual, P(C(x))/Q(C(x)) for GSD's group-exact
    residual, which carries its ``group`` size), ``room_B`` the tokens a row still has to emit,
    ``residual_fn(p_BV, q_BV)`` the distribution a rejection resamples from. Returns (n_B
    accepted drafts, z_B the token emitted after them, y_BW one target sample per window
    position, cap_B drafts the row was allowed to accept).

    Draws, in this order: (B, W, V) uniforms for y, (B, g) for the test, (B, V) for the residual
    draw. The computation is :func:`vargen_kernels.speculative_verify.verify` for the token
    residual, :func:`vargen_kernels.group_verify.group_verify` for the group-exact one (fused
    kernels under ``backend``, see :func:`vargen_kernels.dispatch.backend_for`), else the torch
    reference with ``residual_fn``; every backend draws the same tokens.
    """
    B, W, V = p_BWV.shape
    u_BWV = _uniform((B, W, V), generator, p_BWV.device)
    a_Bg = _uniform((B, W - 1), generator, p_BWV.device)
    u_res_BV = _uniform((B, V), generator, p_BWV.device)
    draws = (p_BWV, q_BgV, x_Bg, room_B, u_BWV, a_Bg, u_res_BV, ratio_Bg)
    if residual_fn is token_residual:
        return verify(*draws, backend=backend)
    group = getattr(residual_fn, "group", None)
    if group is not None and ratio_Bg is None:
        return group_verify(*draws[:-1], group=group, backend=backend)
    return verify_reference(*draws, residual_fn=residual_fn)


def verify_counts(n_B, cap_B, active_B, draft_calls: int) -> torch.Tensor:
    """This verification's contribution to :data:`COUNTERS` (a device tensor, no sync), after
    ``draft_calls`` draft-model calls on the same rows."""
    a = active_B.long()
    can = a * (cap_B > 0)  # verifications where the first draft could be accepted
    rows = a.sum()
    return torch.stack(
        [(n_B * a).sum(), (cap_B * a).sum(), rows, draft_calls * rows, (can * (n_B > 0)).sum(), can.sum()]
    )


def token_ratio(p_BgV, q_BgV, x_Bg):
    """The exact per-token acceptance ratio p(x)/q(x)."""
    x = x_Bg[..., None]
    return p_BgV.gather(2, x)[..., 0] / q_BgV.gather(2, x)[..., 0]


@dataclass
class SpeculativeConfig:
    name: str = "speculative"
    draft_ckpt: str = ""  # run dir of a smaller llamagen trained on the same tokenizer
    gamma: int = 4  # draft tokens per target call
    use_cache: bool = True  # False: both models recompute the whole prefix every call (baseline)
    cfg_scale: float = 1.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    backend: str = "auto"  # verification kernel: auto | triton | interpret | torch (vargen_kernels.dispatch)


@torch.no_grad()
def sample_speculative(
    target, draft, cond_B, *, generator, gamma=4, use_cache=True, slots=0, backend="auto", **warp
):
    """Draw ids (N, T) for the N classes ``cond_B`` from ``target`` with ``draft`` proposals,
    ``slots`` rows at a time (continuous batching; 0 = all at once); returns (ids_NT, stats).
    ``backend``: how the verification (:func:`accept_and_correct`) and the cached windows'
    attention run; all draw the same ids (to float rounding of the attention)."""
    t0 = time.perf_counter()
    cond_N = cond_B  # every pending sample (the keyword keeps its historical name)
    if gamma < 1:
        raise ValueError(f"sampler.gamma must be >= 1, got {gamma}")
    warp = {"cfg_scale": 1.0, "temperature": 1.0, "top_k": 0, "top_p": 1.0, **warp}
    T = target.num_tokens
    rows = RowQueue(cond_N, slots, T, gamma + 1)
    stats = {**new_stats(), "syncs": 0}
    draft_stats = new_stats()
    counts = torch.zeros(len(COUNTERS), dtype=torch.long, device=cond_N.device)
    p_model = WindowScorer(target, rows.cond_B, warp, stats, use_cache, gamma + 1, backend)
    q_model = WindowScorer(draft, rows.cond_B, warp, draft_stats, use_cache, gamma + 1, backend)
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
        # ratio None: the token ratio p(x)/q(x), computed inside the verification
        n_B, z_B, _, cap_B = accept_and_correct(
            p_BWV, q_BgV, x_Bg, None, T - len_B, generator, backend=backend
        )
        ids_BX.scatter_(1, (len_B + n_B)[:, None], z_B[:, None])
        counts += verify_counts(n_B, cap_B, active_B, gamma)
        rows.len_B = len_B + (n_B + 1) * active_B
        if rows.R < rows.N:  # refills happen: new classes, caches of new rows back to 0
            rows.refill()  # SD keeps no draft state across iterations: nothing else to restart
            p_model.set_cond(rows.cond_B)
            q_model.set_cond(rows.cond_B)
        p_model.commit(rows.len_B)
        q_model.commit(rows.len_B)
    stats["draft_positions_computed"] = draft_stats["positions_computed"]
    return rows.ids(), finish_stats(stats, rows.N, rows.N * T, t0, counts)


def finish_stats(stats: dict, rows: int, tokens: int, t0: float, counts: torch.Tensor | None = None) -> dict:
    """Fill the derived stats. ``rows`` = samples; ``counts`` (:data:`COUNTERS`, on the device)
    is read here, one host sync. Without it every call served ``rows`` rows (CSpD)."""
    if counts is not None:
        stats.update(zip(COUNTERS, counts.tolist()))
        stats["syncs"] += 1
    stats.setdefault("row_target_forwards", stats["target_forwards"] * rows)
    stats["tokens"] = tokens
    return derived_stats(stats, rows, t0)


def derived_stats(stats: dict, images: int, t0: float | None = None) -> dict:
    """Ratios of the summed counts (also what :func:`generate` recomputes over batches)."""
    stats["acceptance"] = stats["accepted"] / max(1, stats["proposed"])
    stats["tokens_per_target_call"] = stats["tokens"] / max(1, stats["row_target_forwards"])
    stats["mean_accepted_length"] = stats["tokens_per_target_call"]  # accepted + 1 per verification
    stats["target_calls_per_image"] = stats["row_target_forwards"] / max(1, images)
    if "row_draft_forwards" in stats:
        stats["draft_calls_per_image"] = stats["row_draft_forwards"] / max(1, images)
    if "first_proposed" in stats:
        stats["alpha"] = stats["first_accepted"] / max(1, stats["first_proposed"])
    if "syncs" in stats:
        stats["syncs_per_image"] = stats["syncs"] / max(1, images)
    if t0 is not None:
        stats["seconds"] = time.perf_counter() - t0
    return stats


def warp_kwargs(cfg) -> dict:
    return {k: cfg[k] for k in ("cfg_scale", "temperature", "top_k", "top_p")}


@SAMPLERS.register("speculative", SpeculativeConfig)
def build_speculative(cfg):
    """``(model, cond_N, generator, progress, slots) -> (ids, stats)``; loads ``draft_ckpt`` on
    first use. ``run.continuous``: :func:`generate` passes every label at once with ``slots``."""
    cfg = {**asdict(SpeculativeConfig()), **dict(cfg)}
    if not cfg["draft_ckpt"]:
        raise ValueError("sampler.draft_ckpt must name a trained draft llamagen run for 'speculative'")
    if cfg["gamma"] < 1:
        raise ValueError(f"sampler.gamma must be >= 1, got {cfg['gamma']}")

    def run(model, cond_N, generator, progress=False, slots=0):
        draft, _ = load_cached(cfg["draft_ckpt"], model.tok_emb.weight.device)
        if draft.vocab_size != model.vocab_size or draft.num_tokens != model.num_tokens:
            raise ValueError("sampler.draft_ckpt: draft and target must share the tokenizer")
        cond_N = cond_N.to(model.tok_emb.weight.device)
        return sample_speculative(
            model,
            draft,
            cond_N,
            generator=generator,
            gamma=cfg["gamma"],
            use_cache=cfg["use_cache"],
            slots=slots,
            backend=cfg["backend"],
            **warp_kwargs(cfg),
        )

    run.continuous = True
    return run
