"""CSpD verification on analytic toys (spec sampling-speculative.md 3(c))."""

import math

import pytest
import torch
from scipy.stats import kstest, norm

from vargen.sampling.speculative.cspd_verify import cspd_verify, gaussian_logpdf, residual_sample

M = 100_000


class LinearGaussianHead:
    """Two-step linear-Gaussian "diffusion": x1 = a x_T + s e1, x0 = b x1 + s0 e2.
    Marginal of x0: N(0, b^2 (a^2 + s^2) + s0^2) (spec 3(c).2)."""

    def __init__(self, a, s, b, s0):
        self.a, self.s, self.b, self.s0 = a, s, b, s0
        self.var = b**2 * (a**2 + s**2) + s0**2

    def reverse_trajectory(self, cond_NW, x_T_NC, noises_SNC, temperature=1.0):
        x1 = self.a * x_T_NC + self.s * noises_SNC[0]
        mean = self.b * x1
        std = torch.full_like(mean, self.s0)
        return {
            "x0": mean + std * noises_SNC[-1],
            "mean_last": mean,
            "std_last": std,
            "sum_log_std": torch.full_like(mean, math.log(self.s)),
        }


def run_toy(target, draft, mode, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(M, 1, generator=g)
    noises = torch.randn(2, M, 1, generator=g)  # shared by draft and target (alignment)
    tq = {k: v[:, None] for k, v in draft.reverse_trajectory(None, x_T, noises).items()}  # (M, 1, 1)
    tp = {k: v[:, None] for k, v in target.reverse_trajectory(None, x_T, noises).items()}
    n, z, stats = cspd_verify(tq, tp, g, mode=mode)
    out = torch.where(n[:, None] > 0, tq["x0"][:, 0], z)[:, 0]
    return out, n, stats


TARGET = LinearGaussianHead(a=0.9, s=0.3, b=1.1, s0=0.5)
DRAFT = LinearGaussianHead(a=0.6, s=1.5, b=0.9, s0=0.8)


def test_exact_mode_is_unbiased_on_two_step_toy():
    out, n, stats = run_toy(TARGET, DRAFT, "exact")
    assert kstest(out.numpy(), norm(scale=math.sqrt(TARGET.var)).cdf).pvalue > 1e-3
    assert 0.2 < n.float().mean() < 0.95 and stats["ar_unfilled"] == 0


def test_paper_mode_bias_is_visible():
    out, _, _ = run_toy(TARGET, DRAFT, "paper")
    assert kstest(out.numpy(), norm(scale=math.sqrt(TARGET.var)).cdf).pvalue < 1e-3


def test_identical_heads_accept_everything():
    _, n, stats = run_toy(TARGET, TARGET, "exact")
    assert bool((n == 1).all()) and stats["accepted"] == M


def test_first_rejection_stops_the_block():
    g = torch.Generator().manual_seed(1)
    B, k = 20_000, 4
    x_T, noises = torch.randn(B * k, 1, generator=g), torch.randn(2, B * k, 1, generator=g)
    tq = {a: v.view(B, k, 1) for a, v in DRAFT.reverse_trajectory(None, x_T, noises).items()}
    tp = {a: v.view(B, k, 1) for a, v in TARGET.reverse_trajectory(None, x_T, noises).items()}
    n, _, stats = cspd_verify(tq, tp, g)
    # i.i.d. positions: P(n >= j) = alpha^j for the per-position acceptance alpha
    alpha = stats["accepted"] / stats["proposed"]
    for j in range(1, k + 1):
        assert abs((n >= j).float().mean() - alpha**j) < 0.02


def test_gmm_target_gaussian_draft_single_step():
    """1-D: acceptance = 1 - TV(p, q) and the outputs follow the GMM target (KS)."""
    w, mus, sds = torch.tensor([0.3, 0.7]), torch.tensor([-1.5, 1.0]), torch.tensor([0.5, 0.7])
    mq, sq = 0.0, 1.5

    def log_p(y):
        comp = torch.distributions.Normal(mus, sds).log_prob(y[..., None]) + w.log()
        return torch.logsumexp(comp, -1)[..., 0]  # (K, N)

    def log_q(y):
        return gaussian_logpdf(y, torch.full_like(y, mq), torch.full_like(y, sq))

    def sample_p(k, gen):
        c = torch.multinomial(w, k * M, replacement=True, generator=gen).view(k, M)
        return (mus[c] + sds[c] * torch.randn(k, M, generator=gen))[..., None]  # (k, M, 1)

    g = torch.Generator().manual_seed(2)
    x = (mq + sq * torch.randn(M, generator=g))[None, :, None]  # (1, M, 1) drafts
    accept = torch.rand(M, generator=g).log() < (log_p(x) - log_q(x)).clamp(max=0)[0]
    z, tries, filled = residual_sample(sample_p, log_p, log_q, torch.zeros(M), g, K=16)
    out = torch.where(accept, x[0, :, 0], z[:, 0])
    grid = torch.linspace(-10, 10, 20_001)[None, :, None]
    tv = 0.5 * (log_p(grid).exp() - log_q(grid).exp()).abs().sum() * (20 / 20_000)
    assert abs(accept.float().mean() - (1 - tv)) < 0.01
    assert filled.all()
    assert abs(tries.float().mean() - 1 / tv) < 0.1 * (1 / tv)  # A-R tries ~ 1 / Z, Z = TV

    def gmm_cdf(v):
        return sum(wi * norm(mi, si).cdf(v) for wi, mi, si in zip(w.tolist(), mus.tolist(), sds.tolist()))

    assert kstest(out.numpy(), gmm_cdf).pvalue > 1e-3


@pytest.mark.parametrize("mode", ["bogus"])
def test_bad_mode_is_rejected(mode):
    with pytest.raises(ValueError, match="sampler.mode"):
        run_toy(TARGET, DRAFT, mode)


def test_path_means_equal_the_chain_means():
    """A head's step means along a path in one batched call equal those its chain computed."""
    from vargen.heads.diffusion import DiffusionHead, DiffusionHeadConfig

    torch.manual_seed(0)
    head = DiffusionHead(DiffusionHeadConfig(width=16, depth=2), 3, 8).double()
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.2)
    g = torch.Generator().manual_seed(0)
    c, cu = torch.randn(5, 8, generator=g).double(), torch.randn(5, 8, generator=g).double()
    w = torch.tensor([1.0, 2.0, 1.0, 3.0, 1.5]).double()
    x_T, noises = torch.randn(5, 3, generator=g).double(), torch.randn(6, 5, 3, generator=g).double()
    tr = head.reverse_trajectory(c, x_T, noises, 1.0, w, cu, return_path=True)
    assert torch.allclose(head.path_means(c, tr["path"], w, cu), tr["means"], atol=1e-12)
    assert torch.equal(tr["path"][0], x_T) and torch.allclose(
        tr["x0"], tr["mean_last"] + tr["std_last"] * noises[-1]
    )


