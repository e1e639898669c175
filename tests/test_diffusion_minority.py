"""Minority guidance on a 1-D GMM with the exact quadrature oracle classifier (spec 3c)."""

import torch

from vargen.diffusion.denoiser import eps_to
from vargen.diffusion.loops import ddim_sample
from vargen.diffusion.minority import (
    QuadratureOracle,
    assign_levels,
    guided_eps_fn,
    minority_score,
    quantile_levels,
)
from vargen.diffusion.schedules import linear_alphas_cumprod

ABAR = linear_alphas_cumprod()
W, MU, VAR = torch.tensor([0.85, 0.15]), torch.tensor([-1.0, 2.0]), torch.tensor([0.25, 0.25])


def _eps(x, t_B):
    """Exact eps of the GMM marginal at discrete step t."""
    a = ABAR[int(t_B[0])]
    var_t = a * VAR + 1 - a
    diff = x[..., None] - a.sqrt() * MU
    resp = torch.softmax(torch.log(W) - 0.5 * torch.log(var_t) - 0.5 * diff**2 / var_t, -1)
    score = (resp * (-diff / var_t)).sum(-1)
    return -(1 - a).sqrt() * score


def _x0_hat(x_t, t):
    a = ABAR[t]
    return (x_t - (1 - a).sqrt() * _eps(x_t, torch.tensor([t]))) / a.sqrt()


def _data(n, g):
    comp = torch.multinomial(W, n, replacement=True, generator=g)
    return (MU[comp] + VAR[comp].sqrt() * torch.randn(n, generator=g, dtype=torch.float64)).reshape(n, 1)


def test_levels_balanced_and_in_range():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(1000, generator=g, dtype=torch.float64)
    labels, q = quantile_levels(scores, 8)
    assert labels.min() >= 0 and labels.max() <= 7
    counts = torch.bincount(labels, minlength=8)
    assert (counts - 125).abs().max() <= 1


def test_minor_component_has_higher_minority_score():
    g = torch.Generator().manual_seed(1)
    x0 = torch.cat([torch.full((500, 1), -1.0), torch.full((500, 1), 2.0)]).double()
    x0 = x0 + 0.5 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    s = minority_score(x0, _x0_hat, ABAR, 605, g)
    assert s[500:].mean() > s[:500].mean()


def test_guidance_fraction_matches_data_at_w0_and_rises(one_thread):
    g = torch.Generator().manual_seed(2)
    t_score, L = 605, 4
    _, q = quantile_levels(minority_score(_data(20000, g), _x0_hat, ABAR, t_score, g), L)
    grid = torch.linspace(-5, 6, 441, dtype=torch.float64)
    dens = sum(w * torch.exp(-0.5 * (grid - m) ** 2 / v) / v.sqrt() for w, m, v in zip(W, MU, VAR))
    dens = dens / dens.sum()
    grid_levels = assign_levels(minority_score(grid[:, None], _x0_hat, ABAR, t_score, g, n_iter=400), q)
    data_frac = dens[grid_levels == L - 1].sum().item()
    oracle = QuadratureOracle(grid, dens, grid_levels, ABAR)

    def level_of(x):
        return grid_levels[torch.bucketize(x.reshape(-1).clamp(-5, 6), grid).clamp(max=len(grid) - 1)]

    fracs = []
    for w in (0.0, 1.0, 3.0):
        eps = guided_eps_fn(_eps, "eps", oracle.grad_log_p, L - 1, w, ABAR)
        x, _ = ddim_sample(eps, (2000, 1), 100, torch.Generator().manual_seed(3), eta=1.0)
        fracs.append((level_of(x) == L - 1).double().mean().item())
    assert abs(fracs[0] - data_frac) < 0.03
    assert fracs[1] > 0.85 and fracs[0] < fracs[1] <= fracs[2]


def test_v_model_guidance_equals_eps_model_guidance():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(16, 1, generator=g, dtype=torch.float64)
    t_B = torch.full((16,), 500)
    a = ABAR[500]

    def v_model(x, t_B):
        return eps_to(_eps(x, t_B), "v", x, a.sqrt(), (1 - a).sqrt())

    def grad(x, t, c):
        return torch.sin(x)

    e1 = guided_eps_fn(_eps, "eps", grad, 3, 2.0, ABAR)(x, t_B)
    e2 = guided_eps_fn(v_model, "v", grad, 3, 2.0, ABAR)(x, t_B)
    assert torch.allclose(e1, e2) and not torch.allclose(e1, _eps(x, t_B))
