#!/usr/bin/env python
"""Every accelerated sampler against its own plain baseline on the 256-token photos workload.

    python -m benchmarks.acceleration [--quick] [--methods sd sjd ...] [--batches 1 16] [--set KEY=VALUE ...]

The models come from the zoo (``benchmarks/zoo.py``; trained on first use). Pairs (method ->
its baseline, the same trained model unless named):

| method | what | baseline |
|---|---|---|
| sd | speculative sampling, photos_ar_draft, gamma per regime (``sd.gamma``) | ar: KV-cached decode |
| sjd | speculative Jacobi decoding, window per regime (``sjd.window``) | ar |
| gsd | grouped speculative decoding, window per regime (``gsd.window``; G = 14, relative dist 1.0) | ar |
| gsd_exact | GSD's group-exact variant (``gsd_exact.window``) | ar |
| var | next-scale VAR on the VAT ids (5 scales) | ar (next-token on the VQ ids, same 16x16 grid) |
| cspd | continuous speculative decoding, photos_xar_draft, ``cspd.gamma`` 1, K per batch, verify last | xar |
| cspd_path | CSpD, verify path (whole reverse chain), heads' variance beta | xar_beta: xar, variance beta |
| tarflow_jacobi | TarFlow, frozen-prefix Jacobi, all blocks, tuned per batch | tarflow_seq: KV-cached loop |
| tarflow_gs_jacobi | TarFlow, GS-Jacobi (8 segments, tuned as tarflow_jacobi) on every block | tarflow_seq |

Window and gamma per regime (``DEFAULTS``; JSON ``options.<key>[.b<batch>]``, and the value each
cell ran with as ``<m>.b<b>.window`` / ``gamma``): the best ``cpu_ratio`` of each batch size in
``benchmarks/results/spec_sweep.json`` (``python -m benchmarks.spec_sweep``: SJD / GSD windows 2-16,
SD gamma 1-4, one thread, this CPU), because a window's cost differs by regime (batch 1: per-op
overhead, a window of 16 costs ~2x one token; batch 16: arithmetic, close to 16 steps):

| key | batch 1 | batch 16 (and FID) |
|---|---|---|
| ``sd.gamma`` | 4 (cpu_ratio 0.62; gamma 1-3: 0.53-0.61) | 1 (0.64; gamma 4: 0.42) |
| ``sjd.window`` | 6 (1.36; W 3: 1.37, W 16: 1.15) | 2 (0.78; W 16: 0.35) |
| ``gsd.window`` | 16 (1.11; W 6: 1.17) | 2 (0.70; W 16: 0.45) |
| ``gsd_exact.window`` | 16 (1.08; W 8: 0.79) | 2 (0.49; W 16: 0.26) |

(4 images at batch 1, 32 at batch 16, best of 2; the same cells a run earlier read up to +-0.3 apart
at batch 1: treat neighbouring windows within ~0.2 as ties.) The batch-1 SJD / GSD windows are the
ties that held up on an idle machine after the equal-rows window fast path: a batch-1 rerun of the
sweep (best of 3) read SJD W 6 1.06 (W 3 0.88, W 16 0.83) and GSD W 16 1.45 (W 6 1.00, W 8 1.19),
and two alternating runs of 8 images, best of 3, read SJD W 6 1.10 / 1.13 (W 16 0.86 / 1.09) and
GSD W 16 1.14 / 1.13 (W 6 0.78 / 1.13).

``--set <family>.speculate_by=cost`` (sd, sjd, gsd, gsd_exact, cspd) measures the width instead:
the sampler times plain sampling and each of its candidate widths at the batch size in a warm-up
draw of a full batch (``vargen/sampling/speculative/cost_plan.py``), outside the timed reps, and
runs the fastest or plain sampling; the cell records ``speculate_by`` and ``plan_width`` (0 =
plain). Results of the CPU run: ``acceleration_cost.json`` (README).

A per-batch value applies from its batch size up to the next one listed. FID draws run at
``fid_batch`` = 100 rows and so at the batch-16 setting (``<m>.fid_window`` / ``fid_gamma`` record
it). ``--set sjd.window=8`` overrides every regime, ``--set sd.gamma.b16=2`` one; an unknown key
is an error. ``--merge`` keeps the other methods' results in the JSON (``meta.methods``: the commit
each method was measured at, its images and reps), so an expensive method need not be rerun
after an unrelated change. The JSON is written after each method, so an interrupted run keeps the
methods it finished. ``--device cuda`` runs the models on the GPU (``acceleration_cuda.json``),
``--keep-going`` records a method that raises as ``<m>.error`` and runs the rest.
``--set cuda_graph=true`` (CUDA) replays captured static steps: plain decoding
(``sample_ar(cuda_graph=True)``) and SJD / GSD iterations
(:mod:`vargen.sampling.speculative.jacobi_graph`, chunks of ``b`` samples without refill); SD,
CSpD, VAR and TarFlow stay eager, so their ratios are then against graph-replayed plain decoding.
``--set graph_noise=chunk`` draws SJD / GSD's random numbers one call per kind and chunk of
iterations (other ids than the eager samplers', the same samplers; less host time per iteration).

SD, SJD, GSD, CSpD and TarFlow Jacobi batch continuously: every image's condition goes into one
call that keeps ``b`` rows in flight and refills a finished row's slot with the next image; the
baselines and the other methods run chunks of ``b`` rows.

Per method and batch size b (1: latency; 16: throughput), interleaved with its baseline in the
same run (baseline, method, baseline, method, ... best of ``--reps``), on the same labels and seed:

- ``<m>.b<b>.nfe``: target forwards per image (a call serving k rows counts k times; a CFG pair is
  one call), and ``nfe_ratio`` = baseline nfe / method nfe;
- ``<m>.b<b>.token_rows``: sequence positions pushed through the target per image (CFG rows count);
- ``<m>.b<b>.wall_ratio``: baseline seconds / method seconds (best of reps each), and both seconds;
  ``cpu_ratio`` the same on process CPU time (with ``--threads 1``: an idle core's wall ratio, far
  less noisy than wall time on a shared machine);
- ``<m>.b<b>.acceptance`` (accepted / proposed drafts) and ``alpha`` (first-draft acceptance) where
  the method has them.

FID (``<m>.fid_mean`` / ``fid_std`` beside ``<m>.baseline_fid_mean`` / ``_std``) is measured on
``--fid-samples`` images per seed against the held-out photos, in the classifier feature space of
``vargen.eval`` (a proxy, not Inception FID). ``workload.tokens``, ``workload.params.<model>`` and
``meta`` (commit, machine, threads) complete ``benchmarks/results/acceleration.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback
from dataclasses import dataclass, field

import torch

from benchmarks.common import RESULTS, meta, print_table, write_results

BATCHES = (1, 16)


@dataclass
class Workload:
    """The models of one workload (any may be None: its methods are skipped) and the FID evaluator."""

    ar: object = None  # next-token target (llamagen on VQ ids)
    draft: object = None  # smaller llamagen on the same ids
    vq: object = None  # tokenizer of ar / draft
    var: object = None  # next-scale model (tokenizer attached)
    vat: object = None
    xar: object = None  # xAR + MAR head, entity token (CSpD target)
    xar_draft: object = None
    kl: object = None
    tarflow: object = None
    num_classes: int = 1
    evaluator: object = None  # FIDEvaluator against the held-out split, or None (no FID)
    device: torch.device = torch.device("cpu")  # where the models run (labels and generators follow)
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """``draw(w, cond_N, generator, slots, opts) -> (tokens or images, stats)``; ``decode(w, out)``."""

    model: str  # Workload field the method needs (and its baseline's)
    baseline: str
    draw: object
    decode: object
    needs: tuple = ()  # further Workload fields it needs


def _chunked(fn, cond_N, slots):
    """Run ``fn(cond_b)`` on chunks of ``slots`` rows; concatenate outputs and sum stats."""
    outs, total = [], {}
    for i in range(0, len(cond_N), slots):
        out, stats = fn(cond_N[i : i + slots])
        outs.append(out)
        for k, v in stats.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                total[k] = total.get(k, 0) + v
        total["rows_per_call"] = slots
    if isinstance(outs[0], list):  # multi-scale ids: one list entry per scale
        return [torch.cat(parts) for parts in zip(*outs)], total
    return torch.cat(outs), total


def _warp(o):
    return {"cfg_scale": o["cfg_scale"], "temperature": 1.0, "top_k": 0, "top_p": 1.0}


def draw_ar(w, cond, g, slots, o):
    from vargen.sampling.decoders.ar import sample_ar

    graph = o.get("cuda_graph", False)
    return _chunked(lambda c: sample_ar(w.ar, c, generator=g, cuda_graph=graph, **_warp(o)), cond, slots)


def _continuous(out_stats, slots):
    """A continuous sampler's (out, stats): every condition in one call, ``slots`` rows in flight."""
    out, stats = out_stats
    stats["rows_per_call"] = slots
    return out, stats


