"""The weighted-reference math of benchmarks/diffusion_fkc_images.py (issue 20, item 8) on toys
whose tilted target is known in closed form or by quadrature: draws of p(x) weighted by
p(c|x)^w must reproduce p_c^w p_u^(1-w), and the weighted Fréchet distance must vanish against
that target and equal the closed form against anything else."""

import math

import pytest
import torch

from benchmarks.diffusion_fkc_images import (
    calibrate_temperature,
    ess,
    frechet,
    snis,
    target_log_weights,
    weighted_frechet,
    weighted_moments,
)


def test_frechet_matches_closed_forms():
    f64 = dict(dtype=torch.float64)
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0], **f64), torch.tensor([0.5, 1.0, 0.0], **f64)
    s1, s2 = torch.tensor([1.0, 4.0, 0.25], **f64), torch.tensor([2.0, 1.0, 0.25], **f64)
    # diagonal: |dmu|^2 + sum (sqrt s1 - sqrt s2)^2
    want = float((mu1 - mu2).pow(2).sum() + (s1.sqrt() - s2.sqrt()).pow(2).sum())
    assert frechet(mu1, torch.diag(s1), mu2, torch.diag(s2)) == pytest.approx(want, abs=1e-10)
    # non-commuting covariances: tr (S1 S2)^(1/2) from the eigenvalues of S1 S2 (real, >= 0)
    g = torch.Generator().manual_seed(0)
    a, b = (
        torch.randn(4, 4, generator=g, dtype=torch.float64),
        torch.randn(4, 4, generator=g, dtype=torch.float64),
    )
    c1, c2 = a @ a.T + 0.1 * torch.eye(4), b @ b.T + 0.1 * torch.eye(4)
    tr_sqrt = torch.linalg.eigvals(c1 @ c2).real.clamp_min(0).sqrt().sum()
    want = float(c1.trace() + c2.trace() - 2 * tr_sqrt)
    assert frechet(torch.zeros(4), c1, torch.zeros(4), c2) == pytest.approx(want, rel=1e-8)


def test_weighted_moments_and_ess_reduce_to_the_unweighted_ones():
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mu, cov = weighted_moments(x, torch.full((50,), 0.7, dtype=torch.float64))
    assert torch.allclose(mu, x.mean(0)) and torch.allclose(cov, torch.cov(x.T))
    assert ess(torch.zeros(50)) == pytest.approx(50)
    assert ess(torch.tensor([0.0] + [-1e4] * 49)) == pytest.approx(1.0)


def test_exponential_tilt_of_a_gaussian_is_the_shifted_gaussian():
    """N(0, I) tilted by exp(a.x) is N(a, I): the weighted reference's Fréchet distance to draws
    of N(a, I) is sampling noise, to N(0, I) (the untilted set) it is |a|^2."""
    g = torch.Generator().manual_seed(2)
    a = torch.tensor([0.8, -0.5], dtype=torch.float64)
    x = torch.randn(40000, 2, generator=g, dtype=torch.float64)  # draws of N(0, I)
    log_w = x @ a  # (N,)
    assert ess(log_w) == pytest.approx(40000 * math.exp(-float(a @ a)), rel=0.1)
    mu, cov = weighted_moments(x, log_w)
    assert torch.allclose(mu, a, atol=0.03) and torch.allclose(
        cov, torch.eye(2, dtype=torch.float64), atol=0.05
    )
    assert frechet(mu, cov, a, torch.eye(2, dtype=torch.float64)) < 0.005
    y = a + torch.randn(20000, 2, generator=g, dtype=torch.float64)  # draws of the tilted target
    assert weighted_frechet(y, x, None, log_w) < 0.01
    assert weighted_frechet(x, x, None, log_w) == pytest.approx(float(a @ a), abs=0.05)


