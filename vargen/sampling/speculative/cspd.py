"""Continuous speculative decoding (CSpD) of a token-entity xAR model with MAR's diffusion head.

The verification step is :mod:`vargen.sampling.speculative.cspd_verify`. Target and draft
are ``xar`` models with ``entity: token`` and head ``mar_diffusion`` on the same
tokenizer (the draft smaller). One iteration over the rows in flight:

1. the draft proposes g_b = min(gamma, room_b - 1) tokens (0 while a row is still pre-filling)
   one by one: its head runs the reverse chain from x_T with step noises drawn from the
   generator and recorded (one draft backbone call per token; the first call of an iteration
   also catches up the row's last committed token);
2. one target backbone call on each row's window of g + 1 positions gives the target's
   conditions at the drafts and the position after them;
3. verification of the drafts, stopping at the first rejection, by ``verify``:
   ``last`` (default, exact): the target head re-runs each draft's chain with the *same* x_T and
   step noises (trajectory alignment) and the last step's densities are compared
   (:func:`~vargen.sampling.speculative.cspd_verify.accept_last_step`, a fused kernel under
   ``backend``); ``path`` (exact, higher acceptance):
   the joint density of the draft's whole reverse chain under both heads, the target's step
   means along the draft's states in ONE batched head call
   (:func:`~vargen.sampling.speculative.cspd_verify.path_log_ratio`; the residual proposes target chains);
4. the rejected position's token comes from the residual; a row whose g_b drafts all pass takes
   a target sample at the next position (the bonus token).

KV cache (``use_cache``, default): both backbones run only new positions per call on a
:class:`~vargen.nn.kv_cache.RaggedKVCache` (:meth:`XAR.forward_window`), rolled back to each
row's committed length after verification; ``use_cache=False`` recomputes every sequence through
``entity_conditions`` (the reference: same tokens from the same generator).

Continuous batching: ``cond_B`` holds ALL pending samples; ``slots`` rows are in flight (0 =
all); a finished row is refilled at once with the next pending sample (its cache rows reset), in
input order, and rows are dropped when nothing is pending. Outputs come back in input order; the
same generator seed and ``slots`` give the same tokens.

Guidance (``cfg_scale`` != 1) follows the plain ``xar`` sampler: token i gets the xAR ramp scale
w_i = 1 + (cfg_scale - 1) i / (N - 1) (:func:`~vargen.models.xar.cfg_ramp`), the backbones run
the conditional and the null-class rows as one batch, and the heads mix eps with each position's
own w_i. Draft and target chains are both guided, so the densities compared are those of what
each chain actually samples, and the output is distributed as ``xar`` with the same
``cfg_scale``.

Stats: ``target_forwards`` / ``draft_forwards`` count backbone calls (a guided call counts once);
``positions_computed`` / ``draft_positions_computed`` the token-rows pushed through each backbone
(window width x rows; rows x N per full recompute; guided rows doubled);
``row_target_forwards`` the rows served over target calls and ``target_calls_per_image`` that
over the images; ``alpha`` first-draft acceptance (the papers' alpha) and
``mean_accepted_length`` accepted drafts per verification; ``syncs`` host synchronisations (one
per iteration plus one per residual round).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial

import torch

from vargen.models.xar import cfg_ramp
from vargen.registry import SAMPLERS
from vargen.sampling.base import Sampler
from vargen.sampling.decoders.xar import sample_xar
from vargen.sampling.speculative.cost_plan import CostPlanOptions, check_cost_options, plain_chunks, planned
from vargen.sampling.speculative.cspd_verify import (
    MODES,
    accept_last_step,
    accept_prefix,
    last_step_log_sigma,
    path_log_ratio,
    residual_at,
    residual_rounds,
)
from vargen.sampling.stats import new_stats

VERIFY = ("last", "path")


@dataclass
class CSpDConfig(CostPlanOptions):
    name: str = "cspd"
    draft_ckpt: str = ""  # a trained smaller xar (entity token, head mar_diffusion) on the same tokenizer
    gamma: int = 4  # drafts per iteration
    temperature: float = 1.0
    num_steps: int = 0  # head reverse steps for both heads; 0 = the target head's
    mode: str = "exact"  # exact (Sigma = 1) or paper (variance factor; = exact with this fixed-variance head)
    verify: str = "last"  # last: last reverse step given shared noise; path: joint density of the whole chain
    variance: str = ""  # both heads' reverse-step variance (beta_tilde | beta); "" = the target head's
    proposals: int = 16  # K proposals per row and round in the residual sampler
    cfg_scale: float = 1.0  # guidance at the last token; xAR's ramp from 1 at the first
    prefill: float = 0.05  # fraction of the tokens the target draws alone first (the reference demo: 0.05)
    use_cache: bool = True  # False: both backbones recompute every sequence per call (the reference)
    slots: int = 0  # rows in flight under continuous batching; 0 = all samples at once
    backend: str = "auto"  # fused kernels (last-step test, residual proposals, window attention)
    # fixed: speculate at `gamma`; cost: the measured fastest of the plain xar sampler (the target,
    # with this config's variance) and CSpD at each of cost_gammas (cost_plan.py; stats["plan_widths"])
    cost_gammas: list[int] = field(default_factory=lambda: [1, 2, 4])


def _check_pair(model, draft):
    for m, who in ((model, "target"), (draft, "draft")):
        if m.cfg.denoiser != "head" or m.cfg.entity != "token" or m.cfg.head["name"] != "mar_diffusion":
            raise ValueError(
                f"cspd needs xar models with denoiser head, entity token and head mar_diffusion ({who})"
            )
    if draft.cfg.code_dim != model.cfg.code_dim or list(draft.cfg.grid) != list(model.cfg.grid):
        raise ValueError("sampler.draft_ckpt: draft and target must share the tokenizer")
    if draft.num_classes != model.num_classes:  # the same labels and null class (guidance)
        raise ValueError("sampler.draft_ckpt: draft and target must share the classes")
    if draft.head.cfg.num_train_steps != model.head.cfg.num_train_steps:  # the same step variances
        raise ValueError("sampler.draft_ckpt: draft and target heads must share num_train_steps")


class _Backbone:
    """Head conditions of one xAR model at per-row windows of positions.

    Cached: :meth:`XAR.forward_window` on a :class:`RaggedKVCache` of the (guidance-doubled)
    rows, whose lengths the caller keeps at the committed lengths (:meth:`rollback`). Uncached:
    ``entity_conditions`` over whole sequences, gathered at the window (the reference path).
    """

    def __init__(self, model, rows: int, window: int, use_cache: bool, stats: dict, key: str, backend: str):
        self.model, self.stats, self.key = model, stats, key
        self.cache = model.new_ragged_cache(rows, window) if use_cache else None
        if self.cache is not None:
            self.cache.backend = backend  # its attention (vargen_kernels.ragged_attention)

    def window(self, tokens_MNC, cond_R, start_M, width: int, used: int):
        """Conditions (M, W, Wz) at positions start_m .. start_m+W-1 (and the null-class ones,
        or None); cached, start_M must equal the cache's lengths and ``used`` bound their max + W."""
        M, N, C = tokens_MNC.shape
        rep = len(cond_R) // M  # 2 under guidance
        j_W = torch.arange(width, device=start_M.device)
        if self.cache is None:
            z = self.model.entity_conditions(tokens_MNC.repeat(rep, 1, 1), cond_R)  # (R, N, Wz)
            pos_RW = (start_M[:, None] + j_W).clamp(max=N - 1).repeat(rep, 1)
            z = z.gather(1, pos_RW[..., None].expand(*pos_RW.shape, z.shape[-1]))  # (R, W, Wz)
            self.stats[self.key] += len(cond_R) * N
        else:
            idx_MW = (start_M[:, None] - 1 + j_W).clamp(0, N - 1)  # context of position p: token p - 1
            ctx = tokens_MNC.gather(1, idx_MW[..., None].expand(M, width, C)).repeat(rep, 1, 1)
            z = self.model.forward_window(ctx, cond_R, self.cache, used)  # (R, W, Wz)
            self.stats[self.key] += len(cond_R) * width
        return z[:M], (z[M:] if rep == 2 else None)

    def rollback(self, len_M, rep: int):
        if self.cache is not None:
            self.cache.rollback(len_M.repeat(rep))

    def keep(self, rows_M, rep: int):
        """Keep only these rows (and their null-class twins)."""
        if self.cache is not None:
            M = len(self.cache.length_B) // rep
            self.cache = self.cache.select_rows(torch.cat([rows_M + r * M for r in range(rep)]))


