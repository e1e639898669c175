#!/usr/bin/env python
"""Draw images from a trained generator checkpoint.

    python sample.py --ckpt runs/digits_ar [key=value ...]
    python sample.py --ckpt runs/digits_ar num_samples=1000 fid=true sampler.cfg_scale=2.0

Writes <out>/samples.png (a grid, one class per column), samples.npz (uint8 images,
labels, token ids) and metrics.json (sampler stats; FID when fid=true). The same seed
gives the same images on the same machine.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="generator weights file or run directory")
    p.add_argument("--config", default=None, help="optional YAML with sampling settings")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. num_samples=100 sampler.top_k=10")
    args = p.parse_args(argv)

    from vargen.config import ConfigError, load_config
    from vargen.data import DataError
    from vargen.sampling.generate import SampleConfig, default_sampler, run_sampling
    from vargen.train.checkpoint import CheckpointError

    try:
        base = {"sampler": {"name": default_sampler(args.ckpt)}}
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        cfg = load_config(SampleConfig, args.config, args.overrides, base=base)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2

    try:
        run_sampling(args.ckpt, cfg, log=lambda m: print(m, flush=True))
    except (CheckpointError, DataError, ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