@pytest.mark.parametrize("subset", [False, True])
def test_residual_rounds_draw_the_residual_with_later_rounds_on_unfilled_rows(subset):
    """Enumerable toy: every row draws norm(max(0, p - q)) (chi-square), K = 1 so most rows take
    several rounds; with ``subset`` the later rounds propose for the unfilled rows only."""
    from scipy.stats import chisquare

    from vargen.sampling.speculative.cspd_verify import residual_rounds

    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    q = torch.tensor([0.25, 0.15, 0.2, 0.4])
    resid = (p - q).clamp(min=0) / (p - q).clamp(min=0).sum()  # [0, 1 / 3, 2 / 3, 0]
    n = 20_000
    need = torch.arange(n) % 5 != 0  # every 5th row needs no residual: a plain p sample
    seen = []

    def propose(k, gen, rows=None):
        m = n if rows is None else len(rows)
        seen.append(m)
        y = torch.multinomial(p, k * m, replacement=True, generator=gen).view(k, m, 1).float()
        i = y[..., 0].long()
        return y, (q[i] / p[i]).log()

    y, tries, filled, rounds = residual_rounds(
        propose, need, torch.Generator().manual_seed(0), 1, subset=subset
    )
    assert bool(filled.all()) and rounds > 3
    assert seen[0] == n and (max(seen[1:]) < 0.9 * n if subset else set(seen) == {n})
    for rows, law in ((need, resid), (~need, p)):
        counts = torch.bincount(y[rows, 0].long(), minlength=4).double()
        keep = law > 0
        assert counts[~keep].sum() == 0
        assert chisquare(counts[keep], counts.sum() * law[keep]).pvalue > 1e-3
    assert abs(float(tries[need].float().mean()) - 1 / 0.15) < 0.2  # 1 / sum max(0, p - q)
