"""Exact speculative sampling with a draft model (Leviathan et al. 2023; Chen et al. 2023).

Spec: specs/sampling-speculative.md section 1. Per iteration the draft model samples gamma
tokens ``x`` from its warped conditionals ``q``; one target call gives the warped target
conditionals ``p`` at the gamma draft positions plus the bonus position; draft i is accepted
with probability min(1, p(x_i)/q(x_i)) (eq. in section 1(a).3) and the first rejection is
replaced by a sample of norm(max(0, p - q)) (1(a).4), so every row emits n_b + 1 tokens and the
output is distributed exactly as the target's (proof in section 1).

Rows are ragged: each row keeps its own committed length and its window starts at its own
position, without a Python loop over rows or positions. Both models are driven through a
:class:`WindowScorer`: by default KV-cached (:meth:`ARTransformer.forward_window` on a
:class:`RaggedKVCache`, whose per-row lengths are rolled back to the committed lengths after
each verification), or with ``use_cache=False`` by full recompute of the prefix through
``model.logits``; both draw the same tokens from the same generator. The same warpers (CFG,
temperature, top-k, top-p) are applied to draft and target logits through
:func:`vargen_kernels.logits_warper.warped_probs`, since the test needs the warped p and q.
Near the end of the sequence a row may have less room than gamma: acceptance is capped there,
and the capped position is drawn from p directly (a truncation that does not depend on the
drafted tokens keeps the sampler exact).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from vargen.registry import SAMPLERS
from vargen.sampling.ar_decode import new_stats
from vargen_kernels.logits_warper import warped_probs

RESIDUAL_EPS = 1e-6  # residual mass below this means p ~ q numerically: sample p instead (1(a).5)


def sample_probs(probs_XV: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One id per row of (..., V) probabilities by Gumbel-max on the generator's uniforms."""
    u = torch.rand(probs_XV.shape, generator=generator, device=generator.device).to(probs_XV.device)
    g = -torch.log(-torch.log(u.clamp(2.0**-24, 1.0 - 2.0**-24)))
    return (probs_XV.log() + g).argmax(-1)  # log(0) = -inf is never chosen


def window_probs(model, ids_BN, cond_B, pos_BW, warp: dict) -> torch.Tensor:
    """Warped next-token distributions (B, W, V) at per-row positions ``pos_BW`` (one model call)."""
    N = ids_BN.shape[1]
    ids_in = ids_BN[:, : N - 1]  # logits at position t predict token t from ids < t
    guided = warp["cfg_scale"] != 1.0
    if guided:
        null_B = torch.full_like(cond_B, model.null_class)
        logits = model.logits(torch.cat([ids_in, ids_in]), torch.cat([cond_B, null_B]))  # (2B, N, V)
        cond_BNV, unc_BNV = logits.chunk(2)
    else:
        cond_BNV, unc_BNV = model.logits(ids_in, cond_B), None  # (B, N, V)
    B, W = pos_BW.shape
    V = cond_BNV.shape[-1]
    idx = pos_BW[..., None].expand(B, W, V)
    c = cond_BNV.gather(1, idx).reshape(B * W, V)
    u = unc_BNV.gather(1, idx).reshape(B * W, V) if guided else None
    return warped_probs(c, u, **warp).view(B, W, V)  # (B, W, V)


def window_inputs(ids_BN, start_B, width: int) -> torch.Tensor:
    """Model inputs (B, W) at positions start_b .. start_b+W-1: image token position - 1 (the
    class token stands at position 0, so index -1 is a placeholder), clamped to the sequence."""
    N = ids_BN.shape[1]
    idx = start_B[:, None] - 1 + torch.arange(width, device=ids_BN.device)  # (B, W)
    return ids_BN.gather(1, idx.clamp(0, N - 1))


