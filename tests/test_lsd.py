"""Masked diffusion and LSD / LSD+ (spec sampling-diffusion.md section 4).

The enumerable toy (spec 4c): L = 2 positions, V = 3 tokens, a correlated joint p0 and its exact
conditionals as the "network"; the 16 states (mask included) are enumerated, so the terminal
distribution of any sampler (coefficients, times) is computed exactly and its total-variation
distance (TV) to p0 has no Monte-Carlo error.
"""

import itertools
import math

import pytest
import torch

from vargen.diffusion.absorbing import all_mask, sample_chain, transition_probs, uniform_times
from vargen.diffusion.lsd import (
    distill_loss,
    score_l2_loss,
    student_rollout,
    student_times,
    teacher_forced_loss,
)

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
            toy_logp0,
            x,
            times,
            EPS,
            torch.Generator().manual_seed(n),
            coefs_K=torch.ones(n, requires_grad=True),
        )
        assert torch.equal(base, student)
        assert (student < V).all()  # the last step unmasks everything
        other = sample_chain(
            toy_logp0, x, times, EPS, torch.Generator().manual_seed(n), torch.full((n,), 1.3)
        )
        assert not torch.equal(base, other)  # the coefficients do reach the draws


def test_rows_are_probabilities_and_clipped_when_a_step_overshoots():
    torch.manual_seed(0)
    logp0 = torch.log_softmax(3 * torch.randn(64, 5, 7), -1)
    x = torch.randint(0, 8, (64, 5))  # 7 = mask
    for t, t_next, c, last in [
        (0.9, 0.8, 1.0, False),
        (0.3, 0.05, 2.5, False),
        (0.9, 0.05, 0.2, False),
        (0.2, EPS, 1.7, True),
    ]:
        p = transition_probs(logp0, x, t, t_next, EPS, c, last)  # (B, L, V+1)
        assert (p >= 0).all() and torch.allclose(p.sum(-1), torch.ones(64, 5))
        kept = x < 7
        assert torch.equal(p[kept].argmax(-1), x[kept])
        assert torch.allclose(p[kept].max(-1).values, torch.ones(1))
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
        return teacher_forced_loss(toy_logp0, states, teacher_times, student_times(logits, EPS), coef, EPS)[0]

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


def test_teacher_forced_objective_lowers_its_loss_and_does_not_raise_tv():
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


def _own_loss(times, coefs, teacher_times, seed=0, B=512, student_seed=None):
    g = torch.Generator().manual_seed(seed)
    _, teacher = sample_chain(toy_logp0, all_mask(B, L, V), teacher_times, EPS, g, record=True)
    gs = torch.Generator().manual_seed(seed if student_seed is None else student_seed)
    own, own_logp0 = student_rollout(toy_logp0, all_mask(B, L, V), times, coefs, EPS, gs)
    return distill_loss(own_logp0, own, toy_logp0, teacher, teacher_times, times, coefs, EPS)


def test_own_trajectory_loss_vanishes_exactly_when_the_student_is_the_teacher():
    # n = N, c = 1, uniform steps, the same generator: the student's own trajectory is the
    # teacher's state for state, so every aligned pair of rows is equal (a misaligned teacher
    # index or a student scored on other states would leave a positive KL).
    times = uniform_times(8, EPS)
    coef = torch.ones(8, requires_grad=True)
    loss, per_step = _own_loss(times, coef, times)
    loss.backward()
    assert loss.item() == 0 and (per_step == 0).all() and coef.grad.abs().max() < 1e-6, (per_step, coef.grad)
    # another coefficient changes the student's own later states, not only its step-0 row
    coef2 = torch.ones(8)
    coef2[0] = 3.0
    _, per_step2 = _own_loss(times, coef2, times)
    assert per_step2[0] > 0 and per_step2[1:].sum() > 0, per_step2


