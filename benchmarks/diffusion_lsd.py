#!/usr/bin/env python
"""LSD / LSD+ students vs the Euler sampler of a masked diffusion model, on digits.

    python benchmarks/diffusion_lsd.py [--quick]

Trains (or resumes) into runs/bench_lsd_{quick,full}: the VQ tokenizer (configs/digits_vq.yaml),
the masked diffusion model (configs/digits_mdm.yaml) and, from its 64-step Euler sampler as the
teacher (configs/digits_lsd.yaml), students for 8 and 4 steps: LSD+ (coefficients and step sizes)
and LSD (coefficients only). Samples class-balanced sets, without guidance, with the teacher, the
uniform Euler sampler at 8 and 4 steps and each student: FID (mean and std over 3 sampling seeds,
vs the held-out split) and model forwards per sample (nfe). Writes
benchmarks/results/diffusion_lsd.json (the issue's ``lsd.*`` keys).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, meta, print_table, train, write_results  # noqa: E402

TEACHER_STEPS = 64


def run(quick: bool, root: str) -> dict:
    """Train what is missing under ``root``, sample every method; returns the flat results."""
    from vargen.checkpoint import load_component, load_tokenizer_for
    from vargen.eval import FIDEvaluator
    from vargen.sampling.decoders.mdm import sample_lsd, sample_mdm
    from vargen.sampling.generate import class_labels, generate

    vq = train("digits_vq", os.path.join(root, "vq"), quick)
    mdm = train("digits_mdm", os.path.join(root, "mdm"), quick, [f"tokenizer_ckpt={vq}"], quick_steps=1000)
    distil = [f"teacher_ckpt={mdm}", f"teacher_steps={TEACHER_STEPS}"]
    distil += ["train.batch_size=32"] if quick else []
    students = {}
    for n in (8, 4):
        for plus in (True, False):
            name = f"student{n}" + ("" if plus else "_lsd")
            over = [*distil, f"model.student_steps={n}", f"model.learn_steps={str(plus).lower()}"]
            students[name] = train("digits_lsd", os.path.join(root, name), quick, over, quick_steps=40)
    model, cfg = load_component(mdm)
    tok = load_tokenizer_for(cfg)
    evaluator = FIDEvaluator.for_dataset(dict(cfg.data), split="heldout")
    n_samples, seeds, batch = (200 if quick else 1000), [0, 1, 2], 250
    labels = class_labels(n_samples, model.num_classes, [])

    def euler(steps):
        return model, lambda m, c, g: sample_mdm(m, c, generator=g, steps=steps)

    methods = {"teacher": euler(TEACHER_STEPS), "euler8": euler(8), "euler4": euler(4)}
    for name, path in students.items():
        methods[name] = (load_component(path)[0], lambda m, c, g: sample_lsd(m, c, generator=g))
    flat, rows = {}, []
    for name, (net, fn) in methods.items():
        fids, fwd, sec = [], 0, 0.0
        for seed in seeds:
            t0 = time.perf_counter()
            images, _, st = generate(net, tok, labels, fn, torch.Generator().manual_seed(seed), batch)
            sec += time.perf_counter() - t0
            fids.append(evaluator.score(images))
            fwd += st["target_forwards"]
        flat[f"lsd.fid_{name}"] = statistics.mean(fids)
        flat[f"lsd.fid_{name}_std"] = statistics.stdev(fids)
        flat[f"lsd.nfe_{name}"] = fwd / (len(seeds) * -(-n_samples // batch))
        flat[f"lsd.seconds_{name}"] = sec
        fid = f"{flat[f'lsd.fid_{name}']:.2f} ± {flat[f'lsd.fid_{name}_std']:.2f}"
        rows.append({"sampler": name, "fid": fid, "nfe": flat[f"lsd.nfe_{name}"], "seconds": sec})
    for name, path in students.items():
        ev = json.load(open(os.path.join(path, "eval.json")))
        flat[f"lsd.distill_loss_{name}"] = ev["eval_loss"]
        flat[f"lsd.distill_loss_base_{name}"] = ev["eval_loss_base"]
        sched = json.load(open(os.path.join(path, "lsd_schedule.json")))
        flat[f"lsd.coef_{name}"], flat[f"lsd.times_{name}"] = sched["coef"], sched["times"]
    flat["lsd.samples_per_seed"] = n_samples
    print_table(rows, ["sampler", "fid", "nfe", "seconds"])
    return flat


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short training runs and 200 samples per seed")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    root = os.path.join(ROOT, "runs", f"bench_lsd_{'quick' if args.quick else 'full'}")
    flat = run(args.quick, root)
    print("wrote", write_results("diffusion_lsd", flat, meta(args.quick, [0, 1, 2])))


if __name__ == "__main__":
    main()
