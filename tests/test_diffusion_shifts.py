"""TS-DPM exposure-bias time shift (a hook of the DDIM loop), eps/v/x0 conversions."""

import pytest
import torch

from vargen.diffusion.denoiser import PARAMETERISATIONS, eps_to, to_eps
from vargen.diffusion.loops import ddim_sample
from vargen.diffusion.schedules import linear_alphas_cumprod
from vargen.diffusion.time_shift import ExposureBiasTimeShift, calibrate_window

ABAR = linear_alphas_cumprod()


def _gauss_eps(v0):
    """Exact eps for data N(0, v0 I): eps = sqrt(1-abar) x / (abar v0 + 1 - abar)."""

    def eps(x, t):
        a = ABAR[t].view(-1, *([1] * (x.dim() - 1)))
        return (1 - a).sqrt() * x / (a * v0 + 1 - a)

    return eps


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("mode", ["canonical", "pndm_target", "adm_target"])
@pytest.mark.parametrize("window,cutoff", [(0, 300), (40, 1000)])
def test_disabled_time_shift_is_bit_exact(eta, mode, window, cutoff):
    ts = ExposureBiasTimeShift(window=window, cutoff=cutoff, mode=mode)
    eps = _gauss_eps(0.5)
    base, _ = ddim_sample(eps, (8, 16), 10, torch.Generator().manual_seed(0), eta=eta)
    off, st = ddim_sample(eps, (8, 16), 10, torch.Generator().manual_seed(0), eta=eta, hook=ts)
    assert torch.equal(base, off) and st["shifted_steps"] == 0


@pytest.mark.parametrize("mode", ["canonical", "pndm_target", "adm_target"])
def test_enabled_time_shift_changes_output(mode):
    eps = _gauss_eps(0.5)
    base, _ = ddim_sample(eps, (8, 16), 10, torch.Generator().manual_seed(0))
    ts = ExposureBiasTimeShift(40, mode=mode)
    on, st = ddim_sample(eps, (8, 16), 10, torch.Generator().manual_seed(0), hook=ts)
    assert st["shifted_steps"] > 0 and not torch.equal(base, on)


def test_adm_target_transfers_to_the_shifted_step_minus_stride():
    """adm_target: the network sees the scheduled t; the transfer goes abar_t -> abar_{t_s - stride}."""
    ts = ExposureBiasTimeShift(window=40, cutoff=0, mode="adm_target")
    seen_x, seen_t = [], []

    def eps(x, t_B):  # eps = 0 makes one DDIM step x -> sqrt(abar_target / abar_t) x
        seen_x.append(x.clone())
        seen_t.append(t_B.clone())
        return torch.zeros_like(x)

    ddim_sample(eps, (64, 16), 3, torch.Generator().manual_seed(0), hook=ts)  # grid 999, 500, 0
    assert [int(t.unique()) for t in seen_t] == [999, 500, 0]  # never a shifted network time
    target = (ts.shifted(seen_x[1], 500, ABAR) - 500).clamp(min=0)  # (B,) the stride is 500
    want = (ABAR[target] / ABAR[500]).sqrt()[:, None] * seen_x[1]
    torch.testing.assert_close(seen_x[2], want, rtol=1e-12, atol=0)
    assert (target > 0).any()  # some rows really moved off the scheduled target 0


def test_window_and_cutoff():
    ts = ExposureBiasTimeShift(window=20, cutoff=300)
    g = torch.Generator().manual_seed(0)
    for t in (100, 300, 301, 600, 995):
        x = torch.randn(32, 64, generator=g, dtype=torch.float64) * torch.rand(32, 1, generator=g) * 1.5
        t_s = ts.shifted(x, t, ABAR)
        assert torch.all((t_s - t).abs() <= 10) and torch.all((t_s >= 0) & (t_s <= 999))
        if t <= 300:
            assert torch.all(t_s == t)


def test_variance_matching_recovers_tau_and_is_monotone():
    ts = ExposureBiasTimeShift(window=40, cutoff=0)
    g = torch.Generator().manual_seed(1)
    for tau_star, t in ((150, 160), (200, 190), (250, 265)):
        x = (1 - ABAR[tau_star]).sqrt() * torch.randn(1, 100_000, generator=g, dtype=torch.float64)  # x0 = 0
        t_s = ts.shifted(x, t, ABAR).item()
        assert abs(t_s - tau_star) <= 1
        prev = t_s
        for delta in (0.01, 0.05, 0.2):
            now = ts.shifted(x * (1 + delta), t, ABAR).item()
            assert now >= prev
            prev = now