def test_own_trajectory_teacher_is_evaluated_at_the_student_time_not_a_snapped_one():
    # A 3-step student with t = (1, 0.6, 0.45, eps), off the teacher's grid (N = 4: 0.75, 0.5, 0.25):
    # given the same states on both sides and c = 1, the KL vanishes only if the teacher's rows are
    # computed for the student's steps (snapped, 0.6 and 0.45 both become 0.5: a zero-length step).
    teacher_times = uniform_times(4, EPS)
    times = torch.tensor([1.0, 0.6, 0.45, EPS])
    g = torch.Generator().manual_seed(3)
    _, teacher = sample_chain(toy_logp0, all_mask(256, L, V), teacher_times, EPS, g, record=True)
    own = [teacher[0], teacher[1], teacher[2]]  # the states the teacher holds at t = 1, 0.6, 0.45
    coef = torch.ones(3, requires_grad=True)
    logp0 = [toy_logp0(x) for x in own]
    loss, _ = distill_loss(logp0, own, toy_logp0, teacher, teacher_times, times, coef, EPS)
    assert loss.item() < 1e-9, loss
    x = all_mask(4, L, V)
    p = transition_probs(toy_logp0(x), x, times[1], times[2], EPS, 1.0)
    snapped = transition_probs(toy_logp0(x), x, 0.5, 0.5, EPS, 1.0)
    assert (p - snapped).abs().max() > 0.2  # ... which is not the row a snapped teacher would give
    # and LSD+'s times get a gradient through both rows
    logits = torch.zeros(3, requires_grad=True)
    t3 = student_times(logits, EPS)
    loss3, _ = _own_loss(t3, torch.full((3,), 1.2), teacher_times)
    loss3.backward()
    assert logits.grad.abs().max() > 0, logits.grad


def _reference_euler_row(logp0_BLV, x_BL, t, dt, c, last):
    """feiyangfu/LSD's student step, re-derived by hand from its sources (fd31724): the network
    emits SEDD's log score log r + log p0 with r = 1 / (e^sigma_bar - 1) (model.py:103-105, 0 at the
    current token), the solver multiplies it by c_i (sampler.py:108), the rate on a masked row is
    sigma(t) s_j off the mask and minus their sum on it (ddms/sedd.py Q_tok / Q_tilde), the row is
    one_hot(x) + dt * rate, the last step drops the mask column, and the gumbel-argmax draw
    (sample_categorical) samples the row clipped at 0, normalised."""
    sb = -math.log1p(-(1 - EPS) * t)
    sig = (1 - EPS) / (1 - (1 - EPS) * t)
    s = torch.exp(c * (logp0_BLV.double() - math.log(math.expm1(sb))))  # (B, L, V) score^c
    rate = torch.cat([sig * s, -sig * s.sum(-1, keepdim=True)], -1)  # (B, L, V+1) masked rows
    rate = torch.where((x_BL == V)[..., None], rate, torch.zeros_like(rate))  # absorbing: unmasked rows stay
    row = torch.nn.functional.one_hot(x_BL, V + 1).double() + dt * rate
    if last:
        row[..., V] = 0
    row = row.clamp_min(0)
    return row / row.sum(-1, keepdim=True)


def test_student_step_is_the_reference_solvers_step_with_c_on_the_whole_log_score():
    # c multiplies log r(t) + log p0, not log p0 alone: the two differ for c != 1 away from t = 0.5
    # (r = 1 there), so every (t, c) below except c = 1 tells them apart.
    for t, dt in ((1.0, 0.25), (0.75, 0.25), (0.9, 0.6), (0.3, 0.299), (0.5, 0.3)):
        for c in (1.0, 0.6, 1.4, 2.0):
            for last in (False, True):
                ref = _reference_euler_row(toy_logp0(STATES), STATES, t, dt, c, last)
                ours = transition_probs(toy_logp0(STATES), STATES, t, t - dt, EPS, c, last).double()
                assert (ours - ref).abs().max() < 1e-6, (t, dt, c, last, (ours - ref).abs().max())


