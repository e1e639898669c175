"""Sampling a :class:`~vargen.models.tarflow.TarFlow`: sequential, Jacobi and GS-Jacobi inversion.

Inverting one block means solving u = G(u) with G(u)_i = z_i exp(a_i(u_<i)) + b_i(u_<i)
in the block's permuted order (TarFlow arXiv:2412.06329; GS-Jacobi arXiv:2505.12849). G is
strictly causal, so:

- **sequential** (TarFlow's sampler, the baseline): T-1 single-token passes with a KV
  cache, token i's pass giving (a, b) of token i+1;
- **Jacobi** (GS-Jacobi paper, arXiv 2505.12849, num_GS = 1): repeat one parallel causal
  pass, u <- G(u). Token 0 is exact from the start and each pass makes one more token
  exact, so L inputs need at most L passes from ANY initial guess. Here the converged
  prefix is frozen (issue 16): a pass runs a window of inputs after the committed prefix
  against its K/V cache, then commits the input the guarantee made exact plus the following
  run whose tokens moved by at most ``tol`` per element; committed positions are never
  recomputed, so a pass costs its window, not the whole sequence (:func:`_solve_segment`);
- **GS-Jacobi**: contiguous segments of inputs solved one after another, windowed Jacobi
  inside a segment. Inputs [s, e) update tokens [s+1, e+1). A run committed by the cap
  (values still moving) gets its keys/values recomputed from the final values when later
  positions attend to it; the reference caches the stale ones.

Guidance runs a second stream with the null class (mean class embedding) in the same
batched pass and mixes a <- a + g_i (a - a_null), b likewise, annealed g_i = i/(T-1) w for
token i (TarFlow). ``cfg_scale`` follows the project's convention (1 = off), w = cfg_scale-1.
``attn_temp`` is TarFlow's attention temperature of that unguided stream alone (scores
divided by it; 1 = plain): for an unconditional model it is what the guidance pushes away from.

Counting (stats): every model pass of a block - one sequential single-token pass, one
windowed Jacobi pass or one K/V recompute, a guided pair of streams counting once - is one
target forward and one sequential pass, because the passes run one after another.
``token_rows`` counts the positions those passes push through the network per image.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace

import torch
from tqdm.auto import tqdm

from vargen.models.generator import guidance_labels
from vargen.registry import SAMPLERS
from vargen.sampling.base import Sampler
from vargen.sampling.stats import new_stats
from vargen_kernels.tarflow_step import tarflow_step

METHODS = ("sequential", "jacobi", "gs_jacobi")
INITS = ("z", "zero")

# Frozen-prefix Jacobi settings measured fastest against the KV-cached sequential loop on the
# photos TarFlow (256 tokens of 48 values, 4 blocks x 2 layers, width 128, cfg 1.5), one CPU
# thread, per batch size (issue 16; alternating timings on a shared 2-core machine, +-15%):
# - batch 1 is bound by per-pass overhead (a 64-token pass costs ~3.3 single-token steps), so a
#   wide window pays: window 64 needs 189 passes per image against 1020 (tol 1e-6: 260); passes
#   per image for windows 8 / 16 / 32 / 64 / 128 / 255: 609 / 440 / 297 / 198 / 136 / 94, token
#   rows 4817 / 6859 / 9023 / 11496 / 14861 / 20700. Every token needs ~10-15 Jacobi updates before
#   it moves by < tol (the deltas after the frozen front decay ~0.65x per pass), so a pass's rows
#   cost what its fewer passes save: per-block windows timed by tarflow_cost gained <10% on 4
#   calibration images, within the noise, and ran slower on 8 (1.54 vs 1.64), so batch 1 keeps 64;
# - batch 16 is bound by the rows pushed through the network (a W-token pass costs ~W/2+ steps):
#   Jacobi pays on no block of this model (tarflow_cost.calibrate_cost at batch 16: sequential
#   0.53-0.84 s per block on 16 rows, the best Jacobi window 0.72-0.99 s; window 2 everywhere read
#   0.82x in the benchmark, continuous batching ~0.7x), so ``policy: "cost"`` times each block at
#   this batch size (``calib`` rows of seeded noise, candidate ``windows``) and keeps the sequential
#   loop where Jacobi does not pay: every block here, ~1.0x by construction.
# tol 1e-4 per element keeps the images within 3.9e-4 of the sequential ones (2e-4 reached 7.5e-4,
# 3e-4 1.1e-3). ``continuous``: refill freed rows (sample_tarflow_continuous) or run chunks.
JACOBI_CPU = {
    1: {"window": 64, "tol": 1e-4, "continuous": True},
    16: {"window": 2, "tol": 1e-4, "continuous": False, "policy": "cost", "windows": [2, 4, 8], "calib": 16},
}


def jacobi_cpu_setting(batch: int) -> dict:
    """The :data:`JACOBI_CPU` entry of the largest measured batch size <= ``batch`` (at least 1)."""
    return dict(JACOBI_CPU[max(b for b in JACOBI_CPU if b <= max(batch, 1))])


@dataclass(frozen=True)
class BlockPlan:
    """How one block is inverted: method, GS segments, cap on updates per token (0 = none:
    the exactness guarantee bounds the passes), init, Jacobi window (0 = whole segment)."""

    method: str = "sequential"
    segments: int = 1
    max_iters: int = 0
    init: str = "z"
    window: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.segments < 1 or self.max_iters < 0 or self.window < 0:
            raise ValueError(
                f"need segments >= 1, max_iters >= 0, window >= 0, got {self.segments}, "
                f"{self.max_iters}, {self.window}"
            )


def _cond_rows(block, cond_B, guidance):
    """Labels of the rows of one pass: (B,), or (2B,) = conditional then null when guided."""
    return guidance_labels(cond_B, block.null_class, guidance is not None)


def _stream_rows(u_BLC, guidance):
    """Inputs of one pass: the tokens, twice when guided (both streams see the same u)."""
    return u_BLC if guidance is None else torch.cat([u_BLC, u_BLC])  # (R, L, C)


def _temp_rows(cond_R, guidance, attn_temp):
    """Attention temperature per pass row, (R,): 1 for the conditional stream, ``attn_temp``
    for the unguided one; None when every row has 1 (the plain attention, bit for bit)."""
    if guidance is None or attn_temp == 1.0:
        return None
    B = cond_R.shape[0] // 2
    temp_R = torch.ones(2 * B, device=cond_R.device)
    temp_R[B:] = attn_temp
    return temp_R


def _anneal(tok, guidance, T):
    """Annealed guidance weight of tokens ``tok`` (float64), g_i = i / (T - 1) w, rounded once to
    the model dtype afterwards: the reference's float arithmetic, so guided samples match it."""
    return tok / (T - 1) * guidance


