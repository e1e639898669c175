"""Sampling a :class:`~vargen.models.tarflow.TarFlow`: sequential, Jacobi and GS-Jacobi inversion.

Inverting one block means solving u = G(u) with G(u)_i = z_i exp(a_i(u_<i)) + b_i(u_<i)
in the block's permuted order (spec models.md 3b, 4). G is strictly causal, so:

- **sequential** (TarFlow's sampler, the baseline): T-1 single-token passes with a KV
  cache, token i's pass giving (a, b) of token i+1;
- **Jacobi** (GS-Jacobi paper, arXiv 2505.12849, num_GS = 1): repeat one parallel causal
  pass over all tokens, u <- G(u). Token 0 is exact from the start and each iteration
  makes one more token exact, so L inputs need at most L iterations from ANY initial guess;
  we cap at that guarantee, so Jacobi never costs more passes than the sequential loop;
- **GS-Jacobi**: contiguous segments of inputs solved one after another, Jacobi inside a
  segment, attending to a K/V cache of the finished segments. Inputs [s, e) update tokens
  [s+1, e+1). When a segment stops with keys/values computed from a stale iterate (the
  tolerance or a cap stopped it while values still moved) they are recomputed from the
  final values; the reference caches the stale ones.

Guidance runs a second stream with the null class (mean class embedding) in the same
batched pass and mixes a <- a + g_i (a - a_null), b likewise, annealed g_i = i/(T-1) w for
token i (TarFlow). ``cfg_scale`` follows the project's convention (1 = off), w = cfg_scale-1.

Counting (stats): every model pass of a block - one sequential single-token pass or one
parallel Jacobi pass, a guided pair of streams counting once - is one target forward and
one sequential pass, because the passes run one after another.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace

import torch
from tqdm.auto import tqdm

from vargen.registry import SAMPLERS
from vargen.sampling.ar_decode import new_stats

METHODS = ("sequential", "jacobi", "gs_jacobi")
INITS = ("z", "zero")


@dataclass(frozen=True)
class BlockPlan:
    """How one block is inverted: method, GS segments, iteration cap (0 = the guarantee), init."""

    method: str = "sequential"
    segments: int = 1
    max_iters: int = 0
    init: str = "z"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.segments < 1 or self.max_iters < 0:
            raise ValueError(f"need segments >= 1 and max_iters >= 0, got {self.segments}, {self.max_iters}")


def _cond_rows(block, cond_B, guidance):
    """Labels of the rows of one pass: (B,), or (2B,) = conditional then null when guided."""
    if guidance is None:
        return cond_B
    return torch.cat([cond_B, torch.full_like(cond_B, block.null_class)])


def _stream_rows(u_BLC, guidance):
    """Inputs of one pass: the tokens, twice when guided (both streams see the same u)."""
    return u_BLC if guidance is None else torch.cat([u_BLC, u_BLC])  # (R, L, C)


def _guided_params(block, u_BLC, cond_R, cache, guidance):
    """(a, b) for tokens start+1..start+L from ONE pass, with the annealed guidance mix."""
    start = 0 if cache is None else cache.length
    B, L = u_BLC.shape[:2]
    a, b = block.params(_stream_rows(u_BLC, guidance), cond_R, cache)
    if guidance is not None:
        tok = torch.arange(start + 1, start + L + 1, dtype=a.dtype, device=a.device)
        g_L1 = (tok * (guidance / (block.num_tokens - 1)))[:, None]  # (L, 1): g_i = i/(T-1) w
        a = a[:B] + g_L1 * (a[:B] - a[B:])
        b = b[:B] + g_L1 * (b[:B] - b[B:])
    return a, b


def _affine(z, a, b, clamp):
    u = z * torch.exp(a) + b
    return u if clamp is None else u.clamp(-clamp, clamp)


def initial_guess(z_BTC, init: str):
    """u^0: "z" = z itself; "zero" = [z_0, 0, ..., 0]. Token 0 is exact either way."""
    if init == "z":
        return z_BTC.clone()
    u = torch.zeros_like(z_BTC)
    u[:, 0] = z_BTC[:, 0]
    return u


@torch.no_grad()
def invert_block_sequential(block, z_BTC, cond_B, *, guidance: float | None = None):
    """Sequential inverse, permuted order in and out: ((B, T, C) u, {"iterations", "passes"})."""
    T = z_BTC.shape[1]
    cond_R = _cond_rows(block, cond_B, guidance)
    cache = block.new_cache(cond_R.shape[0])
    u = z_BTC.clone()  # token 0: a = b = 0
    for i in range(T - 1):
        a, b = _guided_params(block, u[:, i : i + 1], cond_R, cache, guidance)  # token i+1
        cache.advance(1)
        u[:, i + 1 : i + 2] = _affine(z_BTC[:, i + 1 : i + 2], a, b, None)
    return u, {"iterations": T - 1, "passes": T - 1}


@torch.no_grad()
def invert_block_gs_jacobi(
    block,
    z_BTC,
    cond_B,
    *,
    segments: int = 1,
    max_iters: int = 0,
    tol: float = 1e-6,
    init: str = "z",
    clamp: float | None = None,
    guidance: float | None = None,
):
    """Gauss-Seidel over ``segments`` contiguous segments, Jacobi inside each (spec 4c).

    The T-1 inputs 0..T-2 are cut into segments of S = ceil((T-1)/segments) tokens. Each
    segment iterates until diff = ||u^{k+1} - u^k||_F / (B C_p) <= tol, ``max_iters``
    (0 = no cap) or S iterations (the exactness guarantee), whichever comes first.
    Returns (u_BTC, {"iterations": sum over segments, "passes", "segment_iterations"}).
    """
    B, T, C = z_BTC.shape
    n_in = T - 1
    size = -(-n_in // segments)  # ceil
    cond_R = _cond_rows(block, cond_B, guidance)
    cache = block.new_cache(cond_R.shape[0])
    u = initial_guess(z_BTC, init)
    seg_iters, passes = [], 0
    for s in range(0, n_in, size):
        e = min(s + size, n_in)
        L = e - s
        cap = L if max_iters <= 0 else min(max_iters, L)
        k, stale = 0, False
        while k < cap:
            a, b = _guided_params(block, u[:, s:e], cond_R, cache, guidance)  # tokens s+1..e
            new = _affine(z_BTC[:, s + 1 : e + 1], a, b, clamp)  # (B, L, C)
            old = u[:, s + 1 : e + 1]
            diff = (new - old).norm().item() / (B * C)
            stale = not torch.equal(new[:, :-1], old[:, :-1])  # inputs s+1..e-1 moved
            u[:, s + 1 : e + 1] = new
            k += 1
            if diff <= tol:
                break
        passes += k
        seg_iters.append(k)
        if e < n_in:  # later segments attend to this one
            if stale:  # keys/values came from the previous iterate: recompute from the final one
                block.params(_stream_rows(u[:, s:e], guidance), cond_R, cache)
                passes += 1
            cache.advance(L)
    return u, {"iterations": sum(seg_iters), "passes": passes, "segment_iterations": seg_iters}


def invert_block_jacobi(block, z_BTC, cond_B, **kw):
    """Plain Jacobi: GS-Jacobi with one segment (all T-1 inputs in every pass)."""
    return invert_block_gs_jacobi(block, z_BTC, cond_B, segments=1, **kw)


@torch.no_grad()
def invert_tarflow(
    model,
    z_BTC,
    cond_B,
    plans: list[BlockPlan],
    *,
    tol: float = 1e-6,
    clamp: float | None = None,
    guidance: float | None = None,
    progress: bool = False,
):
    """z -> x through all blocks in reverse; ``plans`` are in sampling (reverse block) order."""
    if len(plans) != len(model.blocks):
        raise ValueError(f"{len(plans)} block plans for {len(model.blocks)} blocks")
    x, infos = z_BTC, []
    order = list(reversed(model.blocks))
    for block, plan in tqdm(list(zip(order, plans)), desc="blocks", disable=not progress, leave=False):
        zp = block.permute(x)
        if plan.method == "sequential":
            u, info = invert_block_sequential(block, zp, cond_B, guidance=guidance)
        else:
            u, info = invert_block_gs_jacobi(
                block,
                zp,
                cond_B,
                segments=plan.segments if plan.method == "gs_jacobi" else 1,
                max_iters=plan.max_iters,
                tol=tol,
                init=plan.init,
                clamp=clamp,
                guidance=guidance,
            )
        x = block.permute(u)
        infos.append(info)
    return x, infos


@torch.no_grad()
def sample_tarflow(
    model,
    cond_B: torch.Tensor,
    *,
    generator: torch.Generator,
    method: str = "sequential",
    cfg_scale: float = 1.0,
    tol: float = 1e-6,
    max_iters: int = 0,
    segments: int = 8,
    init: str = "z",
    policy: list[BlockPlan] | None = None,
    clamp: float | None = None,
    denoise: bool = True,
    progress: bool = False,
):
    """Draw images (B, C, H, W) in [0, 1] for labels ``cond_B``; returns (images, stats).

    z ~ N(0, I) is drawn as one (B, T, C_p) tensor on the generator's device. ``policy``
    (one :class:`BlockPlan` per block, sampling order) overrides method / segments /
    max_iters / init. ``denoise`` applies the Tweedie step (one forward + backward of the
    whole flow, counted in ``denoise_forwards``, not in ``target_forwards``).
    """
    t0 = time.perf_counter()
    p = next(model.parameters())
    cond_B = cond_B.to(p.device)
    B, T, C = cond_B.shape[0], model.num_tokens, model.token_dim
    plans = policy or [BlockPlan(method, segments, max_iters, init)] * len(model.blocks)
    guidance = None if cfg_scale == 1.0 else cfg_scale - 1.0
    z = torch.randn(B, T, C, generator=generator, device=generator.device, dtype=p.dtype).to(p.device)
    x, infos = invert_tarflow(
        model, z, cond_B, plans, tol=tol, clamp=clamp, guidance=guidance, progress=progress
    )
    if denoise:
        x = model.denoise(x, cond_B)
    stats = new_stats()
    passes = [i["passes"] for i in infos]
    stats.update(
        target_forwards=sum(passes),
        sequential_passes=sum(passes),
        baseline_passes=len(infos) * (T - 1),  # the sequential sampler's count
        passes_per_block=passes,
        iterations_per_block=[i["iterations"] for i in infos],
        denoise_forwards=len(model.blocks) if denoise else 0,
        tokens=B * T,
        accepted=B * T,
        proposed=B * T,
        plans=[asdict(pl) for pl in plans],
    )
    stats["seconds"] = time.perf_counter() - t0
    return model.to_images(x), stats


# ---------------------------------------------------------------------- strategy (spec 4d)
@torch.no_grad()
def crm_igm(model, images_BCHW, labels_B=None) -> dict:
    """Per-block strategy metrics from real images, model block order, each (num_blocks,).

    CRM (convergence-ranking metric) = ||mean_B(exp(-a) * u)||_2 ||W_a||_2 + ||W_b||_2 with
    spectral norms and W_a, W_b the log-scale / shift halves of proj_out: a Lipschitz-style
    proxy for how strongly tokens couple (the spec follows the reference code). IGM for
    each init = ||mean_B(G(u^0) - u_true)||: one Jacobi step from that guess on the true z.
    Labels default to the null class (the mean class embedding), as in the paper.
    """
    p = next(model.parameters())
    x = model.to_tokens(images_BCHW.to(p.device, p.dtype))  # (B, T, C)
    if labels_B is None:
        labels_B = torch.full((x.shape[0],), model.null_class, dtype=torch.long, device=p.device)
    C = model.token_dim
    out = {"crm": [], "igm_z": [], "igm_zero": []}
    for block in model.blocks:
        u = block.permute(x)  # the block's true input
        a, b = block.shifted_params(u, labels_B)
        z = (u - b) * torch.exp(-a)
        W = block.proj_out.weight  # (2C, D)
        m = (torch.exp(-a) * u).mean(0)  # (T, C)
        crm = torch.linalg.matrix_norm(m, 2) * torch.linalg.matrix_norm(W[:C], 2)
        out["crm"].append(crm + torch.linalg.matrix_norm(W[C:], 2))
        for init in INITS:
            a0, b0 = block.shifted_params(initial_guess(z, init), labels_B)
            step = z * torch.exp(a0) + b0  # G(u^0)
            out[f"igm_{init}"].append((step - u).mean(0).norm())
        x = block.permute(z)
    return {k: torch.stack(v).float().cpu() for k, v in out.items()}


def choose_policy(
    crm,
    igm_z,
    igm_zero,
    *,
    tough_share: float = 0.3,
    gs_segments: int = 8,
    gs_max_iters: int = 32,
    jacobi_max_iters: int = 10,
) -> list[BlockPlan]:
    """Per-block plans in SAMPLING order from metrics in model block order (spec 4d).

    Blocks holding at least ``tough_share`` of the total CRM are "tough" and get GS-Jacobi
    with ``gs_segments`` segments capped at ``gs_max_iters`` per segment; the rest plain
    Jacobi capped at ``jacobi_max_iters``. Each block starts from the init with lower IGM.
    """
    share = crm / crm.sum()
    plans = []
    for blk in reversed(range(len(crm))):
        init = "z" if igm_z[blk] <= igm_zero[blk] else "zero"
        if share[blk] >= tough_share:
            plans.append(BlockPlan("gs_jacobi", gs_segments, gs_max_iters, init))
        else:
            plans.append(BlockPlan("jacobi", 1, jacobi_max_iters, init))
    return plans


def stack_policy(num_blocks: int, gs_blocks, segments: int, gs_max_iters: int, max_iters: int, init: str):
    """The paper's [Stack-GS-J-Else] notation: ``gs_blocks`` (sampling-order indices) get
    GS-Jacobi with ``segments`` segments capped at ``gs_max_iters``; the others Jacobi
    capped at ``max_iters``. [6-8-32-10] = stack_policy(n, [6], 8, 32, 10, init)."""
    jac = BlockPlan("jacobi", 1, max_iters, init)
    gs = replace(jac, method="gs_jacobi", segments=segments, max_iters=gs_max_iters)
    return [gs if j in set(gs_blocks) else jac for j in range(num_blocks)]


@dataclass
class TarFlowSamplerConfig:
    name: str = "tarflow"
    method: str = "sequential"  # sequential | jacobi | gs_jacobi (every block) | auto (CRM/IGM policy)
    cfg_scale: float = 1.0  # 1 = off; annealed over tokens per TarFlow
    tol: float = 1e-6  # Jacobi stop: ||u^{k+1} - u^k||_F / (B C_p) <= tol
    max_iters: int = 0  # Jacobi cap per block / per GS segment; 0 = the exactness guarantee
    segments: int = 8  # GS-Jacobi segments (num_GS)
    init: str = "z"  # z | zero
    clamp: float = 0.0  # overflow clamp of Jacobi iterates to [-clamp, clamp]; 0 = off
    denoise: bool = True  # Tweedie step after sampling
    gs_blocks: list[int] = field(default_factory=list)  # non-empty: [Stack-GS-J-Else] policy
    gs_max_iters: int = 32  # cap per segment for gs_blocks


@SAMPLERS.register("tarflow", TarFlowSamplerConfig)
def build_tarflow_sampler(cfg):
    """A callable ``(model, cond_B, generator, progress) -> (images, stats)`` for the config.

    ``method=auto`` picks a per-block policy from CRM / IGM (spec 4d); Jacobi blocks are
    capped at ``max_iters`` (default 0: stop by ``tol`` alone, at most T passes). The
    paper's caps of 6-20 are tuned for 1024-token models; on the 64-token digits model a
    cap of 10 left one block unconverged (max pixel error 0.9, FID 34.5 -> 42.7) while
    the tolerance stop needed 26 passes there. It needs real images,
    given once through the callable's ``prepare(model, images, labels)`` (sample.py passes
    training images of the checkpoint's dataset). ``run.policy`` holds the chosen plans.
    """
    kw = {k: v for k, v in dict(cfg).items() if k not in ("name", "gs_blocks", "gs_max_iters", "clamp")}
    gs_blocks, gs_max_iters = list(cfg["gs_blocks"]), cfg["gs_max_iters"]
    clamp = cfg["clamp"] or None
    auto = kw["method"] == "auto"
    if auto:
        kw["method"] = "jacobi"  # overridden per block by the chosen policy

    def prepare(model, images_BCHW, labels_B=None):
        if auto:
            m = crm_igm(model, images_BCHW, labels_B)
            run.policy = choose_policy(
                m["crm"],
                m["igm_z"],
                m["igm_zero"],
                gs_segments=kw["segments"],
                gs_max_iters=gs_max_iters,
                jacobi_max_iters=kw["max_iters"],
            )

    def run(model, cond_B, generator, progress=False):
        policy = run.policy
        if auto and policy is None:
            raise ValueError("sampler.method=auto needs real images first: call prepare(model, images)")
        if gs_blocks:
            n = len(model.blocks)
            policy = stack_policy(n, gs_blocks, kw["segments"], gs_max_iters, kw["max_iters"], kw["init"])
        return sample_tarflow(
            model, cond_B, generator=generator, policy=policy, clamp=clamp, progress=progress, **kw
        )

    run.policy = None
    run.prepare = prepare
    return run
