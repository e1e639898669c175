#!/usr/bin/env python
"""TarFlow sampling: the sequential KV-cached inverse vs the Jacobi-family policy measured on a
calibration batch (frozen-prefix windows), side by side on the same trained model and noise.

    python -m benchmarks.tarflow [--quick] [--ckpt runs/digits_tarflow] [--window 16]

Without --ckpt a model is trained with configs/digits_tarflow.yaml (apple/ml-tarflow's
architecture) into runs/bench_tarflow_{quick,full} (resumed if present). Reports FID (mean,
std over 3 seeds) of both samplers, the largest pixel difference between them, wall-time
ratio and model passes, and the GS-Jacobi paper's CRM / IGM per block (null class, spectral
norms, as its reference). Both samplers run through ``common.sweep`` (one batch per seed);
its ``on_draw`` compares their images of each seed. Writes benchmarks/results/tarflow.json.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from benchmarks.common import ROOT, Method, meta, print_table, sweep, write_results


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
    m = crm_igm(model, data.train_images[pick])  # null class, as the reference
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

    def sampler(**kw):
        return lambda mod, lab, g: sample_tarflow(mod, lab, generator=g, cfg_scale=args.cfg_scale, **kw)

    methods = {"seq": Method(model, None, sampler()), "gsj": Method(model, None, sampler(policy=policy))}
    drawn, diffs = {}, []

    def on_draw(name, seed, images, ids, stats):  # the exactness check: both samplers, same noise
        drawn[name] = images
        if name == "gsj":
            diffs.append((drawn["seq"] - images).abs().max().item())

    res = sweep(methods, labels, seeds, evaluator, batch_size=n, on_draw=on_draw)
    times = {k: r["seconds"] for k, r in res.items()}
    max_diff = max(diffs)
    token_rows = {k: statistics.mean(s["token_rows"] for s in r["seed_stats"]) for k, r in res.items()}

    flat = {
        "tarflow.fid_sequential": res["seq"]["fid_mean"],
        "tarflow.fid_sequential_std": res["seq"]["fid_std"],
        "tarflow.fid_gsj": res["gsj"]["fid_mean"],
        "tarflow.fid_gsj_std": res["gsj"]["fid_std"],
        "tarflow.max_abs_diff": max_diff,
        "tarflow.speedup_wall": times["seq"] / times["gsj"],
        "tarflow.passes_sequential": res["seq"]["nfe"],
        "tarflow.passes_gsj": res["gsj"]["nfe"],
        "tarflow.token_rows_sequential": token_rows["seq"],
        "tarflow.token_rows_gsj": token_rows["gsj"],
        "tarflow.policy": [
            f"{pl.method}:{pl.segments}x{pl.max_iters}:{pl.init}:w{pl.window}" for pl in policy
        ],
        "tarflow.crm": m["crm"].tolist(),
        "tarflow.crm_percent": (100 * m["crm"] / m["crm"].sum()).tolist(),
        "tarflow.igm_z": m["igm_z"].tolist(),
        "tarflow.igm_zero": m["igm_zero"].tolist(),
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
            "final_norm": bool(cfg.model.get("final_norm", True)),
        },
    )
    print(
        f"\npolicy {flat['tarflow.policy']}; max |seq - gsj| = {max_diff:.2e}; "
        f"wall speedup {flat['tarflow.speedup_wall']:.2f}x; wrote {path}"
    )


if __name__ == "__main__":
    main()
