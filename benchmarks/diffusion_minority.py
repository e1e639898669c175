#!/usr/bin/env python
"""Minority guidance (Um et al., ICLR'24) on the digits DDPM: unguided vs guided samples.

    python benchmarks/diffusion_minority.py [--quick] [--w 3.0]

Trains (or resumes) the class-conditional DDPM (configs/digits_ddpm.yaml) and its noisy minority
level classifier (configs/digits_minority.yaml) into runs/bench_minority_{quick,full}, then
samples a class-balanced set per seed with the ``minority`` sampler (ancestral DDPM) at w = 0,
w = 1 (``minority.*_w1``) and w = ``--w`` (``minority.*_guided``) toward the rarest level, and
reports for each the mean minority score (the L2 score the classifier's levels come from, under
the same denoiser, fixed scoring generator) and the FID vs the held-out split: mean and std over
3 sampling seeds. Higher score = samples the model finds harder to reconstruct (rarer); FID vs
the ordinary held-out set is expected to rise with w, as minority samples are by design not
distributed like the data. Writes benchmarks/results/diffusion_minority.json (``minority.*``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, meta, print_table, train, write_results  # noqa: E402

SEEDS = (0, 1, 2)


def run(quick: bool, root: str, ddpm_ckpt: str, w: float = 3.0) -> dict:
    """Train the classifier for ``ddpm_ckpt`` under ``root`` and measure; returns the flat results."""
    from vargen.checkpoint import load_component
    from vargen.data import build_dataset
    from vargen.diffusion.minority import minority_scores
    from vargen.eval import FIDEvaluator
    from vargen.sampling.decoders.minority import sample_minority
    from vargen.sampling.generate import class_labels, generate

    clf_dir = train(
        "digits_minority", os.path.join(root, "minority"), quick, [f"denoiser_ckpt={ddpm_ckpt}"], 600
    )
    den, den_cfg = load_component(ddpm_ckpt)
    clf, clf_cfg = load_component(clf_dir)
    clf.requires_grad_(False)
    with open(os.path.join(clf_dir, "eval.json")) as f:
        clf_eval = json.load(f)
    evaluator = FIDEvaluator.for_dataset(dict(den_cfg.data), split="heldout")
    n, steps, batch = (200 if quick else 1000), (50 if quick else 250), 200
    labels = class_labels(n, den.num_classes, [])
    score_kw = dict(t=clf_eval["score_step"], n_iter=clf_cfg.n_iter)
    held = build_dataset(dict(den_cfg.data)).heldout_images
    scales = {"unguided": 0.0, "w1": 1.0, "guided": w}  # w1: a milder scale, to show the trade-off
    res = {name: {"score": [], "fid": []} for name in scales}
    for seed in SEEDS:
        for name, scale in scales.items():

            def sampler(m, c, g, scale=scale):
                return sample_minority(m, clf, c, g, level=-1, w=scale, steps=steps, eta=1.0)

            images, _, _ = generate(den, None, labels, sampler, torch.Generator().manual_seed(seed), batch)
            scores = minority_scores(images, den, torch.Generator().manual_seed(1000 + seed), **score_kw)
            res[name]["score"].append(float(scores.mean()))
            res[name]["fid"].append(evaluator.score(images))
            print(f"seed {seed} {name}: score {res[name]['score'][-1]:.2f} fid {res[name]['fid'][-1]:.2f}")
    flat = {}
    for name, r in res.items():
        flat[f"minority.score_{name}"] = statistics.mean(r["score"])
        flat[f"minority.score_{name}_std"] = statistics.stdev(r["score"])
        flat[f"minority.fid_{name}"] = statistics.mean(r["fid"])
        flat[f"minority.fid_{name}_std"] = statistics.stdev(r["fid"])
    flat["minority.score_heldout_data"] = float(
        minority_scores(held, den, torch.Generator().manual_seed(999), **score_kw).mean()
    )
    flat.update(
        {
            "minority.w": w,
            "minority.steps": steps,
            "minority.samples_per_seed": n,
            "minority.num_levels": clf_cfg.num_levels,
            "minority.classifier_heldout_acc": clf_eval["heldout_acc"],
            "minority.classifier_heldout_acc_t0": clf_eval["heldout_acc_t0"],
            "minority.classifier_chance_acc": clf_eval["chance_acc"],
        }
    )
    return flat


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short training, 200 samples x 50 steps per seed")
    p.add_argument("--w", type=float, default=3.0, help="minority guidance scale of the guided run")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    root = os.path.join(ROOT, "runs", f"bench_minority_{'quick' if args.quick else 'full'}")
    ddpm = train("digits_ddpm", os.path.join(root, "ddpm"), args.quick, quick_steps=800)
    flat = run(args.quick, root, ddpm, args.w)
    rows = [
        {
            "sampler": f"minority w={w}",
            "minority score": f"{flat[f'minority.score_{k}']:.2f} ± {flat[f'minority.score_{k}_std']:.2f}",
            "fid": f"{flat[f'minority.fid_{k}']:.2f} ± {flat[f'minority.fid_{k}_std']:.2f}",
        }
        for k, w in (("unguided", 0.0), ("w1", 1.0), ("guided", args.w))
    ]
    print_table(rows, ["sampler", "minority score", "fid"])
    print(
        f"held-out data score {flat['minority.score_heldout_data']:.2f}, classifier held-out acc "
        f"{flat['minority.classifier_heldout_acc']:.3f} "
        f"(t=0: {flat['minority.classifier_heldout_acc_t0']:.3f}, "
        f"chance {flat['minority.classifier_chance_acc']:.3f})"
    )
    print("wrote", write_results("diffusion_minority", flat, meta(args.quick, SEEDS)))


if __name__ == "__main__":
    main()