def draw_sd(w, cond, g, slots, o):
    from vargen.registry import SAMPLERS
    from vargen.sampling.base import SamplerContext

    cfg = {"name": "speculative", "draft_ckpt": "photos_ar_draft", "gamma": o["gamma"], **_warp(o)}
    run = SAMPLERS.build({**cfg, "speculate_by": o.get("speculate_by", "fixed")})
    run.setup(SamplerContext(w.ar, loader=lambda ckpt, device: (w.draft, None)))
    return _continuous(run(w.ar, cond, g, slots=slots), slots)


def _jacobi(w, cond, g, slots, o, name, **extra):
    from vargen.registry import SAMPLERS

    graph = {"cuda_graph": o.get("cuda_graph", False), "graph_noise": o.get("graph_noise", "eager")}
    plan = {"window": o["window"], "speculate_by": o.get("speculate_by", "fixed")}
    run = SAMPLERS.build({"name": name, **plan, **graph, **_warp(o), **extra})
    return _continuous(run(w.ar, cond, g, slots=slots), slots)


def draw_sjd(w, cond, g, slots, o):
    return _jacobi(w, cond, g, slots, o, "sjd")


def draw_gsd(w, cond, g, slots, o):
    return _jacobi(w, cond, g, slots, o, "gsd")


