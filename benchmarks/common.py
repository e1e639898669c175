"""Shared helpers for benchmark scripts: training a shipped config, the methods x seeds sweep
(FID mean/std, forwards, seconds), results JSON with a meta entry, table printing.

Every script runs as ``python -m benchmarks.<name> [--quick]`` from the repository root.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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


@dataclass
class Method:
    """One row of a sweep: a generator, its tokenizer (None for a pixel generator) and a sampler
    ``(model, labels_B, generator) -> (out, stats)``.

    ``batch_size`` overrides the sweep's batch size for this method (a sampler whose batch holds
    several particles per image wants fewer images per batch); ``score=False`` draws without
    computing FID (a variant run only for its time or its tokens: no ``fid_*`` entries)."""

    model: Any
    tokenizer: Any
    sampler: Callable
    batch_size: int | None = None
    score: bool = True


def sweep(
    methods: dict[str, Method], labels_N, seeds, evaluator, batch_size: int, progress=False, on_draw=None
) -> dict:
    """Each method draws ``labels_N`` with each seed, interleaved (seed-major, so a slow spell of a
    shared machine hits every method alike), scored by ``evaluator.score``.

    Returns ``{method: {"fid_mean", "fid_std", "fids", "nfe", "forwards", "seconds", "stats",
    "seed_stats"}}``: ``nfe`` is model forwards per batch (the ``target_forwards`` of the sampler
    stats averaged over the batches of all seeds, at the method's batch size), ``seconds`` the
    sampling time summed over seeds (FID excluded), ``seed_stats`` each seed's sampler stats (summed
    over its batches, as :func:`generate` returns them) and ``stats`` the last seed's. A method with
    ``score=False`` has no ``fid_*`` entries. ``on_draw(name, seed, images, ids, stats)``, when
    given, sees every draw (e.g. to compare two methods' tokens) before the next one.
    """
    from vargen.sampling.generate import generate

    out = {name: {"fids": [], "forwards": 0, "seconds": 0.0, "seed_stats": []} for name in methods}
    for seed in seeds:
        for name, m in methods.items():
            t0 = time.perf_counter()
            images, ids, stats = generate(
                m.model,
                m.tokenizer,
                labels_N,
                m.sampler,
                torch.Generator().manual_seed(seed),
                m.batch_size or batch_size,
                progress,
            )
            r = out[name]
            r["seconds"] += time.perf_counter() - t0
            r["forwards"] += stats.get("target_forwards", 0)
            r["seed_stats"].append(stats)
            r["stats"] = stats
            if m.score:
                r["fids"].append(evaluator.score(images))
            if on_draw is not None:
                on_draw(name, seed, images, ids, stats)
    for name, r in out.items():
        if methods[name].score:
            r["fid_mean"] = statistics.mean(r["fids"])
            r["fid_std"] = statistics.stdev(r["fids"]) if len(r["fids"]) > 1 else 0.0
        batches = len(seeds) * math.ceil(len(labels_N) / (methods[name].batch_size or batch_size))
        r["nfe"] = r["forwards"] / batches
    return out


def flat_results(swept: dict, keys=("fid_mean", "fid_std", "nfe", "seconds")) -> dict:
    """``{"<method>.<key>": value}`` for the results JSON, from a :func:`sweep` result."""
    return {f"{name}.{k}": r[k] for name, r in swept.items() for k in keys}


def commit() -> str:
    """The checked-out commit (with "+dirty" when the tree has uncommitted changes outside
    ``benchmarks/results/``: a benchmark that merges into its results file runs beside the
    uncommitted results of the previous one), or "unknown". ``$VARGEN_COMMIT``, when set, is
    taken instead: a tree copied to another machine may carry a stale ``.git``."""
    import subprocess

    if os.environ.get("VARGEN_COMMIT"):  # a copied tree (a borrowed machine): its git may be stale
        return os.environ["VARGEN_COMMIT"]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results"],
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


# (x, y) metric pairs a results chart shows, first match wins: quality against cost per method.
CHARTS = [
    ("nfe", "fid_mean"),
    ("nfe", "fid"),
    ("token_forwards_per_image", "fid_mean"),
    ("tokens_per_image", "fid_mean"),
    ("tokens", "kv_speedup"),
    ("passes", "fid"),  # TarFlow: sequential vs Jacobi passes
    ("score", "fid"),  # minority guidance: minority score vs FID
]


def write_results(topic: str, flat: dict, meta_entry: dict, chart: tuple[str, str] | None = None) -> str:
    """``results/<topic>.json`` (``flat`` plus a ``meta`` entry) and, beside it, ``<topic>.png``:
    the table's main comparison (see :func:`write_chart`). Returns the JSON path."""
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{topic}.json")
    with open(path, "w") as f:
        json.dump({**flat, "meta": meta_entry}, f, indent=2)
    png = write_chart(topic, flat, chart)
    if png:
        print("wrote", png)
    return path


def _method_rows(flat: dict, x: str, y: str) -> dict[str, dict]:
    """{method: {x: value, y: value}} from ``"<method>.<metric>"`` keys, or from
    ``"<prefix>.<metric>_<method>"`` keys (``lsd.fid_student8``, ``lsd.nfe_student8``)."""
    rows: dict[str, dict] = {}
    for key, value in flat.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        prefix, last = key.rsplit(".", 1) if "." in key else ("", key)
        for metric in (x, y):
            if last == metric and prefix:
                rows.setdefault(prefix, {})[metric] = float(value)
            elif last.startswith(metric + "_"):
                method = f"{prefix}.{last[len(metric) + 1 :]}".lstrip(".")
                rows.setdefault(method, {})[metric] = float(value)
    return {m: r for m, r in rows.items() if x in r and y in r}


def write_chart(topic: str, flat: dict, chart: tuple[str, str] | None = None) -> str | None:
    """``results/<topic>.png``: one dot per method at (x, y) = ``chart``, or at the first pair of
    :data:`CHARTS` that at least two methods report; None (no picture) when no pair fits."""
    from vargen.plot import line_chart

    for x, y in [chart] if chart else CHARTS:
        rows = _method_rows(flat, x, y)
        if len(rows) >= (1 if chart else 2):
            series = [{"label": m, "x": [r[x]], "y": [r[y]]} for m, r in rows.items()]
            path = os.path.join(RESULTS, f"{topic}.png")
            return line_chart(series, path, title=f"{topic}: {y} vs {x}", xlabel=x, ylabel=y)
    return None


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
