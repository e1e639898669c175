#!/usr/bin/env python
"""What ``speculate_by="cost"`` measures and picks on this machine, per sampler and batch size.

    python -m benchmarks.cost_plan [--quick] [--threads 1] [--methods sjd gsd gsd_exact sd cspd]
                                   [--batches 1 16] [--device cuda --cuda-graph]

For each method and batch size b the registered sampler is built with ``speculate_by="cost"`` on
the photos zoo (``zoo_workload``; CFG 1.5) and draws one batch of b labels. That call measures
the plan (:func:`vargen.sampling.speculative.cost_plan.choose_width`: plain sampling and each
candidate width, on ``max(b, cost_images)`` calibration images with b rows in flight,
``cost_reps`` interleaved rounds, best of each; process CPU time on the CPU). Keys per cell:

- ``<m>.b<b>.plain_ms`` and ``<m>.b<b>.w<k>_ms``: ms per image of plain sampling and of width k
  (SJD / GSD: window; SD / CSpD: gamma);
- ``<m>.b<b>.chosen``: the width that runs (0 = plain sampling: no width was ``cost_margin`` times
  faster); ``best_ratio``: plain ms / the fastest width's ms (> 1: that width is faster);
- ``<m>.b<b>.calibration_s``: seconds the calibration took.

A measured plan is timed, so it carries the machine's noise (about +-15% at batch 1 on a shared
CPU); ``benchmarks.acceleration --set <m>.speculate_by=cost`` times the chosen plan against the
plain baseline side by side.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.acceleration import labels
from benchmarks.common import meta, print_table, write_results

METHODS = ("sjd", "gsd", "gsd_exact", "sd", "cspd")


def sampler_for(w, name: str, reps: int, extra: dict):
    """The registered sampler of ``name`` with ``speculate_by="cost"``, set up on the workload
    (SD and CSpD get the zoo's drafts), and the model it draws from."""
    from vargen.registry import SAMPLERS
    from vargen.sampling.base import SamplerContext

    cfg = {"speculate_by": "cost", "cost_reps": reps, "cfg_scale": 1.5, **extra}
    if name in ("sjd", "gsd", "gsd_exact"):
        cfg["name"] = "gsd" if name.startswith("gsd") else "sjd"
        if name == "gsd_exact":
            cfg["exact_groups"] = True
        return SAMPLERS.build(cfg), w.ar
    cfg.pop("cuda_graph", None)  # SD and CSpD have no graph path
    model, draft = (w.ar, w.draft) if name == "sd" else (w.xar, w.xar_draft)
    run = SAMPLERS.build({**cfg, "name": "speculative" if name == "sd" else "cspd", "draft_ckpt": "zoo"})
    run.setup(SamplerContext(model, loader=lambda ckpt, device: (draft, None)))
    return run, model


def measure(w, methods, batches, reps: int, extra: dict | None = None) -> dict:
    """The flat keys of the module docstring for every method and batch size."""
    flat = {}
    for name in methods:
        for b in batches:
            run, model = sampler_for(w, name, reps, extra or {})
            g = torch.Generator(device=w.device).manual_seed(0)
            _, stats = run(model, labels(b, w.num_classes, w.device), g, slots=b)
            cal = stats["calibration"][0]
            secs = {int(k): v for k, v in cal["seconds"].items()}
            key = f"{name}.b{b}."
            flat[key + "plain_ms"] = 1e3 * secs.pop(0)
            flat.update({f"{key}w{k}_ms": 1e3 * v for k, v in secs.items()})
            flat[key + "chosen"] = cal["chosen"]
            flat[key + "best_ratio"] = flat[key + "plain_ms"] / (1e3 * min(secs.values()))
            flat[key + "calibration_s"] = cal["seconds_total"]
    return flat


def table(flat: dict, methods, batches) -> list[dict]:
    rows = []
    for name in methods:
        for b in batches:
            key = f"{name}.b{b}."
            widths = {k[len(key) + 1 : -3]: v for k, v in flat.items() if k.startswith(key + "w")}
            rows.append(
                {
                    "method": name,
                    "batch": b,
                    "plain ms": round(flat[key + "plain_ms"], 1),
                    "width: ms": ", ".join(f"{k}: {v:.1f}" for k, v in widths.items()),
                    "chosen": flat[key + "chosen"],
                    "best ratio": round(flat[key + "best_ratio"], 2),
                    "calibration s": round(flat[key + "calibration_s"], 1),
                }
            )
    return rows


def main(argv=None):
    from benchmarks.acceleration import zoo_workload
    from benchmarks.zoo import Zoo

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="cost_reps 1, not 2")
    ap.add_argument("--methods", nargs="*", default=["sjd", "gsd", "gsd_exact", "sd"], choices=METHODS)
    ap.add_argument("--batches", nargs="*", type=int, default=[1, 16])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as measured)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--cuda-graph", action="store_true", help="SJD / GSD and plain decoding replay graphs (CUDA)"
    )
    ap.add_argument(
        "--topic", default="cost_plan", help="results file name (benchmarks/results/<topic>.json)"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    w = zoo_workload(Zoo(), fid=False, device=args.device)
    extra = {"cuda_graph": True} if args.cuda_graph else {}
    flat = measure(w, args.methods, args.batches, 1 if args.quick else 2, extra)
    rows = table(flat, args.methods, args.batches)
    print_table(rows, list(rows[0]))
    print("wrote", write_results(args.topic, flat, meta(args.quick, [0], args.device)))


if __name__ == "__main__":
    main()
