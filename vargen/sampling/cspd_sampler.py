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
``entity_conditions`` (one call per step serves every row at its own position). Guidance is not
supported here (``cfg_scale`` must be 1): the xAR ramp gives each position its own scale and the
head's chain takes one scale per call.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

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
    cfg_scale: float = 1.0  # must be 1 (see the module docstring)


def _check_pair(model, draft):
    for m, who in ((model, "target"), (draft, "draft")):
        if m.cfg.entity != "token" or m.cfg.head["name"] != "mar_diffusion":
            raise ValueError(f"cspd needs xar models with entity token and head mar_diffusion ({who})")
    if draft.cfg.code_dim != model.cfg.code_dim or list(draft.cfg.grid) != list(model.cfg.grid):
        raise ValueError("sampler.draft_ckpt: draft and target must share the tokenizer")


def _trajectory(head, cond_BgW, x_T, noises, temperature) -> dict:
    """The head's aligned chain on (B, g) positions, outputs reshaped to (B, g, ...)."""
    B, g, W = cond_BgW.shape
    z, x = cond_BgW.reshape(B * g, W), x_T.flatten(0, 1)
    out = head.reverse_trajectory(z, x, noises.flatten(1, 2), temperature)
    return {k: v.reshape(B, g, *v.shape[1:]) for k, v in out.items()}


@torch.no_grad()
def sample_cspd(
    model, draft, cond_B, *, generator, gamma=4, temperature=1.0, num_steps=0, mode="exact", K=16
):
    """Draw tokens (B, N, C) distributed as the target's own ``xar`` sampler (exact mode)."""
    t0 = time.perf_counter()
    device = model.start_1nC.device
    cond_B = cond_B.to(device)
    B, N, C = cond_B.shape[0], model.length, model.cfg.code_dim
    S = int(num_steps or model.head.num_sampling_steps)
    rows = torch.arange(B, device=device)
    tokens = torch.zeros(B, N, C, device=device)  # committed prefix, then drafts
    len_B = torch.zeros(B, dtype=torch.long, device=device)
    stats = new_stats()
    stats.update(ar_tries=0.0, ar_unfilled=0)
    kw = {"generator": generator, "device": generator.device}
    while bool((len_B < N).any()):
        g = int(min(gamma, int((N - len_B).max())))
        x_T = torch.randn(B, g, C, **kw).to(device)
        noises = torch.randn(S, B, g, C, **kw).to(device)
        steps_q = []
        for k in range(g):  # draft proposals, one draft call each
            pos = (len_B + k).clamp(max=N - 1)
            z = draft.entity_conditions(tokens, cond_B)[rows, pos]  # (B, W_q)
            traj = draft.head.reverse_trajectory(z, x_T[:, k], noises[:, :, k], temperature)
            write = len_B + k < N
            tokens[rows[write], pos[write]] = traj["x0"][write]
            steps_q.append(traj)
            stats["draft_forwards"] += 1
        q = {key: torch.stack([t[key] for t in steps_q], 1) for key in steps_q[0]}  # (B, g, ...)
        pos_Bg = (len_B[:, None] + torch.arange(g + 1, device=device)).clamp(max=N - 1)  # (B, g+1)
        z_p = model.entity_conditions(tokens, cond_B)  # (B, N, W): one target call
        stats["target_forwards"] += 1
        z_p = z_p.gather(1, pos_Bg[..., None].expand(B, g + 1, z_p.shape[-1]))  # (B, g+1, W)
        p = _trajectory(model.head, z_p[:, :g], x_T, noises, temperature)
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
        bonus = model.head.sample(z_p[:, g], generator, S, temperature)  # (B, C)
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
    if cfg["cfg_scale"] != 1.0:
        raise ValueError("sampler.cfg_scale: cspd samples without guidance (1.0); see cspd_sampler.py")
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
        )

    return run