def _trajectory(head, cond_BgW, x_T, noises, temperature, w_Bg, uncond_BgW, variance) -> dict:
    """The head's aligned chain on (B, g) positions (guided by w_Bg), outputs reshaped to (B, g, ...)."""
    B, g, W = cond_BgW.shape
    z, x = cond_BgW.reshape(B * g, W), x_T.flatten(0, 1)
    z_u = None if uncond_BgW is None else uncond_BgW.reshape(B * g, W)
    w = 1.0 if w_Bg is None else w_Bg.flatten()  # a float when unguided: no per-call device check
    out = head.reverse_trajectory(z, x, noises.flatten(1, 2), temperature, w, z_u, variance=variance)
    return {k: v.reshape(B, g, *v.shape[1:]) for k, v in out.items()}


def _take(t, idx_M):
    """t[m, idx_m] for a (M, W, ...) tensor (or None)."""
    if t is None:
        return None
    M = t.shape[0]
    return t[torch.arange(M, device=t.device), idx_M]


def _path_extra(
    model, draft, zp, zpu, zq, zqu, w_MW, n_M, need_M, S, temperature, variance, generator, K, need_any
):
    """Path mode: the token at each row's position len + n_M, from target chains at window
    column n_M. Rows with ``need_M`` (a rejection) draw the path residual norm(max(0, P - Q)) by
    acceptance-rejection (K target chains per round, q(path) from ONE batched draft head call);
    the others take a plain target sample (the bonus token)."""
    M = n_M.shape[0]
    C = model.cfg.code_dim
    zc, zu, w = _take(zp, n_M), _take(zpu, n_M), _take(w_MW, n_M)
    w = 1.0 if w is None else w
    dtype = zc.dtype
    stds = model.head.step_stds(S, temperature, variance)
    if zq is not None:
        col = n_M.clamp(max=zq.shape[1] - 1)
        qc, qu = _take(zq, col), _take(zqu, col)

    def propose(k, gen, rows=None):  # rows: a later round's unfilled rows (all at first)
        m = M if rows is None else len(rows)
        sel = lambda t: t if rows is None or not torch.is_tensor(t) else t[rows]  # noqa: E731
        kw = {"generator": gen, "device": gen.device, "dtype": dtype}
        x_T = torch.randn(k * m, C, **kw).to(zc.device)
        noises = torch.randn(S, k * m, C, **kw).to(zc.device)
        rep = lambda t: t if not torch.is_tensor(t) else sel(t).repeat(k, *([1] * (t.dim() - 1)))  # noqa: E731
        tr = model.head.reverse_trajectory(
            rep(zc), x_T, noises, temperature, rep(w), rep(zu), return_path=zq is not None, variance=variance
        )
        if zq is None:  # no draft this iteration: nothing to reject
            return tr["x0"].view(k, m, C), torch.zeros(k, m, device=zc.device, dtype=dtype)
        mq = draft.head.path_means(rep(qc), tr["path"], rep(w), rep(qu))  # (S, k m, C)
        log_pq = path_log_ratio(tr["path"], tr["x0"], tr["means"], mq, stds)
        return tr["x0"].view(k, m, C), -log_pq.view(k, m)

    return residual_rounds(propose, need_M, generator, K, need_any=need_any, subset=True)