class WindowScorer:
    """Warped next-token distributions of one model over per-row windows, KV-cached or not.

    With ``use_cache`` the model runs :meth:`forward_window` on a :class:`RaggedKVCache` of the
    (CFG-doubled) batch; callers keep the cache at each row's committed length with
    :meth:`commit`. Without it every call recomputes the whole prefix (:func:`window_probs`).
    ``stats["positions_computed"]`` counts the sequence positions pushed through the model.
    """

    def __init__(self, model, cond_B, warp: dict, stats: dict, use_cache: bool, window: int):
        self.model, self.cond_B, self.warp, self.stats = model, cond_B, warp, stats
        self.guided = warp["cfg_scale"] != 1.0
        null_B = torch.full_like(cond_B, model.null_class)
        self.cond_in = torch.cat([cond_B, null_B]) if self.guided else cond_B  # (R,) R = B or 2B
        self.cache = model.new_ragged_cache(len(self.cond_in), window) if use_cache else None

    def window(self, ids_BN, start_B, width: int) -> torch.Tensor:
        """(B, W, V) at positions start_b .. start_b+W-1 (cached: start_B must be the cache's
        length; positions past the sequence are meaningless, the caller never uses them)."""
        N = ids_BN.shape[1]
        R = len(self.cond_in)
        if self.cache is None:
            pos_BW = (start_B[:, None] + torch.arange(width, device=ids_BN.device)).clamp(max=N - 1)
            self.stats["positions_computed"] += R * N
            return window_probs(self.model, ids_BN, self.cond_B, pos_BW, self.warp)
        inputs_RW = window_inputs(ids_BN, start_B, width).repeat(R // len(start_B), 1)
        logits_RWV = self.model.forward_window(inputs_RW, self.cond_in, self.cache)
        self.stats["positions_computed"] += R * width
        B, V = len(start_B), logits_RWV.shape[-1]
        c = logits_RWV[:B].reshape(B * width, V)
        u = logits_RWV[B:].reshape(B * width, V) if self.guided else None
        return warped_probs(c, u, **self.warp).view(B, width, V)  # (B, W, V)

    def next_probs(self, ids_BN, pos_B) -> torch.Tensor:
        """(B, V) at position ``pos_B`` (the draft's autoregressive step). Cached, a row whose
        cache lags behind pos_b (the draft never ran on its last accepted token) catches up in
        the same call; afterwards the cache holds pos_b + 1 positions."""
        if self.cache is None:
            return self.window(ids_BN, pos_B, 1)[:, 0]
        B = len(pos_B)
        start_B = self.cache.length_B[:B]
        lag_B = pos_B - start_B  # >= 0: the cache never runs ahead of the committed tokens
        probs_BWV = self.window(ids_BN, start_B, 1 + int(lag_B.max()))
        self.commit(pos_B + 1)
        return probs_BWV.gather(1, lag_B[:, None, None].expand(B, 1, probs_BWV.shape[-1]))[:, 0]

    def commit(self, len_B):
        """Roll each row's cache back to (at most) its committed length ``len_B``."""
        if self.cache is not None:
            self.cache.rollback(len_B.repeat(len(self.cond_in) // len(len_B)))


def token_residual(p_BV, q_BV):
    """norm(max(0, p - q)) (1(a).4); p itself when the residual mass vanishes (1(a).5)."""
    res = (p_BV - q_BV).clamp(min=0)
    mass = res.sum(-1, keepdim=True)
    return torch.where(mass > RESIDUAL_EPS, res / mass.clamp(min=RESIDUAL_EPS), p_BV)


def accept_and_correct(p_BWV, q_BgV, x_Bg, ratio_Bg, room_B, generator, residual_fn=token_residual):
    """The verification step shared by SD, SJD and GSD, vectorised over batch and window.

    ``p_BWV`` holds the target at the g = W-1 draft positions plus the bonus one, ``ratio_Bg``
    the acceptance ratio of each draft (p(x)/q(x) for the exact samplers), ``room_B`` the tokens
    a row still has to emit, ``residual_fn(p_BV, q_BV)`` the distribution a rejection resamples
    from. Returns (n_B accepted drafts, z_B the token emitted after them, y_BW one target sample
    per window position, cap_B drafts the row was allowed to accept).
    """
    B, W, V = p_BWV.shape
    g = W - 1
    y_BW = sample_probs(p_BWV, generator)  # the bonus token / Jacobi's next drafts
    u_Bg = torch.rand(B, g, generator=generator, device=generator.device).to(p_BWV.device)
    cap_B = torch.minimum(torch.full_like(room_B, g), (room_B - 1).clamp(min=0))
    j = torch.arange(g, device=p_BWV.device)
    acc_Bg = (u_Bg < ratio_Bg.clamp(max=1.0)) & (j[None] < cap_B[:, None])
    n_B = acc_Bg.long().cumprod(1).sum(1)  # leading accepted drafts
    rejected_B = n_B < cap_B  # a real rejection, not the end-of-window / end-of-sequence cap
    p_n = p_BWV.gather(1, n_B[:, None, None].expand(B, 1, V))[:, 0]  # (B, V)
    if g > 0:
        q_n = q_BgV.gather(1, n_B.clamp(max=g - 1)[:, None, None].expand(B, 1, V))[:, 0]  # (B, V)
        res = residual_fn(p_n, q_n)
    else:
        res = p_n
    z_res = sample_probs(res, generator)
    y_n = y_BW.gather(1, n_B[:, None])[:, 0]
    z_B = torch.where(rejected_B, z_res, y_n)
    return n_B, z_B, y_BW, cap_B


def token_ratio(p_BgV, q_BgV, x_Bg):
    """The exact per-token acceptance ratio p(x)/q(x)."""
    x = x_Bg[..., None]
    return p_BgV.gather(2, x)[..., 0] / q_BgV.gather(2, x)[..., 0]


def write_at(ids_BN, pos_B, val_B, ok_B):
    """ids[b, pos_b] = val_b where ok_b (pos clamped to the sequence)."""
    N = ids_BN.shape[1]
    pos = pos_B.clamp(max=N - 1)[:, None]
    old = ids_BN.gather(1, pos)[:, 0]
    ids_BN.scatter_(1, pos, torch.where(ok_B, val_B, old)[:, None])


@dataclass
class SpeculativeConfig:
    name: str = "speculative"
    draft_ckpt: str = ""  # run dir of a smaller llamagen trained on the same tokenizer
    gamma: int = 4  # draft tokens per target call
    use_cache: bool = True  # False: both models recompute the whole prefix every call (baseline)
    cfg_scale: float = 1.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


@torch.no_grad()
def sample_speculative(target, draft, cond_B, *, generator, gamma=4, use_cache=True, **warp):
    """Draw ids (B, N) from ``target`` with ``draft`` proposals; returns (ids_BN, stats)."""
    t0 = time.perf_counter()
    if gamma < 1:
        raise ValueError(f"sampler.gamma must be >= 1, got {gamma}")
    warp = {"cfg_scale": 1.0, "temperature": 1.0, "top_k": 0, "top_p": 1.0, **warp}
    B, N = cond_B.shape[0], target.num_tokens
    device = cond_B.device
    ids_BN = torch.zeros(B, N, dtype=torch.long, device=device)
    len_B = torch.zeros(B, dtype=torch.long, device=device)
    stats = new_stats()
    draft_stats = new_stats()
    p_model = WindowScorer(target, cond_B, warp, stats, use_cache, gamma + 1)
    q_model = WindowScorer(draft, cond_B, warp, draft_stats, use_cache, gamma + 1)
    while bool((len_B < N).any()):
        active_B = len_B < N
        qs, xs = [], []
        for j in range(gamma):  # autoregressive drafting: a loop over draft steps, not rows
            pos_B = len_B + j
            q_BV = q_model.next_probs(ids_BN, pos_B)
            x_B = sample_probs(q_BV, generator)
            write_at(ids_BN, pos_B, x_B, pos_B < N)
            qs.append(q_BV)
            xs.append(x_B)
            stats["draft_forwards"] += 1
        q_BgV, x_Bg = torch.stack(qs, 1), torch.stack(xs, 1)
        p_BWV = p_model.window(ids_BN, len_B, gamma + 1)
        stats["target_forwards"] += 1
        ratio_Bg = (
            p_BWV[:, :gamma].gather(2, x_Bg[..., None])[..., 0] / q_BgV.gather(2, x_Bg[..., None])[..., 0]
        )
        n_B, z_B, _, cap_B = accept_and_correct(p_BWV, q_BgV, x_Bg, ratio_Bg, N - len_B, generator)
        write_at(ids_BN, len_B + n_B, z_B, active_B)
        stats["accepted"] += int((n_B * active_B).sum())
        stats["proposed"] += int((cap_B * active_B).sum())
        len_B = len_B + (n_B + 1) * active_B
        p_model.commit(len_B)
        q_model.commit(len_B)
    stats["draft_positions_computed"] = draft_stats["positions_computed"]
    return ids_BN, finish_stats(stats, B, B * N, t0)


def finish_stats(stats: dict, rows: int, tokens: int, t0: float) -> dict:
    stats["tokens"] = tokens
    stats["acceptance"] = stats["accepted"] / max(1, stats["proposed"])
    stats["row_target_forwards"] = stats["target_forwards"] * rows  # a call serves every row
    stats["tokens_per_target_call"] = tokens / max(1, stats["row_target_forwards"])  # per row
    stats["seconds"] = time.perf_counter() - t0
    return stats


def warp_kwargs(cfg) -> dict:
    return {k: cfg[k] for k in ("cfg_scale", "temperature", "top_k", "top_p")}


@SAMPLERS.register("speculative", SpeculativeConfig)
def build_speculative(cfg):
    """``(model, cond_B, generator, progress) -> (ids, stats)``; loads ``draft_ckpt`` on first use."""
    cfg = {**asdict(SpeculativeConfig()), **dict(cfg)}
    if not cfg["draft_ckpt"]:
        raise ValueError("sampler.draft_ckpt must name a trained draft llamagen run for 'speculative'")
    if cfg["gamma"] < 1:
        raise ValueError(f"sampler.gamma must be >= 1, got {cfg['gamma']}")
    loaded = {}

    def run(model, cond_B, generator, progress=False):
        if "draft" not in loaded:
            from vargen.train.tasks import load_component

            draft, _ = load_component(cfg["draft_ckpt"], model.tok_emb.weight.device)
            if draft.vocab_size != model.vocab_size or draft.num_tokens != model.num_tokens:
                raise ValueError("sampler.draft_ckpt: draft and target must share the tokenizer")
            loaded["draft"] = draft.eval()
        cond_B = cond_B.to(model.tok_emb.weight.device)
        return sample_speculative(
            model,
            loaded["draft"],
            cond_B,
            generator=generator,
            gamma=cfg["gamma"],
            use_cache=cfg["use_cache"],
            **warp_kwargs(cfg),
        )

    return run
