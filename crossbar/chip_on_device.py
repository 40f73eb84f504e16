"""Programming and ``at(t)`` with torch, on the device that holds a grid's chip.

The same computation as the tile grid's host path (``grid_programming.py``): the same
device models (``devices/``, written for numpy and torch alike), the same counter-based
draws (``chip_draws.py``) and the same float64 arithmetic, rounded to float32 where the
chip is stored. It runs a row of tiles at a time, every column tile of it at once, so
that the float64 temporaries stay near 8 bytes x 2 x rows x n_out each and a GPU does
one set of kernels per row of tiles, not per tile. Per-tile counts are summed on the
device and read once at the end.

A seed names the same chip on both paths: identical draws, identical elementwise
operations in the same order. Only the libraries' float64 logarithms, exponentials and
powers may differ, in their last bit or two (each library is accurate to an ulp or
so, not correctly rounded), which the float32 chip rounds away but for about one value
in 10^8; on the CPU device numpy and torch agree bitwise (tested).
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from .chip_draws import row_block_hashes
from .torch_engine import column_keys
from .torch_normals import normals_from_hash, uniforms_from_hash
from .wires import effective_conductance_torch, pair_read_variance


class RowBlocks:
    """A grid's rows of tiles on its device: the draws of each and per-tile sums."""

    def __init__(self, grid) -> None:
        self.grid = grid
        self.columns = grid.column_map()
        self.device = self.columns.tile.device
        self.tile_shape = (grid.config.rows, grid.config.cols)
        self._keys: dict = {}

    def __iter__(self):
        """(r, slice of its inputs) of every row of tiles."""
        starts = self.grid.row_starts
        return ((r, slice(int(starts[r]), int(starts[r + 1]))) for r in range(len(starts) - 1))

    def keys(self, tags: tuple) -> torch.Tensor:
        """(R, n_out) int64: each tile's stream key of ``tags``, per output column (made
        when first asked for: most streams are drawn from only where a model needs them)."""
        if tags not in self._keys:
            self._keys[tags] = column_keys(self.grid.stream_keys(*tags), self.columns)
        return self._keys[tags]

    def draws(self, tags: tuple, r: int, rows: int, uniform: bool = False) -> Callable:
        """A function giving row block r's (2, rows, n_out) normals (uniforms) of the
        streams ``tags`` name."""
        def draw() -> torch.Tensor:
            hashes = row_block_hashes(self.keys(tags)[r], self.columns, 2, rows, self.tile_shape)
            return uniforms_from_hash(hashes) if uniform else normals_from_hash(hashes)
        return draw

    def per_tile(self, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """(C,) int64: how many True ``mask`` (2, rows, n_out) holds in each tile of its row."""
        sums = torch.zeros(self.grid.grid_shape[1], dtype=torch.int64, device=self.device)
        if mask is None:
            return sums
        return sums.index_add_(0, self.columns.tile, mask.sum(dim=(0, 1)))


def program(grid, targets: tuple, program_tag: int, fault_tag: int, drift_tag: int) -> tuple:
    """Program ``targets`` (G+, G-), each (n_in, n_out) float64 on the grid's device:
    (g_prog (2, n_in, n_out) float32, nu or None, {count name: (R, C) int64 on the host}
    for prog_clamped, stuck_min and stuck_max)."""
    blocks = RowBlocks(grid)
    model, dev = grid.device, grid.config.device
    g = torch.empty((2, *grid.shape), dtype=torch.float32, device=blocks.device)
    nu = torch.zeros_like(g) if dev.drift else None
    counts = torch.zeros((3, *grid.grid_shape), dtype=torch.int64, device=blocks.device)
    for r, rs in blocks:
        rows = rs.stop - rs.start
        block = torch.stack([target[rs].clamp(dev.g_min, dev.g_max) for target in targets])
        prog = model.program(block, blocks.draws((program_tag,), r, rows),
                             blocks.draws((fault_tag,), r, rows, uniform=True))
        g[:, rs] = prog.g
        if nu is not None:
            exps = model.drift_exponents(block, blocks.draws((drift_tag,), r, rows))
            if prog.stuck is not None:  # a stuck device keeps its conductance
                exps = torch.where(prog.stuck, model.stuck_drift_state, exps)
            nu[:, rs] = exps
        for i, mask in enumerate((prog.below, prog.at_min, prog.at_max)):
            counts[i, r] = blocks.per_tile(mask)
    found = counts.cpu().numpy()
    return g, nu, {"prog_clamped": found[0], "stuck_min": found[1], "stuck_max": found[2]}


def conductances_at(grid, t: float, slow_tags: tuple) -> tuple:
    """What the chip reads as at time t, from its programmed state on its device, as
    ``grid._conductances_at`` gives it: (G+ and G- read (2, n_in, n_out) float32, G+ - G-
    through the wires (n_in, n_out) float32, the per-pair read variance float32 or None
    where it is uniform or absent, the uniform variance or None, each tile's devices
    clamped at 0 (R, C) int64 on the host); ``slow_tags`` name the 1/f sample's streams."""
    blocks = RowBlocks(grid)
    model = grid.device
    g_prog, nu = grid.g_prog, (grid.nu if grid.nu.numel() else None)
    g_read = torch.empty_like(g_prog)
    gdiff = torch.empty(grid.shape, dtype=torch.float32, device=blocks.device)
    noisy = model.has_fast_noise
    var = torch.empty_like(gdiff) if noisy else None
    clamped = torch.zeros(grid.grid_shape, dtype=torch.int64, device=blocks.device)
    first = uniform = None
    for r, rs in blocks:
        g, below = model.conductance_at(g_prog[:, rs], None if nu is None else nu[:, rs], t,
                                        blocks.draws(slow_tags, r, rs.stop - rs.start))
        g_read[:, rs] = g
        g_eff = _through_wires(grid, g)
        gdiff[rs] = g_eff[0] - g_eff[1]  # the float64 difference, rounded to float32
        clamped[r] = blocks.per_tile(below)
        if noisy:
            v = pair_read_variance(model.read_variance, g, g_eff)
            var[rs] = v
            first = v.reshape(-1)[0] if first is None else first
            same = (v == first).all()
            uniform = same if uniform is None else uniform & same
    clamped_host = clamped.cpu().numpy()
    if noisy and bool(uniform):
        # then sum_i x_i^2 var_ij = var * sum_i x_i^2: a row sum, not a second product
        return g_read, gdiff, None, float(first), clamped_host
    return g_read, gdiff, var, None, clamped_host


def _through_wires(grid, g: torch.Tensor) -> torch.Tensor:
    """G_eff (2, rows, n_out) of a row of tiles whose conductances are g, every tile
    through its own wires (PHYSICS.md section 8; the tiles of one width solved as one
    batch); g itself without wires. ``grid._through_wires`` on the host."""
    wires = grid.config.ir_drop
    if not wires.on:
        return g
    starts = [int(s) for s in grid.col_starts]
    spans = list(zip(starts[:-1], starts[1:]))
    out = torch.empty_like(g)
    for width in sorted({b - a for a, b in spans}):
        same = [(a, b) for a, b in spans if b - a == width]
        arrays = torch.cat([g[:, :, a:b] for a, b in same])  # (2 x tiles, rows, width): G+ then G- of each
        solved = effective_conductance_torch(arrays, wires.r_row, wires.r_col, grid.config.rows)
        for k, (a, b) in enumerate(same):
            out[:, :, a:b] = solved[2 * k:2 * k + 2]
    return out


def as_targets(targets: tuple, device: torch.device) -> tuple:
    """Checked float64 target arrays (numpy) as tensors on ``device``."""
    return tuple(torch.from_numpy(np.ascontiguousarray(t)).to(device) for t in targets)
