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
