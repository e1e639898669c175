#!/usr/bin/env python
"""LSD / LSD+ students vs the Euler sampler of a masked diffusion model, on digits, and the
objective on the enumerable toy.

    python -m benchmarks.diffusion_lsd [--quick]

Trains (or resumes) into runs/bench_lsd_{quick,full}: the VQ tokenizer (configs/digits_vq.yaml),
the masked diffusion model (configs/digits_mdm.yaml) and, from its 64-step Euler sampler as the
teacher (configs/digits_lsd.yaml, the own-trajectory objective), students: LSD+
(coefficients and step sizes) at 8 and 4 steps, LSD (coefficients only) at 4, and a 4-step LSD+
student with the earlier ``teacher_forced`` objective. Samples class-balanced sets, without
guidance, with the teacher, the uniform Euler sampler at 8 and 4 steps and each student
(:func:`benchmarks.common.sweep`: FID mean and std over 3 sampling seeds vs the held-out split,
model forwards per batch). ``lsd.toy.*``: exact TV to p0 on the enumerable toy of tests/test_lsd.py
(L = 2, V = 3, exact network) of the 4-step base sampler, of the students the objectives distil
(LSD, and LSD+ for the own-trajectory ones) and of the coefficients that minimise the TV directly;
``--toy`` recomputes only these (seconds to minutes) and carries the rest of the file over.
Writes benchmarks/results/diffusion_lsd.json.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from benchmarks.common import (
    RESULTS,
    ROOT,
    Method,
    flat_results,
    meta,
    print_table,
    sweep,
    train,
    write_results,
)

TEACHER_STEPS = 64
SEEDS = (0, 1, 2)
# (name, student steps, LSD+, objective)
STUDENTS = (
    ("student8", 8, True, "own_trajectory"),
    ("student4", 4, True, "own_trajectory"),
    ("student4_lsd", 4, False, "own_trajectory"),
    ("student4_teacher_forced", 4, True, "teacher_forced"),
)


def toy(n: int = 4, iters: int = 100, batch: int = 4096, teacher_steps: int = 64) -> dict:
    """Exact TVs on the enumerable toy (module docstring); deterministic (fixed generators)."""
    from tests.test_lsd import EPS, L, V, exact_terminal, toy_logp0, tv_to_p0
    from vargen.diffusion.absorbing import all_mask, sample_chain, uniform_times
    from vargen.diffusion.lsd import (
        distill_loss,
        score_l2_loss,
        student_rollout,
        student_times,
        teacher_forced_loss,
    )

    teacher_times = uniform_times(teacher_steps, EPS)

    def distil(objective: str, plus: bool):
        coef, logits = torch.nn.Parameter(torch.ones(n)), torch.nn.Parameter(torch.zeros(n))
        opt = torch.optim.Adam([coef] + ([logits] if plus else []), lr=0.02)
        for it in range(iters):
            g = torch.Generator().manual_seed(it)
            x_T = all_mask(batch, L, V)
            _, teacher = sample_chain(toy_logp0, x_T, teacher_times, EPS, g, record=True)
            times = student_times(logits, EPS)
            if objective == "teacher_forced":
                loss = teacher_forced_loss(toy_logp0, teacher, teacher_times, times, coef, EPS)[0]
            else:
                own, own_logp0 = student_rollout(toy_logp0, x_T, times, coef, EPS, g)
                loss_fn = score_l2_loss if objective == "score_l2" else distill_loss
                loss = loss_fn(own_logp0, own, toy_logp0, teacher, teacher_times, times, coef, EPS)[0]
            opt.zero_grad()
            loss.backward()
            opt.step()
        times = student_times(logits, EPS).detach()
        return tv_to_p0(exact_terminal(times, coef.detach())), coef.detach().tolist(), times.tolist()

    base = uniform_times(n, EPS)
    out = {"lsd.toy.steps": n, "lsd.toy.tv_base": tv_to_p0(exact_terminal(base))}
    for name, objective, plus in (
        ("own_trajectory_lsd", "own_trajectory", False),
        ("own_trajectory_lsd_plus", "own_trajectory", True),
        ("score_l2_lsd", "score_l2", False),
        ("score_l2_lsd_plus", "score_l2", True),
        ("teacher_forced_lsd", "teacher_forced", False),
    ):
        tv, coef, times = distil(objective, plus)
        out[f"lsd.toy.tv_{name}"], out[f"lsd.toy.coef_{name}"] = tv, coef
        if plus:
            out[f"lsd.toy.times_{name}"] = times
    coef = torch.nn.Parameter(torch.ones(n, dtype=torch.float64))  # direct TV minimisation
    opt = torch.optim.Adam([coef], lr=0.02)
    for _ in range(300):
        tv = _tv_exact(exact_terminal(base, coef), V)
        opt.zero_grad()
        tv.backward()
        opt.step()
    out["lsd.toy.tv_direct"] = tv_to_p0(exact_terminal(base, coef.detach()))
    out["lsd.toy.coef_direct"] = coef.detach().tolist()
    return out


def _tv_exact(d, V):
    """Differentiable TV to the toy's p0 (the masked mass counts as error)."""
    from tests.test_lsd import P0

    clean = d.view(V + 1, V + 1)[:V, :V]
    return 0.5 * ((clean - P0.double()).abs().sum() + (1 - clean.sum()))


