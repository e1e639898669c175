"""Continuous speculative decoding (CSpD) of a token-entity xAR model with MAR's diffusion head.

Spec: specs/sampling-speculative.md section 3; the verification step is :mod:`vargen.sampling.cspd`.
Target and draft are ``xar`` models with ``entity: token`` and head ``mar_diffusion`` on the same
tokenizer (the draft smaller). One iteration per batch:

1. the draft proposes g = min(gamma, room) tokens one by one: its head runs the reverse chain from
   x_T with step noises drawn from the generator and recorded (one draft backbone call per token);
2. one target backbone call on the rows' committed prefixes plus the drafts gives the target's
   conditions at the g draft positions and the position after them;
3. the target head re-runs each draft's chain with the *same* x_T and step noises (trajectory
   alignment) and :func:`cspd_verify` accepts drafts by the last-step density ratio, stopping at
   the first rejection, and draws that position's token from the residual;
4. when every draft is accepted, a bonus token is sampled from the target head at the next position.

Rows are ragged (each commits its own number of tokens); the backbones run by full recompute of
``entity_conditions`` (one call per step serves every row at its own position).

Guidance (``cfg_scale`` != 1) follows the plain ``xar`` sampler: token i gets the xAR ramp scale
w_i = 1 + (cfg_scale - 1) i / (N - 1) (:func:`~vargen.models.xar.cfg_ramp`), the backbones run
the conditional and the null-class rows as one batch of 2B rows, and the heads mix eps with each
position's own w_i (a per-row scale tensor, since a block spans several ramp positions and rows sit
at different positions). Draft and target chains are both guided, so the last-step Gaussians the
ratio test compares are the guided ones, the densities of what each chain actually samples (spec
3(a).4), and the output is distributed as ``xar`` with the same ``cfg_scale``.

Stats: ``target_forwards`` / ``draft_forwards`` count backbone calls; a guided call on the 2B-row
batch counts once, as in the ``xar`` sampler (and :func:`~vargen.sampling.ar_decode.new_stats`);
``positions_computed`` counts the target's positions over calls (rows x N per full recompute,
doubled rows under guidance).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from vargen.models.xar import cfg_ramp
from vargen.registry import SAMPLERS
from vargen.sampling.ar_decode import new_stats
from vargen.sampling.cspd import cspd_verify
from vargen.sampling.speculative import finish_stats


@dataclass
class CSpDConfig:
    name: str = "cspd"
    draft_ckpt: str = ""  # a trained smaller xar (entity token, head mar_diffusion) on the same tokenizer
    gamma: int = 4  # drafts per iteration
    temperature: float = 1.0
    num_steps: int = 0  # head reverse steps for both heads; 0 = the target head's
    mode: str = "exact"  # exact (Sigma = 1) or paper (biased variance factor, opt-in)
    proposals: int = 16  # K proposals per row and round in the residual sampler
    cfg_scale: float = 1.0  # guidance at the last token; xAR's ramp from 1 at the first
    prefill: float = 0.05  # fraction of the tokens the target draws alone first (spec 3a.1; demo 0.05)


def _check_pair(model, draft):
    for m, who in ((model, "target"), (draft, "draft")):
        if m.cfg.entity != "token" or m.cfg.head["name"] != "mar_diffusion":
            raise ValueError(f"cspd needs xar models with entity token and head mar_diffusion ({who})")
    if draft.cfg.code_dim != model.cfg.code_dim or list(draft.cfg.grid) != list(model.cfg.grid):
        raise ValueError("sampler.draft_ckpt: draft and target must share the tokenizer")
    if draft.num_classes != model.num_classes:  # the same labels and null class (guidance)
        raise ValueError("sampler.draft_ckpt: draft and target must share the classes")


def _trajectory(head, cond_BgW, x_T, noises, temperature, w_Bg, uncond_BgW) -> dict:
    """The head's aligned chain on (B, g) positions (guided by w_Bg), outputs reshaped to (B, g, ...)."""
    B, g, W = cond_BgW.shape
    z, x = cond_BgW.reshape(B * g, W), x_T.flatten(0, 1)
    z_u = None if uncond_BgW is None else uncond_BgW.reshape(B * g, W)
    w = w_Bg.flatten()  # (B g,) per-position scales
    out = head.reverse_trajectory(z, x, noises.flatten(1, 2), temperature, w, z_u)
    return {k: v.reshape(B, g, *v.shape[1:]) for k, v in out.items()}


def _conditions(model, tokens_BNC, cond_in, B):
    """One backbone call: conditional and (under guidance) null-class conditions, (B, N, W) each."""
    rows = cond_in.shape[0] // B  # 2 under guidance
    z = model.entity_conditions(tokens_BNC.repeat(rows, 1, 1), cond_in)  # (rows B, N, W)
    return z[:B], (z[B:] if rows == 2 else None)


