"""Learnable Sampler Distillation (LSD / LSD+, Fu et al. NeurIPS'25) for absorbing diffusion:
the student's times and the distillation losses, as pure functions.

Student: n Euler steps (vargen/diffusion/absorbing.py) from the same all-mask x_T as the teacher,
with a coefficient c_i per step on the model's log-output (s -> s^{c_i}; c_i = 1 is the base
sampler). LSD+ also learns the step sizes: t_i = 1 - (1 - eps) sum_{k<i} softmax(logits)_k (with a
1e-4 uniform floor), so the times are strictly decreasing from 1 and end at eps
(:func:`student_times`).

Teacher: the same network with N uniform steps (N >> n); its states x_{tau_k} on its grid are
recorded. The chain's state at a continuous time t in (tau_{k+1}, tau_k] is x_{tau_k} (the last
jump happened at or before tau_k): :func:`teacher_index_at`.

What the reference defines (feiyangfu/LSD at fd31724, its only public snapshot; its README lists
"Release training and evaluation code" as to-do): the samplers, not the loss. It has no loss, no
optimiser and no training loop. ``sampler.py``:
  * ``teacher_sampler`` (l. 8-27, Euler): N steps from x_T with the global RNG, returning the
    teacher's own small-step row (one_hot + dt sigma Q~) at every (N/n)-th step; redefined at
    l. 30-82 by a predictor-corrector teacher that multiplies the network output by 1.15.
  * ``StudentSolverDiscrete`` (l. 85-131, coefficients): c_i initialised to 1 multiplies the
    network's SEDD log score (log r(t) + log p0; model.py:103-105) before the Euler step, exactly as
    here (tests/test_lsd.py re-derives its row and matches :func:`transition_probs` to 1e-6); it runs
    on its *own* states from the x_T it is given, with ``torch.Generator().manual_seed(42)`` made
    anew in every forward (the same draws every call, unrelated to the teacher's), stores
    c_i log s on its own state per step (l. 110; the list is never cleared) and draws twice per step
    (l. 125, then ``scheduler.step`` on the new state with the same output, l. 129-130), which
    raises the toy's 4-step TV at c = 1 from 0.109 to 0.142 (Monte Carlo, 400k draws).
  * ``StudentSolverDiscrete`` again (l. 134-179, times; the name the module exports): n+1 raw step
    sizes initialised to (1 - 1e-5)/n, ``t_curr = 1 - cumsum(all of them)`` (a vector, so a batch
    of more than one fails), t_next on the fixed uniform grid, storing dt log s.
So "own trajectory, unpaired with the teacher's" is the reference's; what the two lists are
compared with is not. Here, n Euler steps once per step (as its teacher), and LSD+ as above. The
objectives (``OBJECTIVES``), all with the student on its own trajectory except the last:

``own_trajectory`` (:func:`distill_loss`, the default): per-position KL from the teacher's row to
the student's, both for the student's step t_i -> t_{i+1} (the teacher's network on the teacher's
state held at t_i, not snapped to its grid, so LSD+'s times get a gradient through both rows),
over positions masked in both states (elsewhere both rows are deterministic):

    L = sum_i E [ (1/L) sum_{l masked in x^s and x^T} KL(p_l(. | x^T_{t_i}; t_i -> t_{i+1}, c=1)
                                                    || q_l(. | x^s_{t_i}; t_i -> t_{i+1}, c_i)) ].

``score_l2`` (:func:`score_l2_loss`): the quantities the reference's solver returns, compared
directly: squared error of c_i log s on the student's state and log s on the teacher's, at t_i.

``teacher_forced`` (:func:`teacher_forced_loss`, vargen before issue 20): the student's transition
from the *teacher's* state (snapped to the nearest teacher time); its optimum on an exact network
is the base sampler.

The states are samples and carry no gradient: c_i and the step logits get gradients only through
the per-step rows, never through sampling (as in the reference).

What they do on the enumerable toy (L = 2, V = 3, exact network, 4 steps, 64-step teacher;
benchmarks/diffusion_lsd.py ``lsd.toy.*``): the base sampler's TV to p0 is 0.109, the TV-optimal c
sharpen (c > 1, TV 0.042), and both own-trajectory objectives flatten (c < 1) and raise the TV
(own_trajectory 0.275, score_l2 0.255; LSD+ 0.420 and 0.389; the reference's own solver and RNG,
trained with score-L2 on the lists it returns, give the same: 0.256). At c = 1 their gradients
have the opposite sign of the TV's on steps 1-3 (tests/test_lsd.py). The reason is the
unpairing: with an exact network the student and teacher rows differ only through their states,
which are independent draws; for L2, the optimal c_i = E[a_s . a_T] / E[a_s . a_s] (a = log s on
each side) is <= 1 whenever the two states have the same law (Cauchy-Schwarz; exact at step 0,
approximate later), with equality only when a_s = a_T, i.e. paired states, where the gradient is
zero. No per-position alignment sees the
joint error of a few-step sampler (tokens unmasked in one step are drawn independently) that
sharpening trades against. (The reference's own predictor-corrector teacher sharpens by a fixed
1.15, which on the toy gives 0.1045.)
"""

