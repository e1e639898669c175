"""Fused GSD group verification: rank-block partition, group acceptance and group-level residual.

GSD's group-exact variant (:func:`vargen.sampling.speculative.gsd.exact_group_fns`) partitions the
vocabulary by the target alone: blocks of G consecutive ranks of supp(p) in p's stable descending
order, plus one group for the tokens with p = 0. A draft x is accepted with
min(1, P(C(x)) / Q(C(x))) and a rejection draws a group K ~ norm(max(0, P - Q)) and a token from
p(. | K). The torch path ranks no draft row: x's block is found among its rank neighbours (two
top-k selections, :func:`rank_block_ratio`); only the residual row is argsorted (once), and its
group masses are a ``scatter_add``; then the gathers of :mod:`vargen_kernels.speculative_verify`.
(Ranking every (B, g, V) row by two argsorts cost ~3 ms of a ~7 ms batch-1 GSD-exact iteration on
the CPU, window 16.) The Triton kernel here sorts
each row once on the device (``tl.sort`` of a unique int64 key per token, no host round trip),
reads group masses off the sorted row (masked sums for the draft's group; segmented scans for
every group on the residual row) and draws the residual token with the caller's noise.

Semantics: :func:`group_verify_reference`, which is :func:`verify_reference
<vargen_kernels.speculative_verify.verify_reference>` with the group ratio of
:func:`partition_ratio` (computed as :func:`rank_block_ratio`, the same floats) and the residual
:func:`group_residual` on :func:`rank_partition` -- the functions the sampler uses, so it draws the
same tokens whichever backend runs.
The kernel's group sums run in another order than ``scatter_add``'s (identical for G <= 2, a few
ulps otherwise), so an acceptance can differ only for a uniform within ulps of the ratio and a
residual token only for Gumbel scores within ulps; ties between residual scores are not
resolved to the smallest id (continuous noise makes them measure-zero).
"""

from __future__ import annotations

import torch

from vargen_kernels.dispatch import TRITON_AVAILABLE, backend_for, check_kernel_mode
from vargen_kernels.speculative_verify import (
    RESIDUAL_EPS,
    U_EPS,
    _check_args,
    _row_major,
    verify_reference,
)


def rank_keys(p_XV: torch.Tensor) -> torch.Tensor:
    """A unique int64 key per token (..., V) that orders like p's stable descending order: the
    float32 bit pattern of p >= 0, then the smaller id first on ties (keys < 2**42)."""
    V = p_XV.shape[-1]
    tie_V = torch.arange(V - 1, -1, -1, device=p_XV.device)  # smaller id first on ties
    return torch.add(tie_V, p_XV.float().view(torch.int32), alpha=V)