def test_score_l2_loss_by_hand():
    # Two steps t = (1, 0.6, eps), c = (1.1, 0.8), one sequence; teacher grid N = 4, so the teacher
    # state held at 0.6 is its state at 0.75. Step 0: both all-mask. Step 1: the student still
    # (mask, mask), the teacher (mask, 0): only position 0 is masked in both; its student row is the
    # marginal of x_0, the teacher's the conditional given x_1 = 0.
    times, c = torch.tensor([1.0, 0.6, EPS]), torch.tensor([1.1, 0.8])
    teacher_times = uniform_times(4, EPS)
    m = all_mask(1, L, V)
    xt1 = torch.tensor([[V, 0]])
    teacher = [m, xt1, xt1, xt1, xt1]
    own = [m, m]
    loss, per_step = score_l2_loss(
        [toy_logp0(x) for x in own], own, toy_logp0, teacher, teacher_times, times, c, EPS
    )

    def log_r(t):
        return math.log((1 - (1 - EPS) * t) / ((1 - EPS) * t))

    marg0, marg1 = P0.sum(1).tolist(), P0.sum(0).tolist()
    cond0 = (P0[:, 0] / P0[:, 0].sum()).tolist()
    step0 = sum(((1.1 - 1) * (log_r(1.0) + math.log(p))) ** 2 for p in marg0 + marg1) / 2
    step1 = (
        sum(
            (0.8 * (log_r(0.6) + math.log(a)) - (log_r(0.6) + math.log(b))) ** 2 for a, b in zip(marg0, cond0)
        )
        / 2
    )
    assert abs(per_step[0].item() - step0) < 1e-4 * step0 and abs(per_step[1].item() - step1) < 1e-4 * step1
    assert abs(loss.item() - step0 - step1) < 1e-4 * (step0 + step1)


@pytest.mark.parametrize("loss_fn", [distill_loss, score_l2_loss])
def test_own_trajectory_objectives_point_away_from_lower_tv_on_the_toy(loss_fn):
    # The documented negative result (module docstring of vargen/diffusion/lsd.py): at the base
    # sampler (c = 1, 4 uniform steps) the exact TV falls when c_1..c_3 rise (sharpening), while
    # both own-trajectory losses rise with them (their gradient steps flatten, c < 1). Step 0 has
    # no gradient: both states are all-mask there.
    times, teacher_times = uniform_times(4, EPS), uniform_times(64, EPS)
    c64 = torch.ones(4, dtype=torch.float64, requires_grad=True)
    clean = exact_terminal(times, c64).view(V + 1, V + 1)[:V, :V]
    (0.5 * ((clean - P0.double()).abs().sum() + 1 - clean.sum())).backward()
    g = torch.Generator().manual_seed(0)
    _, teacher = sample_chain(toy_logp0, all_mask(1024, L, V), teacher_times, EPS, g, record=True)
    own, own_logp0 = student_rollout(toy_logp0, all_mask(1024, L, V), times, torch.ones(4), EPS, g)
    c = torch.ones(4, requires_grad=True)
    loss_fn(own_logp0, own, toy_logp0, teacher, teacher_times, times, c, EPS)[0].backward()
    assert (c64.grad[1:] < -0.03).all(), c64.grad
    assert (c.grad[1:] > 0.02).all() and c.grad[0].abs() < 1e-6, c.grad


# ------------------------------------------------------------------ the masked diffusion model


def _tiny_mdm(**over):
    from vargen.models.mdm import MaskedDiffusionTransformer, MDMConfig

    torch.manual_seed(0)
    cfg = dict(vocab_size=11, grid=[2, 3], num_classes=2, dim=32, depth=2, heads=2, dropout=0.0) | over
    return MaskedDiffusionTransformer(MDMConfig(**cfg)).eval()