def _verify_last(
    model,
    draft,
    steps_q,
    zq,
    zqu,
    z_p,
    z_pu,
    x_T,
    noises,
    w_MW,
    g_M,
    g_h,
    S,
    temp,
    var,
    mode,
    gen,
    K,
    backend,
):
    """``verify="last"``: the target head re-runs every column's chain with the draft's noise
    (column g: fresh noise); drafts are tested on the last step's Gaussians (fused kernels of
    :mod:`vargen_kernels.cspd_ratio` under ``backend``). Returns (n_M, n_h,
    the token at len + n per row, residual info with the host syncs spent besides n_h's)."""
    M, g = g_M.shape[0], len(steps_q)
    p = _trajectory(model.head, z_p, x_T, noises, temp, w_MW, z_pu, var)  # (M, g+1, ...)
    if g > 0:
        keys = ("x0", "mean_last", "std_last", "sum_log_std")
        q = {key: torch.stack([t[key] for t in steps_q], 1) for key in keys}  # (M, g, ...)
        p_g = {key: v[:, :g] for key, v in p.items()}
        log_sigma = last_step_log_sigma(q, p_g, mode)
        n_M = accept_last_step(q, p_g, log_sigma, gen, g_M, backend)
    else:
        n_M = torch.zeros(M, dtype=torch.long, device=g_M.device)
    n_h = n_M.tolist()  # the iteration's host sync
    # no rejection: the target chain at column n, whose noise no accept decision saw (bonus token)
    extra = _take(p["x0"], n_M)
    res = {"rounds": 0}
    if any(n < gb for n, gb in zip(n_h, g_h)):
        need_M = n_M < g_M
        resid, res["tries"], res["filled"] = residual_at(q, p_g, log_sigma, n_M, need_M, gen, K, backend)
        extra = torch.where(need_M[:, None], resid, extra)
        res["rounds"] = 1  # the residual's round check (one round in the common case)
    return n_M, n_h, extra, res


