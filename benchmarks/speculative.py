#!/usr/bin/env python
"""Speculative samplers against plain next-token decoding of the same trained llamagen.

    python -m benchmarks.speculative [--quick] --target runs/digits_ar --draft runs/digits_ar_draft

Side by side in one run on the trained digits models (16 tokens per image): baseline KV-cached
decoding ("ar"), exact speculative sampling with the draft model ("sd"), speculative Jacobi
decoding ("jacobi"), GSD ("gsd") and GSD's group-exact variant ("gsd_exact"). Per method: target
forwards (NFE) and wall-clock ratios against the baseline, acceptance, and FID against the
held-out split as mean and std over 3 sampling seeds. The speculative samplers run KV-cached on
a ragged cache (``<m>.wall_ratio``); each is run again with ``use_cache=false`` (full prefix
recompute) for ``<m>.wall_ratio_nocache`` and ``<m>.same_tokens_nocache``, the fraction of
images whose tokens the two variants drew identically from the same generator (float32: a
rare argmax flip on a 1e-6 logit difference can change a row). ``gsd.tv_toy`` is GSD's
lossiness TV(out, p) on a toy AR model (exact joint). ``long.*``: the same cached / uncached
comparison on random-weight llamagens with a 16x16 grid (256 tokens), where the prefix a full
recompute repeats is long; their near-uniform conditionals make acceptance high, so only the
cost is meaningful there (no FID).
``cspd.*``: continuous speculative decoding on its own model family (xAR + MAR head on the KL
tokenizer, ``benchmarks.cspd``'s models) against its own baseline, the ``xar`` sampler at the same
``--cfg-scale`` (``cspd.baseline_*``).
Writes benchmarks/results/speculative.json.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks import cspd
from benchmarks.common import Method, flat_results, meta, print_table, sweep, write_results
from vargen.checkpoint import load_component, load_tokenizer_for
from vargen.eval.fid import FIDEvaluator
from vargen.sampling.generate import build_sampler


def gsd_tv_on_toy(samples: int) -> float:
    from vargen.models.toy_ar import ToyAR
    from vargen.sampling.speculative.gsd import gsd_ratio
    from vargen.sampling.speculative.jacobi import sample_jacobi

    target = ToyAR(0, zero_frac=0.3)
    cond = torch.zeros(samples, dtype=torch.long)

    def ratio(p, q, x):
        return gsd_ratio(p, q, x, group=14, delta=0.15, dist=0.0)

    g = torch.Generator().manual_seed(0)
    ids, _ = sample_jacobi(target, cond, generator=g, window=3, ratio_fn=ratio, use_cache=False)
    emp = torch.bincount(target.index(ids), minlength=len(target.joint())).double() / samples
    return 0.5 * (emp - target.joint()).abs().sum().item()


def cspd_entries(quick: bool, cfg_scale: float) -> tuple[dict, dict]:
    """``cspd.*`` keys from :func:`benchmarks.cspd.run` (exact mode) and a table row."""
    r = cspd.run(quick, cfg_scale=cfg_scale, paper=False)
    keys = ("nfe", "seconds", "nfe_ratio", "wall_ratio", "acceptance", "fid_mean", "fid_std")
    res = {f"cspd.{k}": r[f"cspd.{k}"] for k in keys}
    res.update({f"cspd.baseline_{k}": r[f"baseline.{k}"] for k in ("nfe", "seconds", "fid_mean", "fid_std")})
    res["cspd.cfg_scale"] = cfg_scale
    return res, {"method": "cspd", **{k: res[f"cspd.{k}"] for k in keys if k != "seconds"}}


def long_sequence_costs(batch: int = 8) -> dict:
    """Wall ratios against KV-cached "ar" of cached and uncached SD / SJD on 256 tokens."""
    from vargen.models.ar import ARConfig, ARTransformer
    from vargen.sampling.decoders.ar import sample_ar
    from vargen.sampling.speculative.draft import sample_speculative
    from vargen.sampling.speculative.jacobi import sample_jacobi

    torch.manual_seed(0)  # random weights (benchmark data only)

    def llamagen(dim, depth):
        cfg = ARConfig(vocab_size=128, grid=[16, 16], num_classes=10, dim=dim, depth=depth, heads=4)
        return ARTransformer(cfg).eval()

    target, draft = llamagen(64, 4), llamagen(32, 2)
    cond = torch.arange(batch) % 10

    def timed(fn, repeats=1, **kw):  # best of ``repeats`` (the short runs are noisy on a shared CPU)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            ids, stats = fn(generator=torch.Generator().manual_seed(0), **kw)
            best = min(best, time.perf_counter() - t0)
        return best, ids, stats

    base, _, _ = timed(sample_ar, repeats=3, model=target, cond_B=cond, cfg_scale=1.5)
    runs = {
        "sd": (sample_speculative, {"target": target, "draft": draft, "gamma": 4}),
        "jacobi": (sample_jacobi, {"model": target, "window": 16}),
    }
    res = {"long.tokens": target.num_tokens, "long.batch": batch}
    for m, (fn, kw) in runs.items():
        t_c, ids_c, st = timed(fn, repeats=3, cond_B=cond, cfg_scale=1.5, use_cache=True, **kw)
        t_n, ids_n, _ = timed(fn, cond_B=cond, cfg_scale=1.5, use_cache=False, **kw)
        res[f"long.{m}.nfe"] = st["target_forwards"]
        res[f"long.{m}.wall_ratio"] = base / t_c
        res[f"long.{m}.wall_ratio_nocache"] = base / t_n
        res[f"long.{m}.same_tokens_nocache"] = (ids_c == ids_n).all(1).float().mean().item()
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--target", default="runs/digits_ar")
    p.add_argument("--draft", default="runs/digits_ar_draft")
    p.add_argument("--cfg-scale", type=float, default=1.5)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    num = 200 if args.quick else 1000
    model, gen_cfg = load_component(args.target)
    tokenizer = load_tokenizer_for(gen_cfg, "cpu")
    fid = FIDEvaluator.for_dataset(dict(gen_cfg.data), split="heldout")
    warp = {"cfg_scale": args.cfg_scale}
    methods = {
        "baseline": {"name": "ar", **warp},
        "sd": {"name": "speculative", "draft_ckpt": args.draft, "gamma": 4, **warp},
        "jacobi": {"name": "sjd", "window": 16, **warp},
        "gsd": {"name": "gsd", "window": 16, **warp},
        "gsd_exact": {"name": "gsd", "window": 16, "exact_groups": True, **warp},
    }
    labels = torch.arange(num) % model.num_classes
    swept_methods = {}
    for m, scfg in methods.items():  # each speculative method beside its full-recompute variant
        swept_methods[m] = Method(model, tokenizer, build_sampler(scfg, model, gen_cfg, "cpu"))
        if m != "baseline":
            swept_methods[f"{m}_nocache"] = Method(
                model,
                tokenizer,
                build_sampler({**scfg, "use_cache": False}, model, gen_cfg, "cpu"),
                score=False,
            )
    ids_of, same = {}, {m: [] for m in methods}

    def same_tokens(name, seed, images, ids, stats):
        """Fraction of images whose tokens the cached and uncached variants drew identically."""
        if name.endswith("_nocache"):
            m = name[: -len("_nocache")]
            same[m].append((ids_of.pop(m) == ids).all(1).float().mean().item())
        elif name != "baseline":
            ids_of[name] = ids

    seeds = range(3)
    swept = sweep(swept_methods, labels, seeds, fid, batch_size=num, on_draw=same_tokens)
    res, rows = {}, []
    for m in methods:
        r = swept[m]
        res[f"{m}.nfe"], res[f"{m}.seconds"] = r["nfe"], r["seconds"] / len(seeds)  # seconds per seed
        res[f"{m}.acceptance"] = sum(st.get("acceptance", 1.0) for st in r["seed_stats"]) / len(seeds)
        res.update(flat_results({m: r}, ("fid_mean", "fid_std")))
        if m != "baseline":
            res[f"{m}.seconds_nocache"] = swept[f"{m}_nocache"]["seconds"] / len(seeds)
            res[f"{m}.same_tokens_nocache"] = sum(same[m]) / len(seeds)
    for m in methods:
        if m != "baseline":
            res[f"{m}.nfe_ratio"] = res["baseline.nfe"] / res[f"{m}.nfe"]
            res[f"{m}.wall_ratio"] = res["baseline.seconds"] / res[f"{m}.seconds"]
            res[f"{m}.wall_ratio_nocache"] = res["baseline.seconds"] / res[f"{m}.seconds_nocache"]
        rows.append(
            {
                "method": m,
                "nfe": res[f"{m}.nfe"],
                "nfe_ratio": res.get(f"{m}.nfe_ratio", 1.0),
                "wall_ratio": res.get(f"{m}.wall_ratio", 1.0),
                "wall_ratio_nocache": res.get(f"{m}.wall_ratio_nocache", float("nan")),
                "same_tokens": res.get(f"{m}.same_tokens_nocache", float("nan")),
                "acceptance": res[f"{m}.acceptance"],
                "fid_mean": res[f"{m}.fid_mean"],
                "fid_std": res[f"{m}.fid_std"],
            }
        )
    cspd_res, cspd_row = cspd_entries(args.quick, args.cfg_scale)
    res.update(cspd_res)
    rows.append(cspd_row)
    res["gsd.tv_toy"] = gsd_tv_on_toy(20_000 if args.quick else 100_000)
    res.update(long_sequence_costs())
    cols = ["method", "nfe", "nfe_ratio", "wall_ratio", "wall_ratio_nocache", "same_tokens", "acceptance"]
    print_table(rows, [*cols, "fid_mean", "fid_std"])
    print(f"gsd.tv_toy = {res['gsd.tv_toy']:.4f}")
    for k, v in res.items():
        if k.startswith("long."):
            print(f"{k} = {v:.4g}")
    write_results("speculative", {**res, "samples_per_seed": num, "batch": num}, meta(args.quick, range(3)))


if __name__ == "__main__":
    main()