def test_classifier_tilted_draws_of_p_x_estimate_the_cfg_target():
    """Two classes, p(x) = (N(-1, 1) + N(1, 1)) / 2, exact posterior p(1|x): draws of p(x)
    weighted by p(1|x)^w give SNIS means that match p_1^w p_u^(1-w) by quadrature (w = 3)."""
    w = 3.0

    def normal(x, m, s):
        return torch.exp(-0.5 * ((x - m) / s) ** 2) / (s * math.sqrt(2 * math.pi))

    def p0(x):
        return normal(x, -1.0, 1.0)

    def p1(x):
        return normal(x, 1.0, 1.0)

    g = torch.Generator().manual_seed(3)
    n = 40000
    comp = torch.rand(n, generator=g) < 0.5
    x = torch.where(comp, 1.0 + torch.randn(n, generator=g), -1.0 + torch.randn(n, generator=g)).double()
    pu = 0.5 * p0(x) + 0.5 * p1(x)
    logp_N2 = torch.stack([torch.log(0.5 * p0(x) / pu), torch.log(0.5 * p1(x) / pu)], 1)  # (N, 2)
    log_w = target_log_weights(logp_N2, 1, w)
    grid = torch.linspace(-8, 8, 16001, dtype=torch.float64)
    pg = 0.5 * p0(grid) + 0.5 * p1(grid)
    dens = p1(grid) ** w * pg ** (1 - w)
    dens = dens / dens.sum()
    mean_t = float((grid * dens).sum())
    logp_t = float((torch.log(0.5 * p1(grid) / pg) * dens).sum())
    assert snis(x, log_w) == pytest.approx(mean_t, abs=0.02)
    assert snis(logp_N2[:, 1], log_w) == pytest.approx(logp_t, abs=0.01)
    # the tilt is far from the class itself (w = 1: p(x|1), mean 1, log p -0.36; target 1.44, -0.13)
    assert abs(snis(x, target_log_weights(logp_N2, 1, 1.0)) - mean_t) > 0.3


def test_calibrated_temperature_undoes_overconfidence():
    g = torch.Generator().manual_seed(4)
    logits = 1.5 * torch.randn(20000, 3, generator=g, dtype=torch.float64)  # the true log-odds
    y = torch.multinomial(torch.softmax(logits, -1), 1, generator=g).squeeze(1)
    assert calibrate_temperature(3.0 * logits, y) == pytest.approx(3.0, rel=0.05)


def test_target_reference_scores_exact_target_draws_near_the_floor():
    """TargetReference's per-class plumbing on the two-class toy (exact posterior as classifier,
    identity features): exact draws of each class's target score near 0 and match its SNIS
    log p(c|x); draws of p(x|c) (the untilted class) score worse on both."""
    from benchmarks.diffusion_fkc_images import TargetReference

    w, g = 3.0, torch.Generator().manual_seed(5)
    means = torch.tensor([-1.0, 1.0], dtype=torch.float64)

    def classify(x_N1):
        ll = -0.5 * (x_N1 - means) ** 2  # (N, 2): equal priors and variances
        return torch.log_softmax(ll, -1)

    n = 40000
    y = (torch.rand(n, generator=g) < 0.5).long()
    x = (means[y] + torch.randn(n, generator=g, dtype=torch.float64))[:, None]  # (N, 1) draws of p(x)
    ref = TargetReference(x, y, classify, lambda v: v, w)
    summ = ref.summary()
    assert summ["ess_min"] > 0.1 * n
    # exact target draws by resampling a fresh set of p(x) draws by their weights, per class
    y2 = (torch.rand(n, generator=g) < 0.5).long()
    x2 = (means[y2] + torch.randn(n, generator=g, dtype=torch.float64))[:, None]
    lab = torch.arange(2).repeat_interleave(4000)  # (8000,)
    pick = torch.cat(
        [torch.multinomial(torch.softmax(w * classify(x2)[:, c], 0), 4000, True, generator=g) for c in (0, 1)]
    )
    exact = ref.score(x2[pick], lab)
    data = ref.score(torch.cat([x2[y2 == c][:4000] for c in (0, 1)]), lab)  # p(x|c), not the target
    assert exact["fd"] < 0.01 and abs(exact["logp"] - summ["logp"]) < 0.01, (exact, summ)
    assert data["fd"] > 0.1 and data["logp"] < summ["logp"] - 0.1, (data, summ)
