"""Continuous speculative decoding (CSpD, Wang et al.) verification for diffusion-head tokens.

Spec: specs/sampling-speculative.md section 3. Works against any head with the protocol
``reverse_trajectory(cond_NW, x_T_NC, noises_SNC, temperature) -> dict(x0, mean_last, std_last,
sum_log_std)`` (the MAR head of ``vargen/heads/diffusion.py``): the last reverse step is
Gaussian, x0 = mean_last + std_last * noises[-1], and ``sum_log_std`` sums log std over the
earlier steps.

Denoising-trajectory alignment (3(a).3): the target head re-runs the draft's trajectory with the
*same* x_T and step noises, so, conditional on that noise, draft and target tokens are single
Gaussians N(mu_q, s_q^2) and N(mu_p, s_p^2). Testing that last step, accept with
min(1, N(x0; mu_p, s_p) / N(x0; mu_q, s_q)), is an exact speculative sampler per noise, hence
exact in the marginal ("exact" mode, Sigma = 1, the default). The paper multiplies the ratio by
Sigma = prod_t |S^q_t|^(1/2) / |S^p_t|^(1/2) over the earlier steps; that is biased (the spec's
two-step toy shows it) and is kept as the opt-in "paper" mode.

Defects of the released code (``MarkXCloud/CSpD``) not copied: it accepts/resamples every block
token independently (we stop at the first rejection: later drafts were conditioned on a rejected
token), divides the Mahalanobis term by ``inner_temperature=42`` (we use the true densities),
uses a noiseless last step for the draft but noisy proposals in the residual (both noisy here),
and leaves a zero vector when 100 A-R tries fail (we continue with exact rounds and only after
``max_rounds`` fall back to a plain target sample).

Residual (3(a).5): sample norm(max(0, Sigma p - q)) by acceptance-rejection with proposals
y ~ p (the target's last-step Gaussian, no network pass) and acceptance max(0, 1 - q(y)/(Sigma p(y))),
K proposals per row at once; the first accepted one per row is taken.
"""

from __future__ import annotations

import math

import torch

MODES = ("exact", "paper")


def gaussian_logpdf(x_NC, mean_NC, std_NC):
    """Diagonal Gaussian log density summed over the token dims, (N,)."""
    z = (x_NC - mean_NC) / std_NC
    return (-0.5 * z.pow(2) - std_NC.log() - 0.5 * math.log(2 * math.pi)).sum(-1)


def residual_sample(sample_p, log_p, log_q, log_sigma_N, generator, K=16, max_rounds=100):
    """Draws from norm(max(0, Sigma p - q)) per row by acceptance-rejection, vectorised.

    ``sample_p(K, generator) -> (K, N, C)`` proposals from each row's p; ``log_p``/``log_q`` map
    (K, N, C) -> (K, N); ``log_sigma_N`` is log Sigma per row (0 in exact mode). Returns
    (y_NC, tries_N, filled_N); rows never filled after ``max_rounds`` get a p sample (filled False).
    """
    out, filled, tries = None, None, None
    for _ in range(max_rounds):
        y_KNC = sample_p(K, generator)
        acc_KN = 1 - torch.exp(log_q(y_KNC) - log_p(y_KNC) - log_sigma_N)  # max(0, .) via u < acc
        u_KN = torch.rand(acc_KN.shape, generator=generator, device=generator.device).to(y_KNC.device)
        ok_KN = u_KN < acc_KN
        first_N = ok_KN.float().argmax(0)  # first accepted proposal per row
        got_N = ok_KN.any(0)
        pick_NC = y_KNC.gather(0, first_N[None, :, None].expand(1, *y_KNC.shape[1:]))[0]
        if out is None:
            out, filled = pick_NC.clone(), got_N.clone()
            tries = torch.where(got_N, first_N + 1, torch.full_like(first_N, K))
        else:
            new = got_N & ~filled
            out = torch.where(new[:, None], pick_NC, out)
            tries = tries + torch.where(filled, 0, torch.where(got_N, first_N + 1, K))
            filled = filled | got_N
        if bool(filled.all()):
            break
    fallback_NC = sample_p(1, generator)[0]
    return torch.where(filled[:, None], out, fallback_NC), tries, filled


def cspd_verify(draft_traj: dict, target_traj: dict, generator, mode: str = "exact", K: int = 16):
    """Verify a block of g continuous drafts per row, (B, g, C) tensors in both trajectories.

    ``draft_traj`` / ``target_traj`` are the heads' ``reverse_trajectory`` outputs reshaped to
    (B, g, ...) and computed with shared x_T and step noises. Returns (n_B accepted leading drafts,
    z_BC the residual token for position n (valid where n < g), stats dict).
    """
    if mode not in MODES:
        raise ValueError(f"sampler.mode must be one of {MODES}, got {mode!r}")
    x0 = draft_traj["x0"]  # (B, g, C)
    B, g, C = x0.shape
    mu_p, s_p = target_traj["mean_last"].expand_as(x0), target_traj["std_last"].expand_as(x0)
    mu_q, s_q = draft_traj["mean_last"].expand_as(x0), draft_traj["std_last"].expand_as(x0)
    log_sigma = torch.zeros(B, g, device=x0.device)
    if mode == "paper":  # Sigma = prod_t |S^q_t|^(1/2) / |S^p_t|^(1/2): biased, opt-in
        lq, lp = draft_traj["sum_log_std"], target_traj["sum_log_std"]
        log_sigma = (lq - lp).reshape(B, g, -1).sum(-1) if lq.dim() > 1 else (lq - lp).reshape(B, g)
    log_r = gaussian_logpdf(x0, mu_p, s_p) + log_sigma - gaussian_logpdf(x0, mu_q, s_q)  # (B, g)
    u = torch.rand(B, g, generator=generator, device=generator.device).to(x0.device)
    acc = u.log() < log_r.clamp(max=0)
    n_B = acc.long().cumprod(1).sum(1)  # stop at the first rejection
    pos = n_B.clamp(max=g - 1)
    take = lambda t: t.gather(1, pos[:, None, None].expand(B, 1, C))[:, 0]  # noqa: E731  (B, C)
    mp, sp, mq, sq = take(mu_p), take(s_p), take(mu_q), take(s_q)
    ls = log_sigma.gather(1, pos[:, None])[:, 0]

    def sample_p(k, gen):
        e = torch.randn(k, B, C, generator=gen, device=gen.device).to(x0.device)
        return mp + sp * e  # (k, B, C)

    z, tries, filled = residual_sample(
        sample_p, lambda y: gaussian_logpdf(y, mp, sp), lambda y: gaussian_logpdf(y, mq, sq), ls, generator, K
    )
    rejected = n_B < g
    stats = {
        "accepted": int(n_B.sum()),
        "proposed": int(torch.minimum(n_B + 1, torch.full_like(n_B, g)).sum()),
        "ar_tries": float(tries[rejected].float().mean()) if bool(rejected.any()) else 0.0,
        "ar_unfilled": int((~filled & rejected).sum()),
    }
    return n_B, z, stats
