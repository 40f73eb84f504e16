"""A chip's per-device random draws, the same on every device.

Programming noise, stuck-at faults, drift exponents, the 1/f sample of each time and
the ADCs' fixed errors are drawn from the counter-based generator of ``rng.py``: the
draw of device (p, i, j) of a tile (p = 0 for G+, 1 for G-; i, j its row and column in
the tile) in the stream of 64-bit ``key`` is a function of (key, n) alone, with

    n = (p * rows + i) * cols + j        (rows, cols: the tile's physical size)

so a tile draws the same numbers whichever device computes them, in whatever order or
cut, and a device keeps its draws however many of the tile's rows and columns a matrix
uses. Each stream's key comes from the tile's seed and the effect's tag
(``grid_programming.py``). The host computes them with the Numba functions here, one
tile at a time; a grid on another torch device computes them there, one row of tiles at
a time (:func:`row_block_hashes` into ``torch_normals.normals_from_hash`` and
``uniforms_from_hash``), to the same bits.
"""
from __future__ import annotations

import numpy as np
import torch
from numba import njit, uint64

from . import torch_engine, torch_normals
from .rng import _uniform, counter_hash, normal_from_hash

# Which draws name a chip: 1 was numpy's PCG64 streams of each tile's seed (xbarsim
# before 2026-11-23), 2 these. What depends on the samples a seed names (the model
# cache's key of device-mode hardware-aware training, eval/hwa.py) records it.
VERSION = 2


@njit(cache=True, nogil=True)  # host threads draw for their tiles at once (host_threads.py)
def _fill(key, tile_rows, tile_cols, uniform, out):
    for p in range(out.shape[0]):
        for i in range(out.shape[1]):
            for j in range(out.shape[2]):
                h = counter_hash(uint64(key), uint64((p * tile_rows + i) * tile_cols + j))
                out[p, i, j] = _uniform(h) if uniform else normal_from_hash(h)


def tile_draws(key: int, shape: tuple, tile_shape: tuple, uniform: bool = False) -> np.ndarray:
    """Standard normals (or uniforms in (0, 1]) of the devices of one tile's first
    ``shape`` = (arrays, rows used, columns used) in stream ``key``: float64 of that
    shape. ``tile_shape``: the tile's physical (rows, cols)."""
    out = np.empty(shape, np.float64)
    _fill(np.uint64(key), tile_shape[0], tile_shape[1], uniform, out.reshape((shape[0], -1, shape[-1])))
    return out


def row_block_hashes(keys: torch.Tensor, columns: torch_engine.ColumnMap, arrays: int, rows: int,
                     tile_shape: tuple) -> torch.Tensor:
    """The counter hashes of the devices of one row of tiles, (arrays, rows, n_out)
    int64 on the keys' device: ``keys`` (n_out,) is each output column's tile's stream
    key (int64 bits), ``columns`` the grid's column map, ``rows`` the row block's used
    rows. :func:`tile_draws` hashes the same (key, n)."""
    device = keys.device
    p = torch.arange(arrays, dtype=torch.int64, device=device)[:, None, None]
    i = torch.arange(rows, dtype=torch.int64, device=device)[None, :, None]
    counters = (p * tile_shape[0] + i) * tile_shape[1] + columns.offset.to(torch.int64)[None, None, :]
    return torch_normals.counter_hash(keys[None, None, :], counters)
