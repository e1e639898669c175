"""Learnable Sampler Distillation (LSD / LSD+, Fu et al. NeurIPS'25) for absorbing diffusion:
the student's times and the distillation loss, as pure functions.

Student: n Euler steps (vargen/diffusion/absorbing.py) from the same all-mask x_T as the teacher,
with a coefficient c_i per step on the model's log-output (s -> s^{c_i}; c_i = 1 is the base
sampler). LSD+ also learns the step sizes: t_i = 1 - (1 - eps) sum_{k<i} softmax(logits)_k (with a
1e-4 uniform floor), so
the times are strictly decreasing from 1 and end at eps (:func:`student_times`).

Teacher: the same network with N uniform steps (N >> n); its states x_{tau_k} on its grid are
recorded. Student time t_i is aligned with the teacher state at the nearest teacher time
(:func:`aligned_indices`; exact alignment for a uniform student grid when n divides N).

Loss (the released code has no training loop, so L2 vs KL is open; this is KL on transition
probabilities): for each step i,
from the teacher's state x_a at the time aligned with t_i, the student's per-position transition
probabilities q_i(. | x_a) (times t_i -> t_{i+1}, coefficient c_i) are scored on the teacher's
state x_b at the time aligned with t_{i+1}:

    L = sum_i E_teacher [ -(1/L) sum_l log q_i(x_b,l | x_a) ]
      = sum_i E [ (1/L) sum_l KL(p_teacher,l(. | x_a) || q_i,l(. | x_a)) ] + const,

the KL from the teacher's per-position transition marginals over [t_{i+1}, t_i] to the
student's, estimated with teacher samples; the constant (the teacher's entropy) does not depend
on c. The states are samples and carry no gradient: c_i and the step logits get gradients only
through the per-step transition probabilities, never through sampling.

What this loss can and cannot do (measured on the enumerable toy, tests/test_lsd.py): for the
log-linear absorbing chain each position's unmasking is already exact at c = 1, and a per-position
KL is minimised by the teacher's marginals, so with an exact network the base sampler is the
loss's optimum; the few-step error is joint (tokens unmasked in one step are drawn independently)
and this loss does not see it. Optimising the exact TV directly on the toy finds c > 1
(sharpening) with TV 0.028 instead of 0.109 at 4 steps: a joint-aware objective would be needed
for that gain. Learned times change which teacher states are aligned, so loss values of different
schedules are not comparable (the teacher's entropy term moves with them).
"""

from __future__ import annotations

import torch

from vargen.diffusion.absorbing import step_fractions, times_from_fractions, transition_probs


def student_times(step_logits_n: torch.Tensor, eps: float) -> torch.Tensor:
    """LSD+ times (n+1,): 1 = t_0 > ... > t_n = eps, step i of size (1 - eps) frac_i with frac the
    softmax of the logits (floored, :func:`~vargen.diffusion.absorbing.step_fractions`; zeros: uniform)."""
    return times_from_fractions(step_fractions(step_logits_n), eps)


def aligned_indices(teacher_times: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    """Index of the nearest teacher time for each student time (no gradient)."""
    return (times.detach()[:, None] - teacher_times[None, :]).abs().argmin(1)


def distill_loss(logp0_fn, teacher_states, teacher_times, times_n1, coefs_n, eps: float):
    """The LSD loss (module docstring); returns (loss, per-step losses (n,)).

    ``logp0_fn(x_BL) -> (B, L, V)`` the network's log p0 (called without gradient);
    ``teacher_states`` the teacher's K+1 recorded states (B, L) at ``teacher_times`` (K+1,).
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
