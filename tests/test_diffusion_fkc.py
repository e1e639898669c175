"""FKC's SMC pieces: resamplers and the effective sample size. The FKC-CFG sampler itself is
tested against closed-form targets in test_diffusion_samplers.py."""

import pytest
import torch

from vargen.diffusion.fkc import ess, multinomial_resample, systematic_resample


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
