"""Continuous speculative decoding (CSpD, Wang et al.) verification for diffusion-head tokens.

Works against any head with the protocol
``reverse_trajectory(cond_NW, x_T_NC, noises_SNC, temperature) -> dict(x0, mean_last, std_last,
sum_log_std)`` (the MAR head of ``vargen/heads/diffusion.py``): the last reverse step is
Gaussian, x0 = mean_last + std_last * noises[-1], and ``sum_log_std`` sums log std over the
earlier steps.

Denoising-trajectory alignment: the target head re-runs the draft's trajectory with the
*same* x_T and step noises, so, conditional on that noise, draft and target tokens are single
Gaussians N(mu_q, s_q^2) and N(mu_p, s_p^2). Testing that last step, accept with
min(1, N(x0; mu_p, s_p) / N(x0; mu_q, s_q)), is an exact speculative sampler per noise, hence
exact in the marginal ("exact" mode, Sigma = 1, the default). The paper multiplies the ratio by
Sigma = prod_t |S^q_t|^(1/2) / |S^p_t|^(1/2) over the earlier steps; that is biased (the
two-step toy of tests/test_cspd.py shows it) and is kept as the opt-in "paper" mode.

Defects of the released code (``MarkXCloud/CSpD``) not copied: it accepts/resamples every block
token independently (we stop at the first rejection: later drafts were conditioned on a rejected
token), divides the Mahalanobis term by ``inner_temperature=42`` (we use the true densities),
uses a noiseless last step for the draft but noisy proposals in the residual (both noisy here),
and leaves a zero vector when 100 A-R tries fail (we continue with exact rounds and only after
``max_rounds`` fall back to a plain target sample).

Residual (3(a).5): sample norm(max(0, Sigma p - q)) by acceptance-rejection with proposals
y ~ p (the target's last-step Gaussian, no network pass) and acceptance max(0, 1 - q(y)/(Sigma p(y))),
K proposals per row at once; the first accepted one per row is taken.

The last-step test and the residual's proposals run as the fused kernels of
:mod:`vargen_kernels.cspd_ratio` (``backend``, :func:`vargen_kernels.dispatch.backend_for`),
whose torch references are these computations: every backend draws the same tokens (to float
rounding).
"""

from __future__ import annotations

import torch

from vargen_kernels.cspd_ratio import (
    cspd_accept,
    cspd_propose,
    gaussian_logpdf,  # noqa: F401  (re-exported: the densities CSpD is stated in)
)

MODES = ("exact", "paper")


def residual_rounds(propose, need_N, generator, K=16, max_rounds=100, need_any=True, subset=False):
    """Acceptance-rejection for norm(max(0, Sigma p - q)) per row, K proposals per row and round.

    ``propose(K, generator) -> (y_KNC, log_qp_KN)``: K proposals per row from p and
    log(q(y) / (Sigma p(y))) of each. Only rows with ``need_N`` wait for an acceptance (the
    others count as filled and get the first proposal, a plain p sample). ``subset``: the rounds
    after the first call ``propose(K, generator, rows_n)`` for the unfilled rows only (each row's
    acceptance-rejection is its own, so leaving filled rows out changes no row's law; with
    proposals that are whole target chains a second round then costs its few rows, not all).
    Returns (y_NC, tries_N, filled_N, rounds); rounds is the number of host syncs spent (one per
    round; none when the caller knows no row needs a residual, ``need_any`` False).
    """
    out = filled = tries = rows = None
    rounds = 0
    for _ in range(max_rounds):
        rounds += 1
        y_KnC, log_qp_Kn = propose(K, generator) if rows is None else propose(K, generator, rows)
        acc_Kn = 1 - torch.exp(log_qp_Kn)  # max(0, .) via u < acc
        u_Kn = torch.rand(acc_Kn.shape, generator=generator, device=generator.device).to(y_KnC.device)
        ok_Kn = u_Kn < acc_Kn
        first_n = ok_Kn.to(torch.uint8).argmax(0)  # first accepted proposal per row
        got_n = ok_Kn.any(0)
        pick_nC = y_KnC.gather(0, first_n[None, :, None].expand(1, *y_KnC.shape[1:]))[0]
        if out is None:
            out = torch.where(need_N[:, None], pick_nC, y_KnC[0])
            filled = got_n | ~need_N
            tries = torch.where(got_n, first_n + 1, torch.full_like(first_n, K)) * need_N
        else:
            if rows is not None:  # back to every row: the others neither got one nor pay tries
                got_n = torch.zeros_like(filled).index_fill_(0, rows[got_n], True)
                first_n = torch.zeros_like(tries).index_copy_(0, rows, first_n)
                pick_nC = out.index_copy(0, rows, pick_nC)
            new = got_n & ~filled
            out = torch.where(new[:, None], pick_nC, out)
            tries = tries + torch.where(filled, 0, torch.where(got_n, first_n + 1, K))
            filled = filled | got_n
        if not need_any:
            return out, tries, filled, 0
        if bool(filled.all()):
            break
        if subset:
            rows = (~filled).nonzero()[:, 0]
    else:  # rows never filled get a plain p sample (reported as unfilled)
        if subset:
            out = out.index_copy(0, rows, propose(1, generator, rows)[0][0])
        else:
            out = torch.where(filled[:, None], out, propose(1, generator)[0][0])
    return out, tries, filled, rounds


