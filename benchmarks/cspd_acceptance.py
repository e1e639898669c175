#!/usr/bin/env python
"""Why CSpD accepts nothing on a trained pair, and what raises acceptance (issue 16 item 6).

    python -m benchmarks.cspd_acceptance [--root runs/bench_cspd_quick] [--reps 8]

Uses the digits target/draft pair of ``benchmarks.cspd`` (``prepare(quick=True, root=...)``,
trained if missing). Part 1, diagnosis at one position on target samples: the last reverse
step's std, |mu_p - mu_q| per dim, the log-ratio of ``verify="last"`` and of ``verify="path"``
and each reverse step's share of the path log-ratio, for both head variances. Part 2, wall time
(one thread): CSpD (KV-cached) vs the target's plain ``xar`` sampler at batch 1 and 16, with
acceptance, alpha, target calls per image and syncs per sample; the baseline runs with the
same head variance (the target distribution CSpD then samples).
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks import cspd


@torch.no_grad()
def diagnose(t, d, n=64, pos=8, S=25):
    from vargen.sampling.decoders.xar import sample_xar

    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % t.num_classes
    tok, _ = sample_xar(t, y, generator=g)
    zp, zq = t.entity_conditions(tok, y)[:, pos], d.entity_conditions(tok, y)[:, pos]
    C = t.cfg.code_dim
    for var in ("beta_tilde", "beta"):
        x_T, nz = torch.randn(n, C, generator=g), torch.randn(S, n, C, generator=g)
        q = d.head.reverse_trajectory(zq, x_T, nz, return_path=True, variance=var)
        p = t.head.reverse_trajectory(zp, x_T, nz, return_path=True, variance=var)
        std = t.head.step_stds(S, 1.0, var)
        dm = (q["mean_last"] - p["mean_last"]).abs()
        lr_last = ((q["x0"] - q["mean_last"]).pow(2) - (q["x0"] - p["mean_last"]).pow(2)).sum(-1) / (
            2 * std[-1] ** 2
        )
        nxt = torch.cat([q["path"][1:], q["x0"][None]])
        mp = t.head.path_means(zp, q["path"])
        step = ((nxt - q["means"]).pow(2).sum(-1) - (nxt - mp).pow(2).sum(-1)) / (
            2 * std[:, None] ** 2
        )  # (S, n)
        lr_path = step.sum(0)
        print(
            f"[{var}] last-step std {float(std[-1]):.4f}, second-to-last {float(std[-2]):.4f}; "
            f"|mu_p - mu_q| per dim mean {float(dm.mean()):.3f} median {float(dm.median()):.3f}"
        )
        for name, lr in (("last", lr_last), ("path", lr_path)):
            q10, q50, q90 = (float(v) for v in lr.quantile(torch.tensor([0.1, 0.5, 0.9], dtype=lr.dtype)))
            print(
                f"  verify={name}: log r quantiles 10/50/90% {q10:.1f} / {q50:.1f} / {q90:.1f}; "
                f"E[min(1, r)] {float(lr.clamp(max=0).exp().mean()):.3f}"
            )
        print("  path log r by step (mean, last 4 steps):", [round(float(v), 2) for v in step.mean(1)[-4:]])


def wall(t, d, reps, variance, verify, gamma, K):
    from vargen.sampling.decoders.xar import sample_xar
    from vargen.sampling.speculative.cspd import sample_cspd

    old = t.head.sample_variance
    t.head.sample_variance = variance
    try:
        for B in (1, 16):
            y = torch.arange(B) % t.num_classes
            n_rep = reps if B == 1 else max(1, reps // 4)
            t0 = time.perf_counter()
            for r in range(n_rep):
                sample_xar(t, y, generator=torch.Generator().manual_seed(r))
            base = time.perf_counter() - t0
            t0, sts = time.perf_counter(), []
            for r in range(n_rep):
                g = torch.Generator().manual_seed(r)
                sts.append(
                    sample_cspd(t, d, y, generator=g, gamma=gamma, verify=verify, variance=variance, K=K)[1]
                )
            sec = time.perf_counter() - t0
            acc = sum(s["accepted"] for s in sts) / max(1, sum(s["proposed"] for s in sts))

            def mean(k, sts=sts):
                return sum(s[k] for s in sts) / len(sts)

            print(
                f"  b{B} verify={verify} variance={variance} gamma={gamma} K={K}: acceptance {acc:.3f} "
                f"alpha {mean('alpha'):.3f} wall_ratio {base / sec:.2f} target calls/image "
                f"{mean('target_calls_per_image'):.1f} (xar {t.length}) "
                f"syncs/sample {mean('syncs_per_sample'):.1f}",
                flush=True,
            )
    finally:
        t.head.sample_variance = old


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=None, help="pair root for cspd.prepare (default runs/bench_cspd_quick)")
    p.add_argument("--reps", type=int, default=8)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    env = cspd.prepare(True, args.root)
    t, d = env["target"].eval(), env["draft"].eval()
    diagnose(t, d)
    for variance, verify, K in (("beta_tilde", "last", 16), ("beta_tilde", "path", 4), ("beta", "path", 4)):
        wall(t, d, args.reps, variance, verify, 4, K)


if __name__ == "__main__":
    main()
