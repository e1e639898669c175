#!/usr/bin/env python
"""xAR on digits: entity kinds, noisy context vs teacher forcing, flow head vs MAR head.

    python benchmarks/xar.py [--quick]

Trains (or resumes) the KL tokenizer (configs/digits_kl.yaml) and, with configs/digits_xar.yaml
and the same training budget, one xAR model per entity kind (token, cell, subsample, scale,
image; flow head, noisy context), the cell model with teacher forcing (``noisy_context=false``)
and the token model with MAR's diffusion head, into runs/bench_xar_{quick,full}. Reports FID
(mean and std over 3 sampling seeds, classifier features, vs the held-out split), backbone
forwards per image (AR steps, ``nfe``) and head network evaluations per image, at one CFG scale.
Writes benchmarks/results/xar.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, meta, print_table, train, write_results  # noqa: E402

VARIANTS = {  # result key -> overrides of configs/digits_xar.yaml
    "xar.token": ["model.entity=token"],
    "xar.cell": ["model.entity=cell"],
    "xar.subsample": ["model.entity=subsample"],
    "xar.scale": ["model.entity=scale"],
    "xar.image": ["model.entity=image"],
    "xar.teacher_forcing": ["model.entity=cell", "model.noisy_context=false"],
    "mar_head": ["model.entity=token", "model.head.name=mar_diffusion", "model.head.num_sampling_steps=50"],
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="300-step models and 200 samples per seed")
    p.add_argument("--cfg-scale", type=float, default=1.5)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from vargen.checkpoint import load_component, load_tokenizer_for
    from vargen.eval import FIDEvaluator
    from vargen.sampling.decoders.xar import sample_xar
    from vargen.sampling.generate import class_labels, generate

    root = os.path.join(ROOT, "runs", f"bench_xar_{'quick' if args.quick else 'full'}")
    kl_dir = train("digits_kl", os.path.join(root, "kl"), args.quick)
    n, seeds, batch = (200 if args.quick else 1000), [0, 1, 2], 250
    flat, rows, evaluator = {}, [], None
    for key, over in VARIANTS.items():
        out = train("digits_xar", os.path.join(root, key), args.quick, [f"tokenizer_ckpt={kl_dir}", *over])
        model, cfg = load_component(out)
        tok = load_tokenizer_for(cfg)
        evaluator = evaluator or FIDEvaluator.for_dataset(dict(cfg.data), split="heldout")
        labels = class_labels(n, model.num_classes, [])
        fids, fwd, head = [], 0, 0
        for seed in seeds:
            images, _, stats = generate(
                model,
                tok,
                labels,
                lambda m, c, g: sample_xar(m, c, generator=g, cfg_scale=args.cfg_scale),
                torch.Generator().manual_seed(seed),
                batch,
            )
            fids.append(evaluator.score(images))
            fwd += stats["target_forwards"]
            head += stats["head_evals"]
        batches = len(seeds) * -(-n // batch)
        flat[f"{key}.fid_mean"], flat[f"{key}.fid_std"] = statistics.mean(fids), statistics.stdev(fids)
        flat[f"{key}.nfe"], flat[f"{key}.head_evals"] = fwd / batches, head / batches
        rows.append(
            {
                "variant": key,
                "entities": model.num_entities,
                "fid": f"{flat[key + '.fid_mean']:.2f} ± {flat[key + '.fid_std']:.2f}",
                "nfe": flat[f"{key}.nfe"],
                "head_evals": flat[f"{key}.head_evals"],
            }
        )
    flat["xar.noisy_context.fid_mean"] = flat["xar.cell.fid_mean"]  # the cell model trains with it
    flat["samples_per_seed"], flat["cfg_scale"] = n, args.cfg_scale
    print_table(rows, ["variant", "entities", "fid", "nfe", "head_evals"])
    print("wrote", write_results("xar", flat, meta(args.quick, seeds)))


if __name__ == "__main__":
    main()