def _verify_path(
    model, draft, steps_q, zq, zqu, z_p, z_pu, x_T, noises, w_MW, g_M, g_h, S, temp, var, mode, gen, K
):
    """``verify="path"``: each draft's whole chain is tested by p(path) / q(path), the target's
    step means along the draft's states in one batched head call; the token at len + n comes
    from :func:`_path_extra` (residual or bonus). Same returns as :func:`_verify_last`."""
    M, g = g_M.shape[0], len(steps_q)
    guided = w_MW is not None
    zqg = zqug = None
    if g > 0:
        q_x0 = torch.stack([t["x0"] for t in steps_q], 1)  # (M, g, C)
        q_path = torch.stack([t["path"] for t in steps_q], 2).flatten(1, 2)  # (S, M g, C)
        q_means = torch.stack([t["means"] for t in steps_q], 2).flatten(1, 2)  # (S, M g, C)
        zqg = torch.stack(zq, 1)  # (M, g, Wz)
        zqug = None if zqu[0] is None else torch.stack(zqu, 1)
        flat = lambda t: None if t is None else t[:, :g].flatten(0, 1)  # noqa: E731  (M g, ...)
        w = flat(w_MW) if guided else 1.0
        mp = model.head.path_means(flat(z_p), q_path, w, flat(z_pu))  # (S, M g, C)
        stds = model.head.step_stds(S, temp, var)
        log_r = path_log_ratio(q_path, q_x0.flatten(0, 1), mp, q_means, stds)  # (M g,)
        n_M = accept_prefix(log_r.view(M, g), gen, g_M)
    else:
        n_M = torch.zeros(M, dtype=torch.long, device=g_M.device)
    n_h = n_M.tolist()  # the iteration's host sync
    need_any = any(n < gb for n, gb in zip(n_h, g_h))
    extra, tries, filled, rounds = _path_extra(
        model,
        draft,
        z_p,
        z_pu,
        zqg,
        zqug,
        w_MW,
        n_M,
        n_M < g_M,
        S,
        temp,
        var,
        gen,
        K if need_any else 1,
        need_any,
    )
    return n_M, n_h, extra, {"rounds": rounds, "tries": tries, "filled": filled}


