"""TokenBridge quantizer (spec tokenizers.md §1c) and its dimension-wise AR head."""

import pytest
import torch

from vargen.tokenizers.tokenbridge import DimQuantConfig, DimQuantizer

REFERENCE = dict(levels=64, std_range=3.0, lo=-5.0, hi=5.0)


def test_reference_table_values():
    q = DimQuantizer(DimQuantConfig(**REFERENCE))
    c = q.values.double()
    assert (c[1:] > c[:-1]).all()
    torch.testing.assert_close(c, -c.flip(0), atol=1e-6, rtol=0)
    assert c[0].item() == pytest.approx(-2.437, abs=1e-3)
    assert c[32].item() == pytest.approx(0.0196, abs=1e-4)
    assert q.boundaries[0].item() == -3.0 and q.boundaries[-1].item() == 3.0


@pytest.mark.parametrize("bins", ["gaussian", "uniform"])
@pytest.mark.parametrize("assign", ["nearest", "bin"])
@pytest.mark.parametrize("levels", [8, 64])
def test_round_trip_every_index(bins, assign, levels):
    q = DimQuantizer(DimQuantConfig(**{**REFERENCE, "levels": levels}, bins=bins, assign=assign))
    idx = torch.arange(levels)
    assert torch.equal(q.quantize(q.dequantize(idx)), idx)


@pytest.mark.parametrize("bins", ["gaussian", "uniform"])
def test_indices_monotone_and_out_of_range_to_end_bins(bins):
    q = DimQuantizer(DimQuantConfig(**REFERENCE, bins=bins))
    x = torch.linspace(-7, 7, 20001)
    idx = q.quantize(x)
    assert (idx[1:] >= idx[:-1]).all()
    assert idx.min() == 0 and idx.max() == 63 and len(idx.unique()) == 64
    assert (q.quantize(torch.tensor([-5.01, -100.0])) == 0).all()
    assert (q.quantize(torch.tensor([5.01, 100.0])) == 63).all()


def test_exact_error_bound_reference():
    q = DimQuantizer(DimQuantConfig(**REFERENCE))
    bound = q.error_bound()
    # spec §1c: edge term 0.563 normalised = 0.94 latent dominates the interior half-gap 0.221
    assert bound == pytest.approx(0.563 * 10 / 6, abs=2e-3)
    x = torch.linspace(-5, 5, 200001)
    err = (x - q.dequantize(q.quantize(x))).abs()
    assert err.max().item() <= bound + 1e-5
    assert err.max().item() == pytest.approx(bound, abs=1e-3)  # attained at x = lo: the bound is tight
    interior_half_gap = ((q.values[1:] - q.values[:-1]) / 2).max().item() * q.scale
    assert err.max().item() > interior_half_gap + 0.3  # "half a bin" does not hold at the edges
    z = torch.randn(100000, generator=torch.Generator().manual_seed(0))
    assert (z - q.dequantize(q.quantize(z))).abs().mean().item() < 0.05


@pytest.mark.parametrize(
    "key,value",
    [("levels", 1), ("std_range", 0.0), ("lo", 6.0), ("bins", "log"), ("assign", "round")],
)
def test_bad_config_names_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        DimQuantizer(DimQuantConfig(**{**REFERENCE, key: value}))