def draw_gsd_exact(w, cond, g, slots, o):
    return _jacobi(w, cond, g, slots, o, "gsd", exact_groups=True)


def draw_var(w, cond, g, slots, o):
    from vargen.sampling.decoders.var import sample_var

    return _chunked(lambda c: sample_var(w.var, c, generator=g, **_warp(o)), cond, slots)


def draw_xar(w, cond, g, slots, o):
    from vargen.sampling.decoders.xar import sample_xar

    return _chunked(lambda c: sample_xar(w.xar, c, generator=g, cfg_scale=o["cfg_scale"]), cond, slots)


def draw_xar_beta(w, cond, g, slots, o):
    """The xar sampler with the head's reverse-step variance beta (the target of ``cspd_path``)."""
    head = w.xar.head
    before, head.sample_variance = head.sample_variance, "beta"
    try:
        return draw_xar(w, cond, g, slots, o)
    finally:
        head.sample_variance = before


def _cspd(**extra):
    def draw(w, cond, g, slots, o):
        from vargen.registry import SAMPLERS
        from vargen.sampling.base import SamplerContext

        cfg = {
            "name": "cspd",
            "draft_ckpt": "photos_xar_draft",
            "gamma": o["gamma"],
            "cfg_scale": o["cfg_scale"],
        }
        cfg.update(speculate_by=o.get("speculate_by", "fixed"), **extra)
        if "proposals" in o:  # else the sampler's default
            cfg["proposals"] = o["proposals"]
        run = SAMPLERS.build(cfg)
        run.setup(SamplerContext(w.xar, loader=lambda ckpt, device: (w.xar_draft, None)))
        return _continuous(run(w.xar, cond, g, slots=slots), slots)

    return draw


def _tarflow(method):
    """Sequential and GS-Jacobi run chunks of ``slots`` rows (every row takes the same passes);
    plain Jacobi batches continuously unless ``continuous`` is False. Jacobi methods use the
    frozen-prefix window ``window`` and ``tol`` when given (``tarflow.tuned``: the setting measured
    best per batch size, ``vargen.sampling.decoders.tarflow.JACOBI_CPU``, see :func:`resolve`).
    ``policy: "cost"`` (a JACOBI_CPU entry): each block gets the cheapest of the sequential loop and
    the method at each of ``windows``, timed at this batch size on ``calib`` rows of its own seeded
    noise (``tarflow_cost.calibrate_cost``), measured once per model and batch size and then reused,
    as the sampler's ``setup`` does; the first draw pays for it, the best of the reps does not."""
    import weakref

    plans = weakref.WeakKeyDictionary()  # model -> {slots: the measured per-block plans}

    def draw(w, cond, g, slots, o):
        from vargen.sampling.decoders.tarflow import sample_tarflow, sample_tarflow_continuous

        kw = {"method": method, "cfg_scale": o["cfg_scale"], "window": 0}
        if method != "sequential":
            kw.update(window=o["window"], **({"tol": o["tol"]} if "tol" in o else {}))
        if method != "sequential" and o.get("policy") == "cost":
            kw["policy"] = _cost_plans(w, slots, o, kw)
        if method == "jacobi" and o.get("continuous", True):
            out, stats = sample_tarflow_continuous(w.tarflow, cond, generator=g, slots=slots, **kw)
            stats["row_target_forwards"] = stats["row_passes"]
            return _continuous((out, stats), slots)
        return _chunked(lambda c: sample_tarflow(w.tarflow, c, generator=g, **kw), cond, slots)

    def _cost_plans(w, slots, o, kw):
        from vargen.sampling.decoders.tarflow_cost import calibrate_cost

        per_batch = plans.setdefault(w.tarflow, {})
        if slots not in per_batch:
            n = max(slots, o.get("calib", slots))
            per_batch[slots], _ = calibrate_cost(
                w.tarflow,
                torch.arange(n, device=w.device) % w.num_classes,
                torch.Generator(device=w.device).manual_seed(0),
                batch=slots,
                method=method,
                windows=o["windows"],
                tol=kw.get("tol", 1e-6),
                guidance=None if o["cfg_scale"] == 1.0 else o["cfg_scale"] - 1.0,
            )
        return per_batch[slots]

    return draw


