"""Command lines: ``vargen-train`` / ``train.py``, ``vargen-sample`` / ``sample.py``, ``vargen plot`` and
``python -m vargen {train,sample,plot}``; every spelling runs the same ``main`` function.

Heavy imports happen inside the functions, after argument parsing, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import os
import sys

TRAIN_DOC = """Train any registered component from a config.

    vargen-train --config configs/digits_vq.yaml [key=value ...]      (or: python train.py ...)
    torchrun --nproc_per_node 2 train.py --config configs/digits_ar.yaml

The config's ``task`` picks what is trained (tokenizer, generator, feature_net); an
unknown key or a wrong type exits with status 2 before any work, naming the key.
"""

SAMPLE_DOC = """Draw images from a trained generator checkpoint.

    vargen-sample --ckpt runs/digits_ar [key=value ...]                (or: python sample.py ...)
    vargen-sample --ckpt runs/digits_ar num_samples=1000 fid=true sampler.cfg_scale=2.0
    torchrun --nproc_per_node 4 sample.py --ckpt runs/digits_ar num_samples=50000 fid=true

Writes <out>/samples.png (a grid, one class per column), samples.npz (uint8 images,
labels, token ids) and metrics.json (sampler stats; FID when fid=true). The same seed
gives the same images on the same machine. Under torchrun the samples are split across
the ranks (rank r draws a contiguous share with its own seed derived from seed and r),
gathered on rank 0, and written (and scored) once.
"""


def train_main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="vargen-train", description=TRAIN_DOC, formatter_class=argparse.RawDescriptionHelpFormatter
    )
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

    from vargen.checkpoint import CheckpointError
    from vargen.data import DataError
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


def sample_main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="vargen-sample", description=SAMPLE_DOC, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--ckpt", required=True, help="generator weights file or run directory")
    p.add_argument("--config", default=None, help="optional YAML with sampling settings")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. num_samples=100 sampler.top_k=10")
    args = p.parse_args(argv)

    from vargen.checkpoint import CheckpointError
    from vargen.config import ConfigError, load_config
    from vargen.data import DataError
    from vargen.distributed import teardown
    from vargen.sampling.generate import SampleConfig, default_sampler, run_sampling

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

    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        run_sampling(args.ckpt, cfg, log=(lambda m: print(m, flush=True)) if rank0 else (lambda m: None))
    except (CheckpointError, DataError, ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        teardown()
    return 0


def main(argv=None) -> int:
    """``vargen {train,sample,plot} ...`` (also ``python -m vargen``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from vargen.plot import plot_main

    commands = {"train": train_main, "sample": sample_main, "plot": plot_main}
    if not argv or argv[0] not in commands:
        print(f"usage: vargen {{{','.join(commands)}}} [args ...]; vargen COMMAND --help", file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    return commands[argv[0]](argv[1:])
