"""FKC on analytic Gaussian / mixture experts: targets in closed form (spec section 2c)."""

import math

import pytest
import torch

from vargen.diffusion.analytic import GaussianMixture1D
from vargen.diffusion.fkc import ess, fkc_sample, log_weight_rate, multinomial_resample, systematic_resample
from vargen.diffusion.schedules import VPSchedule

SCH = VPSchedule()


def _moments(experts, betas, weighted, seeds=(0, 1, 2), n=4000, steps=500):
    means, variances, xs = [], [], []
    for s in seeds:
        x, _, _ = fkc_sample(
            experts, betas, SCH, n, 1, steps, torch.Generator().manual_seed(s), weighted=weighted
        )
        means.append(x.mean().item())
        variances.append(x.var().item())
        xs.append(x)
    return sum(means) / len(means), sum(variances) / len(variances), xs


def _product_gaussian(betas, mus, vars_):
    prec = sum(b / v for b, v in zip(betas, vars_))
    return sum(b * m / v for b, m, v in zip(betas, mus, vars_)) / prec, 1.0 / prec


def test_annealed_gaussian_variance(one_thread):
    g = GaussianMixture1D([1.0], [1.0], [0.5], SCH)
    target = 0.5 / 2.0
    _, v_fkc, _ = _moments([g.score], [2.0], True)
    _, v_plain, _ = _moments([g.score], [2.0], False)
    assert abs(v_fkc / target - 1) < 0.1
    assert abs(v_plain / target - 1) > 0.2  # the unweighted sampler is measurably off


def test_product_of_experts_mean_and_variance(one_thread):
    g1 = GaussianMixture1D([1.0], [-1.0], [1.0], SCH)
    g2 = GaussianMixture1D([1.0], [2.0], [0.5], SCH)
    mu, var = _product_gaussian([1, 1], [-1.0, 2.0], [1.0, 0.5])  # (1.0, 1/3)
    m_fkc, v_fkc, _ = _moments([g1.score, g2.score], [1.0, 1.0], True)
    m_plain, v_plain, _ = _moments([g1.score, g2.score], [1.0, 1.0], False)
    assert abs(m_fkc - mu) < 0.05 and abs(v_fkc / var - 1) < 0.1
    assert abs(m_plain - mu) > 0.1 or abs(v_plain / var - 1) > 0.2


def test_cfg_geometric_average(one_thread):
    w = 2.0
    cond = GaussianMixture1D([1.0], [1.5], [0.3], SCH)
    unc = GaussianMixture1D([1.0], [1.0], [1.0], SCH)
    mu, var = _product_gaussian([w, 1 - w], [1.5, 1.0], [0.3, 1.0])
    m_fkc, v_fkc, _ = _moments([cond.score, unc.score], [w, 1 - w], True)
    m_plain, v_plain, _ = _moments([cond.score, unc.score], [w, 1 - w], False)
    assert abs(m_fkc - mu) < 0.05 and abs(v_fkc / var - 1) < 0.1
    assert abs(m_plain - mu) > 0.08 or abs(v_plain / var - 1) > 0.15


def test_annealed_mixture_mass(one_thread):
    gmm = GaussianMixture1D([0.5, 0.5], [-2.0, 2.0], [0.25, 1.0], SCH)
    grid = torch.linspace(-12, 12, 200001, dtype=torch.float64)
    comp = torch.stack(
        [torch.exp(-0.5 * (grid - m) ** 2 / v) / math.sqrt(v) for m, v in ((-2, 0.25), (2, 1.0))]
    )
    dens = (0.5 * comp).sum(0) ** 2  # beta = 2
    ref = (dens[grid < 0].sum() / dens.sum()).item()
    seeds = range(5)
    fkc = sum((x < 0).double().mean().item() for x in _moments([gmm.score], [2.0], True, seeds)[2]) / 5
    plain = sum((x < 0).double().mean().item() for x in _moments([gmm.score], [2.0], False, seeds)[2]) / 5
    assert abs(fkc - ref) < 0.05
    assert abs(plain - ref) > 0.08


def test_systematic_uniform_weights_each_index_once():
    for K in (1, 7, 64):
        idx = systematic_resample(torch.zeros(K, dtype=torch.float64), torch.Generator().manual_seed(K))
        assert idx.tolist() == list(range(K))


def test_resamplers_sorted_and_follow_weights():
    log_w = torch.log(torch.tensor([0.7, 0.1, 0.2], dtype=torch.float64))
    for fn in (systematic_resample, multinomial_resample):
        idx = fn(log_w.repeat(1000)[:3000], torch.Generator().manual_seed(0))
        assert torch.all(idx[1:] >= idx[:-1])
    g = torch.Generator().manual_seed(1)
    idx = torch.cat([multinomial_resample(log_w, g) for _ in range(3000)])
    freq = torch.bincount(idx, minlength=3).double() / idx.numel()
    assert torch.allclose(freq, log_w.exp(), atol=0.02)


def test_ess_bounds_and_shift_invariance():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        lw = torch.randn(16, generator=g, dtype=torch.float64) * 5
        e = ess(lw).item()
        assert 1 - 1e-9 <= e <= 16 + 1e-9
        assert ess(lw + 123.0).item() == pytest.approx(e)
        i1 = systematic_resample(lw, torch.Generator().manual_seed(3))
        i2 = systematic_resample(lw + 50.0, torch.Generator().manual_seed(3))
        assert torch.equal(i1, i2)


def test_beta_one_and_w_one_give_zero_weights():
    x = torch.randn(32, 2, dtype=torch.float64)
    s1, s2 = torch.randn_like(x), torch.randn_like(x)
    assert torch.all(log_weight_rate([s1], [1.0], -3.0, 2.0) == 0)
    assert torch.all(log_weight_rate([s1, s2], [1.0, 0.0], -3.0, 2.0) == 0)
    g = GaussianMixture1D([1.0], [1.0], [0.5], SCH)
    _, log_w, st = fkc_sample(
        [g.score], [1.0], SCH, 64, 1, 50, torch.Generator().manual_seed(0), final_resample=False
    )
    assert torch.all(log_w == 0) and st["target_forwards"] == 50


def test_same_seed_same_output():
    g = GaussianMixture1D([1.0], [1.0], [0.5], SCH)
    a = fkc_sample([g.score], [2.0], SCH, 128, 1, 50, torch.Generator().manual_seed(4))[0]
    b = fkc_sample([g.score], [2.0], SCH, 128, 1, 50, torch.Generator().manual_seed(4))[0]
    assert torch.equal(a, b)
