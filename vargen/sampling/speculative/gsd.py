"""Grouped speculative decoding (GSD, So et al. ICCV 2025): SJD's loop
(:func:`~vargen.sampling.speculative.jacobi.sample_jacobi`) with a group acceptance ratio.

GSD replaces the per-token ratio p(x)/q(x) by P(C)/Q(C) over a group C around the draft x: the
G tokens nearest x in the
target's probability ranking, filtered by probability gap ``|p(y) - p(x)| < delta`` and
embedding distance ``< dist``. GSD is lossy by
design (it emits the draft token itself on group acceptance). Defects of the reference
(``junhyukso/GSD``) fixed here:

- its window slice ``sorted[r-7:r+7]`` is empty for ranks r < 7 (0/0 = NaN, always rejected);
  ours is clipped into the vocabulary, so it always holds G tokens with x among them;
- tokens outside top-k tie at -inf, so a draft token with p(x) = 0 could be accepted through its
  window; we restrict C to supp(p) and give a draft with p(x) = 0 ratio 0 (never emitted);
- its ``dist`` is an absolute squared-L2 threshold on raw embeddings (0.5 for Chameleon's), which
  on another model's embedding scale keeps no neighbour at all (GSD off) or every one. Ours is
  scale-free: the squared L2 distance relative to the mean squared distance between two tokens
  drawn uniformly from the vocabulary (:func:`relative_embeddings`), so ``dist = 1`` keeps the
  neighbours closer to x than an average pair of tokens;
- a group as large as the support (``group >= vocab``, or ``>= top_k`` with top-k on) accepts
  nearly every draft, random initial tokens included: the builder refuses it.

Optional ``exact_groups`` (exact at the group level, not in the
paper): the groups are a partition fixed by the target alone -- blocks of G consecutive ranks of
supp(p), plus one group for the tokens with p = 0 -- so Theorem 1 applies; the draft is accepted
with min(1, P(C(x))/Q(C(x))) and on rejection a group K is drawn from norm(max(0, P' - Q')) and
a token from p(. | K). The emitted token's group then follows P' exactly (the section 1 proof on
the group distributions), while within a group an accepted token still follows the draft.
The delta / dist filters would break the partition and are not used in this mode.
The reference's batch handling commits min_b n_b for all rows; rows here are ragged (each row
commits its own n_b + 1), which is exact and wastes nothing.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from vargen.registry import SAMPLERS
from vargen.sampling.base import Sampler
from vargen.sampling.speculative.cost_plan import CostPlanOptions
from vargen.sampling.speculative.jacobi import COST_WINDOWS, check_window, run_jacobi_sampler
from vargen.sampling.speculative.verify import token_residual
from vargen_kernels.group_verify import (  # noqa: F401  (re-exported: the partition's reference)
    group_masses,
    group_residual,
    partition_ratio,
    rank_block_ratio,
    rank_neighbours,
    rank_partition,
)


def relative_embeddings(emb_VD: torch.Tensor) -> torch.Tensor:
    """Embeddings (V, D) rescaled so that squared L2 distances are relative to the mean squared
    distance between two tokens drawn independently and uniformly, E||e_u - e_v||^2 =
    2 (mean_v ||e_v||^2 - ||mean_v e_v||^2): GSD's ``dist`` is then scale-free."""
    e_VD = emb_VD.float()
    mean_d2 = 2 * (e_VD.pow(2).sum(-1).mean() - e_VD.mean(0).pow(2).sum())
    return e_VD / mean_d2.clamp(min=torch.finfo(e_VD.dtype).tiny).sqrt()


