"""Exactness of speculative sampling (draft model), speculative Jacobi decoding and GSD on toy
AR models with random conditional tables (spec sampling-speculative.md 1(c), 1b(c), 2(c))."""

import itertools

import pytest
import torch
from scipy.stats import chi2, chisquare

from vargen.models.toy_ar import ToyAR
from vargen.sampling.speculative.draft import sample_speculative
from vargen.sampling.speculative.gsd import exact_group_fns, gsd_ratio, partition_ratio, rank_partition
from vargen.sampling.speculative.jacobi import sample_jacobi

V, T, SAMPLES = 6, 3, 100_000  # ToyAR's default vocabulary and length


def chi2_pvalue(ids_BN, joint):
    code = torch.zeros(ids_BN.shape[0], dtype=torch.long)
    for t in range(T):
        code = code * V + ids_BN[:, t]
    counts = torch.bincount(code, minlength=V**T).double()
    assert counts[joint == 0].sum() == 0, "a sequence with target probability 0 was emitted"
    keep = joint > 0
    expected = joint[keep] * ids_BN.shape[0]
    return chisquare(counts[keep].numpy(), expected.numpy()).pvalue


@pytest.fixture(scope="module")
def toys():
    return ToyAR(0, zero_frac=0.3), ToyAR(1)


COND = torch.zeros(SAMPLES, dtype=torch.long)


@pytest.mark.parametrize("gamma", [1, 2, 4])
def test_speculative_is_exact(toys, gamma):
    target, draft = toys
    ids, stats = sample_speculative(
        target, draft, COND, generator=torch.Generator().manual_seed(gamma), use_cache=False, gamma=gamma
    )
    assert chi2_pvalue(ids, target.joint()) > 1e-3
    assert stats["target_forwards"] < T * SAMPLES  # fewer target calls than tokens...
    assert 0 < stats["acceptance"] < 1


def test_speculative_acceptance_matches_overlap():
    target, draft = ToyAR(2), ToyAR(3)
    target.num_tokens = draft.num_tokens = 2  # one draft position: acceptance = sum min(p, q)
    _, stats = sample_speculative(
        target, draft, COND, generator=torch.Generator().manual_seed(0), use_cache=False, gamma=1
    )
    p, q = torch.softmax(target.tables[0][0], -1), torch.softmax(draft.tables[0][0], -1)
    expected = torch.minimum(p, q).sum().item()
    assert stats["proposed"] == SAMPLES
    assert abs(stats["acceptance"] - expected) < 4 * (expected * (1 - expected) / SAMPLES) ** 0.5


def test_identical_draft_accepts_everything(toys):
    target, _ = toys
    ids, stats = sample_speculative(
        target, target, COND[:2000], generator=torch.Generator().manual_seed(0), use_cache=False, gamma=4
    )
    assert stats["accepted"] == stats["proposed"] > 0
    assert stats["target_forwards"] == 1  # T = 3 tokens: 2 accepted drafts + the bonus, one call


@pytest.mark.parametrize("window", [1, 2, 4])
def test_jacobi_is_exact(toys, window):
    target, _ = toys
    ids, stats = sample_jacobi(
        target, COND, generator=torch.Generator().manual_seed(10 + window), use_cache=False, window=window
    )
    assert chi2_pvalue(ids, target.joint()) > 1e-3
    if window == 1:
        assert stats["target_forwards"] == T  # NFE = tokens per row
    else:
        assert stats["accepted"] > 0 and stats["target_forwards"] <= T


def test_jacobi_under_warpers_matches_warped_target(toys):
    """Top-k on the target: the output follows the top-k-warped product of conditionals."""
    target, _ = toys
    ids, _ = sample_jacobi(
        target,
        COND,
        generator=torch.Generator().manual_seed(5),
        use_cache=False,
        window=3,
        top_k=2,
        temperature=0.8,
    )
    warped = ToyAR(0, zero_frac=0.3)
    for t in range(T):
        tab = target.tables[t] / 0.8
        kth = tab.topk(2, -1).values[:, -1:]
        warped.tables[t] = tab.masked_fill(tab < kth, float("-inf"))
    assert chi2_pvalue(ids, warped.joint()) > 1e-3


def test_gsd_group_one_equals_jacobi_draw_for_draw(toys):
    target, _ = toys
    emb = torch.randn(V, 4, generator=torch.Generator().manual_seed(0))
    ids_j, st_j = sample_jacobi(
        target, COND[:5000], generator=torch.Generator().manual_seed(7), use_cache=False, window=3
    )

    def one(p, q, x):
        return gsd_ratio(p, q, x, group=1, delta=0.15, dist=0.5, emb_VD=emb)

    ids_g, st_g = sample_jacobi(
        target,
        COND[:5000],
        generator=torch.Generator().manual_seed(7),
        use_cache=False,
        window=3,
        ratio_fn=one,
    )
    assert torch.equal(ids_j, ids_g) and st_j["accepted"] == st_g["accepted"]


