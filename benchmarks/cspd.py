#!/usr/bin/env python
"""Continuous speculative decoding (CSpD) vs the target's own sampler, on digits.

    python benchmarks/cspd.py [--quick]

Trains (or resumes) the KL tokenizer and two xAR models with entity ``token`` and MAR's
diffusion head (configs/digits_xar.yaml): the target (dim 64, depth 4) and a smaller draft
(dim 32, depth 2), same steps, into runs/bench_cspd_{quick,full}. Samples each class-balanced
set with the target's plain ``xar`` sampler (the baseline, 16 backbone forwards per image) and
with ``cspd`` in exact mode and the paper's mode, without guidance (CSpD supports none here),
side by side: FID (mean and std over 3 sampling seeds, vs the held-out split), target forwards,
``nfe_ratio`` (baseline / method target forwards), ``wall_ratio`` (baseline / method time) and
the acceptance rate. Writes benchmarks/results/cspd.json (the issue's ``cspd.*`` keys).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, meta, print_table, train, write_results  # noqa: E402

TOKEN_MAR = ["model.entity=token", "model.head.name=mar_diffusion", "model.head.num_sampling_steps=25"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="300-step models and 200 samples per seed")
    p.add_argument("--gamma", type=int, default=4)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from vargen.eval import FIDEvaluator
    from vargen.sampling.cspd_sampler import sample_cspd
    from vargen.sampling.generate import class_labels, generate
    from vargen.sampling.xar_sampling import sample_xar
    from vargen.train.tasks import load_component, load_tokenizer_for

    root = os.path.join(ROOT, "runs", f"bench_cspd_{'quick' if args.quick else 'full'}")
    kl = train("digits_kl", os.path.join(root, "kl"), args.quick)
    tgt = train("digits_xar", os.path.join(root, "target"), args.quick, [f"tokenizer_ckpt={kl}", *TOKEN_MAR])
    small = ["model.dim=32", "model.depth=2", "model.head.width=64", "model.head.depth=2"]
    drf = os.path.join(root, "draft")
    train("digits_xar", drf, args.quick, [f"tokenizer_ckpt={kl}", *TOKEN_MAR, *small])
    target, cfg = load_component(tgt)
    draft, _ = load_component(drf)
    tok = load_tokenizer_for(cfg)
    evaluator = FIDEvaluator.for_dataset(dict(cfg.data), split="heldout")
    n, seeds, batch = (200 if args.quick else 1000), [0, 1, 2], 250
    labels = class_labels(n, target.num_classes, [])
    methods = {
        "baseline": lambda m, c, g: sample_xar(m, c, generator=g),
        "cspd": lambda m, c, g: sample_cspd(m, draft, c, generator=g, gamma=args.gamma),
        "cspd_paper": lambda m, c, g: sample_cspd(m, draft, c, generator=g, gamma=args.gamma, mode="paper"),
    }
    res = {k: {"fid": [], "fwd": 0, "sec": 0.0, "acc": 0, "prop": 0} for k in methods}
    for seed in seeds:
        for name, fn in methods.items():
            t0 = time.perf_counter()
            images, _, st = generate(target, tok, labels, fn, torch.Generator().manual_seed(seed), batch)
            r = res[name]
            r["sec"] += time.perf_counter() - t0
            r["fid"].append(evaluator.score(images))
            r["fwd"] += st["target_forwards"]
            r["acc"] += st.get("accepted", 0)
            r["prop"] += st.get("proposed", 0)
    batches = len(seeds) * -(-n // batch)
    flat, rows = {}, []
    for name, r in res.items():
        flat[f"{name}.nfe"] = r["fwd"] / batches
        flat[f"{name}.fid_mean"] = statistics.mean(r["fid"])
        flat[f"{name}.fid_std"] = statistics.stdev(r["fid"])
        flat[f"{name}.seconds"] = r["sec"]
        if name != "baseline":
            flat[f"{name}.acceptance"] = r["acc"] / max(1, r["prop"])
            flat[f"{name}.nfe_ratio"] = res["baseline"]["fwd"] / r["fwd"]
            flat[f"{name}.wall_ratio"] = res["baseline"]["sec"] / r["sec"]
        rows.append(
            {
                "sampler": name,
                "fid": f"{flat[name + '.fid_mean']:.2f} ± {flat[name + '.fid_std']:.2f}",
                "nfe": flat[f"{name}.nfe"],
                "acceptance": flat.get(f"{name}.acceptance", 1.0),
                "seconds": r["sec"],
            }
        )
    flat["samples_per_seed"], flat["gamma"] = n, args.gamma
    print_table(rows, ["sampler", "fid", "nfe", "acceptance", "seconds"])
    print("wrote", write_results("cspd", flat, meta(args.quick, seeds)))


if __name__ == "__main__":
    main()
