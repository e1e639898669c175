#!/usr/bin/env python
"""TS-DPM window sweep per schedule, image size and step count, on exact denoisers.

    python -m benchmarks.ts_window

The reference window (80) is its CIFAR-10 cosine DDIM-5 setting. For the linear and cosine
schedules, 256 and 3072 entries per image and DDIM-5 / DDIM-10 this reports, per variance
rule (paper: 1 - abar; corrected: abar Var(x0) + 1 - abar), the window
:func:`vargen.diffusion.time_shift.calibrate_window` picks and the relative variance error
|Var(x0_gen) / Var(x0) - 1| of every candidate window on the exact Gaussian denoiser
(``sweep``), then the Wasserstein-1 distance of the per-entry marginal for a bimodal
mixture (0.5 N(-0.6, 0.05) + 0.5 N(0.6, 0.05), Var 0.41; exact denoiser) with no shift, the
reference window and the calibrated one. Writes benchmarks/results/ts_window.json.
"""

from __future__ import annotations

import torch

from benchmarks.common import meta, print_table, write_results


def main():
    torch.set_num_threads(1)
    from scipy.stats import wasserstein_distance

    from vargen.diffusion.analytic import GaussianMixtureDenoiser
    from vargen.diffusion.loops import ddim_sample
    from vargen.diffusion.schedules import cosine_alphas_cumprod, linear_alphas_cumprod
    from vargen.diffusion.time_shift import ExposureBiasTimeShift, calibrate_window

    w, mu, var, data_var = [0.5, 0.5], [-0.6, 0.6], [0.05, 0.05], 0.41
    g = torch.Generator().manual_seed(0)
    data = torch.where(torch.rand(200_000, generator=g) < 0.5, -0.6, 0.6)
    data = (data + 0.05**0.5 * torch.randn(200_000, generator=g)).numpy()
    flat, rows = {}, []
    for sched, abar in (("linear", linear_alphas_cumprod()), ("cosine", cosine_alphas_cumprod())):
        den = GaussianMixtureDenoiser(w, mu, var, abar)
        for D in (256, 3072):
            for steps in (5, 10):
                key = f"{sched}.{D}.ddim{steps}"
                for rule in ("paper", "corrected"):
                    win, err = calibrate_window(abar, D, steps, variance=rule, data_var=data_var)
                    flat[f"{key}.{rule}.window"] = win
                    flat[f"{key}.{rule}.sweep"] = {str(k): round(v, 4) for k, v in err.items()}
                    w1 = {}
                    for name, window in (("none", 0), ("ref80", 80), ("calibrated", win)):
                        ts = ExposureBiasTimeShift(window, 300, rule, data_var) if window else None
                        x, _ = ddim_sample(den, (51_200 // D, D), steps, torch.Generator().manual_seed(1),
                                           abar, hook=ts)  # fmt: skip
                        w1[name] = wasserstein_distance(x.flatten().numpy(), data)
                        flat[f"{key}.{rule}.w1_{name}"] = w1[name]
                    rows.append({"setting": f"{key} {rule}", "window": win, "var_err@0": err[0],
                                 "var_err@win": err[win], "w1 none": w1["none"], "w1 80": w1["ref80"],
                                 "w1 win": w1["calibrated"]})  # fmt: skip
                    print(rows[-1], flush=True)
    print_table(rows, ["setting", "window", "var_err@0", "var_err@win", "w1 none", "w1 80", "w1 win"])
    print(f"wrote {write_results('ts_window', flat, meta(False, [1]))}")


if __name__ == "__main__":
    main()
