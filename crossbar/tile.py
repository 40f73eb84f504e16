"""A simulated memristive crossbar tile holding differential conductance pairs: the
public single-tile API, run by the tile-grid engine as its 1 x 1 case."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from .config import TileConfig
from .devices import make_device
from .grid import TileGrid
from .grid_ranges import check_range
from .seeding import SeedLike, as_seed_sequence


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



class Tile:
    """One crossbar tile of ``config.rows`` x ``config.cols`` differential pairs.

    Typical use::

        tile = Tile(crossbar.presets.pcm(rows=256, cols=256, dac_bits=8, adc_bits=8))
        tile.program(g_plus, g_minus, seed=0)   # target conductances, uS
        tile.calibrate(x_sample)                # calibrated DAC/ADC ranges only
        tile.at(86400.0)                        # one day after programming
        y = tile.mvm(x)                         # ~ x @ (G+ - G-), after the ADC

    ``mvm`` returns float32 in the units of ``x @ (G+ - G-)`` (uS x normalised volts).
    The tile is a 1 x 1 :class:`crossbar.grid.TileGrid` of the programmed shape.
    """

    def __init__(self, config: TileConfig) -> None:
        if not isinstance(config, TileConfig):
            raise ValueError(f"config = {config!r} is invalid: expected a crossbar.TileConfig")
        self.config = config
        self.device = make_device(config.device)
        self._grid: Optional[TileGrid] = None
        # ranges set before programming, handed to the grid when it exists
        self._input_range: Optional[float] = None
        self._output_range: Optional[float] = None

    # -- programming and time ------------------------------------------------------------
    @property
    def programmed(self) -> bool:
        return self._grid is not None

    @property
    def grid(self) -> TileGrid:
        self._require_programmed("grid")
        return self._grid

    @property
    def shape_used(self) -> tuple:
        return self.grid.shape

    @property
    def time(self) -> float:
        return self._grid.time if self._grid is not None else 0.0

    def program(self, g_plus, g_minus, seed: SeedLike = None) -> "Tile":
        """Program target conductances (uS) of shape (rows_used, cols_used) into the tile."""
        shapes = []
        for name, g in (("g_plus", g_plus), ("g_minus", g_minus)):
            shape = np.shape(g)
            if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
                raise ValueError(f"{name} has shape {shape}: expected (rows_used, cols_used)")
            if shape[0] > self.config.rows or shape[1] > self.config.cols:
                raise ValueError(f"{name} has shape {shape}: does not fit a tile of "
                                 f"{self.config.rows} x {self.config.cols}")
            shapes.append(shape)
        if shapes[0] != shapes[1]:
            raise ValueError(f"g_plus {shapes[0]} and g_minus {shapes[1]} must have the same shape")
        grid = TileGrid(self.config, *shapes[0], name="tile")
        grid.program(g_plus, g_minus, [as_seed_sequence(seed)])
        if self._input_range is not None:
            grid.set_input_range(self._input_range)
        if self._output_range is not None:
            grid.set_output_range(self._output_range)
        self._grid = grid
        return self

    def at(self, t: float) -> "Tile":
        """Set the inference time, seconds since programming: drift, and the 1/f sample
        frozen for every read at this time (the same t always gives the same sample)."""
        self._require_programmed("at")
        self._grid.at(t)
        return self

    # -- ranges --------------------------------------------------------------------------
    @property
    def input_range(self) -> Optional[float]:
        """DAC full scale in normalised volts (1 for per-vector scaling; None until calibrated)."""
        if self._grid is not None:
            return self._grid.input_range
        if self.config.dac.range_mode == "per_vector":
            return 1.0
        return self.config.dac.range if self.config.dac.range_mode == "fixed" else self._input_range

    @input_range.setter
    def input_range(self, value: float) -> None:
        self._input_range = check_range("input_range", value)
        if self._grid is not None:
            self._grid.set_input_range(value)

    @property
    def output_range(self) -> Optional[float]:
        """ADC full scale in uS x normalised volts (None until calibrated)."""
        if self._grid is not None:
            ranges = self._grid.output_ranges()
            return None if ranges is None else float(ranges[0, 0])
        return self.config.adc.range if self.config.adc.range_mode == "fixed" else self._output_range

    @output_range.setter
    def output_range(self, value: float) -> None:
        self._output_range = check_range("output_range", value)
        if self._grid is not None:
            self._grid.set_output_range(value)

    def calibrate(self, x) -> "Tile":
        """Set calibrated DAC and ADC ranges from sample inputs x (batch, rows_used)."""
        self.grid.calibrate(x)
        return self

    def calibrate_input(self, x) -> "Tile":
        """Set the DAC range to the configured percentile of |x|."""
        self.grid.calibrate_input(x)
        return self

    def calibrate_output(self, x) -> "Tile":
        """Set the ADC range from the column outputs for inputs x, as read now (see
        :meth:`crossbar.grid.TileGrid.calibrate_output`, including the range a tile
        takes when its sample gives no output at all)."""
        self.grid.calibrate_output(x)
        return self

    # -- the matrix-vector product -------------------------------------------------------
    def mvm(self, x, count: bool = True) -> np.ndarray:
        """Column outputs (batch, cols_used) for inputs x (batch, rows_used), after the ADC.

        count=False leaves the clip/saturation counts alone (for calibration reads that
        are not inference, such as drift compensation's reference read)."""
        self._require_programmed("mvm")
        return self._grid.product(x, count=count)

    # -- inspection and persistence ------------------------------------------------------
    @property
    def counts(self) -> TileCounts:
        """What the tile clipped, saturated or clamped (a snapshot)."""
        if self._grid is None:
            return TileCounts()
        return TileCounts(**self._grid.count_totals())

    def conductances(self) -> tuple:
        """(G+, G-) as read at the current time (drift and 1/f applied), uS, float32."""
        g = self.grid.conductances()
        return g[0], g[1]

    def programmed_conductances(self) -> tuple:
        """(G+, G-) right after programming (t = 0), uS, float32."""
        g = self.grid.g_prog.cpu().numpy()
        return g[0], g[1]

    def read_variance(self) -> Optional[np.ndarray]:
        """Per-read noise variance of each pair, sigma+^2 + sigma-^2 in uS^2 (None: no noise)."""
        return self.grid.read_variance()

    def reset_counts(self) -> None:
        """Zero the DAC/ADC conversion counts (programming counts are kept)."""
        if self._grid is not None:
            self._grid.reset_counts()

    def state_dict(self) -> dict:
        """Everything needed to reproduce this programmed tile bitwise (torch tensors and
        plain values: torch.save(..., weights_only=True) round-trips it)."""
        self._require_programmed("state_dict")
        return {"config": self.config.to_dict(), "grid": self._grid.state_dict()}

    def load_state_dict(self, state: dict) -> "Tile":
        if state.get("config") != self.config.to_dict():
            raise ValueError("state_dict was saved from a tile with a different config")
        g_prog = state["grid"]["g_prog"]
        grid = TileGrid(self.config, *g_prog.shape[1:], name="tile")
        grid.load_state_dict(state["grid"])
        self._grid = grid
        return self

    # -- helpers -------------------------------------------------------------------------
    def _require_programmed(self, what: str) -> None:
        if self._grid is None:
            raise RuntimeError(f"tile.{what}() needs a programmed tile: call tile.program(g_plus, g_minus) first")

    def _check_input(self, x) -> np.ndarray:
        self._require_programmed("mvm")
        return self._grid.check_input(x)
