"""The stats record every sampler returns with its output, and how records combine.

A sampler returns ``(out, stats)``; ``stats`` starts as :func:`new_stats` (model forwards,
tokens, acceptance counts, seconds) plus the sampler's own counters. :func:`add_stats` sums
the records of batches or ranks; ratios do not sum, so :func:`finish_stats` recomputes them
from the summed counts (:func:`derived_stats`). The speculative samplers accumulate
:data:`COUNTERS` on the device and read them once at the end (:func:`finish_speculative`).
"""

from __future__ import annotations

import time

import torch

# Device-side counters of the speculative samplers, read once at the end (one host sync).
COUNTERS = (
    "accepted",
    "proposed",
    "row_target_forwards",
    "row_draft_forwards",
    "first_accepted",
    "first_proposed",
)


def new_stats() -> dict:
    """The record every sampler starts from (the ``Sampler`` contract of
    :mod:`vargen.sampling.base`)."""
    return {
        "target_forwards": 0,  # model calls (a CFG pair counts once: one batched call)
        "draft_forwards": 0,
        "tokens": 0,  # tokens emitted, over the batch
        "accepted": 0,
        "proposed": 0,
        "positions_computed": 0,  # sequence positions pushed through the model, over calls
        "seconds": 0.0,
    }


def add_stats(total: dict, stats: dict) -> dict:
    """Add one batch's (or one rank's) stats into ``total``: numbers sum, lists concatenate."""
    for k, v in stats.items():
        total[k] = total.get(k, [] if isinstance(v, list) else 0) + v
    return total


def finish_stats(total: dict, num_images: int) -> dict:
    """Recompute the ratios of summed counts (speculative samplers), which do not sum."""
    if "acceptance" in total:
        derived_stats(total, num_images)
    return total


def finish_speculative(
    stats: dict, rows: int, tokens: int, t0: float, counts: torch.Tensor | None = None
) -> dict:
    """Fill a speculative sampler's derived stats. ``rows`` = samples; ``counts``
    (:data:`COUNTERS`, on the device) is read here, one host sync. Without it every call
    served ``rows`` rows."""
    if counts is not None:
        stats.update(zip(COUNTERS, counts.tolist()))
        stats["syncs"] += 1
    stats.setdefault("row_target_forwards", stats["target_forwards"] * rows)
    stats["tokens"] = tokens
    return derived_stats(stats, rows, t0)


def derived_stats(stats: dict, images: int, t0: float | None = None) -> dict:
    """Ratios of the summed counts (also what :func:`finish_stats` recomputes over batches)."""
    stats["acceptance"] = stats["accepted"] / max(1, stats["proposed"])
    stats["tokens_per_target_call"] = stats["tokens"] / max(1, stats["row_target_forwards"])
    stats["mean_accepted_length"] = stats["tokens_per_target_call"]  # accepted + 1 per verification
    stats["target_calls_per_image"] = stats["row_target_forwards"] / max(1, images)
    if "row_draft_forwards" in stats:
        stats["draft_calls_per_image"] = stats["row_draft_forwards"] / max(1, images)
    if "first_proposed" in stats:
        stats["alpha"] = stats["first_accepted"] / max(1, stats["first_proposed"])
    if "syncs" in stats:
        stats["syncs_per_image"] = stats["syncs"] / max(1, images)
    if t0 is not None:
        stats["seconds"] = time.perf_counter() - t0
    return stats
