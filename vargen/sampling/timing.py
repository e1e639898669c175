"""The clock a measured-cost calibration reads (TarFlow's per-block plan, the speculative
samplers' width plan): process CPU time on the CPU, wall time after a synchronize elsewhere."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def device_clock(device) -> Callable[[], float]:
    """Seconds for timing a candidate: process CPU time on the CPU (one intra-op thread is the
    intended setting; robust to a neighbour on a shared machine, where wall time is not), wall
    time after a synchronize on an accelerator (its kernels run asynchronously)."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return time.process_time

    def clock() -> float:
        if dev.type == "cuda":  # torch.accelerator (any device) needs torch >= 2.6; we support 2.4
            torch.cuda.synchronize(dev)
        else:
            torch.accelerator.synchronize(dev)
        return time.perf_counter()

    return clock
