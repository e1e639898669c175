"""Masked diffusion and LSD / LSD+ (spec sampling-diffusion.md section 4).

The enumerable toy (spec 4c): L = 2 positions, V = 3 tokens, a correlated joint p0 and its exact
conditionals as the "network"; the 16 states (mask included) are enumerated, so the terminal
distribution of any sampler (coefficients, times) is computed exactly and its total-variation
distance (TV) to p0 has no Monte-Carlo error.
"""

import itertools

import pytest
import torch

from vargen.diffusion.absorbing import all_mask, sample_chain, transition_probs, uniform_times
from vargen.diffusion.lsd import distill_loss, student_times

V, L, EPS = 3, 2, 1e-3
P0 = torch.tensor([[0.30, 0.04, 0.02], [0.03, 0.22, 0.05], [0.02, 0.07, 0.25]])
P0 = P0 / P0.sum()  # (V, V) joint of (x_0, x_1): strongly correlated
STATES = torch.tensor(list(itertools.product(range(V + 1), repeat=2)))  # (16, 2), index a*4 + b


def toy_logp0(x_BL):
    """Exact log p0(x_i = v | unmasked other position), (B, 2, V)."""
    other1, other0 = x_BL[:, 1].clamp_max(V - 1), x_BL[:, 0].clamp_max(V - 1)
    c0, c1 = P0[:, other1].T, P0[other0, :]  # (B, V) joint slices
    out = torch.stack(
        [
            torch.where((x_BL[:, 1] == V)[:, None], P0.sum(1), c0 / c0.sum(1, keepdim=True)),
            torch.where((x_BL[:, 0] == V)[:, None], P0.sum(0), c1 / c1.sum(1, keepdim=True)),
        ],
        1,
    )
    return out.log()


def exact_terminal(times, coefs=None):
    """Exact distribution over the 16 states after the chain (the product of per-step 16x16 kernels)."""
    d = torch.zeros(16, dtype=torch.float64)
    d[15] = 1.0  # all-mask
    K = len(times) - 1
    for i in range(K):
        c = 1.0 if coefs is None else coefs[i]
        p = transition_probs(toy_logp0(STATES), STATES, times[i], times[i + 1], EPS, c, i == K - 1).double()
        d = d @ (p[:, 0, :, None] * p[:, 1, None, :]).reshape(16, 16)  # positions move independently
    return d


def tv_to_p0(d) -> float:
    clean = d.view(V + 1, V + 1)[:V, :V]
    return 0.5 * ((clean - P0.double()).abs().sum().item() + (1 - clean.sum().item()))


def test_unit_coefficients_and_uniform_steps_reproduce_the_base_sampler_draw_for_draw():
    for n in (3, 4, 8):
        x = all_mask(512, L, V)
        base = sample_chain(toy_logp0, x, uniform_times(n, EPS), EPS, torch.Generator().manual_seed(n))
        times = student_times(torch.zeros(n, requires_grad=True), EPS)  # LSD+ parameterisation at init
        student = sample_chain(
            toy_logp0, x, times, EPS, torch.Generator().manual_seed(n), coefs_K=torch.ones(n, requires_grad=True)
        )
        assert torch.equal(base, student)
        assert (student < V).all()  # the last step unmasks everything
        other = sample_chain(toy_logp0, x, times, EPS, torch.Generator().manual_seed(n), torch.full((n,), 1.3))
        assert not torch.equal(base, other)  # the coefficients do reach the draws


def test_rows_are_probabilities_and_clipped_when_a_step_overshoots():
    torch.manual_seed(0)
    logp0 = torch.log_softmax(3 * torch.randn(64, 5, 7), -1)
    x = torch.randint(0, 8, (64, 5))  # 7 = mask
    for t, t_next, c, last in [(0.9, 0.8, 1.0, False), (0.3, 0.05, 2.5, False), (0.9, 0.05, 0.2, False), (0.2, EPS, 1.7, True)]:
        p = transition_probs(logp0, x, t, t_next, EPS, c, last)  # (B, L, V+1)
        assert (p >= 0).all() and torch.allclose(p.sum(-1), torch.ones(64, 5))
        kept = x < 7
        assert torch.equal(p[kept].argmax(-1), x[kept]) and torch.allclose(p[kept].max(-1).values, torch.ones(1))
        if last:
            assert (p[..., 7] == 0).all()
    # no clipping while dt sigma sum_j s_j <= 1: with c = 1 the unmask probability is dt / t exactly
    p = transition_probs(logp0, torch.full((64, 5), 7), 0.8, 0.6, EPS, 1.0)
    assert torch.allclose(p[..., :7].sum(-1), torch.full((64, 5), 0.2 / 0.8), atol=1e-6)
    assert torch.allclose(p[..., :7] / p[..., :7].sum(-1, keepdim=True), logp0.exp(), atol=1e-6)