def decode_vq(w, ids):
    return w.vq.decode(ids)


def decode_vat(w, ids):
    return w.vat.decode(ids)


def decode_kl(w, z):
    return w.kl.decode(z)


def decode_pixels(w, images):
    return images


BASELINES = {
    "ar": Method("ar", "ar", draw_ar, decode_vq, ("vq",)),
    "xar": Method("xar", "xar", draw_xar, decode_kl, ("kl",)),
    "xar_beta": Method("xar", "xar_beta", draw_xar_beta, decode_kl, ("kl",)),
    "tarflow_seq": Method("tarflow", "tarflow_seq", _tarflow("sequential"), decode_pixels),
}
METHODS = {
    "sd": Method("ar", "ar", draw_sd, decode_vq, ("draft", "vq")),
    "sjd": Method("ar", "ar", draw_sjd, decode_vq, ("vq",)),
    "gsd": Method("ar", "ar", draw_gsd, decode_vq, ("vq",)),
    "gsd_exact": Method("ar", "ar", draw_gsd_exact, decode_vq, ("vq",)),
    "var": Method("var", "ar", draw_var, decode_vat, ("ar", "vat", "vq")),
    "cspd": Method("xar", "xar", _cspd(), decode_kl, ("xar_draft", "kl")),
    "cspd_path": Method(
        "xar", "xar_beta", _cspd(verify="path", variance="beta"), decode_kl, ("xar_draft", "kl")
    ),
    "tarflow_jacobi": Method("tarflow", "tarflow_seq", _tarflow("jacobi"), decode_pixels),
    "tarflow_gs_jacobi": Method("tarflow", "tarflow_seq", _tarflow("gs_jacobi"), decode_pixels),
}
# Options: ``cfg_scale`` (a key without a dot) for every method, and
# ``<family>.<option>`` for the methods of a family (FAMILY below), each either one value or
# ``{batch: value}`` per regime. A per-batch value applies
# from its batch size up to the next one listed (``{1: 4, 16: 3}``: 4 for 1..15 rows in flight, 3 for
# 16 and more; FID draws at ``fid_batch`` = 100 rows so they use the 16 setting). The SD / SJD / GSD
# values are the best cpu_ratio of each regime in ``benchmarks/results/spec_sweep.json``
# (``python -m benchmarks.spec_sweep``, one thread, this CPU); CSpD's (gamma 1; residual proposals K
# 4 at batch 1, 2 at batch 16) are the best of an interleaved run against xar_beta (path + beta, one
# thread; b1 cpu_ratio g1 K4 0.48, g1 K16 0.47, g2 0.38-0.41, g4 0.25; b16 g1 K2 0.41, K4 0.34,
# g2 K4 0.30, g4 K16 0.10: at alpha ~0.25 a draft rarely survives, and every proposal is a whole
# target chain over K x rows); TarFlow's
# ``tuned`` setting is ``JACOBI_CPU`` in vargen/sampling/decoders/tarflow.py (its own sweep).
DEFAULTS = {
    "cfg_scale": 1.5,
    "cuda_graph": False,  # CUDA: plain decoding and SJD / GSD replay captured steps (the others stay eager)
    "graph_noise": "eager",  # SJD / GSD under cuda_graph: eager (the eager ids) | chunk (fewer host calls)
    # SD / SJD / GSD: fixed (the width below) | cost (the measured fastest of plain decoding and each
    # width, per batch size: vargen/sampling/speculative/cost_plan.py; the cell records plan_width)
    "sd.speculate_by": "fixed",
    "sjd.speculate_by": "fixed",
    "gsd.speculate_by": "fixed",
    "gsd_exact.speculate_by": "fixed",
    "cspd.speculate_by": "fixed",
    "sd.gamma": {1: 4, 16: 1},
    "sjd.window": {1: 6, 16: 2},
    "gsd.window": {1: 16, 16: 2},
    "gsd_exact.window": {1: 16, 16: 2},
    "cspd.gamma": 1,
    "cspd.proposals": {1: 4, 16: 2},  # K: target chains per row and residual round
    "tarflow.window": 16,  # when not tarflow.tuned
    "tarflow.tuned": True,  # TarFlow Jacobi: window, tol, batching per batch from JACOBI_CPU (resolve)
}
# per-cell options written beside the cell's numbers
RECORDED = (
    "speculate_by",
    "window",
    "gamma",
    "proposals",
    "tol",
    "continuous",
    "policy",
    "windows",
    "cuda_graph",
    "graph_noise",
)
# The option family of each method (the prefix of its option keys); a method not named here is its own.
FAMILY = {"cspd_path": "cspd", "tarflow_jacobi": "tarflow", "tarflow_gs_jacobi": "tarflow"}