def _anneal_table(block, guidance, dtype, device):
    """(T, 1) annealed guidance weights of every token, g_t = t / (T - 1) w, built once per block
    inversion (the same float64 arithmetic as :func:`_anneal`, so the same values); None unguided."""
    if guidance is None:
        return None
    tok = torch.arange(block.num_tokens, dtype=torch.float64, device=device)
    return _anneal(tok, guidance, block.num_tokens).to(dtype)[:, None]


def _guided_params(block, u_BLC, cond_R, cache, guidance, temp_R=None, g_T1=None):
    """(a, b) for tokens start+1..start+L from ONE pass, with the annealed guidance mix.

    The mix runs once on the joint (a, b) output (:meth:`FlowBlock.params_joint`), elementwise
    the same as mixing a and b apart; ``g_T1`` (:func:`_anneal_table`) saves rebuilding the
    weights every pass."""
    start = 0 if cache is None else cache.length
    B, L = u_BLC.shape[:2]
    ab = block.params_joint(_stream_rows(u_BLC, guidance), cond_R, cache, temp_R)  # (R, L, 2C)
    if guidance is not None:
        if g_T1 is None:
            g_T1 = _anneal_table(block, guidance, ab.dtype, ab.device)
        g_L1 = g_T1[start + 1 : start + L + 1]  # (L, 1): g_i = i/(T-1) w
        ab = ab[:B] + g_L1 * (ab[:B] - ab[B:])
    return ab.chunk(2, dim=-1)


def _affine(z, a, b, clamp):
    u = z * torch.exp(a) + b
    return u if clamp is None else u.clamp(-clamp, clamp)


def initial_guess(z_BTC, init: str):
    """u^0: "z" = z itself; "zero" = [z_0, 0, ..., 0]. Token 0 is exact either way."""
    if init == "z":
        return z_BTC.clone()
    u = torch.zeros_like(z_BTC)
    u[:, 0] = z_BTC[:, 0]
    return u


@torch.no_grad()
def invert_block_sequential(block, z_BTC, cond_B, *, guidance: float | None = None, attn_temp: float = 1.0):
    """Sequential inverse, permuted order in and out: ((B, T, C) u, {"iterations", "passes"})."""
    T = z_BTC.shape[1]
    cond_R = _cond_rows(block, cond_B, guidance)
    temp_R = _temp_rows(cond_R, guidance, attn_temp)
    cache = block.new_cache(cond_R.shape[0])
    g_T1 = _anneal_table(block, guidance, z_BTC.dtype, z_BTC.device)
    u = z_BTC.clone()  # token 0: a = b = 0
    for i in range(T - 1):
        a, b = _guided_params(block, u[:, i : i + 1], cond_R, cache, guidance, temp_R, g_T1)  # token i+1
        cache.advance(1)
        u[:, i + 1 : i + 2] = _affine(z_BTC[:, i + 1 : i + 2], a, b, None)
    info = {"iterations": T - 1, "passes": T - 1, "token_rows": T - 1, "syncs": 0, "forced": 0}
    return u, info


def _check_every(check_every: int, device) -> int:
    """Passes between convergence reads; 0 = auto: every pass on CPU (a host read costs
    nothing there), every 4th on an accelerator (each read stalls the launch queue)."""
    if check_every > 0:
        return check_every
    return 1 if torch.device(device).type == "cpu" else 4


