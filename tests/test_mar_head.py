"""MAR diffusion head: zero init, sample == reverse_trajectory, CFG, temperature, exactness on a Gaussian."""

import math

import torch

from vargen.heads.diffusion import DiffusionHead, DiffusionHeadConfig
from vargen.registry import HEADS, import_components


def make_head(**kw):
    torch.manual_seed(0)
    return DiffusionHead(DiffusionHeadConfig(width=32, depth=2, num_sampling_steps=20, **kw), 3, 8)


def randomise(head):
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))


def test_registered_and_zero_init_predicts_zero_eps():
    import_components()
    head = HEADS.build({"name": "mar_diffusion", "width": 16, "depth": 1}, token_dim=3, cond_dim=8)
    x, cond = torch.randn(5, 3), torch.randn(5, 8)
    eps = head.net(x, torch.tensor([0, 10, 100, 500, 999]), cond)
    assert torch.equal(eps, torch.zeros_like(eps))
    assert head.num_sampling_steps == 100


def test_sample_equals_reverse_trajectory_with_documented_noise_order():
    head = make_head().double()  # float64: a random head's chain reaches large values
    randomise(head)
    cond, uncond = torch.randn(6, 8).double(), torch.randn(6, 8).double()
    for cfg_scale in (1.0, 2.5):
        x = head.sample(
            cond,
            torch.Generator().manual_seed(3),
            temperature=0.7,
            cfg_scale=cfg_scale,
            cond_uncond_NW=uncond,
        )
        g = torch.Generator().manual_seed(3)
        x_T = torch.randn(6, 3, generator=g, dtype=torch.float64)
        noises = torch.stack([torch.randn(6, 3, generator=g, dtype=torch.float64) for _ in range(20)])
        out = head.reverse_trajectory(cond, x_T, noises, 0.7, cfg_scale, uncond)
        torch.testing.assert_close(x, out["x0"], rtol=0, atol=0)
        torch.testing.assert_close(out["x0"], out["mean_last"] + out["std_last"] * noises[-1])
        assert out["sum_log_std"].shape == (6,) and (out["std_last"] > 0).all()
        # the last step uses only noises[-1]: changing it moves x0 by std_last * delta
        noises2 = noises.clone()
        noises2[-1] += 1.0
        out2 = head.reverse_trajectory(cond, x_T, noises2, 0.7, cfg_scale, uncond)
        torch.testing.assert_close(out2["mean_last"], out["mean_last"])
        torch.testing.assert_close(out2["x0"] - out["x0"], out["std_last"].expand(6, 3), rtol=1e-6, atol=1e-9)


