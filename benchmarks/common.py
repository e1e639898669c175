"""Shared helpers for benchmark scripts: training a shipped config, results JSON with a meta entry,
table printing."""

from __future__ import annotations

import datetime
import json
import os
import platform

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def train(config: str, out: str, quick: bool, extra=(), quick_steps: int = 300) -> str:
    """Train (or resume) ``configs/<config>.yaml`` into ``out`` with overrides; returns ``out``.

    ``quick`` caps the steps at ``quick_steps`` and turns off periodic evaluation.
    """
    from vargen.config import load_run_config
    from vargen.train.tasks import run

    over = [f"out_dir={out}", "train.resume=true", "train.progress=false", *extra]
    if quick:
        over += [f"train.steps={quick_steps}", "train.eval_every=0"]
    run(load_run_config(os.path.join(ROOT, "configs", f"{config}.yaml"), over), log=print)
    return out


def commit() -> str:
    """The checked-out commit (with "+dirty" when the tree has uncommitted changes), or "unknown"."""
    import subprocess

    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def meta(quick: bool, seeds, device: str = "cpu") -> dict:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": device
        if device != "cpu"
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "quick": quick,
        "seeds": list(seeds),
    }


def write_results(topic: str, flat: dict, meta_entry: dict) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{topic}.json")
    with open(path, "w") as f:
        json.dump({**flat, "meta": meta_entry}, f, indent=2)
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)
