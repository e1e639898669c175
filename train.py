#!/usr/bin/env python
"""Train any registered component from a config.

    python train.py --config configs/digits_vq.yaml [key=value ...]
    torchrun --nproc_per_node 2 train.py --config configs/digits_ar.yaml

The config's ``task`` picks what is trained (tokenizer, generator, feature_net); an
unknown key or a wrong type exits with status 2 before any work, naming the key.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config (may list 'defaults:' to compose)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=200")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = p.parse_args(argv)

    from omegaconf import OmegaConf

    from vargen.config import ConfigError, load_run_config, resolve_paths

    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        cfg = load_run_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    resolve_paths(cfg)
    if args.print_config:
        print(OmegaConf.to_yaml(cfg))
        return 0

    from vargen.data import DataError
    from vargen.train.checkpoint import CheckpointError
    from vargen.train.loop import TrainingError
    from vargen.train.tasks import run

    if rank0:  # config.yaml is written by the run once it is accepted (not locked, not refused)
        print(f"[{cfg.task}] out_dir {cfg.out_dir}", flush=True)
    log = (lambda m: print(m, flush=True)) if rank0 else (lambda m: None)
    try:
        run(cfg, log=log)
    except (TrainingError, CheckpointError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