@torch.no_grad()
def _solve_segment(
    block, z_BTC, u_BTC, cond_R, cache, s, e, *, window, cap, tol, clamp, guidance, every, temp_R=None
):
    """Frozen-prefix Jacobi on inputs [s, e) (tokens s+1..e), in place in ``u_BTC``.

    On entry tokens 0..s are final and inputs < s are committed to ``cache`` (length s);
    on exit inputs [s, e) are too. State: c = committed inputs, tokens 0..c final. A pass
    runs the window of inputs [c, w), w = min(c + window, e) (window 0 = up to e), against
    the cache and gives tokens c+1..w. Input c is final, so its keys/values and token c+1
    are exact: input c is always committed (strict causality; at most e - s passes). The
    inputs after it, c+1.., are committed too while they form a run whose tokens moved by at
    most ``tol`` per element in this pass (max |delta| over rows and values: its meaning does
    not depend on the batch size; tol < 0 never commits early) or were updated ``cap`` times
    (0 = no cap). Keys/values of a run are those of this pass's inputs, within tol of the
    final values; a run forced by the cap is recomputed from the final values (one more pass)
    unless nothing attends to it any more. Convergence is read on the host (one sync) only
    every ``every`` passes; the passes between commit the guaranteed token alone.

    Returns {"iterations", "passes", "token_rows" (positions per stream row), "syncs", "forced"}.
    """
    n_in = block.num_tokens - 1
    age = [0] * (e + 1) if cap > 0 else None  # updates of token j in this segment (host-side: no sync)
    g_T1 = _anneal_table(block, guidance, z_BTC.dtype, z_BTC.device)
    c, k = s, 0
    out = {"iterations": 0, "passes": 0, "token_rows": 0, "syncs": 0, "forced": 0}
    while c < e:
        w = e if window <= 0 else min(c + window, e)
        a, b = _guided_params(block, u_BTC[:, c:w], cond_R, cache, guidance, temp_R, g_T1)  # tokens c+1..w
        new = _affine(z_BTC[:, c + 1 : w + 1], a, b, clamp)  # (B, w - c, C)
        k += 1
        out["token_rows"] += w - c
        check = tol >= 0 and w - c > 1 and k % every == 0
        if age is None:  # no cap: the committed run is the leading run of tol verdicts, read as one count
            run = 0
            if check:
                d_n = (new[:, :-1] - u_BTC[:, c + 1 : w]).abs().amax(dim=(0, 2))  # (w-c-1,) max |delta|
                run = int((d_n <= tol).cumprod(0).sum())  # the one host sync of this pass
                out["syncs"] += 1
            u_BTC[:, c + 1 : w + 1] = new
            cache.advance(1 + run)
            c += 1 + run
            continue
        ok = []  # tol verdicts of inputs c+1..w-1, read on check passes only
        if check:
            d_n = (new[:, :-1] - u_BTC[:, c + 1 : w]).abs().amax(dim=(0, 2))  # (w-c-1,) max |delta|
            ok = (d_n <= tol).tolist()  # the one host sync of this pass
            out["syncs"] += 1
        u_BTC[:, c + 1 : w + 1] = new
        for j in range(c + 1, w + 1):
            age[j] += 1
        run, forced_from = 0, None  # committed inputs c+1 .. c+run; first one forced by the cap
        for i, j in enumerate(range(c + 1, w)):
            by_tol = i < len(ok) and ok[i]
            if not (by_tol or age[j] >= cap):
                break
            if not by_tol and forced_from is None:
                forced_from = j
            run += 1
        new_c = c + 1 + run
        if forced_from is not None and new_c < n_in:  # later passes attend to stale keys/values
            cache.advance(forced_from - c)
            block.params(_stream_rows(u_BTC[:, forced_from:new_c], guidance), cond_R, cache, temp_R)
            cache.advance(new_c - forced_from)
            out["passes"] += 1
            out["token_rows"] += new_c - forced_from
        else:
            cache.advance(new_c - c)
        out["forced"] += 0 if forced_from is None else new_c - forced_from
        c = new_c
    out["iterations"] = k
    out["passes"] += k
    return out