def run(quick: bool, root: str) -> dict:
    """Train what is missing under ``root``, sample every method; returns the flat results."""
    from vargen.checkpoint import load_component, load_tokenizer_for
    from vargen.eval import FIDEvaluator
    from vargen.sampling.decoders.mdm import sample_lsd, sample_mdm
    from vargen.sampling.generate import class_labels

    vq = train("digits_vq", os.path.join(root, "vq"), quick)
    mdm = train("digits_mdm", os.path.join(root, "mdm"), quick, [f"tokenizer_ckpt={vq}"], quick_steps=1000)
    distil = [f"teacher_ckpt={mdm}", f"teacher_steps={TEACHER_STEPS}"]
    distil += ["train.batch_size=32"] if quick else []
    students = {}
    for name, n, plus, objective in STUDENTS:
        over = [*distil, f"model.student_steps={n}", f"model.learn_steps={str(plus).lower()}"]
        over += [f"objective={objective}"]
        students[name] = train("digits_lsd", os.path.join(root, name), quick, over, quick_steps=40)
    model, cfg = load_component(mdm)
    tok = load_tokenizer_for(cfg)
    evaluator = FIDEvaluator.for_dataset(dict(cfg.data), split="heldout")
    n_samples, batch = (200 if quick else 1000), 250
    labels = class_labels(n_samples, model.num_classes, [])

    def euler(steps):
        return Method(model, tok, lambda m, c, g: sample_mdm(m, c, generator=g, steps=steps))

    methods = {"lsd.teacher": euler(TEACHER_STEPS), "lsd.euler8": euler(8), "lsd.euler4": euler(4)}
    for name, path in students.items():
        methods[f"lsd.{name}"] = Method(
            load_component(path)[0], tok, lambda m, c, g: sample_lsd(m, c, generator=g)
        )
    swept = sweep(methods, labels, list(SEEDS), evaluator, batch)
    flat = flat_results(swept)
    rows = [
        {
            "sampler": k,
            "fid": f"{r['fid_mean']:.2f} ± {r['fid_std']:.2f}",
            "nfe": r["nfe"],
            "seconds": r["seconds"],
        }
        for k, r in swept.items()
    ]
    for name, path in students.items():
        ev = json.load(open(os.path.join(path, "eval.json")))
        flat[f"lsd.{name}.distill_loss"] = ev["eval_loss"]
        flat[f"lsd.{name}.distill_loss_base"] = ev["eval_loss_base"]
        sched = json.load(open(os.path.join(path, "lsd_schedule.json")))
        flat[f"lsd.{name}.coef"], flat[f"lsd.{name}.times"] = sched["coef"], sched["times"]
    flat["lsd.samples_per_seed"] = n_samples
    print_table(rows, ["sampler", "fid", "nfe", "seconds"])
    flat.update(toy())
    print({k: v for k, v in flat.items() if k.startswith("lsd.toy.tv")})
    return flat


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short training runs and 200 samples per seed")
    p.add_argument("--toy", action="store_true", help="recompute only lsd.toy.* (the rest carried over)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.toy:
        path = os.path.join(RESULTS, "diffusion_lsd.json")
        old = json.load(open(path))
        flat = {k: v for k, v in old.items() if not k.startswith("lsd.toy.") and k != "meta"} | toy()
        print({k: v for k, v in flat.items() if k.startswith("lsd.toy.tv")})
        print(
            "wrote", write_results("diffusion_lsd", flat, old["meta"] | {"toy_rerun": meta(True, [])["date"]})
        )
        return
    root = os.path.join(ROOT, "runs", f"bench_lsd_{'quick' if args.quick else 'full'}")
    flat = run(args.quick, root)
    print("wrote", write_results("diffusion_lsd", flat, meta(args.quick, SEEDS)))


if __name__ == "__main__":
    main()
