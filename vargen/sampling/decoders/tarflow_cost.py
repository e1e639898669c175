"""TarFlow's per-block plan chosen by MEASURED cost at the batch size that will run (issue 16).

:func:`~vargen.sampling.decoders.tarflow.calibrate_policy` counts passes: fewer passes is
faster only where a pass costs about as much whatever its width, i.e. where the step is bound
by per-call overhead (batch 1 on a CPU, any small batch on a GPU). At batch 16 on one CPU
thread a pass is bound by arithmetic: a W-token window pushes ~W times the rows of a
KV-cached sequential step, so frozen-prefix Jacobi, even with fewer passes, can cost more than
the sequential loop it replaces (photos TarFlow, batch 16: window 2, 1.09x fewer passes, 0.82x
the speed). So this calibration times every candidate on each block: the sequential loop and
the Jacobi method (``jacobi`` or ``gs_jacobi``) at each window of ``windows``, on a
calibration batch of the batch size that will be sampled, and keeps the cheapest. A block
where no window beats the sequential loop is inverted sequentially: exact, and never slower
than the baseline by more than the timing noise. Blocks are walked in sampling order, each
measured on the output of the plan chosen for the block before it (what it sees when sampling).

This is a named choice (``TarFlowSamplerConfig.auto_by="cost"``; the ``policy: "cost"`` entry
of :data:`~vargen.sampling.decoders.tarflow.JACOBI_CPU`), never what ``method="jacobi"``
means: a plain Jacobi sampler still runs Jacobi on every block.

Timing: :func:`~vargen.sampling.timing.device_clock` (process CPU time on one CPU thread, wall
time with more threads or after a synchronize on an accelerator); the best of ``reps``.
``margin`` > 1 asks a Jacobi candidate to beat the sequential loop by that factor before it is
chosen (a guard against timing noise).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from vargen.sampling.decoders.tarflow import BlockPlan, _invert_block
from vargen.sampling.timing import device_clock, fastest

COST_WINDOWS = (2, 4, 8, 16, 32, 64)


def candidates(method: str, windows: Sequence[int], segments: int = 8) -> list[BlockPlan]:
    """The plans a block may get: sequential first, then ``method`` at every window."""
    if method not in ("jacobi", "gs_jacobi"):
        raise ValueError(f"cost calibration compares jacobi or gs_jacobi with sequential, got {method!r}")
    if not windows or min(windows) < 1:
        raise ValueError(f"need windows >= 1, got {list(windows)}")
    seg = segments if method == "gs_jacobi" else 1
    return [BlockPlan("sequential")] + [BlockPlan(method, seg, 0, "z", w) for w in windows]


def plan_name(plan: BlockPlan) -> str:
    """A candidate's key in the measurements: "sequential", "jacobi w16", "gs_jacobi 8x w16"."""
    if plan.method == "sequential":
        return "sequential"
    seg = f" {plan.segments}x" if plan.method == "gs_jacobi" else ""
    return f"{plan.method}{seg} w{plan.window}"


@torch.no_grad()
def calibrate_cost(
    model,
    cond_N: torch.Tensor,
    generator: torch.Generator,
    *,
    batch: int = 0,
    method: str = "jacobi",
    windows: Sequence[int] = COST_WINDOWS,
    segments: int = 8,
    tol: float = 1e-4,
    clamp: float | None = None,
    guidance: float | None = None,
    check_every: int = 1,
    attn_temp: float = 1.0,
    reps: int = 2,
    margin: float = 1.0,
    clock: Callable[[], float] | None = None,
):
    """Per-block plans (sampling order) by measured seconds, and the measurements.

    Draws a calibration set z ~ N(0, I) for labels ``cond_N`` from ``generator`` and runs it in
    chunks of ``batch`` rows (0 = all at once): the batch size to be sampled, since the cost of
    a pass depends on it. For each block every plan of :func:`candidates` inverts every chunk,
    timed by :func:`~vargen.sampling.timing.fastest` (interleaved rounds, best each): the
    cheapest plan wins, sequential unless a Jacobi plan is ``margin`` times faster. ``clock``
    (default :func:`device_clock`) is read before and after each candidate's round. Returns
    (plans, {"seconds": per block {candidate: seconds}, "chosen": per block candidate name}).
    """
    if reps < 1 or margin <= 0 or batch < 0:
        raise ValueError(f"need reps >= 1, margin > 0, batch >= 0, got {reps}, {margin}, {batch}")
    p = next(model.parameters())
    cond_N = cond_N.to(p.device)
    N, T, C = cond_N.shape[0], model.num_tokens, model.token_dim
    step = batch or N
    clock = clock or device_clock(p.device)
    x = torch.randn(N, T, C, generator=generator, device=generator.device, dtype=p.dtype).to(p.device)
    kw = dict(tol=tol, clamp=clamp, guidance=guidance, check_every=check_every, attn_temp=attn_temp)
    by_name = {plan_name(pl): pl for pl in candidates(method, windows, segments)}
    plans, seconds, chosen = [], [], []
    for block in reversed(model.blocks):
        zp = block.permute(x)

        def invert(name, block=block, zp=zp):  # every calibration chunk under one candidate plan
            plan = by_name[name]
            return [
                _invert_block(block, zp[i : i + step], cond_N[i : i + step], plan, **kw)[0]
                for i in range(0, N, step)
            ]

        name, secs, outs = fastest(list(by_name), invert, reps=reps, margin=margin, clock=clock)
        plans.append(by_name[name])
        seconds.append(secs)
        chosen.append(name)
        x = block.permute(torch.cat(outs[name]))
    return plans, {"seconds": seconds, "chosen": chosen}