def test_mdm_is_bidirectional():
    model = _tiny_mdm()
    x = torch.randint(0, 12, (3, 6))
    cond = torch.tensor([0, 1, 2])
    base = model.logits(x, cond)
    later, earlier = x.clone(), x.clone()
    later[:, -1] = (x[:, -1] + 1) % 12
    earlier[:, 0] = (x[:, 0] + 1) % 12
    # a later position reaches the first, and the first the last
    assert not torch.allclose(model.logits(later, cond)[:, 0], base[:, 0])
    assert not torch.allclose(model.logits(earlier, cond)[:, -1], base[:, -1])
    assert base.shape == (3, 6, 11)  # real tokens only, never the mask


def test_mdm_loss_uses_masked_positions_only_and_is_the_elbo():
    model = _tiny_mdm()
    seen = {}
    model.tok_emb.register_forward_hook(lambda m, inp, out: seen.update(x=inp[0]))

    def keep(m, inp, out):
        out.retain_grad()
        seen["logits"] = out

    model.head.register_forward_hook(keep)
    ids = torch.randint(0, 11, (64, 6))
    model.loss(ids, torch.randint(0, 2, (64,)))["loss"].backward()
    masked = seen["x"] == 11
    grad = seen["logits"].grad.abs().sum(-1)  # (B, N)
    assert masked.any() and (~masked).any()
    assert (grad[~masked] == 0).all() and (grad[masked] > 0).all()
    # A uniform p0 costs log V per masked position; the 1/t ELBO weight makes the expected loss
    # (1 - eps) log V nats per token (the mask rate is (1 - eps) t).
    flat = _tiny_mdm(eps=0.01)
    torch.nn.init.zeros_(flat.head.weight)
    torch.manual_seed(1)
    with torch.no_grad():
        mean = sum(flat.loss(ids, torch.zeros(64, dtype=torch.long))["loss"] for _ in range(200)) / 200
    assert abs(mean.item() / (0.99 * torch.log(torch.tensor(11.0)).item()) - 1) < 0.03, mean


# ------------------------------------------------------------------ end to end: train.py tasks + sample.py


@pytest.fixture(scope="module")
def mdm_runs(tmp_path_factory):
    """A tiny VQ, an mdm generator on its ids and a 4-step LSD+ student, through the real tasks."""
    from vargen.train.tasks import run

    from .conftest import task_config

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("lsd")
    quiet = lambda m: None  # noqa: E731
    vq = {"name": "vq", "hidden": [16, 32], "codebook_size": 32, "code_dim": 8}
    run(task_config("tokenizer", root / "vq", dict(steps=200, batch_size=64, lr=3e-3), model=vq), log=quiet)
    mdm = {"name": "mdm", "dim": 32, "depth": 2, "heads": 2, "class_dropout": 0.1}
    gen = dict(steps=400, batch_size=64, lr=3e-3)
    run(task_config("generator", root / "mdm", gen, tokenizer_ckpt=str(root / "vq"), model=mdm), log=quiet)
    lsd = {"name": "lsd_student", "student_steps": 4, "learn_steps": True}
    distil = dict(steps=10, batch_size=32, lr=0.05, log_every=5)
    cfg = task_config(
        "lsd", root / "lsd", distil, teacher_ckpt=str(root / "mdm"), teacher_steps=16, model=lsd
    )
    run(cfg, log=quiet)
    torch.set_num_threads(before)
    return root


def test_trained_mdm_scores_far_below_untrained(mdm_runs, one_thread):
    from vargen.checkpoint import load_component, load_tokenizer_for
    from vargen.eval import FIDEvaluator
    from vargen.models.mdm import MaskedDiffusionTransformer
    from vargen.sampling.decoders.mdm import sample_mdm
    from vargen.sampling.generate import class_labels, generate

    from .conftest import DIGITS

    model, cfg = load_component(str(mdm_runs / "mdm"))
    tok = load_tokenizer_for(cfg)
    untrained = MaskedDiffusionTransformer(model.cfg).eval()
    labels = class_labels(300, model.num_classes, [])
    fid = FIDEvaluator.for_dataset(DIGITS, split="train")

    def score(m):
        fn = lambda mm, c, g: sample_mdm(mm, c, generator=g, steps=16)  # noqa: E731
        images, _, stats = generate(m, tok, labels, fn, torch.Generator().manual_seed(0), 300)
        assert stats["target_forwards"] == 16
        return fid.score(images)

    trained, random = score(model), score(untrained)
    assert trained * 2 < random, (trained, random)  # measured 175 vs 533