@torch.no_grad()
def sample_cspd(
    model,
    draft,
    cond_B,
    *,
    generator,
    gamma=4,
    temperature=1.0,
    num_steps=0,
    mode="exact",
    verify="last",
    K=16,
    cfg_scale=1.0,
    prefill=0.05,
    use_cache=True,
    slots=0,
    variance="",
    backend="auto",
):
    """Draw tokens (B, N, C) distributed as the target's own ``xar`` sampler with the same
    ``cfg_scale`` (exact in both ``verify`` modes; ``mode="paper"`` equals ``exact`` with this
    package's fixed-variance heads, see
    :func:`~vargen.sampling.speculative.cspd_verify.last_step_log_sigma`). The
    first round(prefill N) tokens of each sample are drawn by the target alone (token pre-filling).
    ``cond_B`` are all the samples; ``slots`` of them are in flight at once (0 = all).
    ``variance`` sets both heads' step variance (:meth:`DiffusionHead.schedule`); ``beta`` with
    ``verify="path"`` is what accepts on small trained pairs, and then the output follows the
    target sampled with ``beta`` (set ``model.head.sample_variance`` for the plain sampler).
    ``backend``: how the fused kernels run (``verify="last"``'s test and residual proposals, the
    cached windows' attention; :func:`vargen_kernels.dispatch.backend_for`); every backend draws
    the same tokens (to float rounding)."""
    t0 = time.perf_counter()
    if verify not in VERIFY:
        raise ValueError(f"sampler.verify must be one of {VERIFY}, got {verify!r}")
    if mode not in MODES:
        raise ValueError(f"sampler.mode must be one of {MODES}, got {mode!r}")
    device = model.device
    dtype = next(model.parameters()).dtype
    cond_all = cond_B.to(device)
    total, N, C = cond_all.shape[0], model.length, model.cfg.code_dim
    S = int(num_steps or model.head.num_sampling_steps)
    guided = cfg_scale != 1.0
    rep = 2 if guided else 1
    ramp_N = torch.tensor([cfg_ramp(i, N, cfg_scale) for i in range(N)], device=device, dtype=dtype)  # (N,)
    n_pre = min(N, round(prefill * N))
    variance = variance or model.head.sample_variance
    M = total if slots <= 0 else min(slots, total)
    window = max(gamma + 1, n_pre + 2)  # the widest window: verification or the draft's catch-up
    stats = new_stats()
    dstats = {"positions_computed": 0}
    tgt = _Backbone(model, rep * M, window, use_cache, stats, "positions_computed", backend)
    drf = _Backbone(draft, rep * M, window, use_cache, dstats, "positions_computed", backend)
    out = torch.zeros(total, N, C, device=device, dtype=dtype)
    tokens = torch.zeros(M, N, C, device=device, dtype=dtype)  # rows in flight: committed, then drafts
    sample_h = list(range(M))  # host bookkeeping: which sample each row holds, its lengths
    len_h, dlen_h = [0] * M, [0] * M  # committed tokens; the draft cache's valid length
    pending = M
    cond_M = cond_all[:M]
    tries_sum = unfilled = torch.zeros((), dtype=torch.long, device=device)  # device-side: no sync
    residuals = 0
    first_prop = first_acc = verifications = syncs = row_calls = 0
    kw = {"generator": generator, "device": generator.device, "dtype": dtype}
    while sample_h:
        M = len(sample_h)
        cond_in = model.guidance_labels(cond_M, guided)  # (2M,) guided: labels, then the null class
        g_h = [0 if L < n_pre else min(gamma, N - L - 1) for L in len_h]  # drafts per row
        g = max(g_h)
        len_M = torch.tensor(len_h, device=device)
        g_M = torch.tensor(g_h, device=device)
        x_T = torch.randn(M, g + 1, C, **kw).to(device)
        noises = torch.randn(S, M, g + 1, C, **kw).to(device)
        steps_q, zq, zqu = [], [], []
        for k in range(g):  # draft proposals, one draft call each
            if k == 0:  # catch up on tokens the draft has not seen (its last accepted one, pre-fill)
                lag_h = [L - d for L, d in zip(len_h, dlen_h)]
                w0 = 1 + max(lag_h)
                z_c, z_u = drf.window(
                    tokens, cond_in, torch.tensor(dlen_h, device=device), w0, max(dlen_h) + w0
                )
                lag_M = torch.tensor(lag_h, device=device)
                z_c, z_u = _take(z_c, lag_M), _take(z_u, lag_M)
                drf.rollback(len_M + 1, rep)
            else:
                z_c, z_u = drf.window(tokens, cond_in, len_M + k, 1, max(len_h) + k + 1)
                z_c, z_u = z_c[:, 0], (None if z_u is None else z_u[:, 0])
            pos = (len_M + k).clamp(max=N - 1)
            traj = draft.head.reverse_trajectory(
                z_c,
                x_T[:, k],
                noises[:, :, k],
                temperature,
                ramp_N[pos] if guided else 1.0,
                z_u,
                return_path=verify == "path",
                variance=variance,
            )
            tokens[torch.arange(M, device=device), pos] = traj["x0"]  # beyond a row's cap: never read
            steps_q.append(traj)
            zq.append(z_c)
            zqu.append(z_u)
            stats["draft_forwards"] += 1
        if g > 0:
            dlen_h = [L + g for L in len_h]
        z_p, z_pu = tgt.window(tokens, cond_in, len_M, g + 1, max(len_h) + g + 1)  # one target call
        stats["target_forwards"] += 1
        row_calls += M
        pos_MW = (len_M[:, None] + torch.arange(g + 1, device=device)).clamp(max=N - 1)  # (M, g+1)
        w_MW = ramp_N[pos_MW] if guided else None  # unguided: plain float scales, no device checks
        verify_fn = partial(_verify_last, backend=backend) if verify == "last" else _verify_path
        n_M, n_h, extra, res = verify_fn(
            model,
            draft,
            steps_q,
            zq,
            zqu,
            z_p,
            z_pu,
            x_T,
            noises,
            w_MW,
            g_M,
            g_h,
            S,
            temperature,
            variance,
            mode,
            generator,
            K,
        )
        need_h = [n < gb for n, gb in zip(n_h, g_h)]
        syncs += res["rounds"]
        syncs += 1
        if any(need_h):
            tries_sum = tries_sum + res["tries"].sum()
            unfilled = unfilled + (~res["filled"] & (n_M < g_M)).sum()
            residuals += sum(need_h)
        rows = torch.arange(M, device=device)
        tokens[rows, (len_M + n_M).clamp(max=N - 1)] = extra
        for n, gb in zip(n_h, g_h):
            if gb > 0:
                stats["accepted"] += n
                stats["proposed"] += min(n + 1, gb)
                first_prop += 1
                first_acc += n >= 1
                verifications += 1
        len_h = [L + n + 1 for L, n in zip(len_h, n_h)]
        dlen_h = [min(d, L) for d, L in zip(dlen_h, len_h)]
        len_M = torch.tensor(len_h, device=device)
        tgt.rollback(len_M, rep)
        drf.rollback(len_M, rep)
        done = [m for m in range(M) if len_h[m] >= N]
        if done:
            d = torch.tensor(done, device=device)
            out[torch.tensor([sample_h[m] for m in done], device=device)] = tokens[d]
            keep = []
            for m in range(M):
                if len_h[m] < N:
                    keep.append(m)
                elif pending < total:  # refill the row with the next pending sample
                    sample_h[m], len_h[m], dlen_h[m] = pending, 0, 0
                    cond_M = cond_M.clone()
                    cond_M[m] = cond_all[pending]
                    pending += 1
                    keep.append(m)
            reset = torch.tensor(len_h, device=device)
            tgt.rollback(reset, rep)  # refilled rows start from an empty cache
            drf.rollback(reset, rep)
            if len(keep) < M:  # nothing pending: drop the finished rows
                k_M = torch.tensor(keep, device=device, dtype=torch.long)
                tokens, cond_M = tokens[k_M], cond_M[k_M]
                sample_h = [sample_h[m] for m in keep]
                len_h = [len_h[m] for m in keep]
                dlen_h = [dlen_h[m] for m in keep]
                tgt.keep(k_M, rep)
                drf.keep(k_M, rep)
    stats["tokens"] = total * N
    stats["acceptance"] = stats["accepted"] / max(1, stats["proposed"])
    stats["alpha"] = first_acc / max(1, first_prop)  # first-draft acceptance, E = sum/int min(p, q)
    stats["mean_accepted_length"] = stats["accepted"] / max(1, verifications)
    stats["row_target_forwards"] = row_calls
    stats["target_calls_per_image"] = row_calls / max(1, total)
    stats["tokens_per_target_call"] = total * N / max(1, row_calls)
    stats["draft_positions_computed"] = dstats["positions_computed"]
    stats["ar_tries"] = float(tries_sum) / max(1, residuals)  # mean A-R tries per residual token
    stats["ar_unfilled"] = int(unfilled)
    stats["syncs"] = syncs
    stats["syncs_per_sample"] = syncs / max(1, total)
    stats["seconds"] = time.perf_counter() - t0
    return out, stats


