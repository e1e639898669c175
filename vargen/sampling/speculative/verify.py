"""The machinery SD, SJD and GSD share: windows of per-row positions, continuous batching,
the verification step and its counters (:mod:`~vargen.sampling.speculative.draft`,
:mod:`~vargen.sampling.speculative.jacobi`, :mod:`~vargen.sampling.speculative.gsd`).

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
them. Nothing else in an iteration waits for the device. On the CPU, where a read waits for
nothing, the loop reads before every iteration: the read also bounds the attended width of the
cached windows, which otherwise grows by a whole window per iteration (see
:meth:`RowQueue.iterations`; the same iterations run, so the same draws).

Stats (besides :func:`vargen.sampling.stats.new_stats`'s): ``row_target_forwards`` (sum
over target calls of the rows working in that call), ``target_calls_per_image`` (that / N),
the same for the draft; ``acceptance`` = accepted / proposed drafts, where every draft the row
had room for counts as proposed, also those after the first rejection (so with gamma > 1 it is
below the papers' alpha); ``alpha`` = the papers' acceptance rate, the fraction of first drafts
accepted over verifications that could accept at least one draft (its expectation is
sum_x min(p, q) for the draft model's q); ``mean_accepted_length`` = mean tokens emitted per
verification per row (accepted drafts + 1).
"""

from __future__ import annotations

import torch

from vargen.models.generator import guidance_labels
from vargen.sampling.stats import COUNTERS  # noqa: F401  (re-exported: the counters' order)
from vargen_kernels.group_verify import group_verify
from vargen_kernels.logits_warper import warped_probs
from vargen_kernels.speculative_verify import (  # noqa: F401  (RESIDUAL_EPS, token_residual: re-exported)
    RESIDUAL_EPS,
    gumbel_argmax,
    token_residual,
    verify,
    verify_reference,
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
        cond_R = guidance_labels(cond_B, model.null_class)  # (2B,) labels, then the null class
        logits = model.logits(torch.cat([ids_in, ids_in]), cond_R)  # (2B, N, V)
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
    (:func:`vargen_kernels.ragged_attention.ragged_attention`). ``compile`` turns on
    :meth:`ARTransformer.compile_decode` for the model (it stays on; each window width compiles
    once, on first use): it changes the cost of cached windows, not the tokens, up to float
    rounding.
    """

    def __init__(
        self,
        model,
        cond_B,
        warp: dict,
        stats: dict,
        use_cache: bool,
        window: int,
        backend="auto",
        compile=False,
    ):
        if compile and use_cache and getattr(model, "_compiled_window", None) is None:
            model.compile_decode()
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
        self.cond_in = guidance_labels(cond_B, self.model.null_class, self.guided)  # (R,) R = B or 2B

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
        ``scorers``' caches (committed at that point; idle rows' windows are never used).

        On the CPU a read costs no stall, so it happens before every iteration: between reads
        the caches' bound grows by a whole window per call while rows commit ~3 tokens, and
        attention over the stale slots cost ~10% of a batch-1 window forward (photos_ar)."""
        every = self.len_B.device.type == "cpu"
        while True:
            *len_b, nxt = torch.cat([self.len_B, self.next.view(1)]).tolist()  # one sync, two ops
            stats["syncs"] += 1
            left, pend = self.T - min(len_b), self.N - nxt
            longest = max((n for n in len_b if n < self.T), default=0)  # the longest working row
            for scorer in scorers:
                if scorer.cache is not None:
                    scorer.cache.bound = min(scorer.cache.bound, longest)
            if pend > 0:
                left = max(left, self.T)
            if left <= 0:
                return
            for _ in range(1 if every else -(-left // most)):  # left > 0: one more is certain
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
    p_BWV, q_BgV, x_Bg, ratio_Bg, room_B, generator, residual_fn=token_residual, backend="auto", all_y=True
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
    reference with ``residual_fn``; every backend draws the same tokens. ``all_y=False`` (SD, which
    uses z only): the torch path samples the target at position n alone and returns ``y_BW``
    None, or whole from a kernel (same draws, same n and z).
    """
    draws = verification_draws(p_BWV.shape, generator, p_BWV.device)
    return verify_drawn(p_BWV, q_BgV, x_Bg, ratio_Bg, room_B, draws, residual_fn, backend, all_y)


def verification_draws(shape_BWV, generator, device):
    """:func:`accept_and_correct`'s uniforms, in its order: (u_BWV, a_Bg, u_res_BV)."""
    B, W, V = shape_BWV
    u_BWV = _uniform((B, W, V), generator, device)
    a_Bg = _uniform((B, W - 1), generator, device)
    u_res_BV = _uniform((B, V), generator, device)
    return u_BWV, a_Bg, u_res_BV


def verify_drawn(
    p_BWV, q_BgV, x_Bg, ratio_Bg, room_B, draws, residual_fn=token_residual, backend="auto", all_y=True
):
    """:func:`accept_and_correct` on uniforms already drawn (:func:`verification_draws`): no
    generator inside, so it can run inside ``torch.compile`` (with ``backend="torch"``)."""
    args = (p_BWV, q_BgV, x_Bg, room_B, *draws)
    if residual_fn is token_residual:
        return verify(*args, ratio_Bg, backend=backend, all_y=all_y)
    group = getattr(residual_fn, "group", None)
    if group is not None and ratio_Bg is None:
        return group_verify(*args, group=group, backend=backend)
    return verify_reference(*args, ratio_Bg, residual_fn=residual_fn)


def verify_counts(n_B, cap_B, active_B, draft_calls: int) -> torch.Tensor:
    """This verification's contribution to :data:`COUNTERS` (a device tensor, no sync), after
    ``draft_calls`` draft-model calls on the same rows (or several verifications', stacked)."""
    a = active_B.long()
    can = a * (cap_B > 0)  # verifications where the first draft could be accepted
    rows = a.sum()
    return torch.stack(
        [(n_B * a).sum(), (cap_B * a).sum(), rows, draft_calls * rows, (can * (n_B > 0)).sum(), can.sum()]
    )


class CountLog:
    """:data:`COUNTERS` of a run at no per-iteration cost: each verification's (n_B, cap_B,
    active_B) is kept as it is (no op) and :meth:`total` reduces them all at once, the same
    integers as summing :func:`verify_counts` every iteration (a dozen small ops each)."""

    def __init__(self, draft_calls: int, device):
        self.draft_calls, self.device, self.log = draft_calls, device, []

    def add(self, n_B, cap_B, active_B) -> None:
        self.log.append((n_B, cap_B, active_B))

    def total(self) -> torch.Tensor:
        if not self.log:
            return torch.zeros(len(COUNTERS), dtype=torch.long, device=self.device)
        n_IB, cap_IB, active_IB = (torch.stack(t) for t in zip(*self.log))  # (iterations, B)
        return verify_counts(n_IB, cap_IB, active_IB, self.draft_calls)


def token_ratio(p_BgV, q_BgV, x_Bg):
    """The exact per-token acceptance ratio p(x)/q(x)."""
    x = x_Bg[..., None]
    return p_BgV.gather(2, x)[..., 0] / q_BgV.gather(2, x)[..., 0]


def warp_kwargs(cfg) -> dict:
    return {k: cfg[k] for k in ("cfg_scale", "temperature", "top_k", "top_p")}
