"""Pictures of training: loss curves from ``log.jsonl`` drawn with PIL (no plotting dependency).

- :func:`write_loss_png` writes ``<run>/loss.png`` (training loss, held-out loss as dots); the
  training loop calls it at every evaluation and at the end of a run.
- :func:`plot_runs` overlays several runs in one picture (``vargen plot RUN_DIR [RUN_DIR ...]``).
- :func:`line_chart` is the one drawing routine both use (also used by the benchmarks).
"""

from __future__ import annotations

import argparse
import math
import os

from vargen.io import read_log

# Distinct colours (matplotlib's "tab10"): series i of a chart gets COLORS[i % 10].
COLORS = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
]
PLOT_DOC = """Overlay the loss curves of one or more runs (training and held-out loss from log.jsonl).

    vargen plot runs/digits_ar runs/digits_ar_small --out compare.png
"""
MARGIN = (64, 28, 170, 40)  # left, top, right, bottom: tick labels, title; the legend sits right


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi]."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, n - 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def line_chart(
    series: list[dict],
    path: str,
    title: str = "",
    xlabel: str = "step",
    ylabel: str = "loss",
    size: tuple[int, int] = (760, 400),
    log_y: bool = False,
) -> str:
    """Draw ``series`` as lines into a PNG at ``path``; returns ``path``.

    Each series is ``{"label", "x", "y"}`` with optional ``"color"`` (RGB; default by position)
    and ``"dots": True`` (markers on every point, for sparse curves such as held-out loss).
    Non-finite values are skipped. ``log_y`` plots log10(y) (positive values only).
    """
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = MARGIN[0], MARGIN[1], size[0] - MARGIN[2], size[1] - MARGIN[3]

    def tf(v: float) -> float | None:
        if not math.isfinite(v) or (log_y and v <= 0):
            return None
        return math.log10(v) if log_y else v

    pts = [[(x, tf(y)) for x, y in zip(s["x"], s["y"]) if tf(y) is not None] for s in series]
    xs = [x for p in pts for x, _ in p]
    ys = [y for p in pts for _, y in p]
    x0, x1 = (min(xs), max(xs)) if xs else (0.0, 1.0)
    y0, y1 = (min(ys), max(ys)) if ys else (0.0, 1.0)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    xpad, ypad = 0.03 * (x1 - x0), 0.05 * (y1 - y0)  # points on the extremes stay inside the axes
    x0, x1, y0, y1 = x0 - xpad, x1 + xpad, y0 - ypad, y1 + ypad

    def px(x: float, y: float) -> tuple[float, float]:
        return left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top)

    grey = (200, 200, 200)
    for t in _ticks(x0, x1):
        u = px(t, y0)[0]
        draw.line([(u, top), (u, bottom)], fill=(235, 235, 235))
        draw.text((u, bottom + 4), f"{t:.4g}", fill="black", font=font, anchor="ma")
    for t in _ticks(y0, y1):
        v = px(x0, t)[1]
        draw.line([(left, v), (right, v)], fill=(235, 235, 235))
        label = f"{10**t:.3g}" if log_y else f"{t:.4g}"
        draw.text((left - 4, v), label, fill="black", font=font, anchor="rm")
    draw.rectangle([left, top, right, bottom], outline=grey)
    draw.text(((left + right) / 2, size[1] - 4), xlabel, fill="black", font=font, anchor="md")
    draw.text((4, top - 14), ylabel + (" (log)" if log_y else ""), fill="black", font=font)
    if title:
        draw.text(((left + right) / 2, 4), title, fill="black", font=font, anchor="ma")

    for i, (s, p) in enumerate(zip(series, pts)):
        color = tuple(s.get("color") or COLORS[i % len(COLORS)])
        coords = [px(x, y) for x, y in sorted(p)]
        if len(coords) > 1:  # sparse dotted curves (held-out) get a thin line
            draw.line(coords, fill=color, width=1 if s.get("dots") else 2)
        if s.get("dots") or len(coords) == 1:
            r = 5 if len(coords) == 1 else 3  # a lone point (one method in a comparison) shows larger
            for u, v in coords:
                draw.ellipse([u - r, v - r, u + r, v + r], fill=color)
    for i, s in enumerate(series):  # legend, right of the axes
        color = tuple(s.get("color") or COLORS[i % len(COLORS)])
        y = top + 14 * i
        draw.line([(right + 8, y + 5), (right + 26, y + 5)], fill=color, width=1 if s.get("dots") else 3)
        if s.get("dots"):
            draw.ellipse([right + 14, y + 2, right + 20, y + 8], fill=color)
        draw.text((right + 30, y), str(s["label"])[:24], fill="black", font=font)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    img.save(tmp)
    os.replace(tmp, path)  # a reader never sees a half-written picture
    return path


def loss_series(run_dir: str, metric: str = "loss", label: str = "", color=None) -> list[dict]:
    """The training curve of ``metric`` and its held-out curve (``heldout_<metric>``, dots) from
    ``<run_dir>/log.jsonl``; a curve with no logged value is left out."""
    rows = read_log(run_dir)
    out = []
    for key, dots, kind in ((metric, False, "train"), (f"heldout_{metric}", True, "held-out")):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            name = f"{label[:14]} {kind}" if label else f"{kind} {metric}"
            out.append({"label": name, "x": [p[0] for p in pts], "y": [p[1] for p in pts], "dots": dots})
            if color is not None:
                out[-1]["color"] = color
    return out


def write_loss_png(run_dir: str, metric: str = "loss") -> str | None:
    """``<run_dir>/loss.png`` from its log (None when nothing is logged yet)."""
    series = loss_series(run_dir, metric)
    if not series:
        return None
    name = os.path.basename(os.path.normpath(run_dir))
    return line_chart(series, os.path.join(run_dir, "loss.png"), title=name, ylabel=metric)


def plot_runs(run_dirs: list[str], out: str, metric: str = "loss", log_y: bool = False) -> str:
    """One picture overlaying several runs: each run one colour, held-out loss as dots."""
    series = []
    for i, run in enumerate(run_dirs):
        if not os.path.isfile(os.path.join(run, "log.jsonl")):
            raise FileNotFoundError(f"{run} has no log.jsonl (not a training run directory?)")
        label = os.path.basename(os.path.normpath(run))
        series += loss_series(run, metric, label, COLORS[i % len(COLORS)])
    if not series:
        raise ValueError(f"no '{metric}' values in the logs of {run_dirs}")
    return line_chart(
        series,
        out,
        title=" vs ".join(os.path.basename(os.path.normpath(r)) for r in run_dirs),
        ylabel=metric,
        log_y=log_y,
    )


def plot_main(argv=None) -> int:
    """``vargen plot RUN_DIR [RUN_DIR ...] [--out PNG] [--metric loss] [--log]``."""
    import sys

    p = argparse.ArgumentParser(
        prog="vargen plot", description=PLOT_DOC, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("runs", nargs="+", help="run directories (each holding a log.jsonl)")
    p.add_argument(
        "--out", default="", help="PNG to write (default: RUN/loss.png for one run, else runs.png)"
    )
    p.add_argument("--metric", default="loss", help="logged scalar to draw (and heldout_<metric>)")
    p.add_argument("--log", action="store_true", help="logarithmic y axis")
    args = p.parse_args(argv)
    out = args.out or (os.path.join(args.runs[0], "loss.png") if len(args.runs) == 1 else "runs.png")
    try:
        path = plot_runs(args.runs, out, args.metric, args.log)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0
