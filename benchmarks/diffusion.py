#!/usr/bin/env python
"""Every diffusion sampler of issue 8 on the embedded digits, side by side in one run.

    python -m benchmarks.diffusion [--quick] [--parts image,minority,lsd,fkc_target,fkc_images]

One root (runs/bench_diffusion_{quick,full}) holds every model, trained or resumed:

- ``image`` (benchmarks/diffusion_image.py): the digits DDPM; ``ts.*`` DDIM-10 with and without
  the exposure-bias time shift, ``cfg.*`` vs ``fkc.*`` (FKC-CFG) at equal network evaluations;
- ``minority`` (benchmarks/diffusion_minority.py): a noisy level classifier for that same DDPM;
  ``minority.<w>.cfid_mean`` (FID vs the top-decile minority reference set, the paper's metric),
  ``fid_mean`` (vs held-out) and ``score_mean`` (mean minority score) at w = 0, 1, 3;
- ``lsd`` (benchmarks/diffusion_lsd.py): masked diffusion on VQ ids, the many-step teacher, Euler
  at 8 / 4 steps and the distilled LSD / LSD+ students at 8 / 4 steps, and ``lsd.toy.*``;
- ``fkc_target`` (benchmarks/diffusion_fkc_target.py): FKC-CFG vs plain CFG against FKC's own
  target p_c^w p_u^(1-w) on analytic Gaussian mixtures at equal NFE;
- ``fkc_images`` (benchmarks/diffusion_fkc_images.py): the same comparison on the digits DDPM,
  against real images reweighted by an independent classifier's p(c|x)^w.

FIDs are mean and std over 3 sampling seeds against the held-out split (classifier features).
Writes benchmarks/results/diffusion.json with the issue's keys plus each part's extra ones; the
keys of parts not in ``--parts`` are carried over from that part's own results file
(``diffusion_<part>.json``, when the part's script was run alone) or else from the diffusion.json
already there (``meta.parts``: the parts this run measured; ``meta.carried``: the source and meta
of each part it kept).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from benchmarks.common import RESULTS, ROOT, meta, print_table, train, write_results

PARTS = ("image", "minority", "lsd", "fkc_target", "fkc_images")
# the key prefixes each part writes (for carrying over the parts a run leaves out)
PREFIXES = {
    "image": ("ts.", "cfg.", "cfg_same_steps.", "fkc.", "samples_per_seed"),
    "minority": ("minority.",),
    "lsd": ("lsd.",),
    "fkc_target": ("fkc_target.",),
    "fkc_images": ("fkc_images.",),
}
# The keys the issue asks for, in the order of its list (the table prints these).
HEADLINE = (
    "ts.fid_ddim10",
    "ts.fid_ddim10_shifted",
    "cfg.fid",
    "fkc.fid",
    "minority.unguided.cfid_mean",
    "minority.w1.cfid_mean",
    "minority.guided.cfid_mean",
    "minority.guided.fid_mean",
    "lsd.teacher.fid_mean",
    "lsd.euler8.fid_mean",
    "lsd.student8.fid_mean",
    "lsd.euler4.fid_mean",
    "lsd.student4.fid_mean",
    "fkc_target.mixture.fkc_100x4.w1",
    "fkc_target.mixture.cfg_400.w1",
    "fkc_images.w3.0.fkc_8x4.fd",  # quick (64 NFE)
    "fkc_images.w3.0.cfg_32.fd",
    "fkc_images.w3.0.fkc_25x4.fd",  # full (200 NFE)
    "fkc_images.w3.0.cfg_100.fd",
)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer samples and training steps")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    args = p.parse_args(argv)
    parts = [s for s in args.parts.split(",") if s]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        p.error(f"unknown part(s) {unknown}; choose from {PARTS}")
    torch.set_num_threads(1)
    from benchmarks import (
        diffusion_fkc_images,
        diffusion_fkc_target,
        diffusion_image,
        diffusion_lsd,
        diffusion_minority,
    )

    root = os.path.join(ROOT, "runs", f"bench_diffusion_{'quick' if args.quick else 'full'}")
    flat: dict = {}
    if "image" in parts:  # trains (or resumes) the DDPM into <root>/bench_ddpm
        flat.update(diffusion_image.run(args.quick, root))
    if "minority" in parts:  # guides that same DDPM
        ddpm = train("digits_ddpm", os.path.join(root, "bench_ddpm"), args.quick, quick_steps=800)
        flat.update(diffusion_minority.run(args.quick, root, ddpm))
    if "lsd" in parts:
        flat.update(diffusion_lsd.run(args.quick, root))
    if "fkc_target" in parts:
        flat.update(diffusion_fkc_target.run(args.quick))
    if "fkc_images" in parts:  # the same DDPM again
        flat.update(diffusion_fkc_images.run(args.quick, os.path.join(root, "bench_ddpm"))[0])
    carried = _carry_over(flat, [q for q in PARTS if q not in parts])

    rows = []
    for key in HEADLINE:
        if key in flat:
            std = flat.get(key.removesuffix("_mean") + "_std", flat.get(f"{key}_std"))
            rows.append({"key": key, "value": flat[key], "std": std, "nfe": _nfe(flat, key)})
    print_table(rows, ["key", "value", "std", "nfe"])
    info = {**meta(args.quick, range(3)), "parts": parts, "carried": carried}
    path = write_results("diffusion", flat, info)
    print(f"wrote {path}")


def _carry_over(flat: dict, parts: list) -> dict:
    """Copy the keys of ``parts`` into ``flat`` from the part's own results file
    (``diffusion_<part>.json``, written by running that script alone) where it has them, else from
    the diffusion.json already there; returns {part: the source file's meta}."""
    carried = {}
    for part in parts:
        for name in (f"diffusion_{part}.json", "diffusion.json"):
            path = os.path.join(RESULTS, name)
            if not os.path.exists(path):
                continue
            with open(path) as f:
                old = json.load(f)
            keys = [k for k in old if k != "meta" and k.startswith(PREFIXES[part])]
            if keys:
                flat.update({k: old[k] for k in keys})
                carried[part] = {"file": name, **old.get("meta", {})}
                break
    return carried


def _nfe(flat: dict, key: str):
    """The NFE entry that belongs to a headline key, where the part recorded one."""
    group, name = key.split(".", 1)
    what = name.removeprefix("fid_")
    method = key.rsplit(".", 1)[0]
    for cand in (f"{method}.nfe", f"{group}.nfe_{what}", f"{group}.{what}_nfe", f"{group}.nfe"):
        if cand in flat:
            return flat[cand]
    return None


if __name__ == "__main__":
    main()