def test_corrected_variance_is_noop_on_exact_samples_paper_is_not():
    v0, t = 0.3, 200
    g = torch.Generator().manual_seed(2)
    a = ABAR[t]
    x0 = v0**0.5 * torch.randn(4, 100_000, generator=g, dtype=torch.float64)
    x = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    corrected = ExposureBiasTimeShift(window=100, cutoff=0, variance="corrected", data_var=v0).shifted(
        x, t, ABAR
    )
    paper = ExposureBiasTimeShift(window=100, cutoff=0).shifted(x, t, ABAR)
    assert torch.all((corrected - t).abs() <= 2)
    assert torch.all(paper > t + 5)  # ignores abar * v0: exact samples are pushed to noisier steps


def test_time_shift_bad_config_names_key():
    with pytest.raises(ValueError, match="time_shift.mode"):
        ExposureBiasTimeShift(window=4, mode="deis")
    with pytest.raises(ValueError, match="time_shift.variance"):
        ExposureBiasTimeShift(window=4, variance="data")


@pytest.mark.parametrize("kind", PARAMETERISATIONS)
def test_parameterisation_round_trip(kind):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 5, 4, generator=g, dtype=torch.float64).unbind(0)
    a = 0.6
    s = (1 - a * a) ** 0.5
    xt = a * x0 + s * eps
    pred = eps_to(eps, kind, xt, a, s)
    assert torch.allclose(to_eps(pred, kind, xt, a, s), eps)
    if kind == "x0":
        assert torch.allclose(pred, x0)
    if kind == "v":
        assert torch.allclose(pred, a * eps - s * x0)


@pytest.mark.parametrize("mode", ["canonical", "pndm_target", "adm_target"])
def test_first_step_is_never_shifted(mode):
    """x_T is pure noise: both reference repos start shifting at the second step. Grid 999, 500, 0
    with the cutoff set so that only the first step is eligible (pndm_target shifts the *next*
    step, 500): the output equals the unshifted sampler, though x_T's variance would shift."""
    ts = ExposureBiasTimeShift(window=200, cutoff=400 if mode == "pndm_target" else 600, mode=mode)
    eps = _gauss_eps(0.5)
    base, _ = ddim_sample(eps, (64, 16), 3, torch.Generator().manual_seed(0))
    shifted, st = ddim_sample(eps, (64, 16), 3, torch.Generator().manual_seed(0), hook=ts)
    assert torch.equal(base, shifted) and st["shifted_steps"] == 0
    x_T = torch.randn((64, 16), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert (
        ts.shifted(x_T, 500 if mode == "pndm_target" else 999, ABAR)
        != (500 if mode == "pndm_target" else 999)
    ).any()


def test_corrected_variance_improves_wasserstein_on_an_exact_denoiser(one_thread):
    """Exact mixture denoiser, linear schedule, 256 entries, DDIM-10, the reference's window 80:
    the corrected rule lowers W1 to the data marginal (it corrects DDIM's variance drift); the
    paper's rule, which ignores abar * Var(x0), raises it (seeds 1-4: none 0.115-0.120,
    corrected 0.108-0.110, paper 0.126-0.129)."""
    from scipy.stats import wasserstein_distance

    from vargen.diffusion.analytic import GaussianMixtureDenoiser

    den = GaussianMixtureDenoiser([0.5, 0.5], [-0.6, 0.6], [0.05, 0.05], ABAR)
    g = torch.Generator().manual_seed(0)
    data = torch.where(torch.rand(100_000, generator=g) < 0.5, -0.6, 0.6) + 0.05**0.5 * torch.randn(
        100_000, generator=g
    )
    w1 = {}
    for rule in ("none", "paper", "corrected"):
        ts = None if rule == "none" else ExposureBiasTimeShift(80, 300, rule, data_var=0.05 + 0.36)
        x, _ = ddim_sample(den, (100, 256), 10, torch.Generator().manual_seed(1), hook=ts)
        w1[rule] = wasserstein_distance(x.flatten().numpy(), data.numpy())
    assert w1["corrected"] < w1["none"] - 0.003 and w1["paper"] > w1["none"] + 0.003, w1


def test_calibrated_window_per_schedule_and_size():
    """calibrate_window: on the exact Gaussian denoiser the paper rule only hurts (window 0), the
    corrected rule wants a wide window; the sweep it returns shows the error it minimised."""
    w, err = calibrate_window(ABAR, 256, 10, variance="paper", data_var=0.41, samples=64)
    assert w == 0 and err[80] > err[0]
    w, err = calibrate_window(ABAR, 256, 10, variance="corrected", data_var=0.41, samples=64)
    assert w >= 80 and err[w] < err[0] - 0.02 and err[w] == min(err.values())
    with pytest.raises(ValueError, match="calibrate_window"):
        ExposureBiasTimeShift(window=-1).shifted(torch.zeros(2, 4), 500, ABAR)
