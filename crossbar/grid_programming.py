"""Programming a tile grid and setting its inference time: the chip drawn from each
tile's seed, and what it reads as at a time t (drift, 1/f noise, the wires).

The Numba engine's on the host, a tile at a time (a large grid's tiles on host
threads, ``host_threads.py``); the torch engine's on the grid's device, a row of tiles
at a time (``chip_on_device.py``). Both draw from the same counter-based streams
(``chip_draws.py``), so a seed names the same chip on either.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import torch

from . import chip_on_device
from .chip_draws import tile_draws
from .grid_counts import PROGRAM_COUNTS
from .grid_product import NO_KEYS
from .host_threads import map_tiles
from .rng import stream_key
from .seeding import as_seed_sequence, derive
from .tensor_mode import normal_tensors
from .wires import effective_conductance, pair_read_variance

if TYPE_CHECKING:
    from .grid import TileGrid

# Sub-stream tags of each tile's seed: each physical effect draws from its own stream, so
# switching one effect on or off leaves the samples of the others unchanged.
PROGRAM, FAULTS, DRIFT, SLOW_NOISE, READS, CALIBRATION_READS, ADC_ERRORS, ADC_NOISE = range(8)
# the weights from which a grid works its tiles on several host threads
_THREADED_WEIGHTS = 2 ** 16


def time_bits(t: float) -> int:
    """The float64 bits of t: the tag that makes every random draw at time t its own."""
    return int(np.float64(t).view(np.uint64))


def inference_time(t) -> float:
    """``t``, s since programming, as a float: a finite real number >= 0, given as a
    Python or numpy number or a one-element real tensor (``torch.logspace``'s, say)."""
    value = t
    if isinstance(t, torch.Tensor) and t.numel() == 1 and not (t.is_complex() or t.dtype == torch.bool):
        value = t.item()
    if (isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer))
            or not np.isfinite(value) or value < 0):
        raise ValueError(f"t = {t!r} is invalid: expected a finite time >= 0 s, as a real number "
                         f"or a one-element real tensor")
    return float(value)


