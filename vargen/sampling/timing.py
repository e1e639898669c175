"""What a measured-cost calibration shares (TarFlow's per-block plan, the speculative samplers'
width plan): the clock it reads (process CPU time on one CPU thread, wall time with more threads
or after a synchronize on an accelerator) and how it picks (:func:`fastest`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence

import torch


def device_clock(device) -> Callable[[], float]:
    """Seconds for timing a candidate, read when the clock is made:

    - CPU with one intra-op thread: process CPU time (robust to a neighbour on a shared machine,
      where wall time is not);
    - CPU with more threads: wall time (process time sums the threads' time, so a width whose
      products run in parallel would read slower than it runs, and idle spinning would count);
    - an accelerator: wall time after a synchronize (its kernels run asynchronously)."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return time.process_time if torch.get_num_threads() == 1 else time.perf_counter

    def clock() -> float:
        if dev.type == "cuda":  # torch.accelerator (any device) needs torch >= 2.6; we support 2.4
            torch.cuda.synchronize(dev)
        else:
            torch.accelerator.synchronize(dev)
        return time.perf_counter()

    return clock


def fastest(
    candidates: Sequence[Hashable],
    run: Callable[[Hashable], object],
    *,
    reps: int,
    margin: float,
    clock: Callable[[], float],
) -> tuple[Hashable, dict, dict]:
    """(chosen, {candidate: best seconds}, {candidate: its last output}) of ``run(candidate)``.

    The candidates take turns within each of ``reps`` rounds (a slow spell or the first call's
    allocations do not fall on one of them), each keeps its best round, and the fastest of
    ``candidates[1:]`` is chosen only if it is ``margin`` times faster than ``candidates[0]``
    (the baseline; a guard against timing noise), else the baseline. ``clock`` is read before
    and after each run."""
    secs, outs = dict.fromkeys(candidates, float("inf")), {}
    for _ in range(reps):
        for c in candidates:
            t0 = clock()
            outs[c] = run(c)
            secs[c] = min(secs[c], clock() - t0)
    best = min(candidates[1:], key=secs.__getitem__)
    return (best if secs[best] * margin < secs[candidates[0]] else candidates[0]), secs, outs
