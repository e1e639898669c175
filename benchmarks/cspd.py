#!/usr/bin/env python
"""Continuous speculative decoding (CSpD) vs the target's own sampler, on digits.

    python -m benchmarks.cspd [--quick] [--cfg [--cfg-scale 1.5]]

Trains (or resumes) the KL tokenizer and two xAR models with entity ``token`` and MAR's
diffusion head (configs/digits_xar.yaml): the target (dim 64, depth 4) and a smaller draft
(dim 32, depth 2), same steps, into runs/bench_cspd_{quick,full}. Samples each class-balanced
set with the target's plain ``xar`` sampler (the baseline, 16 backbone forwards per image) and
with ``cspd`` in exact mode and the paper's mode, without guidance, side by side: FID (mean and
std over 3 sampling seeds, vs the held-out split), target forwards, ``nfe_ratio`` (baseline /
method target forwards), ``wall_ratio`` (baseline / method time) and the acceptance rate.
``--cfg`` also measures exact CSpD against the baseline both with guidance ``--cfg-scale`` (xAR's
ramp; a CFG pair of rows is one backbone call in both): keys ``baseline_cfg.*`` and ``cspd_cfg.*``.
Writes benchmarks/results/cspd.json (the issue's ``cspd.*`` keys).

:func:`run` (train, load, measure at one scale) is what ``benchmarks.speculative`` calls for its
``cspd.*`` entries.
"""

from __future__ import annotations

import argparse
import os

import torch

from benchmarks.common import ROOT, Method, flat_results, meta, print_table, sweep, train, write_results

TOKEN_MAR = [
    "model.entity=token",
    "model.denoiser=head",
    "model.head.name=mar_diffusion",
    "model.head.num_sampling_steps=25",
]
SMALL = ["model.dim=32", "model.depth=2", "model.head.width=64", "model.head.depth=2"]
SEEDS = [0, 1, 2]


def default_root(quick: bool) -> str:
    return os.path.join(ROOT, "runs", f"bench_cspd_{'quick' if quick else 'full'}")


def prepare(quick: bool, root: str | None = None) -> dict:
    """Train (or resume) tokenizer, target and draft under ``root``; load them and the evaluator."""
    from vargen.checkpoint import load_component, load_tokenizer_for
    from vargen.eval import FIDEvaluator
    from vargen.sampling.generate import class_labels

    root = root or default_root(quick)
    kl = train("digits_kl", os.path.join(root, "kl"), quick)
    tgt = train("digits_xar", os.path.join(root, "target"), quick, [f"tokenizer_ckpt={kl}", *TOKEN_MAR])
    drf = train(
        "digits_xar", os.path.join(root, "draft"), quick, [f"tokenizer_ckpt={kl}", *TOKEN_MAR, *SMALL]
    )
    target, cfg = load_component(tgt)
    draft, _ = load_component(drf)
    n = 200 if quick else 1000
    return {
        "target": target,
        "draft": draft,
        "tokenizer": load_tokenizer_for(cfg),
        "evaluator": FIDEvaluator.for_dataset(dict(cfg.data), split="heldout"),
        "labels": class_labels(n, target.num_classes, []),
        "batch": 250,
    }


def measure(env: dict, cfg_scale: float = 1.0, gamma: int = 4, paper: bool = True) -> dict:
    """Baseline ``xar`` vs ``cspd`` (and ``cspd_paper``) at one ``cfg_scale``: flat keys
    ``<method>.{nfe, fid_mean, fid_std, seconds}`` and, for the CSpD methods, ``acceptance``,
    ``nfe_ratio`` and ``wall_ratio`` against the baseline."""
    from vargen.sampling.decoders.xar import sample_xar
    from vargen.sampling.speculative.cspd import sample_cspd

    target, draft, tok = env["target"], env["draft"], env["tokenizer"]
    methods = {
        "baseline": Method(target, tok, lambda m, c, g: sample_xar(m, c, generator=g, cfg_scale=cfg_scale)),
        "cspd": Method(
            target,
            tok,
            lambda m, c, g: sample_cspd(m, draft, c, generator=g, gamma=gamma, cfg_scale=cfg_scale),
        ),
    }
    if paper:
        methods["cspd_paper"] = Method(
            target,
            tok,
            lambda m, c, g: sample_cspd(
                m, draft, c, generator=g, gamma=gamma, cfg_scale=cfg_scale, mode="paper"
            ),
        )
    res = sweep(methods, env["labels"], SEEDS, env["evaluator"], env["batch"])
    flat = {}
    for name, r in res.items():
        flat.update(flat_results({name: r}, ("nfe", "fid_mean", "fid_std", "seconds")))
        if name != "baseline":
            accepted = sum(st.get("accepted", 0) for st in r["seed_stats"])
            proposed = sum(st.get("proposed", 0) for st in r["seed_stats"])
            flat[f"{name}.acceptance"] = accepted / max(1, proposed)
            flat[f"{name}.nfe_ratio"] = res["baseline"]["forwards"] / r["forwards"]
            flat[f"{name}.wall_ratio"] = res["baseline"]["seconds"] / r["seconds"]
    return flat


def run(
    quick: bool, root: str | None = None, cfg_scale: float = 1.0, gamma: int = 4, paper: bool = True
) -> dict:
    """Train or resume the models under ``root`` (default runs/bench_cspd_{quick,full}) and
    :func:`measure` at ``cfg_scale``."""
    return measure(prepare(quick, root), cfg_scale, gamma, paper)


def table(flat: dict) -> list[dict]:
    names = dict.fromkeys(k.rsplit(".", 1)[0] for k in flat if k.endswith(".fid_mean"))
    return [
        {
            "sampler": name,
            "fid": f"{flat[name + '.fid_mean']:.2f} ± {flat[name + '.fid_std']:.2f}",
            "nfe": flat[f"{name}.nfe"],
            "acceptance": flat.get(f"{name}.acceptance", 1.0),
            "nfe_ratio": flat.get(f"{name}.nfe_ratio", 1.0),
            "wall_ratio": flat.get(f"{name}.wall_ratio", 1.0),
            "seconds": flat[f"{name}.seconds"],
        }
        for name in names
    ]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="300-step models and 200 samples per seed")
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--cfg", action="store_true", help="also measure with guidance (keys *_cfg.*)")
    p.add_argument("--cfg-scale", type=float, default=1.5)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    env = prepare(args.quick)
    flat = measure(env, 1.0, args.gamma)
    if args.cfg:
        guided = measure(env, args.cfg_scale, args.gamma, paper=False)
        flat.update({k.replace(".", "_cfg.", 1): v for k, v in guided.items()})
        flat["cfg_scale"] = args.cfg_scale
    flat["samples_per_seed"], flat["gamma"] = len(env["labels"]), args.gamma
    print_table(table(flat), ["sampler", "fid", "nfe", "acceptance", "nfe_ratio", "wall_ratio", "seconds"])
    print("wrote", write_results("cspd", flat, meta(args.quick, SEEDS)))


if __name__ == "__main__":
    main()