from __future__ import annotations

import torch

from vargen.diffusion.absorbing import (
    log_score_scale,
    sample_chain,
    step_fractions,
    times_from_fractions,
    transition_probs,
)

OBJECTIVES = ("own_trajectory", "score_l2", "teacher_forced")


def student_times(step_logits_n: torch.Tensor, eps: float) -> torch.Tensor:
    """LSD+ times (n+1,): 1 = t_0 > ... > t_n = eps, step i of size (1 - eps) frac_i with frac the
    softmax of the logits (floored, :func:`~vargen.diffusion.absorbing.step_fractions`; zeros: uniform)."""
    return times_from_fractions(step_fractions(step_logits_n), eps)


def teacher_index_at(teacher_times: torch.Tensor, times: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    """Index k of the teacher state held at each time t: the smallest teacher time tau_k >= t
    (within ``tol``, so a student time on the teacher grid up to rounding picks that grid point)."""
    return (teacher_times[None, :] >= times.detach()[:, None] - tol).sum(1) - 1


def aligned_indices(teacher_times: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    """Index of the nearest teacher time for each student time (no gradient; teacher_forced only)."""
    return (times.detach()[:, None] - teacher_times[None, :]).abs().argmin(1)


@torch.no_grad()
def student_rollout(logp0_fn, x_BL, times_n1, coefs_n, eps: float, generator):
    """The student's own trajectory (n forwards, no gradient): its states x^s_{t_i} (i < n) and the
    network's log p0 (B, L, V) on each, the inputs :func:`distill_loss` needs."""
    outs = []

    def record(x_BL):
        out = logp0_fn(x_BL)
        outs.append(out)
        return out

    _, states = sample_chain(record, x_BL, times_n1.detach(), eps, generator, coefs_n.detach(), record=True)
    return states[:-1], outs


def distill_loss(
    student_logp0, student_states, teacher_logp0, teacher_states, teacher_times, times_n1, coefs_n, eps: float
):
    """The paper's LSD loss (module docstring): returns (loss, per-step losses (n,)).

    ``student_logp0[i]`` / ``student_states[i]`` (i < n): the network's log p0 (B, L, V) on the
    student's own state x^s_{t_i} (B, L); ``teacher_logp0`` a function ``x_BL -> (B, L, V)`` (called
    without gradient on the teacher's state at each t_i); ``teacher_states`` the teacher's K+1
    recorded states at ``teacher_times`` (K+1,).
    """
    n = times_n1.shape[0] - 1

    def kl_BL(i, lp_s, x_s, lp_t, x_t):
        t, t_next, last = times_n1[i], times_n1[i + 1], i == n - 1
        q = transition_probs(lp_s, x_s, t, t_next, eps, coefs_n[i], last)  # (B, L, V+1)
        p = transition_probs(lp_t, x_t, t, t_next, eps, 1.0, last)  # teacher at the student's times
        # both logs by the same op, so equal p and q give exactly 0 on every CPU (xlogy and
        # p * log(q) may round differently where the vector math library differs)
        return (torch.xlogy(p, p) - torch.xlogy(p, q.clamp_min(1e-30))).sum(-1)  # (B, L)

    return _aligned_steps(
        kl_BL, student_logp0, student_states, teacher_logp0, teacher_states, teacher_times, times_n1
    )


def score_l2_loss(
    student_logp0, student_states, teacher_logp0, teacher_states, teacher_times, times_n1, coefs_n, eps
):
    """Objective ``score_l2``: the reference's returned quantities compared directly (module
    docstring). The student's scaled log score c_i log s(x^s_{t_i}, t_i) (what the reference's
    coefficient solver stores, sampler.py:108-110) against the teacher's log s(x^T_{t_i}, t_i), both at
    the student's time t_i, squared over the V real tokens, on positions masked in both states:

        L = sum_i E [ (1/L) sum_{l masked in x^s and x^T} sum_j (c_i log s_lj(x^s) - log s_lj(x^T))^2 ],
        log s_lj(x; t) = log r(t) + log p0(x_l = j | x).

    Arguments as :func:`distill_loss`; returns (loss, per-step losses (n,)). LSD+'s times get a
    gradient through log r(t_i) on both sides.
    """

    def sq_BL(i, lp_s, x_s, lp_t, x_t):
        log_r = log_score_scale(times_n1[i], eps)
        return (coefs_n[i] * (log_r + lp_s) - (log_r + lp_t)).square().sum(-1)  # (B, L)

    return _aligned_steps(
        sq_BL, student_logp0, student_states, teacher_logp0, teacher_states, teacher_times, times_n1
    )


def _aligned_steps(
    distance, student_logp0, student_states, teacher_logp0, teacher_states, teacher_times, times_n1
):
    """The own-trajectory objectives' common sum: at every student step i, ``distance(i, lp_s, x_s,
    lp_t, x_t) -> (B, L)`` between the student's output on its own state x^s_{t_i} and the
    teacher's (no gradient) on its state held at t_i, averaged over positions masked in both
    states (elsewhere both sides are deterministic). Returns (loss, per-step losses (n,))."""
    idx = teacher_index_at(teacher_times, times_n1[:-1]).tolist()
    per_step = []
    for i in range(times_n1.shape[0] - 1):
        x_s, x_t = student_states[i], teacher_states[idx[i]]
        V = student_logp0[i].shape[-1]
        with torch.no_grad():
            lp_t = teacher_logp0(x_t)  # (B, L, V)
        both = (x_s == V) & (x_t == V)  # (B, L)
        per_step.append((distance(i, student_logp0[i], x_s, lp_t, x_t) * both).sum() / both.numel())
    per_step = torch.stack(per_step)
    return per_step.sum(), per_step


def teacher_forced_loss(logp0_fn, teacher_states, teacher_times, times_n1, coefs_n, eps: float):
    """Objective ``teacher_forced`` (vargen before issue 20, not the paper's): the student's
    transition from the teacher's state x_a at the teacher time nearest t_i, scored on the teacher's
    state x_b nearest t_{i+1}: sum_i E[-(1/L) sum_l log q_i(x_b,l | x_a)]; returns (loss, per-step (n,)).

    Its optimum on an exact network is the base sampler (c = 1; per-position KL to the teacher's
    transition marginals), and the snapped times give LSD+ no smooth schedule gradient.
    ``logp0_fn(x_BL) -> (B, L, V)`` (called without gradient).
    """
    idx = aligned_indices(teacher_times, times_n1).tolist()
    n = times_n1.shape[0] - 1
    per_step = []
    for i in range(n):
        x_a, x_b = teacher_states[idx[i]], teacher_states[idx[i + 1]]
        with torch.no_grad():
            logp0 = logp0_fn(x_a)  # (B, L, V)
        q = transition_probs(logp0, x_a, times_n1[i], times_n1[i + 1], eps, coefs_n[i], last=i == n - 1)
        q_b = q.gather(-1, x_b[..., None]).squeeze(-1)  # (B, L) student probability of the teacher's state
        per_step.append(-torch.log(q_b.clamp_min(1e-30)).mean())
    per_step = torch.stack(per_step)
    return per_step.sum(), per_step
