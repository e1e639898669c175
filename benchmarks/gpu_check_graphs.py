#!/usr/bin/env python
"""CUDA-graph plain decoding (``sample_ar(..., cuda_graph=True)``) against eager KV-cached
decoding on a GPU: the same ids from the same generator, and the time per image.

Random-init llamagen targets of the photos workload's shape (``configs/photos_ar.yaml``'s model
section, eval mode; vocabulary 1024, 16x16 = 256 tokens, 15 classes): width 128 x 4 layers
(4 heads, the config's) and width 256 x 6 layers (8 heads), batch 1 and 16, CFG scale 1.5.
Per (model, batch): one warm-up draw of each path (their ids are compared: ``token_mismatch``
tokens differ, ``mismatch_images`` images; float rounding may flip a rare token, and a flip
changes the rest of that image, so these are reported, not required to be 0), then eager and
graph timed interleaved, best of ``--reps``, each call synchronised. The graph path builds and
captures its graph in every call, and that cost is in its time.

    python -m benchmarks.gpu_check_graphs                      (CUDA; run by gpu_check.sh)
    python -m benchmarks.gpu_check_graphs --small --device cpu (CPU smoke test: tiny models, the
                                                               static step run eagerly, no capture)

Prints a table and one line ``RESULT {json}`` with ``graphs.<model>.b<batch>.eager_ms_per_image``,
``.graph_ms_per_image``, ``.speedup`` (eager / graph), ``.token_mismatch``, ``.mismatch_images``, and on
CUDA ``.static_eager_token_mismatch`` (the static step run without capture vs eager: tells a
capture problem from a math one);
``--json PATH`` also writes that JSON. A failing case is recorded as ``.error`` (traceback on
stderr; on CUDA the case is retried once under the plain-math SDPA backend, ``.math_sdpa.*``, to
tell an attention-kernel capture problem from others) and the others still run; exits 1 only
then, 0 with mismatches.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch
from omegaconf import OmegaConf
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.common import ROOT, commit, print_table
from vargen.registry import MODELS
from vargen.sampling.decoders.ar import sample_ar
from vargen.sampling.decoders.ar_graph import sample_ar_static

SHAPES = {"w128x4": (128, 4, 4), "w256x6": (256, 6, 8)}  # name: (width, depth, heads)
SMALL_SHAPES = {"w32x2": (32, 2, 2), "w48x2": (48, 2, 4)}
CFG_SCALE = 1.5


def build_model(dim: int, depth: int, heads: int, small: bool, device: torch.device, seed: int):
    """A random-init llamagen from ``configs/photos_ar.yaml``'s model section at this width."""
    section = OmegaConf.to_container(OmegaConf.load(os.path.join(ROOT, "configs", "photos_ar.yaml")).model)
    section.update(dim=dim, depth=depth, heads=heads)
    if small:
        section.update(vocab_size=64, grid=[4, 4], num_classes=15)
    else:
        section.update(vocab_size=1024, grid=[16, 16], num_classes=15)  # the photos VQ and dataset
    torch.manual_seed(seed)  # weight init uses the global RNG (check data only)
    return MODELS.build(section).to(device).eval()


def timed(fn, device: torch.device):
    """(seconds, output) of ``fn()``, with the device synchronised before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, out


def run_case(model, batch: int, device: torch.device, reps: int, seed: int, res: dict) -> None:
    """Fill ``res`` (partly, when a step raises) with one case's mismatches and times."""
    cond_B = torch.arange(batch, device=device) % model.num_classes
    capture = device.type == "cuda"

    def gen():
        return torch.Generator(device=device).manual_seed(seed)

    def eager():
        return sample_ar(model, cond_B, generator=gen(), cfg_scale=CFG_SCALE)

    def graph():
        if capture:
            return sample_ar(model, cond_B, generator=gen(), cfg_scale=CFG_SCALE, cuda_graph=True)
        return sample_ar_static(model, cond_B, generator=gen(), cfg_scale=CFG_SCALE, capture=False)

    _, (ids_e, _) = timed(eager, device)  # warm-up of each; their ids are the comparison
    res["tokens"] = int(ids_e.numel())
    if capture:  # the static step without capture: tells a capture problem from a math one
        ids_s, _ = sample_ar_static(model, cond_B, generator=gen(), cfg_scale=CFG_SCALE, capture=False)
        res["static_eager_token_mismatch"] = int((ids_s != ids_e).sum())
    _, (ids_g, stats_g) = timed(graph, device)
    differ_BN = ids_e != ids_g
    res["token_mismatch"] = int(differ_BN.sum())
    res["mismatch_images"] = int(differ_BN.any(dim=1).sum())
    res["graph_replays"] = int(stats_g.get("graph_replays", 0))
    best_e = best_g = float("inf")
    for _ in range(reps):
        best_e = min(best_e, timed(eager, device)[0])
        best_g = min(best_g, timed(graph, device)[0])
    res["eager_ms_per_image"] = round(1000 * best_e / batch, 3)
    res["graph_ms_per_image"] = round(1000 * best_g / batch, 3)
    res["speedup"] = round(best_e / best_g, 3)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny models and batches (CPU smoke test)")
    ap.add_argument("--device", default="cuda", help="cuda (default; capture) or cpu (no capture)")
    ap.add_argument("--reps", type=int, default=3, help="timed calls of each path (best of)")
    ap.add_argument("--json", default="", help="also write the RESULT json to this path")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --small --device cpu for the CPU smoke test")
    t_start = time.perf_counter()
    shapes, batches = (SMALL_SHAPES, (1, 3)) if args.small else (SHAPES, (1, 16))
    out, rows, failed = {}, [], False
    for s, (name, (dim, depth, heads)) in enumerate(shapes.items()):
        model = build_model(dim, depth, heads, args.small, device, seed=s)
        for batch in batches:
            key = f"graphs.{name}.b{batch}"
            res = {}
            try:
                run_case(model, batch, device, args.reps, 100 + batch, res)
            except Exception as e:  # record it (and what the case had measured) and run the others
                traceback.print_exc()
                res["error"] = f"{type(e).__name__}: {e}"[:500]
                failed = True
                if device.type == "cuda":  # one diagnostic retry with the plain-math SDPA backend
                    retry = {}
                    try:
                        with sdpa_kernel(SDPBackend.MATH):
                            run_case(model, batch, device, 1, 100 + batch, retry)
                    except Exception as e2:
                        traceback.print_exc()
                        retry["error"] = f"{type(e2).__name__}: {e2}"[:500]
                    res.update({f"math_sdpa.{k}": v for k, v in retry.items()})
            out.update({f"{key}.{k}": v for k, v in res.items()})
            rows.append({"case": key, **res})
            print(f"{key}: {res}", flush=True)
    cols = [
        "case",
        "eager_ms_per_image",
        "graph_ms_per_image",
        "speedup",
        "token_mismatch",
        "mismatch_images",
    ]
    cols += ["static_eager_token_mismatch"] if device.type == "cuda" else []
    print_table(rows, cols + (["error"] if failed else []))
    out["graphs.device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (no capture)"
    out["graphs.torch"] = torch.__version__
    out["graphs.commit"] = commit()
    out["graphs.cfg_scale"] = CFG_SCALE
    out["graphs.seconds"] = round(time.perf_counter() - t_start, 1)
    line = json.dumps(out)
    print("RESULT " + line)
    if args.json:
        with open(args.json, "w") as f:
            f.write(line + "\n")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
