#!/usr/bin/env python
"""TarFlow sampling: the sequential KV-cached inverse vs the Jacobi-family policy measured on a
calibration batch (frozen-prefix windows), side by side on the same trained model and noise.

    python benchmarks/tarflow.py [--quick] [--ckpt runs/digits_tarflow] [--window 16]

Without --ckpt a model is trained with configs/digits_tarflow.yaml into
runs/bench_tarflow_{quick,full} (resumed if present). Reports FID (mean, std over 3
seeds) of both samplers, the largest pixel difference between them, wall-time ratio and
model passes. Writes benchmarks/results/tarflow.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import meta, print_table, write_results  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def trained_model(args):
    from vargen.checkpoint import load_component
    from vargen.config import load_run_config
    from vargen.train.tasks import run

    ckpt = args.ckpt
    if ckpt is None:
        ckpt = os.path.join(ROOT, "runs", f"bench_tarflow_{'quick' if args.quick else 'full'}")
        over = [f"out_dir={ckpt}", "train.resume=true", "train.progress=false"]
        if args.quick:
            over += ["train.steps=300", "train.eval_every=0"]
        run(load_run_config(os.path.join(ROOT, "configs", "digits_tarflow.yaml"), over), log=print)
    return load_component(ckpt)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a 300-step model and 200 samples per seed")
    p.add_argument("--ckpt", default=None)
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--window", type=int, default=16, help="frozen-prefix Jacobi window (0 = whole)")
    args = p.parse_args(argv)
    from vargen.data import build_dataset
    from vargen.eval import FIDEvaluator
    from vargen.sampling.decoders.tarflow import calibrate_policy, crm_igm, sample_tarflow
    from vargen.sampling.generate import class_labels

    model, cfg = trained_model(args)
    data = build_dataset(cfg.data)
    pick = torch.randperm(len(data.train_images), generator=torch.Generator().manual_seed(0))[:256]
    m = crm_igm(model, data.train_images[pick], data.train_labels[pick])
    calib = class_labels(32, model.num_classes, [])
    policy, _ = calibrate_policy(
        model,
        calib,
        torch.Generator().manual_seed(0),
        window=args.window,
        guidance=None if args.cfg_scale == 1.0 else args.cfg_scale - 1.0,
    )
    evaluator = FIDEvaluator.for_dataset(dict(cfg.data), split="train")
    n = 200 if args.quick else 1000
    seeds = [0, 1, 2]
    labels = class_labels(n, model.num_classes, [])

    res = {"seq": [], "gsj": []}
    times = {"seq": 0.0, "gsj": 0.0}
    passes = {"seq": 0, "gsj": 0}
    token_rows = {"seq": 0.0, "gsj": 0.0}
    max_diff = 0.0
    for seed in seeds:
        out = {}
        for name, kw in (("seq", {}), ("gsj", {"policy": policy})):
            g = torch.Generator().manual_seed(seed)
            t0 = time.perf_counter()
            out[name], stats = sample_tarflow(model, labels, generator=g, cfg_scale=args.cfg_scale, **kw)
            times[name] += time.perf_counter() - t0
            passes[name] += stats["target_forwards"]
            token_rows[name] += stats["token_rows"]
            res[name].append(evaluator.score(out[name]))
        max_diff = max(max_diff, (out["seq"] - out["gsj"]).abs().max().item())

    flat = {
        "tarflow.fid_sequential": statistics.mean(res["seq"]),
        "tarflow.fid_sequential_std": statistics.stdev(res["seq"]),
        "tarflow.fid_gsj": statistics.mean(res["gsj"]),
        "tarflow.fid_gsj_std": statistics.stdev(res["gsj"]),
        "tarflow.max_abs_diff": max_diff,
        "tarflow.speedup_wall": times["seq"] / times["gsj"],
        "tarflow.passes_sequential": passes["seq"] // len(seeds),
        "tarflow.passes_gsj": passes["gsj"] // len(seeds),
        "tarflow.token_rows_sequential": token_rows["seq"] / len(seeds),
        "tarflow.token_rows_gsj": token_rows["gsj"] / len(seeds),
        "tarflow.policy": [
            f"{pl.method}:{pl.segments}x{pl.max_iters}:{pl.init}:w{pl.window}" for pl in policy
        ],
        "tarflow.crm": m["crm"].tolist(),
    }
    rows = [
        {
            "sampler": "sequential",
            "fid": flat["tarflow.fid_sequential"],
            "fid_std": flat["tarflow.fid_sequential_std"],
            "passes": flat["tarflow.passes_sequential"],
            "seconds": times["seq"] / len(seeds),
        },
        {
            "sampler": f"auto policy (window {args.window})",
            "fid": flat["tarflow.fid_gsj"],
            "fid_std": flat["tarflow.fid_gsj_std"],
            "passes": flat["tarflow.passes_gsj"],
            "seconds": times["gsj"] / len(seeds),
        },
    ]
    print_table(rows, list(rows[0]))
    path = write_results(
        "tarflow",
        flat,
        {
            **meta(args.quick, seeds),
            "samples_per_seed": n,
            "cfg_scale": args.cfg_scale,
            "window": args.window,
        },
    )
    print(
        f"\npolicy {flat['tarflow.policy']}; max |seq - gsj| = {max_diff:.2e}; "
        f"wall speedup {flat['tarflow.speedup_wall']:.2f}x; wrote {path}"
    )


if __name__ == "__main__":
    main()
