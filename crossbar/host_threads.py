"""Host threads for the per-tile work of programming and ``at(t)``.

The Numba engine programs and drifts a chip on the host in float64
(``grid_programming.py``), tile by tile: each tile draws from its own counter-based
streams (``chip_draws.py``) and the device models are elementwise, so the tiles are
independent and their results do not depend on which thread ran them or in which order.
Numba's draws and numpy's ufuncs release the GIL, so the tiles run on every core.
Working a tile at a time also keeps the float64 temporaries of the device models small:
over a whole 2048 x 2048 matrix they were 67 MB each, freshly faulted in, and ``at(t)``
ran 3.5x faster cut into tiles on one thread (2 cores, numpy 2).

The number of threads is Numba's (``numba.set_num_threads`` or ``NUMBA_NUM_THREADS``),
so one setting bounds both the product kernels and this work; they never run at once.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Sequence

import numba

_pools: dict = {}  # (process id, threads) -> executor: a forked child makes its own


def map_tiles(work: Callable, items: Sequence, threads: Optional[int] = None) -> list:
    """``[work(item) for item in items]``, spread over ``threads`` host threads (None:
    Numba's thread count). ``work`` must write only what its own item owns."""
    threads = numba.get_num_threads() if threads is None else threads
    if threads <= 1 or len(items) <= 1:
        return [work(item) for item in items]
    key = (os.getpid(), threads)
    pool = _pools.get(key)
    if pool is None:
        pool = _pools[key] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="xbarsim-tiles")
    return list(pool.map(work, items))
