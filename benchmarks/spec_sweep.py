#!/usr/bin/env python
"""Which SJD / GSD window and which SD gamma pay on this CPU, per regime (batch 1 and batch 16).

    python -m benchmarks.spec_sweep [--quick] [--threads 1] [--windows 4 16] [--device cuda --cuda-graph]

Every cell is one call of ``benchmarks.acceleration.measure_speed``: the method at one window W
(SJD, GSD, GSD-exact: W in 2, 3, 4, 6, 8, 16) or one gamma (SD with photos_ar_draft: 1, 2, 3, 4),
interleaved with plain KV-cached decoding on the same labels and seed (baseline, method, ...
best of ``--reps``), on the photos zoo (``zoo_workload``): 4 images at batch 1, 32 at batch 16
(the speculative samplers keep 16 rows in flight and refill a finished row). Per cell:

- ``<m>.<w|g><k>.b<b>.wall_ratio``: plain seconds / method seconds (> 1: faster), and
  ``cpu_ratio``, the same on process CPU time (one thread: what an idle core's wall ratio would be;
  on a shared machine wall times of one run swung 2-4x, CPU times ~15%);
- ``nfe_ratio``: plain target forwards per image / the method's;
- ``mean_accepted_length``: tokens committed per verification; ``alpha``: first-draft acceptance.

Why a sweep: at batch 1 a target forward of these 1M-parameter models is bound by per-op
overhead (a window of 16 costs ~2x one token), at batch 16 by arithmetic (a window of 16 costs
close to 16 steps), so the window that pays differs between regimes; ``benchmarks.acceleration``
uses the best of each regime from the committed ``results/spec_sweep.json`` (its ``DEFAULTS``);
``best.<m>.b<b>`` names the window / gamma of the highest ``cpu_ratio``.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.acceleration import DEFAULTS, measure_speed, zoo_workload
from benchmarks.common import meta, print_table, write_results

WINDOWS = (2, 3, 4, 6, 8, 16)
GAMMAS = (1, 2, 3, 4)
SWEPT = {"sjd": ("window", "w"), "gsd": ("window", "w"), "gsd_exact": ("window", "w"), "sd": ("gamma", "g")}
COLUMNS = (
    "wall_ratio",
    "cpu_ratio",
    "nfe_ratio",
    "mean_accepted_length",
    "alpha",
    "seconds",
    "baseline_seconds",
)


def cells(methods, windows, gammas):
    """``[(method, option, value, key)]``: every (method, window or gamma) cell of the sweep."""
    out = []
    for m in methods:
        option, tag = SWEPT[m]
        for v in windows if option == "window" else gammas:
            out.append((m, option, v, f"{m}.{tag}{v}"))
    return out


def sweep(w, methods, batches, windows, gammas, reps, n_latency, n_throughput, log=print, extra=None) -> dict:
    """Flat ``<m>.<w|g><k>.b<b>.<column>`` keys plus ``best.<m>.b<b>`` (the value of highest cpu
    ratio, or of wall ratio off the CPU, where process CPU time is the host's launch time).
    ``extra``: more options of every cell (``{"cuda_graph": True}``)."""
    flat: dict = {}
    rank = "cpu_ratio" if w.device.type == "cpu" else "wall_ratio"
    for b in batches:
        n = n_latency if b == 1 else max(b, n_throughput)
        for m, option, v, key in cells(methods, windows, gammas):
            opts = {"cfg_scale": DEFAULTS["cfg_scale"], **(extra or {}), option: v}
            r = measure_speed(m, w, b, n, reps, opts)
            for c in COLUMNS:
                if c in r:
                    flat[f"{key}.b{b}.{c}"] = r[c]
            ratios = f"wall {r['wall_ratio']:.2f} cpu {r['cpu_ratio']:.2f}"
            log(f"{key} b{b} ({n} images, best of {reps}): {ratios}")
    for m in methods:
        option, tag = SWEPT[m]
        for b in batches:
            vals = windows if option == "window" else gammas
            flat[f"best.{m}.b{b}"] = max(vals, key=lambda v: flat[f"{m}.{tag}{v}.b{b}.{rank}"])
    return flat


def rows(flat, methods, batches, windows, gammas) -> list[dict]:
    out = []
    for m, option, v, key in cells(methods, windows, gammas):
        for b in batches:
            k = f"{key}.b{b}."
            out.append(
                {
                    "method": m,
                    option: v,
                    "batch": b,
                    **{c: flat.get(k + c) for c in COLUMNS[:5]},
                    "best": "*" if flat.get(f"best.{m}.b{b}") == v else "",
                }
            )
    return out


def main(argv=None):
    from benchmarks.zoo import Zoo

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="best of 1, not 3 (~10-15 min of one core)")
    ap.add_argument("--methods", nargs="*", default=list(SWEPT), choices=list(SWEPT))
    ap.add_argument("--batches", nargs="*", type=int, default=[1, 16])
    ap.add_argument("--reps", type=int, default=None, help="best of this many (default 3, --quick 1)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as measured)")
    ap.add_argument("--windows", nargs="*", type=int, default=list(WINDOWS))
    ap.add_argument("--gammas", nargs="*", type=int, default=list(GAMMAS))
    ap.add_argument("--images-b1", type=int, default=4)
    ap.add_argument("--images-b16", type=int, default=32)
    ap.add_argument("--device", default="cpu", help="where the models run (cuda: ranked by wall ratio)")
    ap.add_argument(
        "--cuda-graph", action="store_true", help="plain decoding and SJD / GSD replay captured steps (CUDA)"
    )
    ap.add_argument(
        "--graph-noise",
        default="eager",
        choices=["eager", "chunk"],
        help="SJD / GSD draw order under --cuda-graph",
    )
    ap.add_argument(
        "--topic", default="spec_sweep", help="results file name (benchmarks/results/<topic>.json)"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    reps = args.reps or (1 if args.quick else 3)
    w = zoo_workload(Zoo(), fid=False, device=args.device)
    extra = {"cuda_graph": True, "graph_noise": args.graph_noise} if args.cuda_graph else {}
    flat = sweep(
        w,
        args.methods,
        args.batches,
        args.windows,
        args.gammas,
        reps,
        args.images_b1,
        args.images_b16,
        extra=extra,
    )
    flat.update(
        {
            "options.reps": reps,
            "options.images.b1": args.images_b1,
            "options.images.b16": args.images_b16,
            "options.device": args.device,
            "options.cuda_graph": args.cuda_graph,
            "options.graph_noise": args.graph_noise,
        }
    )
    print_table(
        rows(flat, args.methods, args.batches, args.windows, args.gammas),
        ["method", "window", "gamma", "batch", *COLUMNS[:5], "best"],
    )
    print("wrote", write_results(args.topic, flat, meta(args.quick, [0]), chart=("nfe_ratio", "wall_ratio")))


if __name__ == "__main__":
    main()
