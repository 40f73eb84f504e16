"""Timing and memory helpers shared by the benchmarks."""
from __future__ import annotations

import resource
import sys
import time

import numpy as np


def median_time(fn, repeats: int = 7, warmup: int = 1, sync=None) -> float:
    """Median wall time of fn() in seconds, after warm-up calls; ``sync()`` (a GPU's
    synchronize) runs before the clock stops, so queued GPU work is counted."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def gpu_peak_mb(device) -> float:
    """Peak GPU memory torch allocated on ``device`` so far, MiB (0 on the CPU)."""
    import torch

    if device.type != "cuda":
        return 0.0
    return torch.cuda.max_memory_allocated(device) / 2 ** 20


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024.0 if sys.platform != "darwin" else peak / 2 ** 20