# SJD / GSD windows under ``cuda_graph`` (used unless set): the best wall ratio of each regime in a
# GPU sweep against graph-replayed plain decoding (``benchmarks/results/spec_sweep_cuda_graph_chunk.json``,
# H200, ``spec_sweep --device cuda --cuda-graph --graph-noise chunk``; the eager-order sweep agreed
# at batch 1): a replayed window costs far less than the CPU's, so wider windows pay
GRAPH_WINDOWS = {"sjd.window": 16, "gsd.window": {1: 24, 16: 16}, "gsd_exact.window": 16}


def options(overrides: dict | None = None) -> dict:
    """DEFAULTS updated by ``overrides``, checked: an unknown key or a per-batch value keyed by
    anything but a positive batch size raises ValueError naming it (a typo must not silently
    leave the default in force). With ``cuda_graph`` the SJD / GSD windows not given are
    :data:`GRAPH_WINDOWS`."""
    out = dict(DEFAULTS)
    if (overrides or {}).get("cuda_graph"):
        out.update(GRAPH_WINDOWS)
    for key, v in (overrides or {}).items():
        if key not in DEFAULTS:
            raise ValueError(f"unknown acceleration option {key!r}; known: {', '.join(DEFAULTS)}")
        if isinstance(v, dict) and not all(isinstance(b, int) and b >= 1 for b in v):
            raise ValueError(f"option {key!r}: per-batch keys must be batch sizes >= 1, got {list(v)}")
        out[key] = v
    return out


def resolve(opts: dict, name: str, batch: int) -> dict:
    """The flat options a draw of method ``name`` at ``batch`` rows gets: the keys without a dot
    and its family's options (``window``, ``gamma``), a per-batch value read at the largest listed
    batch size not above ``batch`` (the smallest listed when ``batch`` is below them all). TarFlow's
    ``tuned`` becomes the ``window``, ``tol`` and ``continuous`` of ``JACOBI_CPU`` at ``batch``."""
    family = FAMILY.get(name, name)
    out = {}
    for key, v in opts.items():
        fam, dot, option = key.partition(".")
        if not dot:
            option = key
        elif fam != family:
            continue
        if isinstance(v, dict):
            at = [b for b in v if b <= batch]
            v = v[max(at) if at else min(v)]
        out[option] = v
    if out.pop("tuned", False):  # TarFlow: the measured setting of this batch size, as it runs
        from vargen.sampling.decoders.tarflow import jacobi_cpu_setting

        out.update(jacobi_cpu_setting(batch))
    return out


def parse_set(items) -> dict:
    """``--set KEY=VALUE`` / ``KEY.bB=VALUE`` pairs as options overrides (``sjd.window=8`` in every
    regime; ``sjd.window.b16=4`` at batch 16 only, the other regimes keep their default);
    ``true`` / ``false`` are booleans (``cuda_graph=true``), other words strings."""
    out: dict = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set wants KEY=VALUE, got {item!r}")
        if value.lower() in ("true", "false"):
            num = value.lower() == "true"
        else:
            try:
                num = float(value) if "." in value else int(value)
            except ValueError:
                num = value  # a name (graph_noise=chunk)
        head, _, last = key.rpartition(".")
        if head and last[:1] == "b" and last[1:].isdigit():
            base = out.get(head, DEFAULTS.get(head))
            per = dict(base) if isinstance(base, dict) else {1: base}
            out[head] = {**per, int(last[1:]): num}
        else:
            out[key] = num
    return out


def labels(n: int, num_classes: int, device="cpu") -> torch.Tensor:
    return torch.arange(n, device=device) % num_classes


def per_image(stats: dict, n: int) -> dict:
    """NFE (row-calls) and token-rows per image from a sampler's summed stats."""
    rows = stats.get("row_target_forwards", stats.get("target_forwards", 0) * stats.get("rows_per_call", 1))
    out = {"nfe": rows / n, "token_rows": stats.get("positions_computed", 0) / n}
    if "acceptance" in stats:  # a ratio: recomputed from the summed counts
        out["acceptance"] = stats["accepted"] / max(1, stats["proposed"])
    for k in ("alpha", "mean_accepted_length"):
        if k in stats:
            out[k] = stats[k]
    if "plan_widths" in stats:  # the width that ran (speculate_by: the measured plan; 0 = plain)
        out["plan_width"] = stats["plan_widths"][-1]
    return out