def test_lsd_checkpoint_loads_and_samples_with_learned_coefficients(mdm_runs, tmp_path, one_thread):
    import json

    import numpy as np

    import sample
    from vargen.checkpoint import load_component
    from vargen.sampling.decoders.mdm import sample_lsd, sample_mdm

    student, cfg = load_component(str(mdm_runs / "lsd"))
    teacher, _ = load_component(str(mdm_runs / "mdm"))
    assert cfg.task == "lsd" and cfg.tokenizer_ckpt == str(mdm_runs / "vq")
    times = student.times()
    assert (times[1:] < times[:-1]).all() and times[0] == 1 and times[-1] == teacher.eps
    assert not torch.equal(student.coef, torch.ones(4))  # distillation moved the coefficients
    assert not torch.equal(times, uniform_times(4, teacher.eps))  # ... and the step sizes (LSD+)
    for k, v in teacher.state_dict().items():  # the network is the teacher's, untouched
        assert torch.equal(student.base.state_dict()[k], v)
    ev = json.load(open(mdm_runs / "lsd" / "eval.json"))
    assert set(ev) == {"eval_loss", "eval_loss_base"} and all(np.isfinite(v) for v in ev.values()), ev

    cond = torch.arange(40) % 10
    learned, stats = sample_lsd(student, cond, generator=torch.Generator().manual_seed(5))
    assert stats["target_forwards"] == 4 and (learned < teacher.vocab_size).all()
    with torch.no_grad():  # reset to c = 1, uniform steps: the base 4-step sampler draw for draw
        student.coef.fill_(1.0)
        student.step_logits.zero_()
    reset, _ = sample_lsd(student, cond, generator=torch.Generator().manual_seed(5))
    base, _ = sample_mdm(teacher, cond, generator=torch.Generator().manual_seed(5), steps=4)
    assert torch.equal(reset, base) and not torch.equal(learned, base)

    args = ["num_samples=20", "batch_size=10", "progress=false", "seed=1"]
    lsd_ckpt, mdm_ckpt = str(mdm_runs / "lsd"), str(mdm_runs / "mdm")
    assert sample.main(["--ckpt", lsd_ckpt, f"out={tmp_path / 'lsd'}", *args]) == 0  # default sampler lsd
    assert sample.main(["--ckpt", mdm_ckpt, f"out={tmp_path / 'mdm'}", "sampler.steps=8", *args]) == 0
    for name, nfe in (("lsd", 4), ("mdm", 8)):
        arr = np.load(tmp_path / name / "samples.npz")
        assert arr["images"].shape == (20, 16, 16, 1) and (arr["ids"] < 32).all()
        assert json.load(open(tmp_path / name / "metrics.json"))["stats.target_forwards"] == 2 * nfe


def test_lsd_task_checks_the_teacher(mdm_runs, tmp_path):
    from vargen.checkpoint import CheckpointError
    from vargen.train.tasks import run

    from .conftest import task_config

    cfg = task_config(
        "lsd", tmp_path / "x", dict(steps=1), teacher_ckpt=str(mdm_runs / "mdm"), teacher_sha256="0" * 64
    )
    with pytest.raises(CheckpointError, match="changed"):
        run(cfg, log=lambda m: None)
    cfg = task_config("lsd", tmp_path / "y", dict(steps=1), teacher_ckpt=str(mdm_runs / "vq"))
    with pytest.raises(ValueError, match="mdm"):
        run(cfg, log=lambda m: None)
