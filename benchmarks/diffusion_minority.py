#!/usr/bin/env python
"""Minority guidance (Um et al., ICLR'24) on the digits DDPM, measured as the paper does: cFID
against the minority reference set.

    python -m benchmarks.diffusion_minority [--quick] [--w 3.0] [--seeds 3] [--steps S] [--samples N]

Trains (or resumes) the class-conditional DDPM (configs/digits_ddpm.yaml) and its noisy minority
level classifier (configs/digits_minority.yaml) into runs/bench_minority_{quick,full}, then
samples a class-balanced set per seed with the ``minority`` sampler (ancestral DDPM) at w = 0,
w = 1 (``minority.w1``) and w = ``--w`` (``minority.guided``) toward the rarest level
(:func:`benchmarks.common.sweep`, 3 sampling seeds). For each:

- ``cfid``: FID against the *minority reference set*, the training images whose minority score
  (the L2 score the classifier's levels come from, same denoiser and scoring step) is in the top
  decile: the paper's metric; lower = closer to the real minority data;
- ``fid``: FID against the ordinary held-out split (expected to rise with w: minority samples are
  by design not distributed like the data);
- ``score``: the mean minority score of the samples.

The L2 score alone is not a minority measure: ``minority.noise.*`` adds N(0, 0.2^2) pixel noise to
the held-out images, which raises their score well above the data's (the denoiser cannot
reconstruct noise) while their cFID to the minority set does not fall. Writes
benchmarks/results/diffusion_minority.json (``minority.*``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

from benchmarks.common import ROOT, Method, flat_results, meta, print_table, sweep, train, write_results

SEEDS = (0, 1, 2)
NOISE_SIGMA = 0.2
TOP_FRACTION = 0.1  # the minority reference set: the top decile of training scores


def run(
    quick: bool,
    root: str,
    ddpm_ckpt: str,
    w: float = 3.0,
    seeds=SEEDS,
    steps=None,
    samples=None,
    clf_steps=600,
) -> dict:
    """Train the classifier for ``ddpm_ckpt`` under ``root`` and measure; returns the flat results.
    ``steps`` / ``samples`` (None: 50 / 200 with ``quick``, else 250 / 1000) per sampling seed."""
    from vargen.checkpoint import load_component
    from vargen.data import build_dataset
    from vargen.diffusion.minority import minority_scores
    from vargen.eval import FIDEvaluator, get_feature_net
    from vargen.sampling.decoders.minority import sample_minority
    from vargen.sampling.generate import class_labels

    clf_dir = train(
        "digits_minority", os.path.join(root, "minority"), quick, [f"denoiser_ckpt={ddpm_ckpt}"], clf_steps
    )
    den, den_cfg = load_component(ddpm_ckpt)
    clf, clf_cfg = load_component(clf_dir)
    clf.requires_grad_(False)
    with open(os.path.join(clf_dir, "eval.json")) as f:
        clf_eval = json.load(f)
    data_cfg = dict(den_cfg.data)
    n = samples or (200 if quick else 1000)
    steps, batch = steps or (50 if quick else 250), 200
    labels = class_labels(n, den.num_classes, [])
    score_kw = dict(t=clf_eval["score_step"], n_iter=clf_cfg.n_iter)
    data = build_dataset(data_cfg)

    def score_fn(images, seed):
        return minority_scores(images, den, torch.Generator().manual_seed(1000 + seed), **score_kw)

    train_scores = minority_scores(data.train_images, den, torch.Generator().manual_seed(998), **score_kw)
    cut = torch.quantile(train_scores, 1 - TOP_FRACTION)
    reference = data.train_images[train_scores >= cut]  # (~N/10, C, H, W)
    cfid = FIDEvaluator(reference, get_feature_net(data_cfg, "cpu"))
    fid = FIDEvaluator.for_dataset(data_cfg, split="heldout")

    scales = {"minority.unguided": 0.0, "minority.w1": 1.0, "minority.guided": w}
    methods = {
        name: Method(
            den, None, lambda m, c, g, s=s: sample_minority(m, clf, c, g, level=-1, w=s, steps=steps, eta=1.0)
        )
        for name, s in scales.items()
    }
    extra = {name: {"fid": [], "score": []} for name in methods}

    def on_draw(name, seed, images, ids, stats):  # FID vs held-out and the score of every draw
        extra[name]["fid"].append(fid.score(images))
        extra[name]["score"].append(float(score_fn(images, seed).mean()))

    swept = sweep(methods, labels, list(seeds), cfid, batch, on_draw=on_draw)  # fid_* here: the cFID
    flat = {k.replace(".fid_", ".cfid_"): v for k, v in flat_results(swept).items()}
    for name, r in extra.items():
        for k in ("fid", "score"):
            flat[f"{name}.{k}_mean"] = statistics.mean(r[k])
            flat[f"{name}.{k}_std"] = statistics.stdev(r[k])

    held = data.heldout_images
    noisy = (held + NOISE_SIGMA * torch.randn(held.shape, generator=torch.Generator().manual_seed(7))).clamp(
        0, 1
    )
    for name, images in (("heldout", held), ("heldout_noisy", noisy), ("reference", reference)):
        flat[f"minority.data.{name}.score"] = float(score_fn(images, -1).mean())
        if name != "reference":
            flat[f"minority.data.{name}.cfid"] = cfid.score(images)
    flat.update(
        {
            "minority.w": w,
            "minority.steps": steps,
            "minority.samples_per_seed": n,
            "minority.reference_size": int(reference.shape[0]),
            "minority.reference_score_cut": float(cut),
            "minority.noise_sigma": NOISE_SIGMA,
            "minority.num_levels": clf_cfg.num_levels,
            "minority.classifier_heldout_acc": clf_eval["heldout_acc"],
            "minority.classifier_heldout_acc_t0": clf_eval["heldout_acc_t0"],
            "minority.classifier_chance_acc": clf_eval["chance_acc"],
        }
    )
    return flat


def print_summary(flat: dict, w: float) -> None:
    rows = [
        {
            "sampler": f"minority w={s}",
            "cfid": f"{flat[f'{k}.cfid_mean']:.1f} ± {flat[f'{k}.cfid_std']:.1f}",
            "fid": f"{flat[f'{k}.fid_mean']:.1f} ± {flat[f'{k}.fid_std']:.1f}",
            "score": f"{flat[f'{k}.score_mean']:.2f} ± {flat[f'{k}.score_std']:.2f}",
        }
        for k, s in (("minority.unguided", 0.0), ("minority.w1", 1.0), ("minority.guided", w))
    ]
    for name in ("heldout", "heldout_noisy"):
        rows.append(
            {
                "sampler": f"data {name}",
                "cfid": f"{flat[f'minority.data.{name}.cfid']:.1f}",
                "score": f"{flat[f'minority.data.{name}.score']:.2f}",
            }
        )
    print_table(rows, ["sampler", "cfid", "fid", "score"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short training, 200 samples x 50 steps per seed")
    p.add_argument("--w", type=float, default=3.0, help="minority guidance scale of the guided run")
    p.add_argument("--seeds", type=int, default=len(SEEDS), help="sampling seeds 0..n-1 (at least 2)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default 50 quick, 250 full)")
    p.add_argument(
        "--samples", type=int, default=None, help="samples per seed (default 200 quick, 1000 full)"
    )
    p.add_argument("--ddpm-steps", type=int, default=800, help="DDPM training steps with --quick")
    p.add_argument("--clf-steps", type=int, default=600, help="classifier training steps with --quick")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    root = os.path.join(ROOT, "runs", f"bench_minority_{'quick' if args.quick else 'full'}")
    ddpm = train("digits_ddpm", os.path.join(root, "ddpm"), args.quick, quick_steps=args.ddpm_steps)
    seeds = tuple(range(args.seeds))
    flat = run(args.quick, root, ddpm, args.w, seeds, args.steps, args.samples, args.clf_steps)
    flat["minority.ddpm_train_steps"] = args.ddpm_steps if args.quick else None
    flat["minority.classifier_train_steps"] = args.clf_steps if args.quick else None
    print_summary(flat, args.w)
    chart = ("score_mean", "cfid_mean")
    print("wrote", write_results("diffusion_minority", flat, meta(args.quick, seeds), chart=chart))


if __name__ == "__main__":
    main()
