#!/usr/bin/env python
"""TarFlow Jacobi family on random-weight flows: passes, token-rows per image and wall time
against the sequential KV-cached loop, at batch 1 and 16, one thread (issue 16).

    python benchmarks/tarflow_jacobi.py [--std 0.02] [--tol 1e-6] [--reps 3]

Two shapes: "digits" (16x16x1, patch 2, 64 tokens, dim 64, 4 blocks x 2 layers) and
"photos" (32x32x3, patch 2, 256 tokens, dim 128, 4 blocks x 2 layers). A fresh TarFlow is
the identity flow, so every block's output projection is redrawn N(0, std^2)
(TarFlow.init_output_). Guided (cfg 1.5), no Tweedie step. Prints one row per
(shape, batch, sampler); wall ratio = sequential seconds / sampler seconds (best of reps).
"""

from __future__ import annotations

import argparse
import time

import torch

from vargen.models.tarflow import TarFlow, TarFlowConfig
from vargen.sampling import tarflow_sampling as ts

SHAPES = {
    "digits": dict(channels=1, resolution=16, num_classes=10, patch_size=2, dim=64, layers_per_block=2),
    "photos": dict(channels=3, resolution=32, num_classes=10, patch_size=2, dim=128, layers_per_block=2),
}


def samplers(window):
    return {
        "sequential": dict(method="sequential"),
        "jacobi w0": dict(method="jacobi", window=0),
        f"jacobi w{window}": dict(method="jacobi", window=window),
        "gs_jacobi 8 seg": dict(method="gs_jacobi", segments=8, window=0),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--std", type=float, default=0.02)
    p.add_argument("--tol", type=float, default=1e-6)
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--shapes", default="digits,photos")
    p.add_argument("--batches", default="1,16")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print("shape  batch sampler          passes/blk            token_rows  syncs/img  max|diff|  wall_ratio")
    for shape in args.shapes.split(","):
        torch.manual_seed(0)
        model = TarFlow(TarFlowConfig(num_blocks=4, heads=4, **SHAPES[shape])).eval()
        model.init_output_(args.std, torch.Generator().manual_seed(1))
        for B in map(int, args.batches.split(",")):
            labels = torch.arange(B) % model.num_classes
            ref, seconds = None, {}
            for name, kw in samplers(args.window).items():
                best = float("inf")
                for _ in range(args.reps):
                    g = torch.Generator().manual_seed(0)
                    t0 = time.perf_counter()
                    x, st = ts.sample_tarflow(
                        model, labels, generator=g, cfg_scale=1.5, tol=args.tol, denoise=False, **kw
                    )
                    best = min(best, time.perf_counter() - t0)
                seconds[name] = best
                ref = x if ref is None else ref
                diff = (x - ref).abs().max().item()
                print(
                    f"{shape:6s} {B:5d} {name:16s} {str(st['passes_per_block']):21s} "
                    f"{st['token_rows']:10.0f} {st['syncs'] / B:9.1f}  {diff:9.1e}  "
                    f"{seconds['sequential'] / best:9.2f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
