"""Absorbing (masked) discrete diffusion: SEDD's log-linear schedule and the Euler / tau-leaping
step of the reverse CTMC, as pure functions shared by the ``mdm`` sampler, the LSD student and
its distillation (LSD, Fu et al. NeurIPS'25).

Schedule (SEDD, Lou et al. 2024, arXiv:2310.16834): total noise sigma_bar(t) = -log(1 - (1 - eps) t), rate
sigma(t) = (1 - eps) / (1 - (1 - eps) t); a token is masked at time t with probability
1 - e^{-sigma_bar(t)} = (1 - eps) t. The mask is token id V.

Concrete score of a masked position (RADD / SEDD absorbing):
    s_j = r(t) p0(x_i = j | unmasked),   r(t) = e^{-sigma_bar} / (1 - e^{-sigma_bar}),
so the model needs no time input: it predicts the clean conditional p0 over the V real tokens.

Euler step from t to t' < t (dt = t - t') per position, independently:
    P(x_{t'} = j | x_t) = 1[j = x_t] + dt sigma(t) Q~(x_t, s)_j,
where for a masked position Q~ is s_j off the diagonal and minus their sum on it, and for an
unmasked position it is zero (absorbing). A row whose mask entry would go negative is clipped at
0 and renormalised. The last step drops the mask column (every masked position is unmasked).
For the log-linear schedule dt sigma(t) r(t) = dt / t, which is also the exact posterior
probability of unmasking in [t', t]: with the exact p0 the only error of a few-step sampler is
that positions unmasked in the same step are drawn independently.

LSD's coefficient c (Fu et al. 2025) multiplies the model's log-output before score conversion:
log s -> c log s, i.e. s -> s^c = r^c p0^c (in SEDD's score form). c = 1 is the base sampler.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sigma_bar(t, eps: float):
    """Total noise -log(1 - (1 - eps) t)."""
    return -torch.log1p(-(1 - eps) * t)


def sigma(t, eps: float):
    """Noise rate d sigma_bar / dt = (1 - eps) / (1 - (1 - eps) t)."""
    return (1 - eps) / (1 - (1 - eps) * t)


def log_score_scale(t, eps: float):
    """log r(t) = log(e^{-sigma_bar} / (1 - e^{-sigma_bar})) = log(1 - (1-eps) t) - log((1-eps) t)."""
    return torch.log1p(-(1 - eps) * t) - torch.log((1 - eps) * t)


def times_from_fractions(frac_K: torch.Tensor, eps: float) -> torch.Tensor:
    """Times (K+1,) t_0 = 1 > t_1 > ... > t_K = eps from step fractions (K,) > 0 summing to 1:
    t_i = 1 - (1 - eps) sum_{k < i} frac_k (LSD+'s step sizes; the last time is set to eps exactly)."""
    inner = 1 - (1 - eps) * torch.cumsum(frac_K, 0)[:-1]  # (K-1,)
    one, end = frac_K.new_ones(1), frac_K.new_full((1,), eps)
    return torch.cat([one, inner, end])


MIN_FRACTION = 1e-4  # each step covers at least this share of (1 - eps) / n: times strictly decrease


def step_fractions(logits_K: torch.Tensor) -> torch.Tensor:
    """Step fractions (K,) > 0 summing to 1: a softmax mixed with a small uniform floor, so that
    no step underflows to zero length (LSD+'s parameterisation; zeros give the uniform grid)."""
    K = logits_K.shape[0]
    return (1 - MIN_FRACTION) * torch.softmax(logits_K, 0) + MIN_FRACTION / K


def uniform_times(steps: int, eps: float) -> torch.Tensor:
    """The base sampler's uniform grid from 1 to eps, (steps+1,): the LSD+ times at zero logits,
    bit for bit, so an untrained student is the base sampler."""
    return times_from_fractions(step_fractions(torch.zeros(steps)), eps)


def transition_probs(logp0_BLV, x_BL, t, t_next, eps: float, coef=1.0, last: bool = False):
    """Per-position transition probabilities (B, L, V+1) of one Euler step from t to t_next.

    ``logp0_BLV``: log p0(x_i = v | unmasked) over the V real tokens. ``coef`` is LSD's c
    (a float or a 0-dim tensor; gradients flow to it and to t / t_next). Unmasked positions stay.
    On the last step the mask column is dropped: probabilities proportional to s^c = p0^c r^c,
    i.e. softmax(c log p0).
    """
    V = logp0_BLV.shape[-1]
    t = torch.as_tensor(t, dtype=logp0_BLV.dtype)
    t_next = torch.as_tensor(t_next, dtype=logp0_BLV.dtype)
    log_s = coef * (log_score_scale(t, eps) + logp0_BLV)  # (B, L, V) log score, times c
    if last:
        jump = torch.softmax(log_s, -1)  # (B, L, V)
        stay = torch.zeros_like(jump[..., :1])
    else:
        log_rate = torch.log(t - t_next) + torch.log(sigma(t, eps))  # log(dt sigma(t))
        jump = torch.exp(log_rate + log_s)  # (B, L, V) dt sigma s_j
        total = jump.sum(-1, keepdim=True)
        stay = (1 - total).clamp_min(0)  # clip a row whose step overshoots ...
        norm = torch.maximum(total, torch.ones_like(total))  # ... and renormalise it
        jump, stay = jump / norm, stay / norm
    masked = (x_BL == V)[..., None]  # (B, L, 1)
    probs = torch.cat([jump, stay], -1)  # (B, L, V+1)
    kept = F.one_hot(x_BL.clamp_max(V), V + 1).to(probs.dtype)  # unmasked rows: stay where they are
    return torch.where(masked, probs, kept)


def categorical(probs_BLK: torch.Tensor, u_BL: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw from rows of (unnormalised) probabilities with uniforms in [0, 1).

    An entry of probability 0 is never chosen (u is scaled by the row total)."""
    cdf = torch.cumsum(probs_BLK, -1)  # (B, L, K)
    target = u_BL[..., None] * cdf[..., -1:]
    return (cdf <= target).sum(-1).clamp_max(probs_BLK.shape[-1] - 1)


def euler_step(x_BL, logp0_BLV, t, t_next, eps: float, generator, coef=1.0, last: bool = False):
    """One step of the reverse chain: draws x_{t_next} (B, L) from :func:`transition_probs`.

    One uniform per position is drawn from ``generator`` (B x L, every step), so two chains with
    equal probabilities draw equal states."""
    probs = transition_probs(logp0_BLV, x_BL, t, t_next, eps, coef, last)
    u = torch.rand(x_BL.shape, generator=generator, device=generator.device).to(x_BL.device)
    return categorical(probs, u)


@torch.no_grad()
def sample_chain(logp0_fn, x_BL, times_K1, eps: float, generator, coefs_K=None, record: bool = False):
    """Run the reverse chain over ``times_K1`` (t_0 = 1 > ... > t_K = eps): K model calls.

    ``logp0_fn(x_BL) -> (B, L, V)`` log p0; ``coefs_K`` LSD's per-step coefficients (None = 1).
    Returns the final ids (B, L), and with ``record`` also the list of the K+1 states x_{t_i}
    (x_{t_0} the input, x_{t_K} the final ids).
    """
    K = times_K1.shape[0] - 1
    states = [x_BL]
    for i in range(K):
        c = 1.0 if coefs_K is None else coefs_K[i]
        x_BL = euler_step(x_BL, logp0_fn(x_BL), times_K1[i], times_K1[i + 1], eps, generator, c, i == K - 1)
        states.append(x_BL)
    return (x_BL, states) if record else x_BL


def all_mask(batch: int, length: int, vocab_size: int, device=None) -> torch.Tensor:
    """x_T: every position the mask id V, (B, L)."""
    return torch.full((batch, length), vocab_size, dtype=torch.long, device=device)


__all__ = [
    "all_mask",
    "categorical",
    "euler_step",
    "log_score_scale",
    "sample_chain",
    "sigma",
    "sigma_bar",
    "step_fractions",
    "times_from_fractions",
    "transition_probs",
    "uniform_times",
]
