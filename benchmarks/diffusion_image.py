#!/usr/bin/env python
"""Diffusion samplers on the digits DDPM: exposure-bias time shift, and FKC-CFG vs plain CFG.

    python -m benchmarks.diffusion_image [--quick]

Trains (or resumes) configs/digits_ddpm.yaml into <root>/bench_ddpm (quick and full train the
same 800 steps: a shorter eps-model samples noise) and compares, side by side, FID (mean and
std over 3 sampling seeds, vs the held-out split, class-balanced labels):

- ``ts.*``: DDIM with 10 steps, unguided, without / with the TS-DPM time shift
  (window 80, cutoff 300, paper variance, canonical mode: the spec's ADM DDIM-5 values), and
  the same window with the data-corrected variance target (``ts.fid_ddim10_shifted_corrected``,
  data_var = mean per-image variance of the training images in model space).
- ``cfg.*`` vs ``fkc.*`` at EQUAL network evaluations per image (NFE = rows pushed through the
  UNet per output image; a guided step costs 2): FKC-CFG with K particles and S ancestral steps
  (2 K S) against plain CFG on DDPM ancestral steps (eta = 1, the same chain FKC weights) with
  K S steps (2 K S). Same guidance scale for both. ``cfg_same_steps.*``: plain CFG with FKC's
  S steps (1/K of the budget): FKC's own proposal chain without weights, for reference.

``*.nfe`` entries are the measured NFE per image. :func:`run` returns the flat dict (the lead's
benchmarks/diffusion.py calls it); ``main`` prints a table and writes
benchmarks/results/diffusion_image.json.
"""

from __future__ import annotations

import argparse
import os

import torch

from benchmarks.common import ROOT, Method, meta, print_table, sweep, train, write_results

SEEDS = (0, 1, 2)
TS = {"window": 80, "cutoff": 300}  # spec section 1b, ADM CIFAR-10 DDIM-5
CFG_SCALE = 1.5


def _settings(quick: bool) -> dict:
    return {"n": 200 if quick else 1000, "fkc_steps": 8 if quick else 25, "particles": 4}