def residual_sample(sample_p, log_p, log_q, log_sigma_N, generator, K=16, max_rounds=100, need_N=None):
    """Draws from norm(max(0, Sigma p - q)) per row by acceptance-rejection, vectorised.

    ``sample_p(K, generator) -> (K, N, C)`` proposals from each row's p; ``log_p``/``log_q`` map
    (K, N, C) -> (K, N); ``log_sigma_N`` is log Sigma per row (0 in exact mode). Returns
    (y_NC, tries_N, filled_N); rows never filled after ``max_rounds`` get a p sample (filled False).
    """

    def propose(k, gen):
        y = sample_p(k, gen)
        return y, log_q(y) - log_p(y) - log_sigma_N

    need = torch.ones_like(log_sigma_N, dtype=torch.bool) if need_N is None else need_N
    y, tries, filled, _ = residual_rounds(propose, need, generator, K, max_rounds)
    return y, tries, filled


def accept_prefix(log_r_Bg, generator, cap_B=None):
    """Leading accepted drafts per row: draft j passes if u_j < min(1, r_j); the first failure
    ends the block; at most ``cap_B`` (default g) count. One (B, g) uniform draw."""
    B, g = log_r_Bg.shape
    u = torch.rand(B, g, generator=generator, device=generator.device).to(log_r_Bg.device)
    n_B = (u.log() < log_r_Bg.clamp(max=0)).long().cumprod(1).sum(1)
    return n_B if cap_B is None else torch.minimum(n_B, cap_B)


def last_step_log_sigma(draft_traj: dict, target_traj: dict, mode: str) -> torch.Tensor:
    """log Sigma (B, g) of the paper's variance factor, 0 in exact mode.

    Sigma = prod_t |S^q_t|^(1/2) / |S^p_t|^(1/2) over the steps before the last. With this
    package's fixed-variance head, draft and target share the step variances whenever they
    share num_steps, temperature and the training schedule (``_check_pair`` requires the
    schedule), so Sigma = 1 exactly and "paper" is bit-identical to "exact". The paper's MAR
    heads learn their variances (learned-range, per token), where Sigma != 1; that is the mode's
    only difference, and it makes the test biased."""
    if mode not in MODES:
        raise ValueError(f"sampler.mode must be one of {MODES}, got {mode!r}")
    x0 = draft_traj["x0"]
    B, g = x0.shape[:2]
    if mode != "paper":
        return torch.zeros(B, g, device=x0.device, dtype=x0.dtype)
    lq, lp = draft_traj["sum_log_std"], target_traj["sum_log_std"]
    return (lq - lp).reshape(B, g, -1).sum(-1) if lq.dim() > 2 else (lq - lp).reshape(B, g)


