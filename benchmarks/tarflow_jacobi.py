#!/usr/bin/env python
"""TarFlow Jacobi family on random-weight flows: model calls and token-rows per image and
wall time against the sequential KV-cached loop, at batch 1 and 16, one thread (issue 16).

    python -m benchmarks.tarflow_jacobi [--std 0.02] [--tol 1e-5] [--window 16] [--reps 1]
    python -m benchmarks.tarflow_jacobi --ckpt runs/bench_tarflow_quick   # a trained flow instead

Two shapes: "digits" (16x16x1, patch 2, 64 tokens, dim 64, 4 blocks x 2 layers) and
"photos" (32x32x3, patch 2, 256 tokens, dim 128, 4 blocks x 2 layers). A fresh TarFlow is
the identity flow, so every block's output projection is redrawn N(0, std^2)
(TarFlow.init_output_). Guided (cfg 1.5), no Tweedie step. Each batch size B samples
N = max(4, 2B) images: in batches of B, or (``cont``) all N through B slots with refilling.
Columns: calls/img = model rows over calls per image (batch-synchronous: passes of the
batch); token_rows = positions per image; syncs per image; max |diff| to sequential;
wall ratio = sequential seconds / sampler seconds (best of reps).
"""

from __future__ import annotations

import argparse
import time

import torch

from vargen.models.tarflow import TarFlow, TarFlowConfig
from vargen.sampling.decoders import tarflow as ts

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
        f"jacobi w{window} cont": dict(method="jacobi", window=window, continuous=True),
    }


def run_once(model, labels, B, tol, kw):
    """(images, calls per image, token rows per image, syncs per image) of one sampler run."""
    kw = dict(kw)
    common = dict(cfg_scale=1.5, tol=tol, denoise=False)
    g = torch.Generator().manual_seed(0)
    N = labels.shape[0]
    if kw.pop("continuous", False):
        x, st = ts.sample_tarflow_continuous(model, labels, generator=g, slots=B, **common, **kw)
        return x, st["target_calls_per_image"], st["token_rows"], st["syncs"] / N
    xs, calls, rows, syncs = [], 0, 0, 0
    for i in range(0, N, B):
        x, st = ts.sample_tarflow(model, labels[i : i + B], generator=g, **common, **kw)
        xs.append(x)
        n = x.shape[0]
        calls, rows, syncs = (
            calls + st["target_forwards"] * n,
            rows + st["token_rows"] * n,
            syncs + st["syncs"],
        )
    return torch.cat(xs), calls / N, rows / N, syncs / N


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--std", type=float, default=0.02)
    p.add_argument("--tol", type=float, default=1e-5)
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--shapes", default="digits,photos")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--ckpt", default=None, help="a trained TarFlow run instead of the random shapes")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print("shape  batch  N sampler              calls/img token_rows syncs/img max|diff|  wall_ratio")
    for shape in ["ckpt"] if args.ckpt else args.shapes.split(","):
        if args.ckpt:
            from vargen.checkpoint import load_component

            model = load_component(args.ckpt)[0].eval()
        else:
            torch.manual_seed(0)
            model = TarFlow(TarFlowConfig(num_blocks=4, heads=4, **SHAPES[shape])).eval()
            model.init_output_(args.std, torch.Generator().manual_seed(1))
        for B in map(int, args.batches.split(",")):
            N = max(4, 2 * B)
            labels = torch.arange(N) % model.num_classes
            ref, seq_s = None, None
            for name, kw in samplers(args.window).items():
                best = float("inf")
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    x, calls, rows, syncs = run_once(model, labels, B, args.tol, kw)
                    best = min(best, time.perf_counter() - t0)
                ref, seq_s = (x, best) if ref is None else (ref, seq_s)
                print(
                    f"{shape:6s} {B:5d} {N:3d} {name:20s} {calls:9.1f} {rows:10.1f} {syncs:9.1f} "
                    f"{(x - ref).abs().max().item():9.1e} {seq_s / best:9.2f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