def rank_partition(p_XV: torch.Tensor, group: int) -> torch.Tensor:
    """Group ids (..., V) fixed by the target alone: blocks of ``group`` consecutive ranks of p's
    support (rank // G), and id V for every token with p = 0 (a group of mass 0, never emitted).
    The ranks invert one stable argsort by a scatter (the same integers as a second argsort, at
    half the cost)."""
    V = p_XV.shape[-1]
    order = p_XV.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(V, device=p_XV.device).expand_as(order))
    return torch.where(p_XV > 0, rank // min(group, V), torch.full_like(rank, V))


def rank_neighbours(p_XV: torch.Tensor, x_X1: torch.Tensor, G: int):
    """x and its G-1 nearest neighbours on each side in p's stable descending order, without
    sorting the vocabulary: a top-(G-1) selection of the keys (:func:`rank_keys`) above x's and
    a top-G of those at or below it (whose first is x itself).

    Returns (win (..., 2G-1) ids, r (..., 2G-1) their ranks, rank (..., 1) x's rank, 0 = most
    likely): x at index G-1, the token at index i ranked rank + i - (G-1). A side with fewer
    than G-1 tokens pads with other ids, whose r is then < 0 (above) or >= V (below)."""
    key = rank_keys(p_XV)  # (..., V)
    kx = key.gather(-1, x_X1)  # (..., 1)
    above_XV = key > kx
    rank = torch.count_nonzero(above_XV, dim=-1).unsqueeze(-1)  # (..., 1)
    big = torch.iinfo(key.dtype).max
    above = torch.where(above_XV, key, big).topk(G - 1, largest=False).indices.flip(-1)  # nearest last
    below = key.masked_fill_(above_XV, -1).topk(G).indices  # x (the largest key left), then nearest first
    r = rank + torch.arange(-(G - 1), G, device=p_XV.device)  # (..., 2G-1)
    return torch.cat([above, below], -1), r, rank


def rank_block_ratio(p_BgV, q_BgV, x_Bg, group: int):
    """:func:`partition_ratio` on :func:`rank_partition` (the same floats), without ranking the
    vocabulary: x's block is the support tokens ranked (rank(x) // G) * G .. + G-1, all among
    :func:`rank_neighbours`; P and Q add its members in id order, as ``scatter_add`` does."""
    V = p_BgV.shape[-1]
    G = min(group, V)
    x = x_Bg[..., None]  # (B, g, 1)
    win, r, rank = rank_neighbours(p_BgV, x, G)  # (B, g, 2G-1)
    win, order = win.sort(-1)  # ids ascending: the order scatter_add sums a group in
    r = r.expand_as(order).gather(-1, order)
    start = rank - rank % G  # x's block starts at this rank
    pw, qw = p_BgV.gather(-1, win), q_BgV.gather(-1, win).to(p_BgV.dtype)
    out = ((r < start) | (r >= start + G) | (r >= V) | (pw <= 0)).long()  # slot 1: not in x's group
    P = torch.zeros(*pw.shape[:-1], 2, dtype=pw.dtype, device=pw.device).scatter_add_(-1, out, pw)
    Q = torch.zeros_like(P).scatter_add_(-1, out, qw)
    px = p_BgV.gather(-1, x)[..., 0]
    return torch.where(px > 0, P[..., 0] / Q[..., 0], torch.zeros_like(px))


def group_masses(p_XV, q_XV, part_XV):
    """Group masses P, Q (..., K) of a partition given as a group id per token (..., V)."""
    K = p_XV.shape[-1] + 1  # ids are < V + 1 (rank_partition); a caller's ids are < V
    idx = part_XV.expand_as(p_XV)
    P = torch.zeros(*p_XV.shape[:-1], K, dtype=p_XV.dtype, device=p_XV.device).scatter_add_(-1, idx, p_XV)
    Q = torch.zeros_like(P).scatter_add_(-1, idx, q_XV.to(p_XV.dtype))
    return P, Q, idx


def partition_ratio(p_BgV, q_BgV, x_Bg, part_V):
    """P(C(x))/Q(C(x)) for a partition ``part_V`` (group id per token, (V,) or per position
    (B, g, V)); 0 for a draft the target cannot emit."""
    P, Q, idx = group_masses(p_BgV, q_BgV, part_V)
    cx = idx.gather(2, x_Bg[..., None])  # (B, g, 1) the draft's group
    px = p_BgV.gather(2, x_Bg[..., None])[..., 0]
    return torch.where(px > 0, P.gather(2, cx)[..., 0] / Q.gather(2, cx)[..., 0], torch.zeros_like(px))


def group_residual(p_BV, q_BV, part_BV):
    """Group-level residual as a token distribution (B, V): a group K ~ norm(max(0, P - Q)),
    then a token ~ p(. | K); P itself when the residual mass vanishes."""
    P, Q, idx = group_masses(p_BV, q_BV, part_BV)  # (B, K)
    r = (P - Q).clamp(min=0)
    mass = r.sum(-1, keepdim=True)
    r = torch.where(mass > RESIDUAL_EPS, r / mass.clamp(min=RESIDUAL_EPS), P)
    within = p_BV / P.gather(1, idx).clamp(min=torch.finfo(P.dtype).tiny)  # p(z | K(z))
    return r.gather(1, idx) * within


def group_verify_reference(p_BWV, q_BgV, x_Bg, room_B, u_BWV, a_Bg, u_res_BV, *, group: int):
    """Torch reference of :func:`group_verify`: int64 ``(n_B, z_B, y_BW, cap_B)``."""
    if group < 1:
        raise ValueError(f"group must be >= 1, got {group}")
    g = p_BWV.shape[1] - 1
    ratio_Bg = rank_block_ratio(p_BWV[:, :g], q_BgV, x_Bg, group)
    return verify_reference(
        p_BWV,
        q_BgV,
        x_Bg,
        room_B,
        u_BWV,
        a_Bg,
        u_res_BV,
        ratio_Bg,
        residual_fn=lambda p, q: group_residual(p, q, rank_partition(p, group)),
    )


if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    from vargen_kernels.speculative_verify import _gumbel_argmax_row

    @triton.jit
    def _seg_add(v1, s1, v2, s2):
        """Combine of a segmented sum over contiguous segments (segment ids ``s``)."""
        return tl.where(s1 == s2, v1 + v2, v2), s2

    @triton.jit
    def _sorted_row(p_row, q_row, V, G, BLOCK_V: tl.constexpr):
        """p's tokens in stable descending order: (ids, p, q, group id, rank) per sorted position.

        The key ``bits(p) * V + (V - 1 - id)`` is unique and orders like (p desc, id asc) since
        p >= 0 orders like its bits; -0.0 counts as 0 and padding gets -1, so it sorts last.
        Tokens with p = 0 (and padding) get the group id 2**30 (the zero group).
        """
        offs = tl.arange(0, BLOCK_V)
        in_row = offs < V
        p = tl.load(p_row + offs, mask=in_row, other=0.0).to(tl.float32)
        bits = tl.maximum(p.to(tl.int32, bitcast=True), 0).to(tl.int64)
        key = tl.where(in_row, bits * V + (V - 1 - offs), -1)
        skey = tl.sort(key, descending=True)
        sid = tl.where(offs < V, V - 1 - skey % V, 0)
        ps = tl.where(offs < V, (skey // V).to(tl.int32).to(tl.float32, bitcast=True), 0.0)
        qs = tl.load(q_row + sid, mask=offs < V, other=0.0).to(tl.float32)
        grp = tl.where(ps > 0, offs // G, 1 << 30)
        return sid, ps, qs, grp, key

    @triton.jit
    def _group_verify_kernel(
        p_ptr,
        q_ptr,
        x_ptr,
        room_ptr,
        u_ptr,
        a_ptr,
        ures_ptr,
        n_ptr,
        z_ptr,
        y_ptr,
        cap_ptr,
        W,
        V,
        G,
        sp_b,
        sp_w,
        sq_b,
        sq_w,
        sx_b,
        su_b,
        su_w,
        sa_b,
        sures_b,
        EPS: tl.constexpr,
        U_LO: tl.constexpr,
        U_HI: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        """One program per row: target samples, group acceptance, group-level residual draw."""
        b = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_V)
        in_row = offs < V
        g = W - 1
        for j in range(W):
            p = tl.load(p_ptr + b * sp_b + j * sp_w + offs, mask=in_row, other=0.0).to(tl.float32)
            u = tl.load(u_ptr + b * su_b + j * su_w + offs, mask=in_row, other=0.5).to(tl.float32)
            tl.store(y_ptr + b * W + j, _gumbel_argmax_row(p, u, U_LO, U_HI))
        room = tl.load(room_ptr + b).to(tl.int64)
        cap = tl.minimum(tl.maximum(room - 1, 0), g)
        n = tl.zeros((), dtype=tl.int64)
        alive = tl.full((), 1, dtype=tl.int64)
        for j in range(g):  # group acceptance: P(C(x)) / Q(C(x)) off the sorted row
            p_row, q_row = p_ptr + b * sp_b + j * sp_w, q_ptr + b * sq_b + j * sq_w
            sid, ps, qs, grp, key = _sorted_row(p_row, q_row, V, G, BLOCK_V)
            x = tl.load(x_ptr + b * sx_b + j)
            kx = tl.sum(tl.where(offs == x, key, 0), axis=0)
            px = tl.sum(tl.where(sid == x, ps, 0.0), axis=0)
            cx = tl.sum((key > kx).to(tl.int64), axis=0) // G  # x's rank block
            in_c = grp == cx
            P_c, Q_c = tl.sum(tl.where(in_c, ps, 0.0), axis=0), tl.sum(tl.where(in_c, qs, 0.0), axis=0)
            r = tl.where(px > 0, tl.math.div_rn(P_c, tl.where(px > 0, Q_c, 1.0)), 0.0)
            a = tl.load(a_ptr + b * sa_b + j).to(tl.float32)
            ok = (a < tl.minimum(r, 1.0, propagate_nan=tl.PropagateNan.ALL)) & (j < cap)
            alive = alive * ok.to(tl.int64)
            n += alive
        p_n = tl.load(p_ptr + b * sp_b + n * sp_w + offs, mask=in_row, other=0.0).to(tl.float32)
        w = tl.load(ures_ptr + b * sures_b + offs, mask=in_row, other=0.5).to(tl.float32)
        z_res = _gumbel_argmax_row(p_n, w, U_LO, U_HI)  # no drafts: the residual is p itself
        if g > 0:  # group residual on the sorted row: every group's masses by segmented scans
            sid, ps, qs, grp, key = _sorted_row(
                p_ptr + b * sp_b + n * sp_w, q_ptr + b * sq_b + tl.minimum(n, g - 1) * sq_w, V, G, BLOCK_V
            )
            fp, _ = tl.associative_scan((ps, grp), 0, _seg_add)
            bp, _ = tl.associative_scan((ps, grp), 0, _seg_add, reverse=True)
            fq, _ = tl.associative_scan((qs, grp), 0, _seg_add)
            bq, _ = tl.associative_scan((qs, grp), 0, _seg_add, reverse=True)
            support = ps > 0
            P = tl.where(support, fp + bp - ps, 0.0)  # the group's mass at each sorted position
            Q = fq + bq - qs
            rk = tl.where(support, tl.maximum(P - Q, 0.0), 0.0)  # the zero group's is 0
            first = support & (offs % G == 0)  # one position per support group
            mass = tl.sum(tl.where(first, rk, 0.0), axis=0)
            rk = tl.where(mass > EPS, tl.math.div_rn(rk, tl.maximum(mass, EPS)), P)
            res = rk * tl.math.div_rn(ps, tl.maximum(P, 1.1754943508222875e-38))  # r_K p(z | K)
            wz = tl.load(ures_ptr + b * sures_b + sid, mask=offs < V, other=0.5).to(tl.float32)
            best = _gumbel_argmax_row(res, wz, U_LO, U_HI)  # a sorted position
            z_res = tl.sum(tl.where(offs == best, sid, 0), axis=0)
        u_n = tl.load(u_ptr + b * su_b + n * su_w + offs, mask=in_row, other=0.5).to(tl.float32)
        y_n = _gumbel_argmax_row(p_n, u_n, U_LO, U_HI)
        tl.store(n_ptr + b, n)
        tl.store(z_ptr + b, tl.where(n < cap, z_res, y_n))
        tl.store(cap_ptr + b, cap)


def group_verify(
    p_BWV: torch.Tensor,
    q_BgV: torch.Tensor,
    x_Bg: torch.Tensor,
    room_B: torch.Tensor,
    u_BWV: torch.Tensor,
    a_Bg: torch.Tensor,
    u_res_BV: torch.Tensor,
    *,
    group: int,
    backend: str = "auto",
):
    """GSD group-exact verification of a window of drafts per row, rank blocks of ``group``;
    int64 ``(n_B, z_B, y_BW, cap_B)``. Inputs as :func:`vargen_kernels.speculative_verify.verify`.
    """
    args = (p_BWV, q_BgV, x_Bg, room_B, u_BWV, a_Bg, u_res_BV)
    which = backend_for(*args, backend=backend)
    if which == "torch":
        return group_verify_reference(*args, group=group)
    if group < 1:
        raise ValueError(f"group must be >= 1, got {group}")
    _check_args(*args, None)
    check_kernel_mode(_group_verify_kernel, which)
    B, W, V = p_BWV.shape
    dev = p_BWV.device
    n_B, z_B, cap_B = (torch.empty(B, dtype=torch.int64, device=dev) for _ in range(3))
    y_BW = torch.empty(B, W, dtype=torch.int64, device=dev)
    if B == 0:
        return n_B, z_B, y_BW, cap_B
    p_BWV, u_BWV, u_res_BV = _row_major(p_BWV), _row_major(u_BWV), _row_major(u_res_BV)
    if W > 1:
        q_BgV, x_Bg, a_Bg = _row_major(q_BgV), _row_major(x_Bg), _row_major(a_Bg)
    else:  # no drafts: nothing of them is read
        q_BgV, x_Bg, a_Bg = p_BWV, room_B[:, None], u_res_BV
    room_B = room_B.contiguous()
    block_v = triton.next_power_of_2(V)
    _group_verify_kernel[(B,)](
        p_BWV,
        q_BgV,
        x_Bg,
        room_B,
        u_BWV,
        a_Bg,
        u_res_BV,
        n_B,
        z_B,
        y_BW,
        cap_B,
        W,
        V,
        min(group, V),
        p_BWV.stride(0),
        p_BWV.stride(1),
        q_BgV.stride(0),
        q_BgV.stride(1),
        x_Bg.stride(0),
        u_BWV.stride(0),
        u_BWV.stride(1),
        a_Bg.stride(0),
        u_res_BV.stride(0),
        EPS=RESIDUAL_EPS,
        U_LO=U_EPS,
        U_HI=1.0 - U_EPS,
        BLOCK_V=block_v,
        num_warps=4 if block_v < 2048 else (8 if block_v < 8192 else 16),
    )
    return n_B, z_B, y_BW, cap_B
