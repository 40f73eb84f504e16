"""Timing and memory helpers shared by the benchmarks."""
from __future__ import annotations

import ctypes
import resource
import sys
import time

import numpy as np


# glibc's mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def steady_allocator() -> bool:
    """Keep the memory that passes free within the process (glibc's malloc), so that a
    timed pass does not page in fresh memory for its buffers; whether it was set (not
    outside glibc). By default glibc gives buffers over its mmap threshold back to the
    system when they are freed, and a pass's buffers fault in again, page by page, at
    every pass: a float resnet20 pass at batch 256 took 56,000-72,000 page faults in a
    fresh process and 0.17-0.21 s, against about 5,000 faults and 0.10-0.13 s with this
    set (and fewer faults after an analog pass had grown the heap). How often a pass
    faults depends on the process's history, so ratios of float and analog times moved
    with it: both are timed with this set."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # no buffer from mmap (each would be returned at its free), and the heap's top
    # trimmed only beyond 2 GiB free
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))


def median_time(fn, repeats: int = 7, warmup: int = 1, sync=None) -> float:
    """Median wall time of fn() in seconds, after warm-up calls; ``sync()`` (a GPU's
    synchronize) runs before the clock stops, so queued GPU work is counted."""
    return interleaved_median_times([fn], repeats, warmup, sync)[0]


def at_seconds(model, t: float, repeats: int = 3) -> float:
    """Median wall time of ``model.at()`` at ``repeats`` distinct times from t s on, each
    deriving the chip's read state anew (at(t) reuses it for the time it last set); the
    model is left at t."""
    times = iter([t + i for i in range(repeats)])
    seconds = median_time(lambda: model.at(next(times)), repeats=repeats, warmup=0)
    model.at(t)
    return seconds


def interleaved_median_times(fns, repeats: int = 7, warmup: int = 1, sync=None) -> list:
    """Median wall time of each of ``fns`` in seconds, timed in alternating rounds (each
    round calls every fn once, the order rotating from round to round) after warm-up
    calls. A ratio of two medians taken this way holds while the machine's speed
    drifts (a neighbour's load, clock changes), which shifts every fn alike; timed
    one after the other, the ratio takes up the drift."""
    sync = sync or (lambda: None)
    for fn in fns:
        for _ in range(warmup):
            fn()
    sync()
    times = [[] for _ in fns]
    for r in range(repeats):
        for k in range(len(fns)):
            i = (k + r) % len(fns)
            start = time.perf_counter()
            fns[i]()
            sync()
            times[i].append(time.perf_counter() - start)
    return [float(np.median(t)) for t in times]


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