@torch.no_grad()
def invert_block_gs_jacobi(
    block,
    z_BTC,
    cond_B,
    *,
    segments: int = 1,
    window: int = 0,
    max_iters: int = 0,
    tol: float = 1e-6,
    init: str = "z",
    clamp: float | None = None,
    guidance: float | None = None,
    check_every: int = 1,
    attn_temp: float = 1.0,
):
    """Gauss-Seidel over ``segments`` contiguous segments, frozen-prefix Jacobi inside each.

    The T-1 inputs 0..T-2 are cut into segments of S = ceil((T-1)/segments) tokens, solved
    one after another by :func:`_solve_segment` with a sliding ``window`` (0 = the rest of
    the segment), ``tol`` (per element), a cap of ``max_iters`` updates per token (0 = none:
    at most S passes per segment, the exactness guarantee) and a convergence read every
    ``check_every`` passes. Committed positions are never recomputed.
    Returns (u_BTC, {"iterations", "passes", "token_rows", "syncs", "forced", "segment_iterations"}).
    """
    n_in = z_BTC.shape[1] - 1
    size = -(-n_in // segments)  # ceil
    cond_R = _cond_rows(block, cond_B, guidance)
    temp_R = _temp_rows(cond_R, guidance, attn_temp)
    cache = block.new_cache(cond_R.shape[0])
    u = initial_guess(z_BTC, init)
    info = {"iterations": 0, "passes": 0, "token_rows": 0, "syncs": 0, "forced": 0, "segment_iterations": []}
    for s in range(0, n_in, size):
        e = min(s + size, n_in)
        seg = _solve_segment(
            block,
            z_BTC,
            u,
            cond_R,
            cache,
            s,
            e,
            window=window,
            cap=max_iters,
            tol=tol,
            clamp=clamp,
            guidance=guidance,
            every=check_every,
            temp_R=temp_R,
        )
        for key, v in seg.items():
            info[key] += v
        info["segment_iterations"].append(seg["iterations"])
    return u, info


def invert_block_jacobi(block, z_BTC, cond_B, **kw):
    """Plain Jacobi: GS-Jacobi with one segment (a window slides over all T-1 inputs)."""
    return invert_block_gs_jacobi(block, z_BTC, cond_B, segments=1, **kw)


@torch.no_grad()
def invert_block_continuous(
    block,
    z_NTC,
    cond_N,
    *,
    slots: int,
    window: int = 0,
    tol: float = 1e-6,
    init: str = "z",
    clamp: float | None = None,
    guidance: float | None = None,
    check_every: int = 1,
    backend: str = "auto",
    attn_temp: float = 1.0,
    one_slot_fast: bool = True,
):
    """Frozen-prefix Jacobi for N rows through ``slots`` batch rows with refilling (issue 16).

    Each slot holds one row with its own committed length c_b in a
    :class:`~vargen.nn.kv_cache.RaggedKVCache`. A pass runs inputs c_b .. c_b+w-1 of
    every slot, w = ``window`` (0 = T-1) or less when no row has that many inputs left
    (positions past a row's sequence are padding, counted in ``token_rows``), and
    commits per row as :func:`_solve_segment` does (input c_b, then the run of inputs whose
    tokens moved by at most ``tol`` per element), on the device. A row whose inputs are all
    committed hands its slot to the next pending row (rows in order), so the batch stays
    full until the rows run out; then it shrinks. Rows never interact, so a row's result
    does not depend on its slot or neighbours. Host reads: one every ``check_every`` passes
    (the finished rows; between reads a finished row idles on padding, counted in
    ``row_passes``); between reads the attended width comes from a host-side bound on the
    committed lengths (grown by the window per pass, exact after each read). Returns (u_NTC, info);
    ``row_passes`` sums the occupied slots over passes (model rows per image = row_passes / N).
    One slot read every pass (``one_slot_fast``) takes :func:`_one_slot`: the same commits
    through the plain KV cache, 1.1-1.35x faster per pass at batch 1 on one CPU thread (window 2-64).
    """
    N, T, C = z_NTC.shape
    n_in = T - 1
    W = n_in if window <= 0 else min(window, n_in)
    S, R = min(slots, N), (1 if guidance is None else 2)
    if S == 1 and check_every == 1 and one_slot_fast:  # batch 1: the uniform-cache path
        return _one_slot(block, z_NTC, cond_N, window, tol, init, clamp, guidance, attn_temp)
    dev = z_NTC.device
    out = initial_guess(z_NTC, init)  # (N, T, C): iterates of pending rows, results of done ones
    pad = z_NTC.new_zeros(S, W, C)  # positions T .. T+W-1: padding of windows past the end
    U = torch.cat([out[:S], pad], 1)  # (S, T+W, C) slot iterates
    Z = torch.cat([z_NTC[:S], pad], 1)  # (S, T+W, C)
    cond_S, rows = cond_N[:S].clone(), list(range(S))
    c_S = torch.zeros(S, dtype=torch.long, device=dev)  # committed inputs per slot
    cache = block.new_cache(R * S, window=W)
    nxt, width = S, W

    info = {"iterations": 0, "passes": 0, "token_rows": 0, "syncs": 0, "forced": 0, "row_passes": 0}
    bound = 0  # host-side upper bound on max(c_S): grows by the width per pass, exact at reads
    while rows:
        S = len(rows)
        cache.length_B, cache.bound = c_S.repeat(R), bound
        pos_SW = c_S[:, None] + torch.arange(width, device=dev)  # input positions c_b .. c_b+width-1
        x_SWC = U.gather(1, pos_SW[..., None].expand(S, width, C))
        cond_R = _cond_rows(block, cond_S, guidance)
        a, b = block.params(
            _stream_rows(x_SWC, guidance), cond_R, cache, _temp_rows(cond_R, guidance, attn_temp)
        )
        if guidance is not None:  # annealed per output token, g_i = i/(T-1) w
            g_SW1 = _anneal((pos_SW + 1).double(), guidance, T).to(a.dtype)[..., None]
            a = a[:S] + g_SW1 * (a[:S] - a[S:])
            b = b[:S] + g_SW1 * (b[:S] - b[S:])
        tok_SWC = (pos_SW + 1)[..., None].expand(S, width, C)  # output tokens c_b+1 .. c_b+width
        if tol >= 0:  # update and max |move| per token in one fused pass (vargen_kernels.tarflow_step)
            old = U.gather(1, tok_SWC)
            new, moved_SW = tarflow_step(Z.gather(1, tok_SWC), a, b, old, clamp, backend=backend)
        else:
            new = _affine(Z.gather(1, tok_SWC), a, b, clamp)  # (S, width, C)
        U.scatter_(1, tok_SWC, new)
        if tol >= 0:  # input c_b+i (i >= 1) commits if tokens c_b+1..c_b+i moved <= tol, c_b+i < T-1
            ok_SW = moved_SW <= tol
            ok_SW = ok_SW[:, :-1] & (pos_SW[:, 1:] < n_in)  # (S, width-1)
            c_S = c_S + 1 + ok_SW.long().cumprod(1).sum(1)
        else:
            c_S = c_S + 1
        c_S = c_S.clamp(max=n_in)  # a finished row idles on padding until the next read
        info["passes"] += 1
        info["row_passes"] += S
        info["token_rows"] += S * width
        bound = min(bound + width, n_in)
        if info["passes"] % check_every:
            continue
        info["syncs"] += 1
        c_list = c_S.tolist()
        keep = []
        for slot, c in enumerate(c_list):
            if c < n_in:
                keep.append(slot)
                continue
            out[rows[slot]] = U[slot, :T]
            if nxt < N:  # refill: the next pending row takes the slot, from its initial guess
                U[slot, :T], Z[slot, :T], cond_S[slot] = out[nxt], z_NTC[nxt], cond_N[nxt]
                c_S[slot], c_list[slot], rows[slot] = 0, 0, nxt
                nxt += 1
                keep.append(slot)
        if len(keep) < S:  # the rows ran out: shrink the batch
            k_S = torch.tensor(keep, dtype=torch.long, device=dev)
            k_R = torch.cat([k_S + r * S for r in range(R)])
            U, Z, cond_S, c_S = U[k_S], Z[k_S], cond_S[k_S], c_S[k_S]
            rows = [rows[i] for i in keep]
            cache.k = [t[k_R] for t in cache.k]
            cache.v = [t[k_R] for t in cache.v]
        if keep:  # no wider than the most remaining inputs of any row
            width = min(W, n_in - min(c_list[i] for i in keep))
            bound = max(c_list[i] for i in keep)
    info["iterations"] = info["passes"]
    info["token_rows"] /= N
    return out, info


def _one_slot(block, z_NTC, cond_N, window, tol, init, clamp, guidance, attn_temp):
    """:func:`invert_block_continuous` with one slot, read every pass: the rows run one after
    another, so every pass's committed length is the same for all its rows and the plain
    :class:`~vargen.nn.kv_cache.KVCache` path (:func:`_solve_segment`) makes the same commits
    without the ragged cache's per-pass mask, gathers and scatters and with attention over the
    row's own prefix (the batch-1 fast path; tests/test_tarflow.py checks it against the ragged
    path). Same (u_NTC, info) as the general path."""
    N = z_NTC.shape[0]
    out = torch.empty_like(z_NTC)
    info = {"iterations": 0, "passes": 0, "token_rows": 0, "syncs": 0, "forced": 0, "row_passes": 0}
    for n in range(N):
        u, part = invert_block_gs_jacobi(
            block,
            z_NTC[n : n + 1],
            cond_N[n : n + 1],
            window=window,
            tol=tol,
            init=init,
            clamp=clamp,
            guidance=guidance,
            check_every=1,
            attn_temp=attn_temp,
        )
        out[n] = u[0]
        for key in ("passes", "token_rows", "syncs", "forced"):
            info[key] += part[key]
    info["iterations"] = info["row_passes"] = info["passes"]
    info["token_rows"] /= N
    return out, info


def _invert_block(
    block, zp_BTC, cond_B, plan: BlockPlan, *, tol, clamp, guidance, check_every, attn_temp=1.0
):
    """One block by its plan, permuted order in and out: (u_BTC, info)."""
    if plan.method == "sequential":
        return invert_block_sequential(block, zp_BTC, cond_B, guidance=guidance, attn_temp=attn_temp)
    return invert_block_gs_jacobi(
        block,
        zp_BTC,
        cond_B,
        segments=plan.segments if plan.method == "gs_jacobi" else 1,
        window=plan.window,
        max_iters=plan.max_iters,
        tol=tol,
        init=plan.init,
        clamp=clamp,
        guidance=guidance,
        check_every=check_every,
        attn_temp=attn_temp,
    )


@torch.no_grad()
def invert_tarflow(
    model,
    z_BTC,
    cond_B,
    plans: list[BlockPlan],
    *,
    tol: float = 1e-6,
    clamp: float | None = None,
    guidance: float | None = None,
    check_every: int = 1,
    progress: bool = False,
    attn_temp: float = 1.0,
):
    """z -> x through all blocks in reverse; ``plans`` are in sampling (reverse block) order."""
    if len(plans) != len(model.blocks):
        raise ValueError(f"{len(plans)} block plans for {len(model.blocks)} blocks")
    x, infos = z_BTC, []
    order = list(reversed(model.blocks))
    for block, plan in tqdm(list(zip(order, plans)), desc="blocks", disable=not progress, leave=False):
        u, info = _invert_block(
            block,
            block.permute(x),
            cond_B,
            plan,
            tol=tol,
            clamp=clamp,
            guidance=guidance,
            check_every=check_every,
            attn_temp=attn_temp,
        )
        x = block.permute(u)
        infos.append(info)
    return x, infos


@torch.no_grad()
def sample_tarflow(
    model,
    cond_B: torch.Tensor,
    *,
    generator: torch.Generator,
    method: str = "sequential",
    cfg_scale: float = 1.0,
    attn_temp: float = 1.0,
    tol: float = 1e-6,
    max_iters: int = 0,
    segments: int = 8,
    init: str = "z",
    window: int = 0,
    check_every: int = 0,
    policy: list[BlockPlan] | None = None,
    clamp: float | None = None,
    denoise: bool = True,
    progress: bool = False,
):
    """Draw images (B, C, H, W) in [0, 1] for labels ``cond_B``; returns (images, stats).

    z ~ N(0, I) is drawn as one (B, T, C_p) tensor on the generator's device. ``policy``
    (one :class:`BlockPlan` per block, sampling order) overrides method / segments /
    max_iters / init / window. ``denoise`` applies the Tweedie step (one forward + backward
    of the whole flow, counted in ``denoise_forwards``, not in ``target_forwards``).

    Stats besides the common record: ``positions_computed`` (token positions pushed through
    the network, over passes and image rows; a guided pair of streams counts once, as in
    ``target_forwards``), ``token_rows`` = that per image, ``syncs`` (host reads of a
    convergence test in this call; one per batch, so also per image at batch 1),
    ``forced_tokens`` (committed by the cap, not by convergence), ``images``.
    """
    t0 = time.perf_counter()
    p = next(model.parameters())
    cond_B = cond_B.to(p.device)
    B, T, C = cond_B.shape[0], model.num_tokens, model.token_dim
    plans = policy or [BlockPlan(method, segments, max_iters, init, window)] * len(model.blocks)
    guidance = None if cfg_scale == 1.0 else cfg_scale - 1.0
    z = torch.randn(B, T, C, generator=generator, device=generator.device, dtype=p.dtype).to(p.device)
    every = _check_every(check_every, p.device)
    x, infos = invert_tarflow(
        model,
        z,
        cond_B,
        plans,
        tol=tol,
        clamp=clamp,
        guidance=guidance,
        check_every=every,
        progress=progress,
        attn_temp=attn_temp,
    )
    if denoise:
        x = model.denoise(x, cond_B)
    stats = new_stats()
    passes = [i["passes"] for i in infos]
    stats.update(
        target_forwards=sum(passes),
        sequential_passes=sum(passes),
        baseline_passes=len(infos) * (T - 1),  # the sequential sampler's count
        passes_per_block=passes,
        iterations_per_block=[i["iterations"] for i in infos],
        denoise_forwards=len(model.blocks) if denoise else 0,
        tokens=B * T,
        accepted=B * T,
        proposed=B * T,
        plans=[asdict(pl) for pl in plans],
        positions_computed=B * sum(i["token_rows"] for i in infos),
        token_rows=sum(i["token_rows"] for i in infos),
        token_rows_per_block=[i["token_rows"] for i in infos],
        syncs=sum(i["syncs"] for i in infos),
        forced_tokens=sum(i["forced"] for i in infos),
        images=B,
    )
    stats["seconds"] = time.perf_counter() - t0
    return model.to_images(x), stats


@torch.no_grad()
def sample_tarflow_continuous(
    model,
    cond_N: torch.Tensor,
    *,
    generator: torch.Generator,
    slots: int,
    method: str = "jacobi",
    cfg_scale: float = 1.0,
    attn_temp: float = 1.0,
    tol: float = 1e-6,
    max_iters: int = 0,
    segments: int = 8,
    init: str = "z",
    window: int = 0,
    check_every: int = 0,
    policy: list[BlockPlan] | None = None,
    clamp: float | None = None,
    denoise: bool = True,
    progress: bool = False,
    backend: str = "auto",
):
    """All N images through ``slots`` batch rows (continuous batching); returns (images, stats).

    z ~ N(0, I) is drawn as one (N, T, C_p) tensor. The blocks run one after another (each
    needs the previous block's output of a row); inside a block a plain Jacobi plan without
    a cap runs :func:`invert_block_continuous`, where a row that finishes early frees its
    slot for the next row; other plans (sequential, GS segments, a cap) run chunks of
    ``slots`` rows, and so does the Tweedie step. Stats as :func:`sample_tarflow` over the
    whole run, plus ``row_passes`` (rows over model calls) and ``target_calls_per_image``.
    ``backend``: how :func:`invert_block_continuous` runs its fused update step.
    """
    t0 = time.perf_counter()
    p = next(model.parameters())
    cond_N = cond_N.to(p.device)
    N, T, C = cond_N.shape[0], model.num_tokens, model.token_dim
    plans = policy or [BlockPlan(method, segments, max_iters, init, window)] * len(model.blocks)
    guidance = None if cfg_scale == 1.0 else cfg_scale - 1.0
    every = _check_every(check_every, p.device)
    x = torch.randn(N, T, C, generator=generator, device=generator.device, dtype=p.dtype).to(p.device)
    infos = []
    for block, plan in tqdm(list(zip(reversed(model.blocks), plans)), disable=not progress, leave=False):
        zp = block.permute(x)
        if plan.method == "jacobi" and plan.max_iters == 0:
            u, info = invert_block_continuous(
                block,
                zp,
                cond_N,
                slots=slots,
                window=plan.window,
                tol=tol,
                init=plan.init,
                clamp=clamp,
                guidance=guidance,
                check_every=every,
                backend=backend,
                attn_temp=attn_temp,
            )
            info["token_rows"] *= N  # summed over rows below, then divided by N
        else:
            parts, info = [], {"passes": 0, "token_rows": 0, "syncs": 0, "forced": 0, "row_passes": 0}
            for i in range(0, N, slots):
                v, part = _invert_block(
                    block,
                    zp[i : i + slots],
                    cond_N[i : i + slots],
                    plan,
                    tol=tol,
                    clamp=clamp,
                    guidance=guidance,
                    check_every=every,
                    attn_temp=attn_temp,
                )
                parts.append(v)
                for key in ("passes", "syncs", "forced"):
                    info[key] += part[key]
                info["token_rows"] += v.shape[0] * part["token_rows"]
                info["row_passes"] += v.shape[0] * part["passes"]
            u = torch.cat(parts)
        infos.append(info)
        x = block.permute(u)
    if denoise:
        x = torch.cat([model.denoise(x[i : i + slots], cond_N[i : i + slots]) for i in range(0, N, slots)])
    stats = new_stats()
    passes = [i["passes"] for i in infos]
    row_passes = sum(i["row_passes"] for i in infos)
    stats.update(
        target_forwards=sum(passes),
        sequential_passes=sum(passes),
        baseline_passes=len(infos) * (T - 1) * -(-N // slots),  # the sequential sampler's count
        passes_per_block=passes,
        denoise_forwards=len(model.blocks) * -(-N // slots) if denoise else 0,
        tokens=N * T,
        accepted=N * T,
        proposed=N * T,
        plans=[asdict(pl) for pl in plans],
        positions_computed=round(sum(i["token_rows"] for i in infos)),
        token_rows=sum(i["token_rows"] for i in infos) / N,
        token_rows_per_block=[i["token_rows"] / N for i in infos],
        syncs=sum(i["syncs"] for i in infos),
        forced_tokens=sum(i["forced"] for i in infos),
        images=N,
        slots=slots,
        row_passes=row_passes,
        target_calls_per_image=row_passes / N,
    )
    stats["seconds"] = time.perf_counter() - t0
    return model.to_images(x), stats


# ---------------------------------------------------------------------- strategy (GS-Jacobi)
@torch.no_grad()
def crm_igm(model, images_BCHW) -> dict:
    """Per-block strategy metrics from real images, model block order, each (num_blocks,).

    As the GS-Jacobi reference (encoreus/GS-Jacobi_for_TarFlow, ``MetaBlock.forward`` in
    detect mode, ``--norm 2``): the images go through the flow with the null class (its
    ``y=None``, the mean class embedding) in every block, and every norm of a (T, C) or
    weight matrix is the spectral 2-norm. CRM (convergence-ranking metric) =
    ||mean_B(exp(-a) * u)||_2 ||W_a||_2 + ||W_b||_2 with W_a, W_b the log-scale / shift halves
    of proj_out: a Lipschitz-style proxy for how strongly tokens couple. IGM for each init =
    ||mean_B(G(u^0) - u_true)||_2: one Jacobi step from that guess on the true z.
    """
    x = model.to_tokens(images_BCHW.to(model.device, model.dtype))  # (B, T, C)
    null_B = torch.full((x.shape[0],), model.null_class, dtype=torch.long, device=model.device)
    C = model.token_dim
    out = {"crm": [], "igm_z": [], "igm_zero": []}
    for block in model.blocks:
        u = block.permute(x)  # the block's true input
        a, b = block.shifted_params(u, null_B)
        z = (u - b) * torch.exp(-a)
        W = block.proj_out.weight  # (2C, D)
        m = (torch.exp(-a) * u).mean(0)  # (T, C)
        crm = torch.linalg.matrix_norm(m, 2) * torch.linalg.matrix_norm(W[:C], 2)
        out["crm"].append(crm + torch.linalg.matrix_norm(W[C:], 2))
        for init in INITS:
            a0, b0 = block.shifted_params(initial_guess(z, init), null_B)
            step = z * torch.exp(a0) + b0  # G(u^0)
            out[f"igm_{init}"].append(torch.linalg.matrix_norm((step - u).mean(0), 2))  # (T, C) -> spectral
        x = block.permute(z)
    return {k: torch.stack(v).float().cpu() for k, v in out.items()}


def choose_policy(measured: list[dict], *, gs_segments: int = 8, gs_max_iters: int = 32, window: int = 0):
    """Per-block plans in SAMPLING order from Jacobi runs measured by :func:`calibrate_policy`.

    ``measured[j][init]`` = {"passes", "forced", "max_iters"} of block j's frozen-prefix
    Jacobi from that init. Each block starts from the init that converged (no token forced
    by the cap) in fewer passes (ties: z). A
    block whose Jacobi converged within its cap (no token committed by the cap) keeps plain
    Jacobi with that cap; one where the cap forced tokens gets GS-Jacobi with
    ``gs_segments`` segments capped at ``gs_max_iters`` updates per token.
    """
    plans = []
    for m in measured:
        init = min(INITS, key=lambda i: (m[i]["forced"] > 0, m[i]["passes"], INITS.index(i)))
        if m[init]["forced"] == 0:
            plans.append(BlockPlan("jacobi", 1, m[init]["max_iters"], init, window))
        else:
            plans.append(BlockPlan("gs_jacobi", gs_segments, gs_max_iters, init, window))
    return plans


@torch.no_grad()
def calibrate_policy(
    model,
    cond_B,
    generator: torch.Generator,
    *,
    window: int = 0,
    max_iters: int = 0,
    tol: float = 1e-6,
    gs_segments: int = 8,
    gs_max_iters: int = 32,
    clamp: float | None = None,
    guidance: float | None = None,
    check_every: int = 1,
    attn_temp: float = 1.0,
):
    """Measure, then choose (issue 16): plans (sampling order) and the measurements.

    Draws a calibration batch z ~ N(0, I) for labels ``cond_B`` from ``generator`` and walks
    the blocks in sampling order: each block is inverted by frozen-prefix Jacobi (``window``,
    cap ``max_iters``, ``tol``) from both inits, :func:`choose_policy` picks the plan, and
    that plan's output feeds the next block, so every block is measured on the inputs it sees
    when sampling. Returns (plans, {"measured": per block per init, "passes": of the plans}).
    """
    p = next(model.parameters())
    B, T, C = cond_B.shape[0], model.num_tokens, model.token_dim
    cond_B = cond_B.to(p.device)
    x = torch.randn(B, T, C, generator=generator, device=generator.device, dtype=p.dtype).to(p.device)
    kw = dict(tol=tol, clamp=clamp, guidance=guidance, check_every=check_every, attn_temp=attn_temp)
    plans, measured, passes = [], [], []
    for block in reversed(model.blocks):
        zp = block.permute(x)
        m, outs = {}, {}
        for init in INITS:
            outs[init], info = invert_block_gs_jacobi(
                block, zp, cond_B, window=window, max_iters=max_iters, init=init, **kw
            )
            m[init] = {"passes": info["passes"], "forced": info["forced"], "max_iters": max_iters}
        (plan,) = choose_policy([m], gs_segments=gs_segments, gs_max_iters=gs_max_iters, window=window)
        if plan.method == "jacobi":
            u, n = outs[plan.init], m[plan.init]["passes"]
        else:
            u, info = invert_block_gs_jacobi(
                block,
                zp,
                cond_B,
                segments=plan.segments,
                window=window,
                max_iters=plan.max_iters,
                init=plan.init,
                **kw,
            )
            n = info["passes"]
        plans.append(plan)
        measured.append(m)
        passes.append(n)
        x = block.permute(u)
    return plans, {"measured": measured, "passes": passes}


def stack_policy(num_blocks: int, gs_blocks, segments: int, gs_max_iters: int, max_iters: int, init: str):
    """The paper's [Stack-GS-J-Else] notation: ``gs_blocks`` (sampling-order indices) get
    GS-Jacobi with ``segments`` segments capped at ``gs_max_iters``; the others Jacobi
    capped at ``max_iters``. [6-8-32-10] = stack_policy(n, [6], 8, 32, 10, init)."""
    jac = BlockPlan("jacobi", 1, max_iters, init)
    gs = replace(jac, method="gs_jacobi", segments=segments, max_iters=gs_max_iters)
    return [gs if j in set(gs_blocks) else jac for j in range(num_blocks)]


@dataclass
class TarFlowSamplerConfig:
    name: str = "tarflow"
    method: str = "sequential"  # sequential | jacobi | gs_jacobi (every block) | auto (measured policy)
    cfg_scale: float = 1.0  # 1 = off; annealed over tokens per TarFlow
    attn_temp: float = 1.0  # attention temperature of the unguided (null-class) stream; 1 = plain
    tol: float = 1e-6  # Jacobi commit: max |u^{k+1} - u^k| per element <= tol; < 0 = guaranteed token only
    max_iters: int = 0  # Jacobi cap on updates per token; 0 = none (the exactness guarantee)
    segments: int = 8  # GS-Jacobi segments (num_GS)
    init: str = "z"  # z | zero
    window: int = 0  # frozen-prefix Jacobi window in tokens; 0 = the rest of the segment
    check_every: int = 0  # passes between host reads of convergence; 0 = auto (1 on CPU, 4 on GPU)
    clamp: float = 0.0  # overflow clamp of Jacobi iterates to [-clamp, clamp]; 0 = off
    denoise: bool = True  # Tweedie step after sampling
    gs_blocks: list[int] = field(default_factory=list)  # non-empty: [Stack-GS-J-Else] policy
    gs_max_iters: int = 32  # cap per token in GS segments (gs_blocks, and auto's unconverged blocks)
    calib: int = 32  # auto: rows of the calibration batch (labels cycle through the classes)
    calib_seed: int = 0  # auto: seed of the calibration noise (its own generator, not the sampler's)
    # auto: how the per-block plan is chosen. "passes": Jacobi unless the cap forced tokens, then
    # GS-Jacobi (calibrate_policy); "cost": the measured cheapest of the sequential loop and
    # Jacobi at each of ``cost_windows`` per block (tarflow_cost.calibrate_cost), timed in batches
    # of ``calib_batch`` rows (the batch size the run samples at; 0 = all ``calib`` rows at once)
    auto_by: str = "passes"
    cost_windows: list[int] = field(default_factory=lambda: [2, 4, 8, 16, 32, 64])
    calib_batch: int = 0
    backend: str = "auto"  # continuous Jacobi's step kernel: auto | triton | interpret | torch


@SAMPLERS.register("tarflow", TarFlowSamplerConfig)
class TarFlowSampler(Sampler):
    """Inverts the flow's blocks as the config says (:func:`sample_tarflow`), images in [0, 1].

    ``method=auto`` measures the plan in :meth:`setup` for the run's model
    (:func:`calibrate_policy` on ``calib`` rows of its own seeded noise, guided like the
    sampler): plain Jacobi per block unless the cap ``max_iters`` forced tokens there, then
    GS-Jacobi. With the default cap 0 every block stays Jacobi (exact, at most T-1 passes).
    ``auto_by="cost"`` instead times the sequential loop and Jacobi at each of ``cost_windows``
    per block (:func:`~vargen.sampling.decoders.tarflow_cost.calibrate_cost`, batches of
    ``calib_batch`` rows) and keeps the cheapest: sequential where Jacobi does not pay.
    ``policy`` holds the plans, ``calibration`` the measurements; ``stats["plans"]`` and
    ``stats["calibration_passes"]`` (``calibration_seconds`` by cost) carry them into
    metrics.json. Jacobi and auto samplers are
    ``continuous``: called with ``slots > 0`` and all labels they refill freed batch rows.
    """

    DROP = (
        "name",
        "gs_blocks",
        "gs_max_iters",
        "clamp",
        "calib",
        "calib_seed",
        "backend",
        "auto_by",
        "cost_windows",
        "calib_batch",
    )

    def __init__(self, cfg):
        super().__init__(cfg)
        self.kw = {k: v for k, v in dict(cfg).items() if k not in self.DROP}
        self.auto = self.kw["method"] == "auto"
        if self.auto:
            self.kw["method"] = "jacobi"  # overridden per block by the measured policy
        self.gs_blocks, self.clamp = list(cfg["gs_blocks"]), cfg["clamp"] or None
        self.policy, self.calibration, self.calibrated_for = None, None, None
        # rows refill freed slots only in plain Jacobi (auto: its Jacobi blocks); sequential and
        # GS-Jacobi rows all take the same passes, and the sequential images stay as they were
        self.continuous = cfg["method"] in ("jacobi", "auto") and not self.gs_blocks
        if cfg["auto_by"] not in ("passes", "cost"):
            raise ValueError(f"sampler.auto_by must be passes or cost, got {cfg['auto_by']!r}")

    def setup(self, ctx):
        """``auto``: measure the policy for the run's model."""
        if not self.auto:
            return
        model, kw, cfg = ctx.model, self.kw, self.cfg
        p = next(model.parameters())
        labels = torch.arange(cfg["calib"], device=p.device) % model.num_classes
        g = torch.Generator(device=p.device).manual_seed(cfg["calib_seed"])
        run = dict(  # how both calibrations invert, as sampling will
            tol=kw["tol"],
            clamp=self.clamp,
            guidance=None if kw["cfg_scale"] == 1.0 else kw["cfg_scale"] - 1.0,
            check_every=_check_every(kw["check_every"], p.device),
            attn_temp=kw["attn_temp"],
        )
        if cfg["auto_by"] == "cost":
            from vargen.sampling.decoders.tarflow_cost import calibrate_cost  # it imports this module

            self.policy, self.calibration = calibrate_cost(
                model, labels, g, batch=cfg["calib_batch"], windows=list(cfg["cost_windows"]), **run
            )
        else:
            self.policy, self.calibration = calibrate_policy(
                model,
                labels,
                g,
                window=kw["window"],
                max_iters=kw["max_iters"],
                gs_segments=kw["segments"],
                gs_max_iters=cfg["gs_max_iters"],
                **run,
            )
        self.calibrated_for = model

    def __call__(self, model, cond_B, generator, progress=False, slots=0):
        """``slots > 0``: ``cond_B`` holds ALL labels, sampled through that many batch rows with
        refilling (:func:`sample_tarflow_continuous`; only where ``continuous``)."""
        kw, policy = self.kw, None
        if self.auto:
            if self.calibrated_for is not model:
                raise RuntimeError("sampler.method=auto measures its policy in setup(ctx) for this model")
            policy = self.policy
        if self.gs_blocks:
            n = len(model.blocks)
            policy = stack_policy(
                n, self.gs_blocks, kw["segments"], self.cfg["gs_max_iters"], kw["max_iters"], kw["init"]
            )
            policy = [replace(pl, window=kw["window"]) for pl in policy]
        if slots > 0:
            if not self.continuous:
                raise ValueError(
                    f"sampler.method={self.cfg['method']} has no continuous batching (plain Jacobi only)"
                )
            images, stats = sample_tarflow_continuous(
                model,
                cond_B,
                generator=generator,
                slots=slots,
                policy=policy,
                clamp=self.clamp,
                progress=progress,
                backend=self.cfg["backend"],
                **kw,
            )
        else:
            images, stats = sample_tarflow(
                model, cond_B, generator=generator, policy=policy, clamp=self.clamp, progress=progress, **kw
            )
        if self.auto and "passes" in self.calibration:
            stats["calibration_passes"] = list(self.calibration["passes"])
        if self.auto and "seconds" in self.calibration:
            stats["calibration_seconds"] = [dict(s) for s in self.calibration["seconds"]]
        return images, stats
