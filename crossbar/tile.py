"""A simulated memristive crossbar tile holding differential conductance pairs."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch

from .config import TileConfig
from .devices import make_device
from .kernels import IDEAL, dac_convert, levels_per_side, readout_convert, row_sum_squares
from .rng import stream_key
from .seeding import SeedLike, as_seed_sequence, derive

# Sub-stream tags: each physical effect draws from its own stream, so switching one
# effect on or off leaves the samples of the others unchanged.
_PROGRAM, _FAULTS, _DRIFT, _SLOW_NOISE, _READS, _CALIBRATION_READS = range(6)
_NO_VARIANCE = np.empty((0, 0), dtype=np.float32)
_NO_ROW_VARIANCE = np.empty(0, dtype=np.float64)
# Targets a hair outside [g_min, g_max] from float rounding in the weight mapping are
# accepted and pulled in; anything further out is an error.
_RANGE_TOLERANCE = 1e-6


@dataclass
class TileCounts:
    """What the tile clipped, saturated or clamped: ranges the user may need to fix.

    Attributes:
        devices: programmed devices (2 per weight: G+ and G-).
        prog_clamped: devices whose programmed conductance fell below 0 and was set to 0.
        stuck_min: devices stuck at g_min.
        stuck_max: devices stuck at g_max.
        read_clamped: devices clamped at 0 by the 1/f sample at the current time.
        dac_converted: input values converted since the last reset.
        dac_clipped: of those, values beyond the DAC range (clipped to it).
        adc_converted: column outputs converted since the last reset.
        adc_saturated: of those, outputs beyond the ADC range (saturated).
        adc_range_fallback: 1 if the calibration sample gave this tile no output at all
            (its inputs were all zero, e.g. after ReLU and pooling), so that its ADC
            range was set from its conductances instead (see ``calibrate_output``).
    """

    devices: int = 0
    prog_clamped: int = 0
    stuck_min: int = 0
    stuck_max: int = 0
    read_clamped: int = 0
    dac_converted: int = 0
    dac_clipped: int = 0
    adc_converted: int = 0
    adc_saturated: int = 0
    adc_range_fallback: int = 0

    def as_dict(self) -> dict:
        return asdict(self)

    def record(self, inputs: int, clipped: int, outputs: int, saturated: int) -> None:
        """Add one read's conversions."""
        self.dac_converted += inputs
        self.dac_clipped += clipped
        self.adc_converted += outputs
        self.adc_saturated += saturated