class Programming:
    """Mixed into :class:`~crossbar.grid.TileGrid`: ``program`` and ``at``. Reads the
    grid's config, device model, shape, tiles and seeds; sets the chip's buffers
    (``g_prog``, ``nu``, the ADC errors), ``seeds``, the programming counts and what
    ``at`` derives (``_derived``, the read-noise stream keys)."""

    @normal_tensors
    def program(self, g_plus, g_minus, seeds: Sequence) -> "TileGrid":
        """Program target conductances (uS), each (n_in, n_out); tile k (row-major) draws
        from ``seeds[k]`` (an int or SeedSequence per tile). The torch engine programs on
        the grid's device (``chip_on_device``), the Numba engine on the host: the same chip."""
        targets = self._check_targets(g_plus, g_minus)
        n_tiles = self.grid_shape[0] * self.grid_shape[1]
        if len(seeds) != n_tiles:
            raise ValueError(f"{self.name}: {len(seeds)} seeds for {n_tiles} tiles")
        self.seeds = [as_seed_sequence(s) for s in seeds]
        for name in PROGRAM_COUNTS:
            self.counts[name][:] = 0
        self.counts["devices"][:] = 2 * np.diff(self.row_starts)[:, None] * np.diff(self.col_starts)[None, :]
        device = self.g_prog.device
        if self._derives_on_device():
            self.g_prog, nu, counts = chip_on_device.program(self, chip_on_device.as_targets(targets, device),
                                                             PROGRAM, FAULTS, DRIFT)
            for name, value in counts.items():
                self.counts[name][:] = value
        else:
            g, nu = self._program_on_host(targets)
            self.g_prog = torch.from_numpy(g).to(device)
            nu = None if nu is None else torch.from_numpy(nu).to(device)
        self.nu = torch.zeros(0, dtype=torch.float32, device=device) if nu is None else nu
        self.adc_gain, self.adc_offset = (torch.from_numpy(a).to(device) for a in self._draw_adc_errors())
        self.reset_counts()
        return self.at(0.0)

    def _program_on_host(self, targets: tuple) -> tuple:
        """(g_prog, nu or None) as numpy float32, programmed on the host tile by tile;
        sets the programming counts."""
        dev = self.config.device
        g = np.empty((2, *self.shape), np.float32)
        nu = np.zeros(g.shape, np.float32) if dev.drift else None

        def program_tile(item) -> None:
            k, (r, c, rs, cs) = item
            block = np.stack([np.clip(target[rs, cs], dev.g_min, dev.g_max) for target in targets])
            shape = block.shape
            prog = self.device.program(block, lambda: self._tile_draws(k, shape, PROGRAM),
                                       lambda: self._tile_draws(k, shape, FAULTS, uniform=True))
            g[:, rs, cs] = prog.g
            if nu is not None:
                exps = self.device.drift_exponents(block, lambda: self._tile_draws(k, shape, DRIFT))
                if prog.stuck is not None:
                    exps[prog.stuck] = self.device.stuck_drift_state  # a stuck device keeps its conductance
                nu[:, rs, cs] = exps
            self.counts["prog_clamped"][r, c] = prog.clamped
            self.counts["stuck_min"][r, c] = prog.stuck_min
            self.counts["stuck_max"][r, c] = prog.stuck_max

        map_tiles(program_tile, list(enumerate(self.tiles())), self._host_threads())
        return g, nu

    def _draw_adc_errors(self) -> tuple:
        """(gain, offset in LSB) of every tile column's ADC, each (R, n_out), from each
        tile's own stream; empty where the config has no fixed ADC errors. Both are
        drawn whatever is on, so that turning one on leaves the other's samples alone."""
        adc = self.config.adc
        if not adc.has_fixed_errors:
            return np.zeros(0), np.zeros(0)
        gain = np.empty((self.grid_shape[0], self.shape[1]))
        offset = np.empty_like(gain)
        for k, (r, _, _, cs) in enumerate(self.tiles()):
            z = self._tile_draws(k, (2, 1, cs.stop - cs.start), ADC_ERRORS)
            offset[r, cs] = adc.offset_sigma * z[0, 0]
            gain[r, cs] = 1.0 + adc.gain_sigma * z[1, 0]
        return gain, offset

    @normal_tensors
    def at(self, t: float) -> "TileGrid":
        """Set the inference time, s since programming: drift, and the 1/f sample frozen
        for every read at this time (the same t always gives the same sample)."""
        self._require_programmed("at")
        t = inference_time(t)
        self.device.check_time(t)
        bits = time_bits(t)
        # what the chip reads as at t is a function of t and the programmed state alone:
        # kept from the last at(t), it serves the same t again while g_prog and nu are
        # unchanged (calibration sets t = 0 twice after programming did)
        chip = (bits, self.g_prog, self.g_prog._version, self.nu, self.nu._version)
        found = self._read_at_time
        if found is None or not all(a is b if isinstance(a, torch.Tensor) else a == b for a, b in zip(found[0], chip)):
            if self._derives_on_device():
                derived = chip_on_device.conductances_at(self, t, (SLOW_NOISE, bits))
            else:
                derived = self._conductances_at(t, bits)
            found = self._read_at_time = (chip, derived)
        g_read, gdiff, var, self._var_uniform, clamped = found[1]
        self._derived = (g_read, gdiff, var)
        self.counts["read_clamped"][:] = clamped
        self.time = t
        self._keys = self.stream_keys(READS, bits)
        self._adc_keys = self.stream_keys(ADC_NOISE, bits) if self._adc_noise_on() else NO_KEYS
        self._upload()
        self._vectors_read = 0
        return self

    def _conductances_at(self, t: float, bits: int) -> tuple:
        """What the chip reads as at time t, from its programmed state, tile by tile:
        (G+ and G- read (2, n_in, n_out) float32, G+ - G- through the wires (n_in, n_out)
        float32, the per-pair read variance float32 or None where it is uniform or
        absent, the uniform variance or None, each tile's devices clamped at 0 (R, C))."""
        g_prog = self.g_prog.cpu().numpy()
        nu = self.nu.cpu().numpy() if self.nu.numel() else None
        g_read = np.empty(g_prog.shape, np.float32)
        gdiff = np.empty(self.shape, np.float32)
        clamped = np.zeros(self.grid_shape, np.int64)
        noisy = self.device.has_fast_noise
        var = np.empty(self.shape, np.float32) if noisy else None

        def read_tile(item) -> Optional[tuple]:
            """Tile k's part of the above; where the devices have per-read noise,
            (whether its read variance is uniform, its first value)."""
            k, (r, c, rs, cs) = item
            shape = (2, rs.stop - rs.start, cs.stop - cs.start)
            g, below = self.device.conductance_at(g_prog[:, rs, cs], None if nu is None else nu[:, rs, cs], t,
                                                  lambda: self._slow_normals(k, bits, shape))
            clamped[r, c] = 0 if below is None else int(below.sum())
            g_read[:, rs, cs] = g
            g_eff = self._through_wires(g)
            gdiff[rs, cs] = g_eff[0] - g_eff[1]  # the float64 difference, rounded to float32
            if not noisy:
                return None
            v = pair_read_variance(self.device.read_variance, g, g_eff)
            var[rs, cs] = v
            return bool(np.all(v == v.flat[0])), v.flat[0]

        # the wires' solves run BLAS on every core themselves, and their per-row loops hold
        # the GIL (on threads of their own the tiles took 9% longer): a tile at a time
        threads = 1 if self.config.ir_drop.on else self._host_threads()
        uniform = map_tiles(read_tile, list(enumerate(self.tiles())), threads)
        if noisy and all(same and first == uniform[0][1] for same, first in uniform):
            # then sum_i x_i^2 var_ij = var * sum_i x_i^2: a row sum, not a second product
            return g_read, gdiff, None, float(uniform[0][1]), clamped
        return g_read, gdiff, var, None, clamped

    def _host_threads(self) -> Optional[int]:
        """Host threads for the per-tile work (None: ``host_threads``' default); one for a
        small grid, whose tiles take less time than handing them to threads."""
        return None if self.shape[0] * self.shape[1] >= _THREADED_WEIGHTS else 1

    def _through_wires(self, g: np.ndarray) -> np.ndarray:
        """(2, rows, cols): the conductances the inputs see through a tile's wires, G_eff
        of both arrays of the tile whose conductances are g (PHYSICS.md section 8); g
        itself without."""
        wires = self.config.ir_drop
        if not wires.on:
            return g
        return np.stack([effective_conductance(g[p], wires.r_row, wires.r_col, self.config.rows) for p in (0, 1)])

    def _slow_normals(self, k: int, bits: int, shape: tuple) -> np.ndarray:
        """The standard normals of tile k's 1/f sample at the time of ``bits``."""
        return self._tile_draws(k, shape, SLOW_NOISE, bits)

    def _tile_draws(self, k: int, shape: tuple, *tags: int, uniform: bool = False) -> np.ndarray:
        """Tile k's normals (uniforms) of the stream ``tags`` names, for its devices of
        ``shape`` = (arrays, rows used, columns used) (``chip_draws``)."""
        return tile_draws(stream_key(derive(self.seeds[k], *tags)), shape, (self.config.rows, self.config.cols),
                          uniform)

    def stream_keys(self, *tags: int) -> np.ndarray:
        """(R, C) uint64: each tile's stream key of the sub-stream ``tags`` of its seed."""
        keys = np.empty(self.grid_shape, np.uint64)
        for k, (r, c, _, _) in enumerate(self.tiles()):
            keys[r, c] = stream_key(derive(self.seeds[k], *tags))
        return keys
