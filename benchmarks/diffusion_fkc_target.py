#!/usr/bin/env python
"""FKC-CFG vs plain CFG against FKC's own target on analytic Gaussian mixtures, at equal NFE.

    python -m benchmarks.diffusion_fkc_target [--quick]

CFG with scale w is meant to sample p_c^w p_u^(1-w) (normalised), which FID against data does not
measure. Here the conditional and unconditional data are 1-D Gaussian mixtures with the exact
eps-denoisers of vargen/diffusion/analytic.py on the linear DDPM grid (T = 1000), so that target
is known on a grid (quadrature) and each sampler's output is compared with it:
Wasserstein-1 (from the CDFs), TV over 0.25-wide bins, the error in the mass left of 0 (the mode
weights guidance reshapes) and the mean / variance errors. Samplers are the sampler-side FKC
(vargen.diffusion.fkc.fkc_cfg_ddpm, as sampler ``fkc_cfg`` runs it): FKC with S steps x K
particles against the same ancestral CFG chain without weights at S K steps (equal network
evaluations per output sample, 2 S K) and at S steps. Mean and std over seeds.
Writes benchmarks/results/diffusion_fkc_target.json (``fkc_target.*``).
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch

from benchmarks.common import meta, print_table, write_results

# (unconditional (weights, means, variances), conditional, w): a Gaussian pair (the target is
# Gaussian) and overlapping two-mode mixtures whose condition prefers and narrows the left mode.
CASES = {
    "gauss": (([1.0], [1.0], [1.0]), ([1.0], [1.5], [0.3]), 2.0),
    "mixture": (([0.5, 0.5], [-1.0, 1.0], [1.0, 1.0]), ([0.8, 0.2], [-1.0, 1.0], [0.5, 0.5]), 3.0),
}
UNCOND, COND = CASES["mixture"][:2]
GRID = torch.linspace(-10, 10, 40001, dtype=torch.float64)


def target_density(w: float, grid=GRID) -> torch.Tensor:
    """p_c^w p_u^(1-w) on ``grid``, normalised (quadrature)."""

    def mix(ws, ms, vs):
        comps = [
            wi * torch.exp(-0.5 * (grid - m) ** 2 / v) / math.sqrt(2 * math.pi * v)
            for wi, m, v in zip(ws, ms, vs)
        ]
        return sum(comps)

    d = mix(*COND) ** w * mix(*UNCOND) ** (1 - w)
    return d / (d.sum() * (grid[1] - grid[0]))


def errors(x_N: torch.Tensor, w: float) -> dict:
    """Distances of the samples ``x_N`` (N,) to the target for scale ``w``."""
    dx = float(GRID[1] - GRID[0])
    dens = target_density(w)
    cdf_t = torch.cumsum(dens, 0) * dx
    x = x_N.double().sort().values
    cdf_e = torch.searchsorted(x, GRID, right=True).double() / x.numel()
    w1 = float((cdf_e - cdf_t).abs().sum() * dx)
    edges = torch.arange(-6, 6.001, 0.25, dtype=torch.float64)
    idx = torch.searchsorted(GRID, edges)
    mass_t = torch.tensor([float(dens[a:b].sum() * dx) for a, b in zip(idx[:-1], idx[1:])])
    mass_e = torch.histc(x.clamp(-6, 6), bins=len(edges) - 1, min=-6, max=6) / x.numel()
    tv = 0.5 * float((mass_e - mass_t).abs().sum() + (1 - mass_t.sum()))
    mean_t = float((GRID * dens).sum() * dx)
    var_t = float(((GRID - mean_t) ** 2 * dens).sum() * dx)
    left_t = float(dens[GRID < 0].sum() * dx)
    return {
        "w1": w1,
        "tv": tv,
        "left_mass_err": abs(float((x < 0).double().mean()) - left_t),
        "mean_err": abs(float(x.mean()) - mean_t),
        "var_err": abs(float(x.var()) - var_t),
    }


def sample(w: float, steps: int, particles: int, weighted: bool, n: int, seed: int) -> torch.Tensor:
    """n draws (n,) of the FKC-CFG chain (``weighted``) or plain CFG on the exact mixture denoisers."""
    from vargen.diffusion.analytic import GaussianMixtureDenoiser
    from vargen.diffusion.fkc import fkc_cfg_ddpm
    from vargen.diffusion.schedules import linear_alphas_cumprod

    abar = linear_alphas_cumprod(1000)
    cond, unc = GaussianMixtureDenoiser(*COND, abar), GaussianMixtureDenoiser(*UNCOND, abar)

    def pair(x, t_B):
        return cond(x, t_B), unc(x, t_B)

    g = torch.Generator().manual_seed(seed)
    x, _ = fkc_cfg_ddpm(
        pair, (n * particles, 1), particles, abar, steps, w, g, weighted=weighted, backend="torch"
    )
    return x.flatten()


# name: (steps, particles, weighted); network evaluations per output sample = 2 steps particles
METHODS = {
    "fkc_25x4": (25, 4, True),
    "cfg_100": (100, 1, False),
    "cfg_25": (25, 1, False),
    "fkc_100x4": (100, 4, True),
    "cfg_400": (400, 1, False),
}


def run(quick: bool) -> dict:
    """Every case x method x seed; returns the flat results (``fkc_target.<case>.<method>.<metric>``)."""
    global UNCOND, COND
    n, seeds = (2000 if quick else 8000), (0, 1, 2)
    flat, rows = {"fkc_target.samples_per_seed": n}, []
    for case, (unc, cond, w) in CASES.items():
        UNCOND, COND = unc, cond
        flat[f"fkc_target.{case}.w"] = w
        for name, (steps, particles, weighted) in METHODS.items():
            errs = [errors(sample(w, steps, particles, weighted, n, s), w) for s in seeds]
            row = {"case": case, "method": name, "nfe": 2 * steps * particles}
            flat[f"fkc_target.{case}.{name}.nfe"] = 2 * steps * particles
            for k in errs[0]:
                vals = [e[k] for e in errs]
                flat[f"fkc_target.{case}.{name}.{k}"] = statistics.mean(vals)
                flat[f"fkc_target.{case}.{name}.{k}_std"] = statistics.stdev(vals)
                row[k] = f"{statistics.mean(vals):.4f} ± {statistics.stdev(vals):.4f}"
            rows.append(row)
        floor = errors(torch.tensor(_target_draws(w, n)), w)  # exact draws: the sampling-noise floor
        for k, v in floor.items():
            flat[f"fkc_target.{case}.exact_draws.{k}"] = v
        rows.append({"case": case, "method": "exact draws", **{k: f"{v:.4f}" for k, v in floor.items()}})
    print_table(rows, ["case", "method", "nfe", "w1", "tv", "left_mass_err", "mean_err", "var_err"])
    return flat


def _target_draws(w: float, n: int) -> list:
    """n exact draws from the target (inverse CDF on the grid, fixed seed): the sampling-noise floor."""
    dx = float(GRID[1] - GRID[0])
    cdf = torch.cumsum(target_density(w), 0) * dx
    u = torch.rand(n, generator=torch.Generator().manual_seed(12345), dtype=torch.float64)
    return GRID[torch.searchsorted(cdf, u).clamp_max(GRID.numel() - 1)].tolist()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2000 instead of 8000 samples per seed")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    flat = run(args.quick)
    print("wrote", write_results("diffusion_fkc_target", flat, meta(args.quick, (0, 1, 2))))


if __name__ == "__main__":
    main()