def accept_last_step(draft_traj: dict, target_traj: dict, log_sigma_Bg, generator, cap_B, backend="auto"):
    """Leading accepted drafts per row (B,), at most ``cap_B``, on the last step's Gaussians:
    :func:`accept_prefix` of log r = log N(x0; mu_p, s_p) + log Sigma - log N(x0; mu_q, s_q) at the
    draft x0 (:func:`vargen_kernels.cspd_ratio.cspd_accept`). One (B, g) uniform draw."""
    x0 = draft_traj["x0"]  # (B, g, C)
    B, g = x0.shape[:2]
    u = torch.rand(B, g, generator=generator, device=generator.device).to(x0.device)
    mu_p, s_p = target_traj["mean_last"], target_traj["std_last"]
    mu_q, s_q = draft_traj["mean_last"], draft_traj["std_last"]
    return cspd_accept(x0, mu_p, s_p, mu_q, s_q, log_sigma_Bg, u, cap_B, backend=backend)[1]


def path_log_ratio(path_SNC, x0_NC, means_p_SNC, means_q_SNC, std_S) -> torch.Tensor:
    """log p(path) - log q(path), (N,), for a reverse chain x_T -> ... -> x0 whose steps are
    N(x_next; mean, std_k^2) under both heads with the SAME std_k (the x_T prior cancels too):
    sum_k (|x_next - mu_q|^2 - |x_next - mu_p|^2) / (2 std_k^2)."""
    nxt = torch.cat([path_SNC[1:], x0_NC[None]])  # (S, N, C) the state each step produced
    d = (nxt - means_q_SNC).pow(2).sum(-1) - (nxt - means_p_SNC).pow(2).sum(-1)  # (S, N)
    return (d / (2 * std_S.to(d)[:, None] ** 2)).sum(0)


def cspd_verify(
    draft_traj: dict,
    target_traj: dict,
    generator,
    mode: str = "exact",
    K: int = 16,
    cap_B=None,
    backend="auto",
):
    """Verify a block of g continuous drafts per row, (B, g, C) tensors in both trajectories.

    ``draft_traj`` / ``target_traj`` are the heads' ``reverse_trajectory`` outputs reshaped to
    (B, g, ...) and computed with shared x_T and step noises. Returns (n_B accepted leading drafts
    (at most ``cap_B``), z_BC the residual token for position n (valid where n < cap), stats
    dict of 0-dim tensors: no host sync but the residual rounds'). ``backend``: how the fused
    steps run (:mod:`vargen_kernels.cspd_ratio`).
    """
    log_sigma = last_step_log_sigma(draft_traj, target_traj, mode)
    x0 = draft_traj["x0"]  # (B, g, C)
    B, g, C = x0.shape
    cap = torch.full((B,), g, dtype=torch.long, device=x0.device) if cap_B is None else cap_B
    n_B = accept_last_step(draft_traj, target_traj, log_sigma, generator, cap, backend)
    need = n_B < cap
    z, tries, filled = residual_at(draft_traj, target_traj, log_sigma, n_B, need, generator, K, backend)
    stats = {
        "accepted": n_B.sum(),
        "proposed": torch.minimum(n_B + 1, cap).sum(),
        "ar_tries": tries.sum() / need.sum().clamp(min=1),
        "ar_unfilled": (~filled & need).sum(),
    }
    return n_B, z, stats


def residual_at(draft_traj, target_traj, log_sigma_Bg, n_B, need_B, generator, K=16, backend="auto"):
    """The residual token at each row's draft n_B (last-step Gaussians; proposals y ~ p and their
    log q(y) / (Sigma p(y)) by :func:`vargen_kernels.cspd_ratio.cspd_propose`): (z_BC, tries_B,
    filled_B) as :func:`residual_sample`."""
    x0 = draft_traj["x0"]
    B, g, C = x0.shape
    pos = n_B.clamp(max=g - 1)
    take = lambda t: t.expand_as(x0).gather(1, pos[:, None, None].expand(B, 1, C))[:, 0]  # noqa: E731  (B, C)
    mp, sp = take(target_traj["mean_last"]), take(target_traj["std_last"])
    mq, sq = take(draft_traj["mean_last"]), take(draft_traj["std_last"])
    ls = log_sigma_Bg.gather(1, pos[:, None])[:, 0]

    def propose(k, gen):
        e = torch.randn(k, B, C, generator=gen, device=gen.device, dtype=x0.dtype).to(x0.device)
        return cspd_propose(mp, sp, mq, sq, ls, e, backend=backend)  # (k, B, C), (k, B)

    y, tries, filled, _ = residual_rounds(propose, need_B, generator, K)
    return y, tries, filled
