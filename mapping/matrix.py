"""A weight matrix on a grid of crossbar tiles that behaves like a matrix."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import numpy as np

from crossbar import Tile, TileConfig
from crossbar.seeding import SeedLike, as_seed_sequence, derive

from .conductance import reference_weight, weights_to_conductances
from .config import MappingConfig


# calibration inputs kept for drift compensation's reference read: enough for a stable
# mean |y|, few enough to read at every at(t) for free
COMPENSATION_ROWS = 128


def _blocks(n: int, size: int) -> list:
    return [(start, min(start + size, n)) for start in range(0, n, size)]


class AnalogMatrix:
    """W (out, in) split over tiles: inputs along tile rows, outputs along tile columns.

    Edge tiles are partly used. Each tile converts its own columns with its own ADC; the
    partial sums are added digitally, scaled back to weight units and, with drift
    compensation on, multiplied by alpha = r0 / r(t) (PHYSICS.md sections 5-6).

        A = AnalogMatrix(W, presets.pcm(), seed=0)
        A.calibrate(X_sample)       # calibrated DAC/ADC ranges, at t = 0
        Y = A.at(86400).matmul(X)   # X (batch, in) -> Y (batch, out), ~ X @ W.T
    """

    def __init__(self, weight, tile_config: TileConfig, seed: SeedLike = None,
                 mapping: Optional[MappingConfig] = None, name: str = "matrix") -> None:
        self.name = name
        self.mapping = mapping if mapping is not None else MappingConfig()
        if not isinstance(self.mapping, MappingConfig):
            raise ValueError(f"{name}: mapping = {mapping!r} is invalid: expected a MappingConfig")
        if not isinstance(tile_config, TileConfig):
            raise ValueError(f"{name}: tile_config = {tile_config!r} is invalid: expected a TileConfig")
        w = np.asarray(weight, dtype=np.float64)
        if w.ndim != 2 or 0 in w.shape:
            raise ValueError(f"{name}: weight has shape {w.shape}: expected a non-empty (out, in) matrix")
        n_bad = int((~np.isfinite(w)).sum())
        if n_bad:
            raise ValueError(f"layer {name!r}: weight contains {n_bad} NaN or Inf values")
        self.tile_config = tile_config
        self.shape = w.shape
        self.row_blocks = _blocks(w.shape[1], tile_config.rows)
        self.col_blocks = _blocks(w.shape[0], tile_config.cols)
        self.time = 0.0
        self.alpha = 1.0
        self.dac_range_fallback = False  # the calibration sample was all zero (see calibrate)
        self._r0: Optional[float] = None
        self._compensation_x: Optional[np.ndarray] = None  # stored calibration inputs
        self._program(w.T, as_seed_sequence(seed))
        if self._ranges_ready():
            self._measure_r0()

    # -- construction ----------------------------------------------------------------------
    def _program(self, wt: np.ndarray, seed: np.random.SeedSequence) -> None:
        dev, m = self.tile_config.device, self.mapping
        layer_ref = reference_weight(wt, m.clip, m.clip_value) if m.scale == "layer" else None
        self.tiles, self.scales, self.clipped_weights = [], [], 0
        for i, (r0, r1) in enumerate(self.row_blocks):
            tile_row, scale_row = [], []
            for j, (c0, c1) in enumerate(self.col_blocks):
                block = wt[r0:r1, c0:c1]
                if m.scale == "layer":
                    w_ref = layer_ref
                else:
                    w_ref = reference_weight(block, m.clip, m.clip_value, axis=0 if m.scale == "column" else None)
                g_plus, g_minus, scale, clipped = weights_to_conductances(block, dev.g_min, dev.g_max, w_ref)
                self.clipped_weights += clipped
                tile_row.append(Tile(self.tile_config).program(g_plus, g_minus,
                                                                 seed=derive(seed, i * len(self.col_blocks) + j)))
                scale_row.append(np.broadcast_to(np.asarray(scale, np.float32), (c1 - c0,)).copy())
            self.tiles.append(tile_row)
            self.scales.append(scale_row)

    @property
    def n_tiles(self) -> int:
        return len(self.row_blocks) * len(self.col_blocks)

    def all_tiles(self):
        for row in self.tiles:
            yield from row

    # -- the product --------------------------------------------------------------------------
    def matmul(self, x) -> np.ndarray:
        """X (batch, in) -> (batch, out) in weight units, float32."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.shape[1]:
            raise ValueError(f"{self.name}: input has shape {x.shape}: expected (batch, {self.shape[1]})")
        if x.dtype not in (np.float32, np.float64):
            raise ValueError(f"{self.name}: input has dtype {x.dtype}: expected float32 or float64")
        self._require_ready()
        chunk = self.mapping.max_rows_per_chunk
        if x.shape[0] <= chunk:
            return self._matmul(x, count=True)
        return np.concatenate([self._matmul(x[i:i + chunk], count=True) for i in range(0, x.shape[0], chunk)])

    @contextmanager
    def _naming(self, i: int, j: int):
        """Errors from tile (i, j) name this layer and the tile."""
        try:
            yield
        except (ValueError, RuntimeError) as err:
            raise type(err)(f"layer {self.name!r}, tile ({i}, {j}) of {len(self.row_blocks)} x "
                            f"{len(self.col_blocks)}: {err}") from None

    def _matmul(self, x: np.ndarray, count: bool, scale_output: bool = True) -> np.ndarray:
        y = np.zeros((x.shape[0], self.shape[0]), dtype=np.float32)
        for i, ((r0, r1), tile_row, scale_row) in enumerate(zip(self.row_blocks, self.tiles, self.scales)):
            xr = np.ascontiguousarray(x[:, r0:r1])
            for j, ((c0, c1), tile, scale) in enumerate(zip(self.col_blocks, tile_row, scale_row)):
                with self._naming(i, j):
                    y[:, c0:c1] += tile.mvm(xr, count=count) / scale
        if scale_output and self.alpha != 1.0:
            y *= np.float32(self.alpha)
        return y

    # -- time, calibration, drift compensation ------------------------------------------------
    def at(self, t: float) -> "AnalogMatrix":
        """Set the inference time (s since programming) of every tile; re-measure alpha."""
        for i, tile_row in enumerate(self.tiles):
            for j, tile in enumerate(tile_row):
                with self._naming(i, j):
                    tile.at(t)
        self.time = self.tiles[0][0].time
        if self.mapping.drift_compensation and self._r0 is not None:
            r_t = self._readout()
            if not r_t > 0:
                raise RuntimeError(f"layer {self.name!r}: drift compensation read back 0 at t = {t} s; "
                                   f"the array no longer conducts (check stuck-at and clamp counts)")
            self.alpha = self._r0 / r_t
        return self

    def calibrate(self, x) -> "AnalogMatrix":
        """Calibrate DAC (one range per layer) and ADC (one per tile) ranges on sample
        inputs X (batch, in), right after programming (t = 0), then measure r0.

        A sample too sparse for the percentile takes its maximum. A layer whose sample is
        all zero keeps a DAC range of 1 (normalised volts) and ``dac_range_fallback``;
        a tile whose inputs are all zero takes its ADC range from its conductances
        (``Tile.calibrate_output``); both are counted, and the run goes on."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.shape[1] or x.shape[0] == 0:
            raise ValueError(f"layer {self.name!r}: calibration input has shape {x.shape}: "
                             f"expected (batch > 0, {self.shape[1]})")
        t = self.time
        for tile in self.all_tiles():
            tile.at(0.0)
        cfg = self.tile_config
        self.dac_range_fallback = cfg.dac.range_mode == "calibrated" and not np.any(x)
        if cfg.dac.range_mode == "calibrated":
            magnitudes = np.abs(x)
            r = float(np.percentile(magnitudes, cfg.dac.percentile)) or float(magnitudes.max()) or 1.0
            for tile in self.all_tiles():
                tile.input_range = r
        if cfg.adc.range_mode == "calibrated":
            for i, ((r0, r1), tile_row) in enumerate(zip(self.row_blocks, self.tiles)):
                xr = np.ascontiguousarray(x[:, r0:r1])
                for j, tile in enumerate(tile_row):
                    with self._naming(i, j):
                        tile.calibrate_output(xr)
        compensation_x = x[:COMPENSATION_ROWS]
        if not np.any(compensation_x):
            # all-zero inputs read zero at every time; every line at full scale reads the array
            compensation_x = np.full((1, self.shape[1]), self.tiles[0][0].input_range or 1.0, np.float32)
        self._compensation_x = np.ascontiguousarray(compensation_x)
        self._measure_r0()
        self.at(t)
        return self

    def _measure_r0(self) -> None:
        self.alpha = 1.0
        if self.mapping.drift_compensation:
            self._r0 = self._readout()
            if not self._r0 > 0:
                raise RuntimeError(f"layer {self.name!r}: drift compensation reference read is 0: every output "
                                   f"of the reference input rounds to zero (all weights zero, or an ADC too "
                                   f"coarse for them); set mapping.drift_compensation = false for this model")

    def _readout(self) -> float:
        """Mean |output|, in weight units, for the fixed compensation input."""
        r_in = self.tiles[0][0].input_range or 1.0
        n_out, n_in = self.shape
        if self.mapping.compensation_input == "calibration" and self._compensation_x is not None:
            y = self._matmul(self._compensation_x, count=False, scale_output=False)
            return float(np.abs(y).mean(dtype=np.float64))
        if self.mapping.compensation_input == "ones":
            y = self._matmul(np.full((1, n_in), r_in, dtype=np.float32), count=False, scale_output=False)
            return float(np.abs(y).mean())
        # one-hot: a line's input reaches only its own row of tiles; the other tiles
        # see zero input and return exactly zero, so each row of tiles is read alone
        total = 0.0
        for (r0, r1), tile_row, scale_row in zip(self.row_blocks, self.tiles, self.scales):
            eye = np.eye(r1 - r0, dtype=np.float32) * np.float32(r_in)
            for tile, scale in zip(tile_row, scale_row):
                total += float(np.abs(tile.mvm(eye, count=False) / scale).sum(dtype=np.float64))
        return total / (n_in * n_out)

    def _ranges_ready(self) -> bool:
        cfg = self.tile_config
        tile = self.tiles[0][0]
        return not ((cfg.dac.bits is not None and tile.input_range is None)
                    or (cfg.adc.bits is not None and tile.output_range is None))

    def _require_ready(self) -> None:
        if not self._ranges_ready():
            raise RuntimeError(f"layer {self.name!r}: DAC/ADC ranges are not calibrated: call calibrate() "
                               f"with sample inputs first (calibrated range modes)")

    # -- reporting and persistence ------------------------------------------------------------
    def counts(self) -> dict:
        """Summed tile counts plus the weights clipped by the mapping."""
        total = {}
        for tile in self.all_tiles():
            for k, v in tile.counts.as_dict().items():
                total[k] = total.get(k, 0) + v
        total["weights"] = self.shape[0] * self.shape[1]
        total["clipped_weights"] = self.clipped_weights
        total["tiles"] = self.n_tiles
        total["dac_range_fallback"] = int(self.dac_range_fallback)
        return total

    def reset_counts(self) -> None:
        for tile in self.all_tiles():
            tile.reset_counts()

    def weight_read(self) -> np.ndarray:
        """The weights the tiles hold now, (G+ - G-) / scale at the current time, (out, in)."""
        w = np.zeros((self.shape[1], self.shape[0]))
        for (r0, r1), tile_row, scale_row in zip(self.row_blocks, self.tiles, self.scales):
            for (c0, c1), tile, scale in zip(self.col_blocks, tile_row, scale_row):
                g_plus, g_minus = tile.conductances()
                w[r0:r1, c0:c1] = (g_plus.astype(np.float64) - g_minus) / scale
        return w.T * self.alpha

    def state(self) -> dict:
        return {
            "tiles": [tile.state_dict() for tile in self.all_tiles()],
            "scales": [s for row in self.scales for s in row],
            "clipped_weights": self.clipped_weights,
            "r0": self._r0,
            "dac_range_fallback": self.dac_range_fallback,
            "compensation_x": self._compensation_x,
            "time": self.time,
        }

    def load_state(self, state: dict) -> "AnalogMatrix":
        if len(state["tiles"]) != self.n_tiles:
            raise ValueError(f"{self.name}: saved state has {len(state['tiles'])} tiles, this layer {self.n_tiles}")
        for tile, tile_state in zip(self.all_tiles(), state["tiles"]):
            tile.load_state_dict(tile_state)
        flat = iter(state["scales"])
        self.scales = [[np.asarray(next(flat), np.float32) for _ in row] for row in self.tiles]
        self.clipped_weights = int(state["clipped_weights"])
        self._r0 = state["r0"]
        self.dac_range_fallback = bool(state.get("dac_range_fallback", False))
        cx = state["compensation_x"]
        self._compensation_x = None if cx is None else np.asarray(cx, np.float32)
        self.alpha = 1.0
        return self.at(state["time"])
