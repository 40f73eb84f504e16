"""A tile grid's converter ranges: the DAC's full scale (one for the grid) and each
tile's ADC full scale, set, fixed by the config or calibrated on sample inputs read
now (noise included) through the DAC and an unclipped ADC.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from . import torch_engine
from .grid_product import EMPTY_2D, EMPTY_DIVISOR, NO_KEYS
from .grid_programming import CALIBRATION_READS, time_bits
from .kernels import IDEAL, grid_readout
from .percentile import percentile
from .tensor_mode import normal_tensors

if TYPE_CHECKING:
    from .grid import TileGrid


class ConverterRanges:
    """Mixed into :class:`~crossbar.grid.TileGrid`: the DAC range (buffer
    ``dac_range``) and the ADC ranges (``adc_ranges``, (R, C)), and their calibration
    (``counts["adc_range_fallback"]``), on the grid's engine."""

    @property
    def input_range(self) -> Optional[float]:
        """DAC full scale of every tile, normalised volts (1 for per-vector scaling; None
        until calibrated)."""
        if self.config.dac.range_mode == "per_vector":
            return 1.0
        r = float(self._host("dac_range"))
        return None if np.isnan(r) else r

    def set_input_range(self, value: float) -> None:
        self.dac_range.fill_(check_range("input_range", value))

    def output_ranges(self) -> Optional[np.ndarray]:
        """(R, C) ADC full scales, uS x normalised volts (None until calibrated)."""
        mode = self.config.adc.range_mode
        if mode == "worst_case":
            r_in = self.input_range
            if r_in is None:
                return None
            dev = self.config.device
            if self.config.dac.cycles > 1:  # the largest input of one cycle
                r_in *= min(2 ** self.config.dac.bits_per_cycle - 1, self._dac_half) / self._dac_half
            return np.full(self.grid_shape, self.config.rows * (dev.g_max - dev.g_min) * r_in)
        ranges = self._host("adc_ranges")
        return None if np.isnan(ranges).any() else ranges

    def set_output_range(self, value: float, tile: Optional[tuple] = None) -> None:
        """Set the ADC full scale of one tile (r, c), or of all."""
        value = check_range("output_range", value)
        if tile is None:
            self.adc_ranges.fill_(value)
        else:
            self.adc_ranges[tile] = value

    def calibrate(self, x) -> "TileGrid":
        """Calibrated DAC (one range for the grid) and ADC (one per tile) ranges from
        sample inputs x (batch, n_in), read now."""
        if self.config.dac.range_mode == "calibrated":
            self.calibrate_input(x)
        if self.config.adc.range_mode == "calibrated":
            self.calibrate_output(x)
        return self

    @normal_tensors
    def calibrate_input(self, x) -> "TileGrid":
        """Set the DAC range to the configured percentile of |x| (its maximum if the
        sample is so sparse that the percentile is 0)."""
        x = self.check_input(x)
        r = percentile_range(np.abs(x), self.config.dac.percentile)
        if r is None:
            raise ValueError(f"{self.name}: cannot calibrate the input range: the sample is all zero; "
                             f"give non-zero sample data")
        self.set_input_range(r)
        return self

    @normal_tensors
    def calibrate_output(self, x) -> "TileGrid":
        """Set each tile's ADC range to the configured percentile of its column outputs
        for inputs x, as read now (noise included) through the DAC and an unclipped ADC.

        A tile whose sample gives no output at all (all its inputs zero, as some tiles of
        a layer see after ReLU and pooling) takes the largest output that inputs within
        the DAC range can produce on its conductances, r_in * max_j sum_i |G+_ij - G-_ij|
        (nothing saturates); ``counts["adc_range_fallback"]`` marks it. The torch engine
        reads and takes the percentiles on the grid's device, the Numba engine on the host."""
        keys = self.stream_keys(CALIBRATION_READS, time_bits(self.time))
        read = self._row_block_reads_torch if self._derives_on_device() else self._row_block_reads
        q = self.config.adc.percentile
        ranges = np.empty(self.grid_shape)
        for r, y in enumerate(read(x, keys)):
            for c in range(self.grid_shape[1]):
                outputs = y[:, self.col_starts[c]:self.col_starts[c + 1]]
                found = percentile_range(abs(outputs), q)  # numpy or a tensor
                self.counts["adc_range_fallback"][r, c] = int(found is None)
                ranges[r, c] = found if found is not None else self._largest_output(r, c)
        self.adc_ranges.copy_(torch.from_numpy(ranges))  # one copy, wherever the buffer lives
        return self

    def _row_block_reads(self, x, keys: np.ndarray):
        """Each row block's outputs (vectors, n_out) for inputs x through the DAC, read
        now with the streams of ``keys`` (R, C) and no ADC (every bit-serial cycle's
        inputs a vector of their own), float32 numpy arrays: the Numba engine's, on the
        host (np.partition finds a percentile's order statistics 2-3x faster there than
        torch.topk)."""
        x = self.check_input(x)
        xq, scales, _ = self._convert_inputs(x)
        cycles = self._cycles(xq)
        if len(cycles) > 1:  # the ADC converts every cycle's outputs: calibrate on them all
            xq = np.concatenate([xc for _, xc in cycles])
            scales = np.concatenate([scales] * len(cycles), axis=1) if scales.size else scales
        partial, var, var_rows = self._products(xq)
        for r in range(self.grid_shape[0]):
            y = np.empty((xq.shape[0], self.shape[1]), np.float32)
            grid_readout(partial[r:r + 1], var[r:r + 1], var_rows[r:r + 1], self.col_starts, keys[r:r + 1], 0,
                         np.ones((1, self.grid_shape[1])), IDEAL, scales[r:r + 1], EMPTY_DIVISOR, 1.0, y,
                         EMPTY_2D, EMPTY_2D, NO_KEYS, 0.0, 0.0)
            yield y

    def _row_block_reads_torch(self, x, keys: np.ndarray):
        """:meth:`_row_block_reads` by the torch engine: tensors on the grid's device."""
        device = self.g_prog.device
        x = self.check_tensor(torch.as_tensor(x).to(device))
        xq, scales, _ = self._convert_inputs_torch(x)
        cycles = self._cycles(xq)
        if len(cycles) > 1:
            xq = torch.cat([xc for _, xc in cycles])
            scales = None if scales is None else torch.cat([scales] * len(cycles), dim=1)
        partial, var, var_rows = self._products_torch(xq)
        keys_t = torch_engine.column_keys(keys, self.column_map())
        first = torch.zeros((), dtype=torch.int64, device=device)
        ones = torch.ones((1, self.grid_shape[1]), dtype=torch.float64, device=device)

        def rows(a, r):
            return None if a is None else a[r:r + 1]

        for r in range(self.grid_shape[0]):
            y, _ = torch_engine.readout(partial[r:r + 1], rows(var, r), rows(var_rows, r), self._columns,
                                        keys_t[r:r + 1], first, ones, IDEAL, rows(scales, r), None, 1.0)
            yield y

    def _largest_output(self, r: int, c: int) -> float:
        rs = slice(self.row_starts[r], self.row_starts[r + 1])
        cs = slice(self.col_starts[c], self.col_starts[c + 1])
        r_in = self.input_range or 1.0
        gdiff = self._g_read[0, rs, cs].astype(np.float64) - self._g_read[1, rs, cs]
        largest = float(np.abs(gdiff).sum(axis=0).max()) * r_in
        if largest > 0:
            return largest
        dev = self.config.device  # the tile holds zeros: the whole conductance range
        return (rs.stop - rs.start) * (dev.g_max - dev.g_min) * r_in

    def _require_input_range(self) -> Optional[float]:
        r_in = self.input_range
        if self._dac_half != IDEAL and r_in is None:
            raise RuntimeError(f"{self.name}: DAC range is not calibrated: call calibrate(x_sample), set the "
                               f"input range, or use dac.range_mode 'fixed' or 'per_vector'")
        return r_in

    def _require_ranges(self) -> np.ndarray:
        ranges = self.output_ranges()
        if self._adc_half != IDEAL and ranges is None:
            raise RuntimeError(f"{self.name}: ADC range is not calibrated: call calibrate(x_sample), set the "
                               f"output range, or use adc.range_mode 'fixed' or 'worst_case'")
        return np.ones(self.grid_shape) if ranges is None else ranges


def check_range(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} = {value!r} is invalid: expected a finite number > 0")
    return float(value)


def percentile_range(magnitudes, q: float) -> Optional[float]:
    """The percentile q of the magnitudes (numpy, or a tensor on any device: the same
    value, ``crossbar.percentile``); their maximum where the sample is so sparse that the
    percentile is 0; None where the sample is all zero."""
    r = float(percentile(magnitudes, q))
    if r > 0:
        return r
    largest = float(magnitudes.max())
    return largest if largest > 0 else None