def test_cfg_scale_one_equals_conditional_and_temperature_zero_is_deterministic():
    head = make_head()
    randomise(head)
    cond, uncond = torch.randn(4, 8), torch.randn(4, 8)
    a = head.sample(cond, torch.Generator().manual_seed(1), cfg_scale=1.0, cond_uncond_NW=uncond)
    b = head.sample(cond, torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = head.sample(cond, torch.Generator().manual_seed(1), cfg_scale=3.0, cond_uncond_NW=uncond)
    assert (a - c).abs().max() > 1e-3
    # tau = 0: with a fixed x_T the per-step noises are irrelevant
    g = torch.Generator().manual_seed(5)
    x_T = torch.randn(4, 3, generator=g)
    n1, n2 = torch.randn(2, 20, 4, 3, generator=g)
    o1 = head.reverse_trajectory(cond, x_T, n1, temperature=0.0)
    o2 = head.reverse_trajectory(cond, x_T, n2, temperature=0.0)
    torch.testing.assert_close(o1["x0"], o2["x0"], rtol=0, atol=0)
    assert math.isinf(o1["sum_log_std"][0].item())


def test_oracle_eps_samples_gaussian_target(one_thread):
    """With the exact eps of N(m, s^2) the chain recovers m and s; respacing errs on the low side.

    The full 1000-step chain is exact up to Monte Carlo error; the respaced chain with the
    posterior (lower-bound) variance underestimates the spread, less so with more steps.
    """
    head = make_head()
    m, s = torch.tensor([1.5, -0.5, 0.0]).double(), torch.tensor([0.3, 1.0, 2.0]).double()
    abar_T = head.alpha_bar.double()

    class Oracle(torch.nn.Module):
        def forward(self, x, t, cond):
            a = abar_T[t][:, None]
            # eps*(x_t) = E[eps | x_t] for x0 ~ N(m, s^2)
            return (1 - a).sqrt() * (x - a.sqrt() * m) / (a * s**2 + 1 - a)

    head.net = Oracle()
    cond = torch.zeros(8000, 8, dtype=torch.float64)
    std_err = {}
    for steps in (20, 100, 1000):
        x = head.sample(cond, torch.Generator().manual_seed(0), num_steps=steps)
        assert (x.mean(0) - m).abs().max() < 0.05
        std_err[steps] = ((x.std(0) / s) - 1).abs().max().item()
    assert std_err[1000] < 0.03
    assert std_err[100] < 0.08
    assert std_err[1000] < std_err[100] < std_err[20]


def test_loss_repeats_batch_and_trains(one_thread):
    head = make_head(diffusion_batch_mul=4)
    torch.manual_seed(0)
    target, cond = torch.randn(32, 3) * 0.5 + 1.0, torch.randn(32, 8)
    first = head.loss(target, cond).item()
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    for _ in range(60):
        opt.zero_grad()
        loss = head.loss(target, cond)
        loss.backward()
        opt.step()
    # eps = 0 at init gives loss ~ E[eps^2] = 1; a trained head predicts part of eps
    assert abs(first - 1.0) < 0.15
    assert torch.stack([head.loss(target, cond) for _ in range(10)]).mean().item() < 0.8 * first


def test_per_row_cfg_scale_equals_per_row_scalar_calls():
    """A (N,) tensor of guidance scales gives each row the chain of its own scalar scale."""
    head = make_head().double()
    randomise(head)
    g = torch.Generator().manual_seed(7)
    cond, uncond = torch.randn(2, 6, 8, generator=g, dtype=torch.float64)
    x_T = torch.randn(6, 3, generator=g, dtype=torch.float64)
    noises = torch.randn(20, 6, 3, generator=g, dtype=torch.float64)
    w_N = torch.tensor([1.0, 2.5, 1.0, 0.5, 3.0, 2.5], dtype=torch.float64)
    out = head.reverse_trajectory(cond, x_T, noises, 0.8, w_N, uncond)
    for w in w_N.unique().tolist():
        r = w_N == w
        ref = head.reverse_trajectory(cond[r], x_T[r], noises[:, r], 0.8, w, uncond[r])
        for key in ("x0", "mean_last", "std_last", "sum_log_std"):
            torch.testing.assert_close(out[key][r], ref[key], rtol=1e-9, atol=1e-9)
    ones = head.reverse_trajectory(cond, x_T, noises, 0.8, torch.ones(6, dtype=torch.float64), uncond)
    plain = head.reverse_trajectory(cond, x_T, noises, 0.8)
    torch.testing.assert_close(ones["x0"], plain["x0"], rtol=0, atol=0)
    assert (out["x0"][w_N != 1] - plain["x0"][w_N != 1]).abs().min() > 1e-6  # guidance acts


def test_temperature_scales_a_gaussian_targets_spread_exactly():
    """tau multiplies every Gaussian draw, x_T included (one meaning with the flow samplers, see
    vargen/heads/flow.py): with the exact (affine) eps of a Gaussian target the sample at tau is
    m + tau (x_1 - m), m the tau = 0 output, draw for draw."""
    head = make_head()
    m, s = torch.tensor([1.5, -0.5, 0.0]).double(), torch.tensor([0.3, 1.0, 2.0]).double()
    abar_T = head.alpha_bar.double()

    class Oracle(torch.nn.Module):
        def forward(self, x, t, cond):
            a = abar_T[t][:, None]
            return (1 - a).sqrt() * (x - a.sqrt() * m) / (a * s**2 + 1 - a)

    head.net = Oracle()
    head.cfg.clip_x0 = 0.0  # the clamp is not affine
    cond = torch.zeros(500, 8, dtype=torch.float64)
    out = {
        tau: head.sample(cond, torch.Generator().manual_seed(0), temperature=tau) for tau in (0.0, 0.6, 1.0)
    }
    torch.testing.assert_close(out[0.6], out[0.0] + 0.6 * (out[1.0] - out[0.0]))


def test_eps_net_chain_equals_the_per_step_reference():
    """The EpsNet chain (modulations precomputed for every step, functional step) equals the
    per-step reference (any other net goes through ``_eps`` at each step) to float64 rounding:
    unguided, scalar and per-row guidance, temperature, the clamp, path and means."""

    class PerStep(torch.nn.Module):  # not an EpsNet: the reference loop
        def __init__(self, net):
            super().__init__()
            self.inner = net

        def forward(self, *a):
            return self.inner(*a)

    head = make_head(clip_x0=1.0).double()
    randomise(head)
    g = torch.Generator().manual_seed(11)
    cond, uncond = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    x_T = torch.randn(5, 3, generator=g, dtype=torch.float64)
    noises = torch.randn(20, 5, 3, generator=g, dtype=torch.float64)
    w_N = torch.tensor([1.0, 2.5, 1.0, 0.5, 3.0], dtype=torch.float64)
    cases = [(1.0, None, 1.0), (2.5, uncond, 0.8), (w_N, uncond, 1.3), (1.0, None, 0.0)]
    for w, u, tau in cases:
        for variance in ("beta_tilde", "beta"):
            kw = dict(return_path=True, variance=variance)
            fast = head.reverse_trajectory(cond, x_T, noises, tau, w, u, **kw)
            net, head.net = head.net, PerStep(head.net)
            ref = head.reverse_trajectory(cond, x_T, noises, tau, w, u, **kw)
            head.net = net
            for key in ("x0", "mean_last", "std_last", "sum_log_std", "path", "means"):
                torch.testing.assert_close(fast[key], ref[key], rtol=1e-10, atol=1e-10)