def timed(method: Method, w: Workload, cond, seed: int, slots: int, opts: dict):
    """(wall seconds, process CPU seconds, stats) of one draw (on CUDA: to the end of its last
    kernel)."""
    g = torch.Generator(device=cond.device).manual_seed(seed)
    _sync(cond.device)
    t0, c0 = time.perf_counter(), time.process_time()
    _, stats = method.draw(w, cond, g, slots, opts)
    _sync(cond.device)
    return time.perf_counter() - t0, time.process_time() - c0, stats


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_speed(name: str, w: Workload, batch: int, n: int, reps: int, opts: dict) -> dict:
    """Interleaved baseline/method timings and per-image counts at ``batch`` concurrent rows.

    ``cpu_ratio`` is ``wall_ratio`` on process CPU time (best of reps each): with one thread it is
    the wall ratio of an otherwise idle core, far less noisy on a shared machine (a slow spell of a
    neighbour stretches wall time but not the CPU time of a descheduled process)."""
    method, base = METHODS[name], BASELINES[METHODS[name].baseline]
    cond = labels(n, w.num_classes, w.device)
    # compile the kernels (Triton JIT, cuBLAS plans) and measure a speculate_by="cost" plan before
    # the clock (the plan is kept per model and batch size)
    cost = opts.get("speculate_by") == "cost"
    if w.device.type != "cpu" or cost:
        warm = cond[:batch] if cost else cond[: min(n, 2)]  # the plan is measured at a full batch
        for m in (base, method) if w.device.type != "cpu" else (method,):
            timed(m, w, warm, 0, batch, opts)
    best = {"method": float("inf"), "baseline": float("inf")}
    cpu = dict(best)
    counts = {}
    for _ in range(reps):
        for role, m in (("baseline", base), ("method", method)):
            secs, cpu_secs, stats = timed(m, w, cond, 0, batch, opts)
            best[role] = min(best[role], secs)
            cpu[role] = min(cpu[role], cpu_secs)
            counts[role] = per_image(stats, n)
    out = {f"{k}": v for k, v in counts["method"].items()}
    out["baseline_nfe"] = counts["baseline"]["nfe"]
    out["baseline_token_rows"] = counts["baseline"]["token_rows"]
    out["nfe_ratio"] = counts["baseline"]["nfe"] / max(1e-9, counts["method"]["nfe"])
    out["seconds"], out["baseline_seconds"] = best["method"] / n, best["baseline"] / n
    out["wall_ratio"] = best["baseline"] / best["method"]
    out["cpu_ratio"] = cpu["baseline"] / cpu["method"]
    return out


def fid_of(method: Method, w: Workload, samples: int, seeds, batch: int, opts: dict) -> tuple[float, float]:
    scores = []
    for seed in seeds:
        g = torch.Generator(device=w.device).manual_seed(seed)
        out, _ = method.draw(w, labels(samples, w.num_classes, w.device), g, batch, opts)
        with torch.no_grad():
            images = torch.cat(
                [method.decode(w, _rows(out, i, batch)).cpu() for i in range(0, samples, batch)]
            )
        scores.append(w.evaluator.score(images.clamp(0, 1)))
    t = torch.tensor(scores)
    return float(t.mean()), float(t.std()) if len(scores) > 1 else 0.0


def _rows(out, i, n):
    return [o[i : i + n] for o in out] if isinstance(out, list) else out[i : i + n]


def available(name: str, w: Workload) -> bool:
    m = METHODS[name]
    need = (m.model, BASELINES[m.baseline].model, *m.needs, *BASELINES[m.baseline].needs)
    return all(getattr(w, f) is not None for f in need)


def run(
    w: Workload,
    methods,
    batches=BATCHES,
    reps: int = 3,
    n_latency: int = 4,
    n_throughput: int = 32,
    fid_samples: int = 0,
    seeds=(0, 1, 2),
    fid_batch: int = 100,
    opts: dict | None = None,
    log=print,
    keep_going: bool = False,
    on_method=None,
) -> dict:
    """Measure ``methods`` on workload ``w``; flat result keys (see the module docstring). With
    ``keep_going`` a method that raises is logged with its traceback and recorded as
    ``<m>.error``, and the next method runs (for a one-shot run on a borrowed machine).
    ``on_method(flat_so_far, name)`` is called after each method (the CLI saves there, so an
    interrupted run keeps the methods it finished)."""
    opts = options(opts)
    flat: dict = {"workload.tokens": w.ar.num_tokens if w.ar is not None else None}
    flat.update({f"workload.params.{k}": v for k, v in w.params.items()})
    for k, v in opts.items():
        flat.update(
            {f"options.{k}.b{b}": x for b, x in v.items()} if isinstance(v, dict) else {f"options.{k}": v}
        )
    base_fid: dict = {}  # baseline FIDs, shared by the methods of one baseline

    def measure(name: str) -> None:  # speed per batch size, then FID beside its baseline's
        for b in batches:
            n = n_latency if b == 1 else max(b, n_throughput)
            o = resolve(opts, name, b)
            log(f"{name} vs {METHODS[name].baseline} at batch {b} ({n} images, best of {reps}, {o})")
            for k, v in measure_speed(name, w, b, n, reps, o).items():
                flat[f"{name}.b{b}.{k}"] = v
            flat.update({f"{name}.b{b}.{k}": v for k, v in o.items() if k in RECORDED})
        if fid_samples and w.evaluator is not None:
            bname, o = METHODS[name].baseline, resolve(opts, name, fid_batch)
            if bname not in base_fid:
                base_fid[bname] = fid_of(BASELINES[bname], w, fid_samples, seeds, fid_batch, o)
            flat[f"{name}.fid_mean"], flat[f"{name}.fid_std"] = fid_of(
                METHODS[name], w, fid_samples, seeds, fid_batch, o
            )
            flat.update({f"{name}.fid_{k}": v for k, v in o.items() if k in RECORDED})
            flat[f"{name}.baseline_fid_mean"], flat[f"{name}.baseline_fid_std"] = base_fid[bname]
            log(f"{name}: FID {flat[f'{name}.fid_mean']:.1f} (baseline {bname} {base_fid[bname][0]:.1f})")

    for name in methods:
        if not available(name, w):
            log(f"skip {name}: its models are not in the workload")
            continue
        try:
            measure(name)
        except Exception as e:
            if not keep_going:
                raise
            log(f"{name} failed:\n{traceback.format_exc()}")  # reported in the results; the rest run
            flat[f"{name}.error"] = f"{type(e).__name__}: {e}"
        if on_method is not None:
            on_method(dict(flat), name)
    return flat


