"""The clock a measured-cost calibration reads (TarFlow's per-block plan, the speculative
samplers' width plan): process CPU time on one CPU thread, wall time with more threads or after
a synchronize on an accelerator."""

from __future__ import annotations

import time
from collections.abc import Callable

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
