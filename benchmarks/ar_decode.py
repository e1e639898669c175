#!/usr/bin/env python
"""KV-cached vs uncached next-token decoding of the same model, side by side.

    python benchmarks/ar_decode.py [--quick] [--ckpt runs/digits_ar]

Without --ckpt, randomly initialised models of the demo's width are timed (decoding cost
does not depend on the weights) on the digits grid (4x4 = 16 tokens) and the shapes grid
(8x8 = 64 tokens). Both modes draw identical tokens from the same generator (checked),
so the ratio is pure caching. Model forwards (NFE) are equal by construction; the work
differs in positions pushed through the model: N for cached, N(N+1)/2 for uncached.
Writes benchmarks/results/ar_decode.json; the headline keys (kv_speedup, nfe_cached,
nfe_uncached, tokens) are those of the longest grid.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import meta, print_table, write_results  # noqa: E402

from vargen.models.ar import ARConfig, ARTransformer  # noqa: E402
from vargen.sampling.ar_decode import sample_ar  # noqa: E402


def time_decode(model, batch, use_cache, reps, seed, cfg_scale):
    cond = torch.arange(batch) % model.num_classes
    best, ids, stats = float("inf"), None, None
    for _ in range(reps):
        g = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        ids, stats = sample_ar(model, cond, generator=g, use_cache=use_cache, cfg_scale=cfg_scale, top_k=0)
        best = min(best, time.perf_counter() - t0)
    return best, ids, stats


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repetitions (a minute on 2 cores)")
    p.add_argument("--ckpt", default=None, help="time this trained generator instead of random models")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--cfg-scale", type=float, default=2.0)
    args = p.parse_args(argv)
    reps = 2 if args.quick else 5
    torch.manual_seed(0)

    models = []
    if args.ckpt:
        from vargen.train.tasks import load_component

        m, _ = load_component(args.ckpt)
        models.append((f"ckpt {m.cfg.grid[0]}x{m.cfg.grid[1]}", m))
    else:
        for grid in ([4, 4], [8, 8]):
            cfg = ARConfig(vocab_size=256, grid=grid, num_classes=10, dim=128, depth=4, heads=4)
            models.append((f"{grid[0]}x{grid[1]}", ARTransformer(cfg).eval()))

    rows, flat = [], {}
    for name, model in models:
        t_c, ids_c, s_c = time_decode(model, args.batch, True, reps, 0, args.cfg_scale)
        t_u, ids_u, s_u = time_decode(model, args.batch, False, reps, 0, args.cfg_scale)
        if not torch.equal(ids_c, ids_u):
            raise SystemExit("cached and uncached decoding drew different tokens: the cache is wrong")
        row = {
            "grid": name,
            "tokens": s_c["tokens"],
            "nfe_cached": s_c["target_forwards"],
            "nfe_uncached": s_u["target_forwards"],
            "positions_cached": s_c["positions_computed"],
            "positions_uncached": s_u["positions_computed"],
            "cached_s": t_c,
            "uncached_s": t_u,
            "kv_speedup": t_u / t_c,
        }
        rows.append(row)
        key = name.replace(" ", "_")
        flat.update({f"{key}.{k}": v for k, v in row.items() if k != "grid"})
    head = rows[-1]
    flat.update({k: head[k] for k in ("kv_speedup", "nfe_cached", "nfe_uncached", "tokens")})
    print_table(rows, list(rows[0]))
    path = write_results(
        "ar_decode", flat, {**meta(args.quick, [0]), "batch": args.batch, "cfg_scale": args.cfg_scale}
    )
    print(f"\nkv_speedup (longest grid) = {head['kv_speedup']:.2f}x; wrote {path}")


if __name__ == "__main__":
    main()