def zoo_workload(zoo, fid: bool = True, device: str = "cpu") -> Workload:
    """The photos workload from the zoo (trains what is missing)."""
    from vargen.checkpoint import load_component, load_tokenizer_for
    from vargen.eval.fid import FIDEvaluator

    paths = zoo.ensure(
        ["photos_ar", "photos_ar_draft", "photos_var", "photos_xar", "photos_xar_draft", "photos_tarflow"]
    )
    loaded = {
        n: load_component(p, device)
        for n, p in paths.items()
        if n
        in ("photos_ar", "photos_ar_draft", "photos_var", "photos_xar", "photos_xar_draft", "photos_tarflow")
    }
    (ar, cfg), (var, var_cfg), (xar, xar_cfg) = (
        loaded["photos_ar"],
        loaded["photos_var"],
        loaded["photos_xar"],
    )
    vat = load_tokenizer_for(var_cfg, device)
    var.attach_tokenizer(vat)
    w = Workload(
        ar=ar,
        draft=loaded["photos_ar_draft"][0],
        vq=load_tokenizer_for(cfg, device),
        var=var,
        vat=vat,
        xar=xar,
        xar_draft=loaded["photos_xar_draft"][0],
        kl=load_tokenizer_for(xar_cfg, device),
        tarflow=loaded["photos_tarflow"][0],
        num_classes=ar.num_classes,
        evaluator=FIDEvaluator.for_dataset(dict(cfg.data), split="heldout") if fid else None,
        device=torch.device(device),
    )
    w.params = {
        n.removeprefix("photos_"): sum(p.numel() for p in m.parameters()) for n, (m, _) in loaded.items()
    }
    return w


def table(flat: dict, methods, batches) -> list[dict]:
    rows = []
    for name in methods:
        for b in batches:
            k = f"{name}.b{b}."
            if k + "nfe" not in flat:
                continue
            rows.append(
                {
                    "method": name,
                    "vs": METHODS[name].baseline,
                    "batch": b,
                    "nfe": flat[k + "nfe"],
                    "nfe_ratio": flat[k + "nfe_ratio"],
                    "token_rows": flat[k + "token_rows"],
                    "base_token_rows": flat[k + "baseline_token_rows"],
                    "wall_ratio": flat[k + "wall_ratio"],
                    "cpu_ratio": flat.get(k + "cpu_ratio"),
                    "acceptance": flat.get(k + "acceptance"),
                    "alpha": flat.get(k + "alpha"),
                    "fid": _pm(flat, f"{name}.fid") if b == batches[-1] else None,
                    "base_fid": _pm(flat, f"{name}.baseline_fid") if b == batches[-1] else None,
                }
            )
    return rows


def _pm(flat, key):
    if f"{key}_mean" not in flat:
        return None
    return f"{flat[key + '_mean']:.1f} ± {flat[key + '_std']:.1f}"


