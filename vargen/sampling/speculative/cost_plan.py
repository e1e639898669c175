"""Whether to speculate, and how wide: chosen by MEASURED cost at the batch size that will run
(issue 16), for SD (width = gamma), SJD and GSD (width = window).

Speculation saves target calls, but it pays only where an iteration costs about one plain
step. Where a step is bound by per-call overhead (batch 1 on a GPU replaying graphs, or on a
CPU) a window is nearly free; where it is bound by arithmetic (batch 16 on one CPU thread) a
W-wide window pushes about W times the rows of a plain step. Measured on photos_ar (one CPU
thread, CFG 1.5): at batch 1 a plain step costs 2.1 ms and an SJD window-4 iteration 3.4 ms
for 1.9 tokens (1.15x); at batch 16 no window of SJD, GSD or SD beats plain decoding
(``benchmarks/results/spec_sweep.json``: 0.38-0.93x), while on an H200 with CUDA graphs
windows 16-24 win at both batch sizes (``spec_sweep_cuda_graph*.json``). The best width is a
property of the machine and the batch, so ``speculate_by="cost"`` measures it.

:func:`choose_width` times plain decoding and the sampler at each candidate width on a
calibration set (``images`` labels ``0, 1, ...`` modulo the classes, run ``rows`` at a time:
the batch that will be sampled; its own generator, seeded, so the caller's stream is not
consumed), interleaved over ``reps`` rounds, best round each, on :func:`device_clock`. The
fastest width wins unless it is not ``margin`` times faster than plain decoding, in which case
the sampler runs plain decoding (width 0). Plain decoding draws from the target itself, so an
exact sampler stays exact under any plan, and lossy GSD, when it yields, samples the target.

:func:`plan_for` keeps a plan per model and key (sampler options, rows, device, threads), so a
process measures once (under torchrun each rank measures its own). This is a named option,
never a silent default: ``speculate_by="fixed"`` speculates at the configured width. The ids
depend on the width, and a timed choice may differ between processes: pin the width
(``fixed``) for ids reproducible across processes; the stats name the width that ran
(``plan_widths``, 0 = plain decoding).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from vargen.sampling.decoders.ar import sample_ar
from vargen.sampling.stats import add_stats
from vargen.sampling.timing import device_clock, fastest

SPECULATE_BY = ("fixed", "cost")


@dataclass
class CostPlanOptions:
    """The plan options of every speculative sampler's config (each adds its candidate widths:
    ``cost_windows`` or ``cost_gammas``)."""

    speculate_by: str = "fixed"  # fixed: the configured width; cost: the measured plan (this module)
    cost_margin: float = 1.05  # a width must be this many times faster than plain decoding
    cost_images: int = 4  # calibration images (at least the rows in flight)
    cost_reps: int = 1  # interleaved timing rounds, best of


# model -> {key: (width, measurements)}; weak, so a freed model takes its plans with it
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def check_cost_options(cfg, widths_field: str, least: int) -> None:
    """The plan options of a sampler config, checked before any work (naming the field)."""
    if cfg.speculate_by not in SPECULATE_BY:
        raise ValueError(f"sampler.speculate_by must be one of {SPECULATE_BY}, got {cfg.speculate_by!r}")
    widths = list(getattr(cfg, widths_field))
    if not widths or min(widths) < least:
        raise ValueError(f"sampler.{widths_field} must be a non-empty list of ints >= {least}, got {widths}")
    if cfg.cost_margin <= 0 or cfg.cost_images < 1 or cfg.cost_reps < 1:
        raise ValueError(
            "sampler.cost_margin must be > 0 and sampler.cost_images, sampler.cost_reps >= 1, got "
            f"{cfg.cost_margin}, {cfg.cost_images}, {cfg.cost_reps}"
        )


def choose_width(
    run: Callable[[int, torch.Tensor, torch.Generator, int], object],
    widths: Sequence[int],
    *,
    num_classes: int,
    rows: int,
    images: int,
    device,
    reps: int = 1,
    margin: float = 1.05,
    seed: int = 0,
    clock: Callable[[], float] | None = None,
) -> tuple[int, dict]:
    """(the width to run, 0 = plain decoding; {"seconds": {width: seconds per image}, "chosen"}).

    ``run(width, cond_N, generator, rows)`` samples ``cond_N`` at ``width`` (0: plain decoding)
    with ``rows`` in flight. Every candidate draws the same labels from a generator seeded with
    ``seed``, timed by :func:`~vargen.sampling.timing.fastest` (interleaved rounds, best each,
    ``margin`` over plain decoding)."""
    if reps < 1 or margin <= 0 or rows < 1 or images < 1:
        raise ValueError(
            f"need reps, rows, images >= 1 and margin > 0, got {reps}, {rows}, {images}, {margin}"
        )
    dev = torch.device(device)
    cond_N = torch.arange(images, device=dev) % num_classes

    def run_one(w):  # each candidate from the same seed; the ids are not kept
        run(w, cond_N, torch.Generator(device=dev).manual_seed(seed), rows)

    cands = [0, *dict.fromkeys(int(w) for w in widths)]
    chosen, secs, _ = fastest(cands, run_one, reps=reps, margin=margin, clock=clock or device_clock(dev))
    return chosen, {"seconds": {w: s / images for w, s in secs.items()}, "chosen": chosen}


def plan_for(model, key: tuple, measure: Callable[[], tuple[int, dict]]) -> tuple[int, dict, bool]:
    """(width, measurements, fresh) kept per ``model`` and ``key``; ``measure()`` runs on a miss
    (``fresh`` True) and its plan serves every later call with the same key."""
    plans = _PLANS.setdefault(model, {})
    fresh = key not in plans
    if fresh:
        plans[key] = measure()
    return (*plans[key], fresh)


def plan_key(cfg, rows: int, device, *extra) -> tuple:
    """What a plan depends on: the sampler's options (its config's repr), the rows in flight,
    the device and the intra-op threads (the cost of a window depends on them)."""
    return (repr(cfg), rows, str(device), torch.get_num_threads(), *extra)


def plain_decoding(ar, cond_N, generator, rows: int, cfg, warp: dict) -> tuple[torch.Tensor, dict]:
    """The plan's width 0 for SD / SJD / GSD: :func:`~vargen.sampling.decoders.ar.sample_ar` of
    the target ``ar`` (exact whatever the plan) in chunks of ``rows``, with the sampler config's
    ``use_cache``, ``compile`` and, where it has one, ``cuda_graph``."""
    opts = dict(use_cache=cfg.use_cache, compile=cfg.compile, cuda_graph=getattr(cfg, "cuda_graph", False))
    opts.update(warp)
    return plain_chunks(lambda cond_b: sample_ar(ar, cond_b, generator=generator, **opts), cond_N, rows)


def plain_chunks(sample_plain, cond_N, rows: int) -> tuple[torch.Tensor, dict]:
    """``sample_plain(cond_b)`` (plain decoding) on chunks of ``rows`` (0 = all at once), the
    stats summed, with the per-row target calls the speculative samplers report."""
    step = len(cond_N) if rows <= 0 else rows
    outs, total = [], {}
    for i in range(0, len(cond_N), step):
        ids, stats = sample_plain(cond_N[i : i + step])
        stats["row_target_forwards"] = stats["target_forwards"] * len(ids)
        outs.append(ids)
        add_stats(total, stats)
    total["target_calls_per_image"] = total["row_target_forwards"] / max(1, len(cond_N))
    return torch.cat(outs), total


def planned(model, cfg, width: int, widths, cond_N, generator, slots: int, run, *extra_key):
    """``run(w, cond_N, generator, slots)`` at the configured ``width`` (``speculate_by="fixed"``)
    or at the measured plan over ``widths`` (``"cost"``; w = 0 is plain decoding). The stats
    carry ``plan_widths`` (a list: one entry per call, so that batches and ranks concatenate)
    and, from the call that measured the plan, ``calibration`` ([{"seconds": seconds per image
    by width, "chosen", "seconds_total"}])."""
    if cfg.speculate_by == "fixed":
        out, stats = run(width, cond_N, generator, slots)
        stats["plan_widths"] = [width]
        return out, stats
    rows = min(slots, len(cond_N)) if slots > 0 else len(cond_N)  # what the samplers keep in flight
    device = cond_N.device

    def measure():  # timed only here: a kept plan costs no clock read (no device sync) per call
        clock = device_clock(device)
        t0 = clock()
        chosen, info = choose_width(
            run,
            widths,
            num_classes=model.num_classes,
            rows=rows,
            images=max(rows, cfg.cost_images),
            device=device,
            reps=cfg.cost_reps,
            margin=cfg.cost_margin,
        )
        return chosen, {**info, "seconds_total": clock() - t0}

    chosen, info, fresh = plan_for(model, plan_key(cfg, rows, device, *extra_key), measure)
    out, stats = run(chosen, cond_N, generator, slots)
    stats["plan_widths"] = [chosen]
    if fresh:
        seconds = {str(w): s for w, s in info["seconds"].items()}
        stats["calibration"] = [{**info, "seconds": seconds}]
    return out, stats
