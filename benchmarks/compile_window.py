#!/usr/bin/env python
"""Does ``torch.compile`` of the speculative windows make GSD / SJD beat plain decoding at batch 1?

    OMP_NUM_THREADS=1 python -m benchmarks.compile_window [--quick] [--images 6]

At batch 1 on CPU every decode is bound by per-op overhead, so a W=16 window costs well over one
plain step. With ``compile=True`` the race is fair, both sides compiled:
:meth:`ARTransformer.compile_decode` compiles the plain cached step and the window forward's fast
path (:meth:`ARTransformer.forward_window`, which SJD / GSD / SD call), and SJD / GSD also run
each iteration's verification and Jacobi update through ``torch.compile``
(:func:`vargen.sampling.speculative.jacobi.compiled_jacobi_step`; ~100 small eager ops
otherwise). The ``photos_ar`` zoo model (CFG 1.5, so 2 rows per image, top_k 0) draws one image at
a time with eight methods, interleaved image by image in one process: plain, GSD and SJD, each
eager (``_e``) and compiled (``_c``, on a compiled copy of the same weights), and GSD / SJD with
the compiled window forward but the eager verification (``_cw``: what ``compile=True`` meant
before the step was compiled). One warm-up image per method runs first; its time minus a warm
image's is the compile time (``*.compile_s``; ``_cw`` warms up before ``_c``, so ``gsd_cw``'s is
the window forward's and ``gsd_c``'s / ``sjd_c``'s the verification step's). Times are CPU
seconds of this process (``time.process_time``), medians over the images;
``*.ms_per_forward`` is per plain step or per window iteration (verification included),
``*.images_per_s`` = 1 / median. Ratios (> 1: the first is faster): ``ratio.gsd_c_vs_ar_c``
(compiled GSD vs compiled plain), ``ratio.gsd_c_vs_ar_e``, ``ratio.sjd_c_vs_ar_c``,
``ratio.sjd_c_vs_ar_e``, ``ratio.<m>_c_vs_<m>_e``, ``ratio.<m>_c_vs_<m>_cw`` (the compiled
verification's gain). ``fwd.*``: the model forward alone (ms, 2 rows, cache length 128): a
plain step and a W=16 window, eager and compiled (:func:`forward_costs`). Token equality of
compiled (``_c``, ``_cw``) vs eager (same seed): ``*.same_images`` (images with every token
equal) and ``*.token_match`` (fraction of equal tokens; a speculative sampler diverges after
one flip).
Writes benchmarks/results/compile_window.json.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from benchmarks.common import meta, print_table, write_results

CFG_SCALE, WINDOW = 1.5, 16
WARP = {"cfg_scale": CFG_SCALE, "temperature": 1.0, "top_k": 0, "top_p": 1.0}


def methods(eager, compiled):
    """{name: draw(cond_B, generator) -> (ids, stats)}: plain / GSD / SJD eager (_e) and compiled
    (_c: ``compile=True``, the compiled window forward and the compiled verification step), and
    GSD / SJD with the compiled window forward but the eager verification (_cw, on the compiled
    copy with ``compile=False``: what ``compile=True`` compiled before the step was)."""
    from vargen.registry import SAMPLERS
    from vargen.sampling.decoders.ar import sample_ar

    spec = {
        (n, c): SAMPLERS.build({"name": n, "window": WINDOW, "compile": c, **WARP})
        for n in ("gsd", "sjd")
        for c in (False, True)
    }
    out = {}
    for tag, m, c in (("e", eager, False), ("cw", compiled, False), ("c", compiled, True)):
        if tag != "cw":
            out[f"ar_{tag}"] = lambda cond, g, m=m: sample_ar(m, cond, generator=g, **WARP)
        for n in ("gsd", "sjd"):
            out[f"{n}_{tag}"] = lambda cond, g, m=m, s=spec[n, c]: s(m, cond, g)
    return out


def run(draw, cond_B, seed):
    g = torch.Generator().manual_seed(seed)
    t0, w0 = time.process_time(), time.perf_counter()
    ids, stats = draw(cond_B, g)
    return ids, stats, time.process_time() - t0, time.perf_counter() - w0


@torch.inference_mode()
def forward_costs(eager, compiled, length: int, reps: int) -> dict:
    """Median CPU ms of the model forward alone at cache length ``length``, 2 rows (CFG at
    batch 1), eager vs compiled, interleaved: one plain cached step (``fwd.step_e`` / ``_c``) and
    one W=16 window (``fwd.window_e`` / ``_c``); the rest of a sampler iteration is
    verification, warper and bookkeeping."""
    cond = torch.tensor([0, eager.null_class])
    ids = torch.zeros(2, length, dtype=torch.long)
    prep = {}
    for tag, m in (("e", eager), ("c", compiled)):
        cache = m.new_cache(2)
        m.forward_step(ids[:, :-1], cond, cache)  # class token + length - 1 ids
        rag = m.new_ragged_cache(2, WINDOW)
        for _ in range(length // WINDOW):
            m.forward_window(torch.zeros(2, WINDOW, dtype=torch.long), cond, rag)
        prep[tag] = (m, cache, rag)
    one, win = ids[:, :1], torch.zeros(2, WINDOW, dtype=torch.long)
    t = {f"fwd.{k}_{tag}": [] for k in ("step", "window") for tag in prep}
    for _ in range(reps):
        for tag, (m, cache, rag) in prep.items():
            t0 = time.process_time()
            m.forward_step(one, None, cache)
            t[f"fwd.step_{tag}"].append(time.process_time() - t0)
            cache.crop(length)
            t0 = time.process_time()
            m.forward_window(win, cond, rag)
            t[f"fwd.window_{tag}"].append(time.process_time() - t0)
            rag.rollback(torch.full((2,), length))
            rag.bound = length
    return {k: 1000 * statistics.median(v) for k, v in t.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="2 images")
    ap.add_argument("--images", type=int, default=6)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from benchmarks.zoo import Zoo
    from vargen.checkpoint import load_component

    model, _ = load_component(Zoo().ensure(["photos_ar"])["photos_ar"], "cpu")
    eager = model.next_token_model.eval()
    compiled = copy.deepcopy(eager).compile_decode()
    draws = methods(eager, compiled)
    n_img = 2 if args.quick else args.images
    seeds = list(range(n_img))
    K = eager.num_classes

    flat, times = {}, {n: [] for n in draws}
    for name, draw in draws.items():  # warm-up: compiles (the compiled copy), then a warm image
        first = run(draw, torch.tensor([K - 1]), 1000)[2]
        warm = run(draw, torch.tensor([K - 1]), 1001)[2]
        if not name.endswith("_e"):  # the eager methods' first image is only a slower warm-up
            flat[f"{name}.compile_s"] = max(first - warm, 0.0)
        print(f"warm-up {name}: first image {first:.1f} s, next {warm:.2f} s", flush=True)
    ids = {n: [] for n in draws}
    fwd = {n: [] for n in draws}
    for i, seed in enumerate(seeds):  # interleaved; the order rotates so no method always runs first
        names = list(draws)
        names = names[i % len(names) :] + names[: i % len(names)]
        for name in names:
            out, stats, cpu, _ = run(draws[name], torch.tensor([i % K]), seed)
            times[name].append(cpu)
            ids[name].append(out)
            fwd[name].append(stats["target_forwards"])
    flat.update(forward_costs(eager, compiled, 128, 20 if args.quick else 100))
    rows = []
    for name in draws:
        med = statistics.median(times[name])
        nf = statistics.mean(fwd[name])
        flat[f"{name}.cpu_s"] = med
        flat[f"{name}.forwards"] = nf
        flat[f"{name}.ms_per_forward"] = 1000 * med / nf
        flat[f"{name}.images_per_s"] = 1 / med
        row = {"method": name, "cpu_s": med, "forwards": nf, "ms_per_fwd": 1000 * med / nf}
        row.update({"img_per_s": 1 / med, "compile_s": flat.get(f"{name}.compile_s")})
        if not name.endswith("_e"):
            e = ids[name.rsplit("_", 1)[0] + "_e"]
            same = sum(bool(torch.equal(a, b)) for a, b in zip(ids[name], e))
            match = sum(float((a == b).float().mean()) for a, b in zip(ids[name], e)) / n_img
            flat[f"{name}.same_images"], flat[f"{name}.token_match"] = same, match
            row.update({"same_imgs": f"{same}/{n_img}", "token_match": match})
        rows.append(row)
    for a, b in (("gsd_c", "ar_c"), ("gsd_c", "ar_e"), ("sjd_c", "ar_c"), ("sjd_c", "ar_e")):
        flat[f"ratio.{a}_vs_{b}"] = flat[f"{b}.cpu_s"] / flat[f"{a}.cpu_s"]
    for m in ("ar", "gsd", "sjd"):
        flat[f"ratio.{m}_c_vs_{m}_e"] = flat[f"{m}_e.cpu_s"] / flat[f"{m}_c.cpu_s"]
    for m in ("gsd", "sjd"):  # the gain of the compiled verification step
        flat[f"ratio.{m}_c_vs_{m}_cw"] = flat[f"{m}_cw.cpu_s"] / flat[f"{m}_c.cpu_s"]
    print_table(
        rows,
        ["method", "cpu_s", "forwards", "ms_per_fwd", "img_per_s", "compile_s"]
        + ["same_imgs", "token_match"],
    )
    print({k: round(v, 3) for k, v in flat.items() if k.startswith(("ratio.", "fwd."))})
    print("wrote", write_results("compile_window", flat, meta(args.quick, seeds)))


if __name__ == "__main__":
    main()