def test_exact_enumeration_matches_the_sampler_and_teacher_tv_falls_with_steps():
    g = torch.Generator().manual_seed(0)
    x = sample_chain(toy_logp0, all_mask(40000, L, V), uniform_times(4, EPS), EPS, g)
    emp = torch.bincount(x[:, 0] * 4 + x[:, 1], minlength=16).double() / 40000
    assert 0.5 * (emp - exact_terminal(uniform_times(4, EPS))).abs().sum() < 0.015
    tvs = [tv_to_p0(exact_terminal(uniform_times(n, EPS))) for n in (1, 2, 4, 16, 64, 256)]
    assert all(a > b for a, b in zip(tvs, tvs[1:])), tvs
    assert tvs[0] > 0.4 and tvs[-1] < 0.003  # one step draws both tokens independently


def _distil(n, learn_steps, c0, B, N, iters=100, lr=0.05, seed=1):
    teacher_times = uniform_times(N, EPS)
    g = torch.Generator().manual_seed(seed)
    _, states = sample_chain(toy_logp0, all_mask(B, L, V), teacher_times, EPS, g, record=True)
    coef = torch.nn.Parameter(torch.full((n,), c0))
    logits = torch.nn.Parameter(torch.zeros(n))
    opt = torch.optim.Adam([coef] + ([logits] if learn_steps else []), lr=lr)

    def loss():
        return distill_loss(toy_logp0, states, teacher_times, student_times(logits, EPS), coef, EPS)[0]

    def tv():
        return tv_to_p0(exact_terminal(student_times(logits, EPS).detach(), coef.detach()))

    before = (loss().item(), tv())
    for _ in range(iters):
        out = loss()
        opt.zero_grad()
        out.backward()
        opt.step()
        times = student_times(logits, EPS).detach()
        assert (times[1:] < times[:-1]).all() and times[0] == 1 and times[-1] == EPS
    return before, (loss().item(), tv()), coef.detach(), student_times(logits, EPS).detach()


def test_optimising_coefficients_lowers_the_loss_and_does_not_raise_tv():
    # From c = 1: on the exact toy the base sampler is already the loss's optimum up to the
    # teacher's error and Monte-Carlo noise (positions' unmasking is exact for the log-linear
    # chain; the per-position KL cannot see joint errors), so the loss falls a little and the
    # exact TV may move only within that noise (+-0.002 over teacher seeds at B = 8192).
    (l0, tv0), (l1, tv1), coef, _ = _distil(4, False, 1.0, B=8192, N=256, iters=40, lr=0.005)
    assert l1 < l0 and tv1 <= tv0 + 5e-3 and (coef - 1).abs().max() < 0.05, (l0, l1, tv0, tv1, coef)
    # From perturbed coefficients the distillation must find its way back: loss and TV fall a lot.
    (l0, tv0), (l1, tv1), coef, _ = _distil(4, False, 0.5, B=2048, N=64, iters=60)
    assert l1 < 0.1 * l0 and tv1 < 0.5 * tv0, (l0, l1, tv0, tv1)
    assert (coef - 1).abs().max() < 0.2, coef


def test_lsd_plus_times_strictly_decrease_and_end_at_eps():
    for logits in (torch.zeros(8), torch.randn(8) * 3, torch.tensor([20.0, -20.0, 0.0, 5.0])):
        t = student_times(logits, EPS)
        assert t[0] == 1 and t[-1] == EPS and (t[1:] < t[:-1]).all(), t
    _, _, _, times = _distil(4, True, 0.5, B=2048, N=64, iters=60)  # asserts the invariant every step
    assert not torch.equal(times, uniform_times(4, EPS))  # the step sizes did move