@torch.no_grad()
def sample_cspd(
    model,
    draft,
    cond_B,
    *,
    generator,
    gamma=4,
    temperature=1.0,
    num_steps=0,
    mode="exact",
    K=16,
    cfg_scale=1.0,
    prefill=0.05,
):
    """Draw tokens (B, N, C) distributed as the target's own ``xar`` sampler with the same
    ``cfg_scale`` (exact mode). The first round(prefill N) tokens are drawn by the target alone
    (token pre-filling), one target call each, so draft and target prefixes agree before
    speculation starts."""
    t0 = time.perf_counter()
    device = model.start_1nC.device
    cond_B = cond_B.to(device)
    B, N, C = cond_B.shape[0], model.length, model.cfg.code_dim
    S = int(num_steps or model.head.num_sampling_steps)
    guided = cfg_scale != 1.0
    cond_in = torch.cat([cond_B, torch.full_like(cond_B, model.null_class)]) if guided else cond_B
    ramp_N = torch.tensor([cfg_ramp(i, N, cfg_scale) for i in range(N)], device=device)  # (N,)
    rows = torch.arange(B, device=device)
    tokens = torch.zeros(B, N, C, device=device)  # committed prefix, then drafts
    stats = new_stats()
    stats.update(ar_tries=0.0, ar_unfilled=0)
    n_pre = min(N, round(prefill * N))
    for k in range(n_pre):  # token pre-filling: plain target sampling of the first tokens
        z_c, z_u = _conditions(model, tokens, cond_in, B)
        stats["target_forwards"] += 1
        stats["positions_computed"] += cond_in.shape[0] * N
        w_B = ramp_N[k].expand(B)
        tokens[:, k] = model.head.sample(
            z_c[:, k], generator, S, temperature, w_B, None if z_u is None else z_u[:, k]
        )
    len_B = torch.full((B,), n_pre, dtype=torch.long, device=device)
    kw = {"generator": generator, "device": generator.device}
    while bool((len_B < N).any()):
        g = int(min(gamma, int((N - len_B).max())))
        x_T = torch.randn(B, g, C, **kw).to(device)
        noises = torch.randn(S, B, g, C, **kw).to(device)
        steps_q = []
        for k in range(g):  # draft proposals, one draft call each
            pos = (len_B + k).clamp(max=N - 1)
            z_c, z_u = _conditions(draft, tokens, cond_in, B)
            z_u = None if z_u is None else z_u[rows, pos]  # (B, W_q)
            traj = draft.head.reverse_trajectory(
                z_c[rows, pos], x_T[:, k], noises[:, :, k], temperature, ramp_N[pos], z_u
            )
            write = len_B + k < N
            tokens[rows[write], pos[write]] = traj["x0"][write]
            steps_q.append(traj)
            stats["draft_forwards"] += 1
        q = {key: torch.stack([t[key] for t in steps_q], 1) for key in steps_q[0]}  # (B, g, ...)
        pos_Bg = (len_B[:, None] + torch.arange(g + 1, device=device)).clamp(max=N - 1)  # (B, g+1)
        z_c, z_u = _conditions(model, tokens, cond_in, B)  # one target call
        stats["target_forwards"] += 1
        stats["positions_computed"] += cond_in.shape[0] * N
        z_p = z_c[rows[:, None], pos_Bg]  # (B, g+1, W)
        z_pu = None if z_u is None else z_u[rows[:, None], pos_Bg]
        w_Bg = ramp_N[pos_Bg]  # (B, g+1)
        u_g = None if z_pu is None else z_pu[:, :g]
        p = _trajectory(model.head, z_p[:, :g], x_T, noises, temperature, w_Bg[:, :g], u_g)
        n_B, resid_BC, vstats = cspd_verify(q, p, generator, mode=mode, K=K)
        room = N - len_B
        live = room > 0
        n_B = torch.minimum(n_B, room)
        stats["accepted"] += int(n_B[live].sum())
        g_B = room.clamp(max=g)  # drafts that count in each row
        stats["proposed"] += int(torch.minimum(n_B + 1, g_B)[live].sum())
        stats["ar_tries"] += vstats["ar_tries"]
        stats["ar_unfilled"] += vstats["ar_unfilled"]
        # position len + n: the residual token after a rejection, a bonus token after g acceptances
        extra_pos = (len_B + n_B).clamp(max=N - 1)
        bonus_u = None if z_pu is None else z_pu[:, g]
        bonus = model.head.sample(z_p[:, g], generator, S, temperature, w_Bg[:, g], bonus_u)  # (B, C)
        extra = torch.where((n_B < g)[:, None], resid_BC, bonus)
        put = live & (len_B + n_B < N)
        tokens[rows[put], extra_pos[put]] = extra[put]
        len_B = torch.where(live, len_B + n_B + put.long(), len_B)
    return tokens, finish_stats(stats, B, B * N, t0)


@SAMPLERS.register("cspd", CSpDConfig)
def build_cspd(cfg):
    """``(model, cond_B, generator, progress) -> (tokens, stats)``; loads ``draft_ckpt`` on first use."""
    cfg = {**asdict(CSpDConfig()), **dict(cfg)}
    if not cfg["draft_ckpt"]:
        raise ValueError("sampler.draft_ckpt must name a trained draft xar run for 'cspd'")
    if cfg["gamma"] < 1:
        raise ValueError(f"sampler.gamma must be >= 1, got {cfg['gamma']}")
    loaded = {}

    def run(model, cond_B, generator, progress=False):
        if "draft" not in loaded:
            from vargen.train.tasks import load_component

            draft, _ = load_component(cfg["draft_ckpt"], model.start_1nC.device)
            _check_pair(model, draft)
            loaded["draft"] = draft.eval()
        return sample_cspd(
            model,
            loaded["draft"],
            cond_B,
            generator=generator,
            gamma=cfg["gamma"],
            temperature=cfg["temperature"],
            num_steps=cfg["num_steps"],
            mode=cfg["mode"],
            K=cfg["proposals"],
            cfg_scale=cfg["cfg_scale"],
            prefill=cfg["prefill"],
        )

    return run