@SAMPLERS.register("cspd", CSpDConfig)
class CSpDSampler(Sampler):
    """CSpD with the draft ``draft_ckpt`` (loaded in :meth:`setup`). ``continuous = True``:
    ``cond_B`` may hold every pending sample, ``slots`` of which are in flight at once
    (continuous batching; 0 = the config's ``slots``, else all)."""

    continuous = True

    def __init__(self, cfg):
        super().__init__(cfg)
        if not cfg.draft_ckpt:
            raise ValueError("sampler.draft_ckpt must name a trained draft xar run for 'cspd'")
        if cfg.gamma < 1:
            raise ValueError(f"sampler.gamma must be >= 1, got {cfg.gamma}")
        if cfg.verify not in VERIFY:
            raise ValueError(f"sampler.verify must be one of {VERIFY}, got {cfg.verify!r}")
        check_cost_options(cfg, "cost_gammas", least=1)
        self.draft = None

    def setup(self, ctx):
        draft, _ = ctx.load(self.cfg.draft_ckpt)
        _check_pair(ctx.model, draft)
        self.draft = draft.eval()

    def __call__(self, model, cond_B, generator, progress=False, slots=0):
        if self.draft is None:
            raise RuntimeError("the cspd sampler loads its draft in setup(ctx): call it first")
        c, draft = self.cfg, self.draft

        def run(gamma, cond, g, rows):
            if gamma == 0:  # the plain xar sampler of the target CSpD follows (exact whatever the plan)
                return plain_chunks(lambda cond_b: target_sampler(model, cond_b, g, c), cond, rows)
            return sample_cspd(
                model,
                draft,
                cond,
                generator=g,
                gamma=gamma,
                temperature=c.temperature,
                num_steps=c.num_steps,
                mode=c.mode,
                verify=c.verify,
                K=c.proposals,
                cfg_scale=c.cfg_scale,
                prefill=c.prefill,
                use_cache=c.use_cache,
                slots=rows,
                variance=c.variance,
                backend=c.backend,
            )

        cond_B = cond_B.to(model.device)
        return planned(model, c, c.gamma, c.cost_gammas, cond_B, generator, slots or c.slots, run, id(draft))


def target_sampler(model, cond_B, generator, cfg: CSpDConfig):
    """The plain ``xar`` sampler whose output CSpD under ``cfg`` follows: its guidance,
    temperature and reverse steps, and the head's step variance ``cfg.variance`` (set on the
    head for this call only)."""
    head = model.head
    before = head.sample_variance
    head.sample_variance = cfg.variance or before
    try:
        return sample_xar(
            model,
            cond_B,
            generator=generator,
            cfg_scale=cfg.cfg_scale,
            temperature=cfg.temperature,
            num_steps=cfg.num_steps,
            use_cache=cfg.use_cache,
        )
    finally:
        head.sample_variance = before