def main(argv=None):
    from benchmarks.zoo import Zoo, quick_overrides

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick", action="store_true", help="fewer images, 1 rep... minutes, not for final numbers"
    )
    ap.add_argument("--quick-zoo", action="store_true", help="use the quick zoo (150-step models)")
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--batches", nargs="*", type=int, default=list(BATCHES))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument(
        "--device",
        default="cpu",
        help="where the models run (cuda: results go to results/acceleration_cuda.json; timings "
        "after one untimed warm-up draw of each sampler, to the end of its last kernel)",
    )
    ap.add_argument(
        "--topic",
        default=None,
        help="results/<topic>.json (default acceleration, or acceleration_<device> off the CPU)",
    )
    ap.add_argument("--fid-samples", type=int, default=None, help="images per seed for FID (0 = no FID)")
    ap.add_argument("--cfg-scale", type=float, default=DEFAULTS["cfg_scale"])
    ap.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="override an option: sjd.window=8 (every batch) or sd.gamma.b16=1 (one regime); keys: "
        + ", ".join(DEFAULTS),
    )
    ap.add_argument("--images-b1", type=int, default=None, help="images timed at batch 1 (quick 2, else 4)")
    ap.add_argument(
        "--images-b16", type=int, default=None, help="images timed at batch 16 (quick 16, else 32)"
    )
    ap.add_argument("--reps", type=int, default=None, help="timing repetitions, best of (quick 1, else 3)")
    ap.add_argument(
        "--keep-going", action="store_true", help="a method that fails is recorded as <m>.error; the rest run"
    )
    ap.add_argument(
        "--merge",
        action="store_true",
        help="keep the other methods' results already in the results JSON (meta.methods "
        "records the commit each method was measured at)",
    )
    args = ap.parse_args(argv)
    try:
        opts = options({"cfg_scale": args.cfg_scale, **parse_set(args.set)})
    except ValueError as e:
        ap.error(str(e))
    if args.threads:
        torch.set_num_threads(args.threads)
    fid_samples = args.fid_samples if args.fid_samples is not None else (200 if args.quick else 1000)
    seeds = (0, 1) if args.quick else (0, 1, 2)
    device = torch.device(args.device)
    topic = args.topic or ("acceleration" if device.type == "cpu" else f"acceleration_{device.type}")
    zoo = Zoo(quick_overrides() if args.quick_zoo else [])
    w = zoo_workload(zoo, fid=fid_samples > 0, device=device)
    reps = args.reps or (1 if args.quick else 3)
    n_b1, n_b16 = args.images_b1 or (2 if args.quick else 4), args.images_b16 or (16 if args.quick else 32)
    # the commit that runs, read now
    entry = {**meta(args.quick, seeds, _device_name(device)), "zoo_quick": args.quick_zoo}
    timing = {"images_b1": n_b1, "images_b16": n_b16, "reps": reps}
    entry["methods"] = {m: {"commit": entry["commit"], **timing} for m in args.methods}
    done: list[str] = []

    def save(partial: dict, name: str) -> None:  # after each method: an interrupted run keeps these
        done.append(name)
        e = {**entry, "methods": {m: entry["methods"][m] for m in done}}
        if args.merge:
            partial, e = merge_previous(partial, e, done, path)
        write_results(topic, partial, e, chart=("nfe_ratio", "wall_ratio"))

    path = os.path.join(RESULTS, f"{topic}.json")
    flat = run(
        w,
        args.methods,
        tuple(args.batches),
        reps=reps,
        n_latency=n_b1,
        n_throughput=n_b16,
        fid_samples=fid_samples,
        seeds=seeds,
        opts=opts,
        keep_going=args.keep_going,
        on_method=save,
    )
    print_table(
        table(flat, args.methods, tuple(args.batches)),
        [
            "method",
            "vs",
            "batch",
            "nfe",
            "nfe_ratio",
            "token_rows",
            "base_token_rows",
            "wall_ratio",
            "cpu_ratio",
            "acceptance",
            "alpha",
            "fid",
            "base_fid",
        ],
    )
    if done:
        print("wrote", path)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def merge_previous(flat: dict, entry: dict, methods, path: str) -> tuple[dict, dict]:
    """``flat`` and meta ``entry`` of a run of ``methods`` merged into the results at ``path``:
    the other methods' keys (``<m>.*``, ``options.<m>.*``) and their ``meta.methods`` entries
    (commit, images timed, reps) are kept, everything of ``methods`` and the run-wide keys come
    from this run. A file from before ``meta.methods`` existed credits its methods to its
    ``meta.commit``."""
    if not os.path.exists(path):
        return flat, entry
    with open(path) as f:
        old = json.load(f)
    old_meta = old.pop("meta", {})
    ran = set(methods)

    def owner(key: str) -> str | None:
        parts = key.split(".")
        head = parts[1] if parts[0] == "options" and len(parts) > 2 else parts[0]
        return head if head in METHODS else None

    kept = {k: v for k, v in old.items() if owner(k) not in (None, *ran)}
    measured = {owner(k) for k in old} - {None}
    before = old_meta.get("methods") or {m: {"commit": old_meta.get("commit")} for m in measured}
    before = {m: e if isinstance(e, dict) else {"commit": e} for m, e in before.items() if m not in ran}
    entry = {**entry, "methods": {**before, **entry["methods"]}}
    return {**kept, **flat}, entry


if __name__ == "__main__":
    main()
