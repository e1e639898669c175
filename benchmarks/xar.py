#!/usr/bin/env python
"""xAR on digits: entity kinds, noisy context vs teacher forcing, backbone flow vs per-token head.

    python -m benchmarks.xar [--quick]

Trains (or resumes) the KL tokenizer (configs/digits_kl.yaml) and, with configs/digits_xar.yaml
and one training budget, into runs/bench_xar_{quick,full}:

- ``xar.<entity>``: xAR as the paper builds it (``denoiser: backbone``, the transformer denoises
  each entity, noisy context learning) for every entity kind (token, cell, subsample, scale, image);
- ``xar.teacher_forcing``: cells with clean context in training (``noisy_context=false``);
- ``head.flow.<entity>``: MAR's split (``denoiser: head``, per-token flow head) for cells and the
  whole image, where its tokens are drawn independently given the backbone's conditions;
- ``mar_head``: MAR's per-token diffusion head, one token per step (``entity=token``).

Every model samples with the same sampler settings (``xar`` sampler, CFG ramp to ``--cfg-scale``,
50 Euler-Maruyama steps per entity for the flow models, 50 DDPM steps for the MAR head) through
:func:`benchmarks.common.sweep`: FID (mean and std over 3 sampling seeds, classifier features,
vs the held-out split), backbone forwards per image batch (``nfe``: sequential network passes),
AR steps (entities) and solver steps per image. Writes benchmarks/results/xar.json.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import ROOT, Method, flat_results, meta, print_table, sweep, train, write_results  # noqa: E402

HEAD = ["model.denoiser=head"]
VARIANTS = {  # result key -> overrides of configs/digits_xar.yaml
    "xar.token": ["model.entity=token"],
    "xar.cell": ["model.entity=cell"],
    "xar.subsample": ["model.entity=subsample"],
    "xar.scale": ["model.entity=scale"],
    "xar.image": ["model.entity=image"],
    "xar.teacher_forcing": ["model.entity=cell", "model.noisy_context=false"],
    "head.flow.cell": [*HEAD, "model.entity=cell"],
    "head.flow.image": [*HEAD, "model.entity=image"],
    "mar_head": [
        *HEAD,
        "model.entity=token",
        "model.head.name=mar_diffusion",
        "model.head.num_sampling_steps=50",
    ],
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="300-step models and 200 samples per seed")
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--only", nargs="*", default=None, help="a subset of the variants")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from vargen.checkpoint import load_component, load_tokenizer_for
    from vargen.eval import FIDEvaluator
    from vargen.sampling.decoders.xar import sample_xar
    from vargen.sampling.generate import class_labels

    root = os.path.join(ROOT, "runs", f"bench_xar_{'quick' if args.quick else 'full'}")
    kl_dir = train("digits_kl", os.path.join(root, "kl"), args.quick)
    n, seeds, batch = (200 if args.quick else 1000), [0, 1, 2], 250
    methods, evaluator, labels = {}, None, None
    for key in args.only or VARIANTS:
        out = train(
            "digits_xar", os.path.join(root, key), args.quick, [f"tokenizer_ckpt={kl_dir}", *VARIANTS[key]]
        )
        model, cfg = load_component(out)
        evaluator = evaluator or FIDEvaluator.for_dataset(dict(cfg.data), split="heldout")
        labels = class_labels(n, model.num_classes, []) if labels is None else labels
        draw = lambda m, c, g: sample_xar(m, c, generator=g, cfg_scale=args.cfg_scale)  # noqa: E731
        methods[key] = Method(model, load_tokenizer_for(cfg), draw)
    swept = sweep(methods, labels, seeds, evaluator, batch)
    flat, rows = flat_results(swept), []
    batches = -(-n // batch)  # per seed: the last seed's stats are summed over its batches
    for key, r in swept.items():
        st = r["stats"]
        flat[f"{key}.ar_steps"] = st["ar_steps"] / batches
        flat[f"{key}.solver_steps"] = st["solver_steps"] / batches
        flat[f"{key}.head_evals"] = st.get("head_evals", 0) / batches
        rows.append(
            {
                "variant": key,
                "fid": f"{r['fid_mean']:.2f} ± {r['fid_std']:.2f}",
                "forwards": r["nfe"],
                "ar_steps": flat[f"{key}.ar_steps"],
                "solver_steps": flat[f"{key}.solver_steps"],
                "head_evals": flat[f"{key}.head_evals"],
                "seconds": r["seconds"],
            }
        )
    flat["samples_per_seed"], flat["cfg_scale"] = n, args.cfg_scale
    print_table(rows, ["variant", "fid", "forwards", "ar_steps", "solver_steps", "head_evals", "seconds"])
    print("wrote", write_results("xar", flat, meta(args.quick, seeds), chart=("nfe", "fid_mean")))


if __name__ == "__main__":
    main()