class Tile:
    """One crossbar tile of ``config.rows`` x ``config.cols`` differential pairs.

    Typical use::

        tile = Tile(crossbar.presets.pcm(rows=256, cols=256, dac_bits=8, adc_bits=8))
        tile.program(g_plus, g_minus, seed=0)   # target conductances, uS
        tile.calibrate(x_sample)                # calibrated DAC/ADC ranges only
        tile.at(86400.0)                        # one day after programming
        y = tile.mvm(x)                         # ~ x @ (G+ - G-), after the ADC

    ``mvm`` returns float32 in the units of ``x @ (G+ - G-)`` (uS x normalised volts).
    """

    def __init__(self, config: TileConfig) -> None:
        if not isinstance(config, TileConfig):
            raise ValueError(f"config = {config!r} is invalid: expected a crossbar.TileConfig")
        self.config = config
        self.device = make_device(config.device)
        self.counts = TileCounts()
        self._dac_half = levels_per_side(config.dac.bits)
        self._adc_half = levels_per_side(config.adc.bits)
        self._input_range: Optional[float] = config.dac.range if config.dac.range_mode == "fixed" else None
        self._output_range: Optional[float] = config.adc.range if config.adc.range_mode == "fixed" else None
        self._g_prog: Optional[np.ndarray] = None  # (2, rows_used, cols_used): G+, G- at t = 0
        self._nu: Optional[np.ndarray] = None       # drift exponents, same shape, or None
        self._seed: Optional[np.random.SeedSequence] = None
        self.time = 0.0

    # -- programming and time ------------------------------------------------------------
    @property
    def programmed(self) -> bool:
        return self._g_prog is not None

    @property
    def shape_used(self) -> tuple:
        self._require_programmed("shape_used")
        return self._g_prog.shape[1:]

    def program(self, g_plus, g_minus, seed: SeedLike = None) -> "Tile":
        """Program target conductances (uS) of shape (rows_used, cols_used) into the tile."""
        targets = self._check_targets(g_plus, g_minus)
        self._seed = as_seed_sequence(seed)
        prog = self.device.program(targets, self._rng(_PROGRAM), self._rng(_FAULTS))
        nu = None
        if self.config.device.drift:
            nu = self.device.drift_exponents(targets, self._rng(_DRIFT))
            nu[prog.stuck] = 0.0  # a stuck device keeps its conductance
            nu = nu.astype(np.float32)
        self._g_prog = prog.g.astype(np.float32)
        self._nu = nu
        self.counts = TileCounts(devices=int(targets.size), prog_clamped=prog.clamped,
                                 stuck_min=prog.stuck_min, stuck_max=prog.stuck_max)
        self.at(0.0)
        return self

    def at(self, t: float) -> "Tile":
        """Set the inference time, seconds since programming: drift, and the 1/f sample
        frozen for every read at this time (the same t always gives the same sample)."""
        self._require_programmed("at")
        if isinstance(t, bool) or not isinstance(t, (int, float, np.floating, np.integer)) or not np.isfinite(t) or t < 0:
            raise ValueError(f"t = {t!r} is invalid: expected a finite time >= 0 s")
        t = float(t)
        t_bits = int(np.float64(t).view(np.uint64))
        g, clamped = self.device.conductance_at(self._g_prog, self._nu, t, self._rng(_SLOW_NOISE, t_bits))
        self.time = t
        self.counts.read_clamped = clamped
        self._g_read = g.astype(np.float32)
        self._gdiff = torch.from_numpy(np.ascontiguousarray(g[0] - g[1], dtype=np.float32))
        self._var = None            # per-pair read variance, uS^2, when it varies
        self._var_uniform = None    # the one value when every pair has the same
        if self.device.has_fast_noise:
            var = self.device.read_variance(g[0]) + self.device.read_variance(g[1])
            if np.all(var == var.flat[0]):
                # then sum_i x_i^2 var_ij = var * sum_i x_i^2: a row sum, not a second product
                self._var_uniform = float(var.flat[0])
            else:
                self._var = torch.from_numpy(np.ascontiguousarray(var, dtype=np.float32))
        self._read_key = stream_key(self._child(_READS, t_bits))
        self._read_offset = 0
        return self

    # -- ranges --------------------------------------------------------------------------
    @property
    def input_range(self) -> Optional[float]:
        """DAC full scale in normalised volts (1 for per-vector scaling; None until calibrated)."""
        return 1.0 if self.config.dac.range_mode == "per_vector" else self._input_range

    @input_range.setter
    def input_range(self, value: float) -> None:
        self._input_range = _check_range("input_range", value)

    @property
    def output_range(self) -> Optional[float]:
        """ADC full scale in uS x normalised volts (None until calibrated)."""
        if self.config.adc.range_mode == "worst_case":
            r_in = self.input_range
            if r_in is None:
                return None
            dev = self.config.device
            return self.config.rows * (dev.g_max - dev.g_min) * r_in
        return self._output_range

    @output_range.setter
    def output_range(self, value: float) -> None:
        self._output_range = _check_range("output_range", value)

    def calibrate(self, x) -> "Tile":
        """Set calibrated DAC and ADC ranges from sample inputs x (batch, rows_used)."""
        if self.config.dac.range_mode == "calibrated":
            self.calibrate_input(x)
        if self.config.adc.range_mode == "calibrated":
            self.calibrate_output(x)
        return self

    def calibrate_input(self, x) -> "Tile":
        """Set the DAC range to the configured percentile of |x|."""
        x = self._check_input(x)
        r = _percentile_range(np.abs(x), self.config.dac.percentile)
        if r is None:
            raise ValueError("cannot calibrate the input range: the sample is all zero; give non-zero sample data")
        self._input_range = r
        return self

    def calibrate_output(self, x) -> "Tile":
        """Set the ADC range to the configured percentile of the column outputs for
        inputs x, as read now (noise included) through the DAC and an unclipped ADC.

        A sample that gives no output at all (all inputs zero, as some tiles of a layer
        see after ReLU and pooling) says nothing about the range; the tile then takes the
        largest output that inputs within the DAC range can produce on its programmed
        conductances, r_in * max_j sum_i |G+_ij - G-_ij| (nothing saturates), and
        ``counts.adc_range_fallback`` is set."""
        x = self._check_input(x)
        key = stream_key(self._child(_CALIBRATION_READS, int(np.float64(self.time).view(np.uint64))))
        y, _, _ = self._forward(x, key, 0, IDEAL, 1.0)
        r = _percentile_range(np.abs(y), self.config.adc.percentile)
        self.counts.adc_range_fallback = int(r is None)
        self._output_range = r if r is not None else self._largest_output()
        return self

    def _largest_output(self) -> float:
        """max_j sum_i |G+_ij - G-_ij| x r_in at the current read; the worst case of the
        whole conductance range where every pair is balanced (the tile holds zeros)."""
        r_in = self.input_range or 1.0
        largest = float(np.abs(self._g_read[0].astype(np.float64) - self._g_read[1]).sum(axis=0).max()) * r_in
        if largest > 0:
            return largest
        dev = self.config.device
        return self._g_prog.shape[1] * (dev.g_max - dev.g_min) * r_in

    # -- the matrix-vector product -------------------------------------------------------
    def mvm(self, x, count: bool = True) -> np.ndarray:
        """Column outputs (batch, cols_used) for inputs x (batch, rows_used), after the ADC.

        count=False leaves the clip/saturation counts alone (for calibration reads that
        are not inference, such as drift compensation's reference read)."""
        x = self._check_input(x)
        r_out = self.output_range
        if self._adc_half != IDEAL and r_out is None:
            raise RuntimeError("ADC range is not calibrated: call tile.calibrate(x_sample), set "
                               "tile.output_range, or use adc.range_mode 'fixed' or 'worst_case'")
        y, clipped, saturated = self._forward(x, self._read_key, self._read_offset, self._adc_half,
                                              1.0 if r_out is None else r_out)
        self._read_offset += y.size
        if count:
            self.counts.record(x.size, clipped, y.size, saturated)
        return y

    def _forward(self, x: np.ndarray, key: int, offset: int, adc_half: int, adc_range: float):
        r_in = self.input_range
        if self._dac_half != IDEAL and r_in is None:
            raise RuntimeError("DAC range is not calibrated: call tile.calibrate(x_sample), set "
                               "tile.input_range, or use dac.range_mode 'fixed' or 'per_vector'")
        batch = x.shape[0]
        per_vector = self.config.dac.range_mode == "per_vector"
        xq = np.empty(x.shape, dtype=np.float32)
        scales = np.empty(batch if per_vector else 0, dtype=np.float64)
        clip_rows = np.empty(batch, dtype=np.int64)
        bad_rows = np.empty(batch, dtype=np.int64)
        dac_convert(x, xq, 1.0 if r_in is None else r_in, self._dac_half, per_vector, scales,
                    clip_rows, bad_rows)
        bad = int(bad_rows.sum())
        if bad:
            raise ValueError(f"x contains {bad} NaN or Inf values; inputs must be finite")
        xq_t = torch.from_numpy(xq)
        y = torch.matmul(xq_t, self._gdiff).numpy()
        var, var_rows = _NO_VARIANCE, _NO_ROW_VARIANCE
        if self._var is not None:
            var = torch.matmul(xq_t * xq_t, self._var).numpy()
        elif self._var_uniform is not None:
            var_rows = np.empty(batch, dtype=np.float64)
            row_sum_squares(xq, var_rows)
            var_rows *= self._var_uniform
        sat_rows = np.empty(batch, dtype=np.int64)
        readout_convert(y, var, var_rows, np.uint64(key), np.uint64(offset), adc_range, adc_half,
                        scales, sat_rows)
        return y, int(clip_rows.sum()), int(sat_rows.sum())

    # -- inspection and persistence ------------------------------------------------------
    def conductances(self) -> tuple:
        """(G+, G-) as read at the current time (drift and 1/f applied), uS, float32."""
        self._require_programmed("conductances")
        return self._g_read[0], self._g_read[1]

    def programmed_conductances(self) -> tuple:
        """(G+, G-) right after programming (t = 0), uS, float32."""
        self._require_programmed("programmed_conductances")
        return self._g_prog[0], self._g_prog[1]

    def read_variance(self) -> Optional[np.ndarray]:
        """Per-read noise variance of each pair, sigma+^2 + sigma-^2 in uS^2 (None: no noise)."""
        self._require_programmed("read_variance")
        if self._var_uniform is not None:
            return np.full(self._g_prog.shape[1:], self._var_uniform, dtype=np.float32)
        return None if self._var is None else self._var.numpy()

    def reset_counts(self) -> None:
        """Zero the DAC/ADC conversion counts (programming counts are kept)."""
        c = self.counts
        c.dac_converted = c.dac_clipped = c.adc_converted = c.adc_saturated = 0

    def state_dict(self) -> dict:
        """Everything needed to reproduce this programmed tile bitwise."""
        self._require_programmed("state_dict")
        return {
            "config": self.config.to_dict(),
            "g_prog": self._g_prog.copy(),
            "nu": None if self._nu is None else self._nu.copy(),
            "seed_entropy": self._seed.entropy,
            "seed_spawn_key": tuple(self._seed.spawn_key),
            "time": self.time,
            "input_range": self._input_range,
            "output_range": self._output_range,
            "counts": self.counts.as_dict(),
        }

    def load_state_dict(self, state: dict) -> "Tile":
        if state["config"] != self.config.to_dict():
            raise ValueError("state_dict was saved from a tile with a different config")
        self._g_prog = np.asarray(state["g_prog"], dtype=np.float32).copy()
        self._nu = None if state["nu"] is None else np.asarray(state["nu"], dtype=np.float32).copy()
        self._seed = np.random.SeedSequence(state["seed_entropy"], spawn_key=tuple(state["seed_spawn_key"]))
        self._input_range = state["input_range"]
        self._output_range = state["output_range"]
        self.counts = TileCounts(**state["counts"])
        self.at(state["time"])
        return self

    # -- helpers -------------------------------------------------------------------------
    def _child(self, *tags: int) -> np.random.SeedSequence:
        return derive(self._seed, *tags)

    def _rng(self, *tags: int) -> np.random.Generator:
        return np.random.default_rng(self._child(*tags))

    def _require_programmed(self, what: str) -> None:
        if self._g_prog is None:
            raise RuntimeError(f"tile.{what}() needs a programmed tile: call tile.program(g_plus, g_minus) first")

    def _check_targets(self, g_plus, g_minus) -> np.ndarray:
        dev = self.config.device
        arrays = []
        for name, g in (("g_plus", g_plus), ("g_minus", g_minus)):
            g = np.asarray(g, dtype=np.float64)
            if g.ndim != 2 or g.shape[0] < 1 or g.shape[1] < 1:
                raise ValueError(f"{name} has shape {g.shape}: expected (rows_used, cols_used)")
            if g.shape[0] > self.config.rows or g.shape[1] > self.config.cols:
                raise ValueError(f"{name} has shape {g.shape}: does not fit a tile of "
                                 f"{self.config.rows} x {self.config.cols}")
            if not np.all(np.isfinite(g)):
                raise ValueError(f"{name} contains {int((~np.isfinite(g)).sum())} NaN or Inf values")
            tol = _RANGE_TOLERANCE * dev.g_max
            lo, hi = float(g.min()), float(g.max())
            if lo < dev.g_min - tol or hi > dev.g_max + tol:
                raise ValueError(f"{name} spans [{lo:g}, {hi:g}] uS: targets must lie in "
                                 f"[g_min, g_max] = [{dev.g_min:g}, {dev.g_max:g}] uS")
            arrays.append(np.clip(g, dev.g_min, dev.g_max))
        if arrays[0].shape != arrays[1].shape:
            raise ValueError(f"g_plus {arrays[0].shape} and g_minus {arrays[1].shape} must have the same shape")
        return np.stack(arrays)

    def _check_input(self, x) -> np.ndarray:
        self._require_programmed("mvm")
        x = np.asarray(x)
        if x.dtype not in (np.float32, np.float64):
            raise ValueError(f"x has dtype {x.dtype}: expected float32 or float64")
        rows_used = self._g_prog.shape[1]
        if x.ndim != 2 or x.shape[1] != rows_used:
            raise ValueError(f"x has shape {x.shape}: expected (batch, {rows_used})")
        return x if x.flags.c_contiguous else np.ascontiguousarray(x)


def _check_range(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} = {value!r} is invalid: expected a finite number > 0")
    return float(value)


def _percentile_range(magnitudes: np.ndarray, percentile: float) -> Optional[float]:
    """The percentile of the magnitudes; their maximum where the sample is so sparse that
    the percentile is 0; None where the sample is all zero."""
    r = float(np.percentile(magnitudes, percentile))
    if r > 0:
        return r
    largest = float(magnitudes.max()) if magnitudes.size else 0.0
    return largest if largest > 0 else None