def test_gsd_emits_only_supported_tokens_and_is_lossy(toys):
    target, _ = toys

    def wide(p, q, x):
        return gsd_ratio(p, q, x, group=V, delta=1.0, dist=0.0)

    ids, stats = sample_jacobi(
        target, COND, generator=torch.Generator().manual_seed(3), use_cache=False, window=3, ratio_fn=wide
    )
    _, stats_sjd = sample_jacobi(
        target, COND, generator=torch.Generator().manual_seed(3), use_cache=False, window=3
    )
    code = ids[:, 0] * V**2 + ids[:, 1] * V + ids[:, 2]
    emp = torch.bincount(code, minlength=V**T).double() / SAMPLES
    joint = target.joint()
    assert emp[joint == 0].sum() == 0  # every emitted token has p > 0
    assert stats["acceptance"] > stats_sjd["acceptance"]
    assert 0.5 * (emp - joint).abs().sum() > 0.05  # lossy by design: visibly not the target


def test_gsd_window_matches_naive_ranking():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(3, 5, 20, generator=g) * 2, -1)
    q = torch.softmax(torch.randn(3, 5, 20, generator=g), -1)
    x = torch.randint(20, (3, 5), generator=g)
    got = gsd_ratio(p, q, x, group=5, delta=0.05, dist=0.0)
    for b, i in itertools.product(range(3), range(5)):
        order = sorted(range(20), key=lambda v: (-p[b, i, v].item(), v))
        r = order.index(x[b, i].item())
        s = min(max(r - 2, 0), 15)
        grp = [v for v in order[s : s + 5] if abs(p[b, i, v] - p[b, i, x[b, i]]) < 0.05 or v == x[b, i]]
        want = p[b, i, grp].sum() / q[b, i, grp].sum()
        assert torch.allclose(got[b, i], want)


def test_group_acceptance_grows_with_nested_partitions():
    """Theorem 1: E_{x~q} min(1, P(C)/Q(C)) = sum_C min(P, Q) >= sum min(p, q), non-decreasing
    along nested partitions."""
    torch.manual_seed(1)  # Dirichlet draws use the global RNG (test data only)
    Vb = 64
    p = torch.distributions.Dirichlet(torch.full((Vb,), 0.3)).sample((8,))[:, None]  # (8, 1, V)
    q = torch.distributions.Dirichlet(torch.full((Vb,), 0.3)).sample((8,))[:, None]
    rank = p[:, 0].argsort(-1, descending=True)
    xs = torch.arange(Vb).expand(8, Vb)[:, :, None]  # every token as draft: (8, V, 1) -> loop free
    accs = []
    for size in (1, 2, 4, 8, 16, 64):
        rows = []
        for b in range(8):
            part = torch.empty(Vb, dtype=torch.long)
            part[rank[b]] = torch.arange(Vb) // size  # fixed p-sorted blocks, nested as size doubles
            r = partition_ratio(p[b].expand(Vb, 1, Vb), q[b].expand(Vb, 1, Vb), xs[b], part)[:, 0]
            rows.append((q[b, 0] * r.clamp(max=1)).sum())
        accs.append(torch.stack(rows))
    base = torch.minimum(p, q).sum(-1)[:, 0]
    assert torch.allclose(accs[0], base, atol=1e-5)
    for a, b in zip(accs, accs[1:]):
        assert (b >= a - 1e-6).all()
    assert (accs[-1] > accs[0] + 0.05).all()


def group_pvalue(ids_BN, target, group):
    """Pooled chi-square of each emitted token's group (rank blocks of the target's p at that
    prefix) against P'(. | prefix), over every prefix seen at least 500 times."""
    stat, dof = 0.0, 0
    prefix = torch.zeros(ids_BN.shape[0], dtype=torch.long)
    for t in range(T):
        p_tab = torch.softmax(target.tables[t].double(), -1)  # (V**t, V)
        part = rank_partition(p_tab, group)  # (V**t, V) group ids < V + 1
        P = torch.zeros(V**t, V + 1, dtype=torch.float64).scatter_add_(1, part, p_tab)
        counts = torch.zeros_like(P).index_put_(
            (prefix, part[prefix, ids_BN[:, t]]),
            torch.ones(len(prefix), dtype=torch.float64),
            accumulate=True,
        )
        assert counts[P == 0].sum() == 0  # a group of target mass 0 is never emitted
        n = counts.sum(1, keepdim=True)
        keep = (n >= 500) & (P > 0)
        E = n * P
        stat += ((counts - E).pow(2) / E)[keep].sum().item()
        dof += int(keep.sum() - keep.any(1).sum())  # K - 1 per prefix
        prefix = prefix * V + ids_BN[:, t]
    return chi2.sf(stat, dof)


def test_gsd_exact_groups_is_exact_at_group_level(toys):
    """Spec 2(a) group-exact variant: the emitted group follows P' given the prefix; with the
    same group test but the token-level residual (plain GSD) it visibly does not."""
    target, _ = toys
    ratio, residual = exact_group_fns(2)
    kw = {"cond_B": COND, "window": 3, "use_cache": False, "ratio_fn": ratio}
    ids, stats = sample_jacobi(target, generator=torch.Generator().manual_seed(4), residual_fn=residual, **kw)
    assert group_pvalue(ids, target, 2) > 1e-3
    ids_plain, _ = sample_jacobi(target, generator=torch.Generator().manual_seed(4), **kw)
    assert group_pvalue(ids_plain, target, 2) < 1e-6
    _, stats_sjd = sample_jacobi(
        target, COND, generator=torch.Generator().manual_seed(4), use_cache=False, window=3
    )
    assert stats["acceptance"] > stats_sjd["acceptance"]  # Theorem 1: grouping accepts more