def run(quick: bool, root: str) -> dict:
    torch.set_num_threads(1)
    from vargen.checkpoint import load_component
    from vargen.data import build_dataset
    from vargen.diffusion.time_shift import ExposureBiasTimeShift
    from vargen.eval import FIDEvaluator
    from vargen.sampling.decoders.diffusion import sample_ddim, sample_fkc_cfg
    from vargen.sampling.generate import class_labels

    ckpt = train("digits_ddpm", os.path.join(root, "bench_ddpm"), quick, quick_steps=800)
    model, cfg = load_component(ckpt)
    evaluator = FIDEvaluator.for_dataset(dict(cfg.data), split="heldout")
    s = _settings(quick)
    K, S = s["particles"], s["fkc_steps"]
    labels = class_labels(s["n"], model.num_classes, [])
    shift = ExposureBiasTimeShift(**TS)
    x0 = model.data_to_x(build_dataset(cfg.data).train_images)  # (N, C, H, W)
    data_var = float(x0.flatten(1).var(dim=1).mean())
    shift_c = ExposureBiasTimeShift(**TS, variance="corrected", data_var=data_var)
    methods = {  # per method its images per batch: FKC's batch holds K particles per image
        "ts.ddim10": (200, lambda m, c, g: sample_ddim(m, c, generator=g, steps=10)),
        "ts.ddim10_shifted": (
            200,
            lambda m, c, g: sample_ddim(m, c, generator=g, steps=10, time_shift=shift),
        ),
        "ts.ddim10_shifted_corrected": (
            200,
            lambda m, c, g: sample_ddim(m, c, generator=g, steps=10, time_shift=shift_c),
        ),
        "cfg_same_steps": (
            100,
            lambda m, c, g: sample_ddim(m, c, generator=g, steps=S, eta=1.0, cfg_scale=CFG_SCALE),
        ),
        "cfg": (
            100,
            lambda m, c, g: sample_ddim(m, c, generator=g, steps=K * S, eta=1.0, cfg_scale=CFG_SCALE),
        ),
        "fkc": (
            50,
            lambda m, c, g: sample_fkc_cfg(m, c, generator=g, steps=S, cfg_scale=CFG_SCALE, particles=K),
        ),
    }
    res = sweep(
        {name: Method(model, None, fn, batch_size=batch) for name, (batch, fn) in methods.items()},
        labels,
        SEEDS,
        evaluator,
        batch_size=200,
    )

    def total(name, key):
        return sum(st.get(key, 0) for st in res[name]["seed_stats"])

    keys = {  # method -> (FID key, prefix of its nfe / seconds keys)
        "ts.ddim10": ("ts.fid_ddim10", "ts.ddim10_"),
        "ts.ddim10_shifted": ("ts.fid_ddim10_shifted", "ts.ddim10_shifted_"),
        "ts.ddim10_shifted_corrected": ("ts.fid_ddim10_shifted_corrected", "ts.ddim10_shifted_corrected_"),
        "cfg_same_steps": ("cfg_same_steps.fid", "cfg_same_steps."),
        "cfg": ("cfg.fid", "cfg."),
        "fkc": ("fkc.fid", "fkc."),
    }
    flat = {}
    for name, (fid_key, prefix) in keys.items():
        r = res[name]
        flat[fid_key] = r["fid_mean"]
        flat[f"{fid_key}_std"] = r["fid_std"]
        flat[f"{prefix}nfe"] = total(name, "net_evals") / (len(SEEDS) * s["n"])  # UNet rows per image
        flat[f"{prefix}seconds"] = r["seconds"]
    flat.update(
        {
            "ts.window": TS["window"],
            "ts.cutoff": TS["cutoff"],
            "ts.data_var": data_var,
            "ts.shifted_steps_per_batch": total("ts.ddim10_shifted", "shifted_steps")
            / (len(SEEDS) * -(-s["n"] // 200)),
            "cfg.scale": CFG_SCALE,
            "cfg.steps": K * S,
            "fkc.steps": S,
            "fkc.particles": K,
            "fkc.resamples": total("fkc", "resamples"),
            "samples_per_seed": s["n"],
        }
    )
    return flat


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="200 samples per seed, FKC 8 steps x 4 particles")
    args = p.parse_args(argv)
    root = os.path.join(ROOT, "runs", f"bench_diffusion_image_{'quick' if args.quick else 'full'}")
    flat = run(args.quick, root)
    rows = [
        {
            "method": "ddim10",
            "fid": flat["ts.fid_ddim10"],
            "std": flat["ts.fid_ddim10_std"],
            "nfe": flat["ts.ddim10_nfe"],
        },
        {
            "method": f"ddim10 + time shift (w={TS['window']}, t_c={TS['cutoff']})",
            "fid": flat["ts.fid_ddim10_shifted"],
            "std": flat["ts.fid_ddim10_shifted_std"],
            "nfe": flat["ts.ddim10_shifted_nfe"],
        },
        {
            "method": f"ddim10 + time shift, corrected variance (data_var={flat['ts.data_var']:.3f})",
            "fid": flat["ts.fid_ddim10_shifted_corrected"],
            "std": flat["ts.fid_ddim10_shifted_corrected_std"],
            "nfe": flat["ts.ddim10_shifted_corrected_nfe"],
        },
        {
            "method": f"cfg {flat['fkc.steps']} ancestral steps (reference, 1/K budget)",
            "fid": flat["cfg_same_steps.fid"],
            "std": flat["cfg_same_steps.fid_std"],
            "nfe": flat["cfg_same_steps.nfe"],
        },
        {
            "method": f"cfg {flat['cfg.steps']} ancestral steps",
            "fid": flat["cfg.fid"],
            "std": flat["cfg.fid_std"],
            "nfe": flat["cfg.nfe"],
        },
        {
            "method": f"fkc_cfg {flat['fkc.steps']} steps x {flat['fkc.particles']} particles",
            "fid": flat["fkc.fid"],
            "std": flat["fkc.fid_std"],
            "nfe": flat["fkc.nfe"],
        },
    ]
    print_table(rows, ["method", "fid", "std", "nfe"])
    print("wrote", write_results("diffusion_image", flat, meta(args.quick, SEEDS)))


if __name__ == "__main__":
    main()