def rank_window(p_XV, x_X1, G: int):
    """The G tokens at ranks start .. start+G-1 of p's stable descending order, start =
    clamp(rank(x) - G//2, 0, V - G) (x among them), without sorting the vocabulary
    (:func:`~vargen_kernels.group_verify.rank_neighbours`). Returns (win (..., 2G-1) ids in
    rank order, member (..., 2G-1) bool): the candidates, x at index G-1, and which of them are
    in the window (start <= V - G, so padding is never a member)."""
    V = p_XV.shape[-1]
    win, r, rank = rank_neighbours(p_XV, x_X1, G)
    start = (rank - G // 2).clamp(0, V - G)
    return win, (r >= start) & (r < start + G)


def near_table(emb_VD: torch.Tensor, dist: float, rows: int = 512) -> torch.Tensor:
    """(V, V) bool: whether tokens u and v are closer than ``dist`` in squared L2 over the rows of
    ``emb_VD``, decided exactly as :func:`gsd_ratio`'s direct ``(e_v - e_u).pow(2).sum(-1) < dist``.

    The embedding filter depends only on the embedding, so GSD builds this once per run and
    looks its window up instead of gathering (2G-1) embedding rows per draft every iteration.
    The distances come from ``|u|^2 + |v|^2 - 2 u.v`` (one matrix product per ``rows`` rows);
    pairs within a rounding margin of ``dist`` are recomputed in the direct form, so every
    entry is the direct decision."""
    e_VD = emb_VD.float()
    V = e_VD.shape[0]
    sq_V = e_VD.pow(2).sum(-1)
    near_VV = torch.empty(V, V, dtype=torch.bool, device=e_VD.device)
    for i in range(0, V, rows):
        e_RD, sq_R = e_VD[i : i + rows], sq_V[i : i + rows]
        d2_RV = (sq_R[:, None] + sq_V) - 2 * (e_RD @ e_VD.T)  # (R, V)
        near_VV[i : i + rows] = d2_RV < dist
        # fp32 error of either form is below ~D * 2^-24 * (|u|^2 + |v|^2); 1e-4 of it is safe for D < 1e3
        u, v = ((d2_RV - dist).abs() <= 1e-4 * (sq_R[:, None] + sq_V) + 1e-6).nonzero(as_tuple=True)
        near_VV[i + u, v] = (e_VD[v] - e_VD[i + u]).pow(2).sum(-1) < dist
    return near_VV


def gsd_ratio(p_BgV, q_BgV, x_Bg, group: int, delta: float, dist: float, emb_VD=None, near_VV=None):
    """GSD's P(C)/Q(C) with C built from p's ranking around x (section 2(a).1-4), vectorised.

    ``group`` = window size G (reference: 14, ``sorted[r-7:r+7]``), ``delta`` the probability gap,
    ``dist`` the threshold on squared L2 distances between rows of ``emb_VD`` (skipped when
    ``emb_VD`` is None or dist <= 0; the sampler passes :func:`relative_embeddings`).
    ``near_VV``: :func:`near_table` of ``emb_VD`` and ``dist``, looked up instead (same result).
    """
    V = p_BgV.shape[-1]
    G = min(group, V)
    x = x_Bg[..., None]  # (B, g, 1)
    px = p_BgV.gather(2, x)  # (B, g, 1)
    win, keep = rank_window(p_BgV, x, G)  # (B, g, 2G-1) candidates, which of them form the window
    pw, qw = p_BgV.gather(2, win), q_BgV.gather(2, win)  # (B, g, 2G-1)
    keep &= (pw - px).abs() < delta
    keep &= pw > 0  # restricted to tokens the target can emit
    if near_VV is not None and dist > 0:
        keep &= near_VV.view(-1)[x * V + win]  # (B, g, 2G-1), near_VV[x, x] is True
    elif emb_VD is not None and dist > 0:
        d2 = (emb_VD[win] - emb_VD[x_Bg][..., None, :]).pow(2).sum(-1)  # (B, g, 2G-1)
        keep &= d2 < dist
    keep[..., G - 1] = True  # x always in its group
    P, Q = (pw * keep).sum(-1), (qw * keep).sum(-1)  # (B, g)
    return torch.where(px[..., 0] > 0, P / Q, torch.zeros_like(P))


def exact_group_fns(group: int):
    """(ratio_fn, residual_fn) of GSD's group-exact variant with rank blocks of size ``group``."""

    def ratio(p_BgV, q_BgV, x_Bg):
        return rank_block_ratio(p_BgV, q_BgV, x_Bg, group)  # partition_ratio on rank_partition

    def residual(p_BV, q_BV):
        return group_residual(p_BV, q_BV, rank_partition(p_BV, group))

    # the pair is recognised by its group size: :func:`accept_and_correct` then runs the fused
    # group verification (:func:`vargen_kernels.group_verify.group_verify`), the same computation
    ratio.group = residual.group = group
    ratio.graph_key, residual.graph_key = ("rank_block_ratio", group), ("group_residual", group)
    return ratio, residual


_NEAR_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (key, near_VV)
NEAR_TABLE_MAX_VOCAB = 8192  # a (V, V) bool table of 64 MiB; larger vocabularies filter directly


def _near_table_of(model, dist: float):
    """:func:`near_table` of the model's relative embeddings, built once per model, embedding
    version and ``dist`` (a sampler is often built per call), or None above
    :data:`NEAR_TABLE_MAX_VOCAB` (the direct filter then runs)."""
    emb_VD = model.token_embeddings()
    if emb_VD.shape[0] > NEAR_TABLE_MAX_VOCAB:
        return None
    key = (emb_VD.data_ptr(), emb_VD._version, tuple(emb_VD.shape), emb_VD.device, float(dist))
    hit = _NEAR_TABLES.get(model)
    if hit is None or hit[0] != key:
        hit = _NEAR_TABLES[model] = (key, near_table(relative_embeddings(emb_VD), dist))
    return hit[1]


@dataclass
class GSDConfig(CostPlanOptions):
    name: str = "gsd"
    window: int = 16
    group: int = 14  # G: ranking window around the draft (reference: sorted[r-7:r+7])
    delta: float = 0.15  # probability-gap filter (reference)
    # input-embedding filter: squared L2 relative to the mean over token pairs (1 = an average
    # pair; the reference's 0.5 is absolute, on Chameleon's scale); <= 0 disables it
    dist: float = 1.0
    exact_groups: bool = False  # group-exact variant: rank-block partition, group-level residual
    use_cache: bool = True
    cfg_scale: float = 1.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    backend: str = "auto"  # verification kernel: auto | triton | interpret | torch (vargen_kernels.dispatch)
    compile: bool = False  # torch.compile the cached windows and the CPU verification step; slow to start
    cuda_graph: bool = False  # replay one static-shape iteration as a CUDA graph (jacobi_graph.py); CUDA only
    graph_noise: str = "eager"  # with cuda_graph: eager (sample_jacobi's ids) | chunk (fewer host calls)
    # fixed: speculate at `window`; cost: the measured fastest of plain decoding and GSD at each
    # of cost_windows, at the batch that runs (cost_plan.py; named in stats["plan_widths"])
    cost_windows: list[int] = field(default_factory=lambda: list(COST_WINDOWS))


@SAMPLERS.register("gsd", GSDConfig)
class GSDSampler(Sampler):
    """GSD (:func:`gsd_ratio` in SJD's loop); continuous: every label at once with ``slots`` rows."""

    continuous = True

    def __init__(self, cfg):
        super().__init__(cfg)
        check_window(cfg)
        if cfg.group < 1:
            raise ValueError(f"sampler.group must be >= 1, got {cfg.group}")
        if cfg.top_k > 0 and cfg.group >= cfg.top_k:
            raise ValueError(
                f"sampler.group = {cfg.group} covers the whole top-k support (top_k = {cfg.top_k}): "
                "every draft would be accepted"
            )

    def __call__(self, model, cond_B, generator, progress=False, slots=0):
        ar, c = model.next_token_model, self.cfg
        if c.group >= ar.vocab_size:
            raise ValueError(
                f"sampler.group = {c.group} covers the whole vocabulary ({ar.vocab_size}): "
                "every draft would be accepted"
            )
        emb = relative_embeddings(ar.token_embeddings())  # (V, D) input embeddings (reference)
        cond_B = cond_B.to(emb.device)
        near = None if c.exact_groups or c.dist <= 0 else _near_table_of(ar, c.dist)

        group, delta, dist = c.group, c.delta, c.dist  # read once: a config lookup costs ~0.05 ms

        def ratio(p, q, x):
            return gsd_ratio(p, q, x, group, delta, dist, emb, near)

        # a captured iteration (cuda_graph) may be replayed by a later call with equal constants
        ratio.graph_key = ("gsd_ratio", group, delta, dist, near is None)

        ratio_fn, residual_fn = exact_group_fns(c.group) if c.exact_groups else (ratio, token_residual)
        return run_jacobi_sampler(model, c, cond_B, generator, slots, ratio_fn, residual_fn)
