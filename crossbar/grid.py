"""A tile grid: every crossbar tile of one weight matrix as one batched computation.

A matrix of n_in inputs and n_out outputs is cut into R row blocks of ``config.rows``
inputs and C column blocks of ``config.cols`` outputs; tile (r, c) holds the conductance
pairs of row block r and column block c (edge tiles are partly used). The grid keeps
the state of all its tiles as stacked arrays: conductances as (2, n_in, n_out) arrays
of which each tile owns a block, and per-tile quantities (ADC ranges, read-noise stream
keys, counts) as (R, C) arrays. Programming, ``at(t)``, calibration and the product run
over the whole grid at once; a product is

    DAC (once per layer input) -> one analog product per row block (all its tiles)
    -> one read-out/ADC kernel over every tile's outputs, with per-tile ranges and
    keys, that also forms the digital sum over row blocks.

Each tile keeps its own random streams, derived from its own seed by the tags below,
so tile (r, c) of a grid programs, drifts and reads exactly as a lone ``crossbar.Tile``
from the same seed would: ``Tile`` is the 1 x 1 grid.

The arrays that define a programmed chip (programmed conductances, drift exponents,
converter ranges) are torch buffers, so ``state_dict()``/``load_state_dict()`` carry
them; what ``at(t)`` derives from them is not saved.

Two engines run the chip. On the CPU the Numba kernels of ``kernels.py``; where the
grid's buffers live on another torch device (``grid.to("cuda")``, or a grid made there:
``grids_made_on``), or with ``engine = "torch"``, the same arithmetic in torch
(``torch_dac.py``, ``torch_engine.py``), on that device, without leaving it. So do
programming, ``at(t)`` and the ADC calibration: the Numba engine's on the host, a tile
at a time (the tiles of a large grid on host threads, ``host_threads.py``), the torch
engine's on the grid's device, a row of tiles at a time (``chip_on_device.py``). Both
compute in float64 with the same device models and the same counter-based draws
(``chip_draws.py``), so a seed names the same chip on either engine and device: bitwise
on the CPU, and on CUDA but for the last bit of a float64 logarithm or power, which
float32 rounds away. Through wires (IR drop) the two solve the same network with other
factorisations, 1e-12 apart.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from . import chip_on_device
from .chip_draws import tile_draws
from .config import TileConfig
from .devices import make_device
from .host_threads import map_tiles
from . import deferred, torch_dac, torch_engine
from .percentile import percentile
from .kernels import IDEAL, grid_dac_convert, grid_readout, grid_row_sum_squares, levels_per_side
from .precision import ieee_float32, moves_only
from .rng import stream_key
from .wires import effective_conductance, pair_read_variance
from .seeding import as_seed_sequence, derive
from .state_changes import CountsChanges
from .tensor_mode import normal_tensors

# Sub-stream tags of each tile's seed: each physical effect draws from its own stream, so
# switching one effect on or off leaves the samples of the others unchanged.
_PROGRAM, _FAULTS, _DRIFT, _SLOW_NOISE, _READS, _CALIBRATION_READS, _ADC_ERRORS, _ADC_NOISE = range(8)
# Targets a hair outside [g_min, g_max] from float rounding in the weight mapping are
# accepted and pulled in; anything further out is an error.
_RANGE_TOLERANCE = 1e-6
# the weights from which a grid works its tiles on several host threads
_THREADED_WEIGHTS = 2 ** 16
_EMPTY_3D = np.empty((0, 0, 0), dtype=np.float32)
_EMPTY_2D = np.empty((0, 0), dtype=np.float64)
_EMPTY_DIVISOR = np.empty((0, 0), dtype=np.float32)
_NO_KEYS = np.zeros((0, 0), np.uint64)

ENGINES = ("auto", "numba", "torch")
# (torch device, engine) of the grids made without a device of their own: see grids_made_on
_MADE_ON: ContextVar = ContextVar("xbarsim_grids_made_on", default=(None, "auto"))
PROGRAM_COUNTS = ("devices", "prog_clamped", "stuck_min", "stuck_max", "read_clamped", "adc_range_fallback")
CONVERSION_COUNTS = ("dac_converted", "dac_clipped", "adc_converted", "adc_saturated")


@contextmanager
def grids_made_on(device, engine: str = "auto"):
    """Within the block, tile grids made without a device of their own (those of the
    layers ``mapping.convert`` makes, say) are made on torch ``device`` with ``engine``,
    and so programmed there: the torch engine programs on the grid's device, the Numba
    engine on the host (see ``TileGrid.program``). Nesting restores the outer setting."""
    if engine not in ENGINES:
        raise ValueError(f"engine = {engine!r} is invalid: expected one of {ENGINES}")
    token = _MADE_ON.set((_torch_device(device), engine))
    try:
        yield
    finally:
        _MADE_ON.reset(token)


def _torch_device(device) -> Optional[torch.device]:
    """``device`` (None, a torch device or its name) as a torch.device, or an error that names it."""
    try:
        return None if device is None else torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device = {device!r} is invalid: expected None or a torch device ('cpu', 'cuda', "
                         f"'cuda:1', ...)") from None


def block_starts(n: int, size: int) -> np.ndarray:
    """[0, size, 2 size, ..., n]: where each block of ``size`` starts, and the end."""
    return np.append(np.arange(0, n, size), n).astype(np.int64)


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


class TileGrid(CountsChanges, nn.Module):
    """The tiles of one (n_in x n_out) conductance matrix, programmed and read together.

    Typical use (``mapping.AnalogMatrix`` does this for a weight matrix)::

        grid = TileGrid(config, n_in, n_out).program(g_plus, g_minus, seeds)
        grid.calibrate(x_sample)          # calibrated DAC/ADC ranges only
        grid.at(86400.0)                  # one day after programming
        y = grid.product(x)               # (batch, n_out) ~ x @ (G+ - G-), after the ADCs
    """

    bookkeeping = frozenset({"_vectors_read", "_counter_holds", "_device_counts"})  # what a read sets

    @normal_tensors
    def __init__(self, config: TileConfig, n_in: int, n_out: int, name: str = "grid", device=None) -> None:
        super().__init__()
        if not isinstance(config, TileConfig):
            raise ValueError(f"config = {config!r} is invalid: expected a crossbar.TileConfig")
        for label, n in (("n_in", n_in), ("n_out", n_out)):
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
                raise ValueError(f"{label} = {n!r} is invalid: expected an integer >= 1")
        self.config, self.name = config, name
        self.device = make_device(config.device)
        self.shape = (int(n_in), int(n_out))
        self.row_starts = block_starts(n_in, config.rows)
        self.col_starts = block_starts(n_out, config.cols)
        self.grid_shape = (len(self.row_starts) - 1, len(self.col_starts) - 1)
        self._dac_half = levels_per_side(config.dac.bits)
        self._adc_half = levels_per_side(config.adc.bits)
        rows, cols = self.grid_shape
        self.register_buffer("g_prog", torch.zeros(0, dtype=torch.float32))         # (2, n_in, n_out) uS at t = 0
        self.register_buffer("nu", torch.zeros(0, dtype=torch.float32))             # drift exponents, same shape
        self.register_buffer("dac_range", torch.tensor(float(config.dac.range) if config.dac.range_mode == "fixed"
                                                       else float("nan"), dtype=torch.float64))
        fixed_adc = config.adc.range if config.adc.range_mode == "fixed" else float("nan")
        self.register_buffer("adc_ranges", torch.full((rows, cols), fixed_adc, dtype=torch.float64))
        # each ADC's fixed errors, (R, n_out) float64, drawn at programming (empty: none)
        self.register_buffer("adc_gain", torch.zeros(0, dtype=torch.float64))
        self.register_buffer("adc_offset", torch.zeros(0, dtype=torch.float64))   # LSB
        self.seeds: list = []
        self.time = 0.0
        self.counts = {name: np.zeros((rows, cols), np.int64) for name in PROGRAM_COUNTS + CONVERSION_COUNTS}
        # what at(t) derived, numpy on the host or tensors on the grid's device (see at):
        # (G+ and G- read, G+ - G- read (float32), the per-pair read variance or None
        # where it is uniform or absent); host copies of tensors made as asked for
        self._derived: Optional[tuple] = None
        self._derived_host: dict = {}
        self._gdiff: Optional[torch.Tensor] = None      # G+ - G- read now on the grid's device
        self._var: Optional[torch.Tensor] = None        # the read variance there
        self._var_uniform: Optional[float] = None
        self._read_at_time: Optional[tuple] = None  # (the chip and time, what at(t) derived: see at)
        self._keys = np.zeros((rows, cols), np.uint64)
        self._adc_keys = _NO_KEYS  # the ADC noise's streams (noise_sigma > 0 only)
        self._vectors_read = 0
        # _vectors_read on the grid's device, where the torch engine reads it (a CUDA
        # graph's replay then draws new noise), and the count the host knows it holds
        # (None: unknown, refilled at the next read)
        self._vector_counter: Optional[torch.Tensor] = None
        self._counter_holds: Optional[int] = None
        self._engine = "auto"
        # the torch engine's view of the above on the grid's device (see _upload)
        self._keys_t: Optional[torch.Tensor] = None      # per output column: (R, n_out)
        self._adc_keys_t: Optional[torch.Tensor] = None
        self._columns: Optional[torch_engine.ColumnMap] = None
        self._block_matrix: Optional[torch.Tensor] = None  # (n_in, R): the inputs of each row block
        self._host_copies: dict = {}    # buffer name -> (buffer, its version, numpy copy)
        self._uploaded_ranges: Optional[tuple] = None  # (host ranges, their copy on the device)
        self._device_counts: dict = {}  # count name -> running device tensor, not yet read
        made_on, engine = _MADE_ON.get()
        device = made_on if device is None else _torch_device(device)
        if device is not None:  # the chip is then programmed there (see program)
            self.to(device)
        self.engine = engine

    # -- engine and device -------------------------------------------------------------------
    @property
    def engine(self) -> str:
        """"numba" or "torch": the one that runs products now ("auto" picks Numba on the
        CPU and torch on any other device)."""
        if self._engine == "auto":
            return "numba" if self.g_prog.device.type == "cpu" else "torch"
        return self._engine

    @engine.setter
    def engine(self, name: str) -> None:
        if name not in ENGINES:
            raise ValueError(f"engine = {name!r} is invalid: expected one of {ENGINES}")
        if name == "numba" and self.g_prog.device.type != "cpu":
            raise ValueError(f"engine = 'numba' needs the grid on the CPU; it is on {self.g_prog.device}")
        self._engine = name

    @property
    def torch_device(self) -> torch.device:
        """The torch device the grid's buffers (and its products) are on."""
        return self.g_prog.device

    @normal_tensors
    def _apply(self, fn, recurse=True):
        move = moves_only(fn)  # a cast never rounds the chip (crossbar.precision)
        super()._apply(move, recurse)
        # counts the torch engine has not collected yet go along (the next product adds to them there)
        self._device_counts = {name: move(value) for name, value in self._device_counts.items()}
        # what at(t) derived follows the buffers to their device (and is no longer kept
        # for a later at(t): the chip's tensors are new ones)
        if self._derived is not None:
            self._derived = tuple(move(a) if isinstance(a, torch.Tensor) else a for a in self._derived)
            self._read_at_time = None
            self._upload()
        self._host_copies.clear()
        return self

    def _upload(self) -> None:
        """Put what at(t) derived on the grid's device (no copy where it is there)."""
        device = self.g_prog.device
        _, gdiff, var = self._derived
        self._gdiff = torch.as_tensor(gdiff).to(device)
        self._var = None if var is None else torch.as_tensor(var).to(device)
        columns = self.column_map()
        self._keys_t = torch_engine.column_keys(self._keys, columns)
        self._adc_keys_t = torch_engine.column_keys(self._adc_keys, columns) if self._adc_keys.size else None

    def column_map(self) -> torch_engine.ColumnMap:
        """Where each output column sits in the tiles, on the grid's device (made once
        per device, with the row blocks' input matrix)."""
        device = self.g_prog.device
        if self._columns is None or self._columns.tile.device != device:
            self._columns = torch_engine.column_map(self.col_starts, device)
            self._block_matrix = torch_dac.block_matrix(self.row_starts, device)
        return self._columns

    def _host_array(self, i: int) -> Optional[np.ndarray]:
        """Item i of what at(t) derived as a numpy array on the host (copied once from a
        device), None where it is None."""
        if self._derived is None or self._derived[i] is None:
            return None
        a = self._derived[i]
        if not isinstance(a, torch.Tensor):
            return a
        found = self._derived_host.get(i)
        if found is None or found[0] is not a:
            found = self._derived_host[i] = (a, a.cpu().numpy())
        return found[1]

    @property
    def _g_read(self) -> Optional[np.ndarray]:
        """G+ and G- read now, (2, n_in, n_out) float32, on the host."""
        return self._host_array(0)

    @property
    def _gdiff_host(self) -> Optional[np.ndarray]:
        """G+ - G- read now, (n_in, n_out) float32, on the host."""
        return self._host_array(1)

    @property
    def _var_host(self) -> Optional[np.ndarray]:
        """The per-pair read variance, (n_in, n_out) float32, on the host (None: uniform or none)."""
        return self._host_array(2)

    def _derives_on_device(self) -> bool:
        """Whether programming and at(t) run with torch on the grid's device (the torch
        engine's) rather than with numpy on the host (the Numba engine's)."""
        return self.engine == "torch"

    def _host(self, name: str) -> np.ndarray:
        """A numpy copy of a small buffer (ranges), refreshed when the buffer changes."""
        t = getattr(self, name)
        found = self._host_copies.get(name)
        if found is None or found[0] is not t or found[1] != t._version:
            found = (t, t._version, t.detach().cpu().numpy())
            self._host_copies[name] = found
        return found[2]

    # -- programming and time --------------------------------------------------------------
    @property
    def programmed(self) -> bool:
        return self.g_prog.numel() > 0

    def tiles(self):
        """(r, c, row slice, column slice) of every tile, row-major."""
        for r in range(self.grid_shape[0]):
            for c in range(self.grid_shape[1]):
                yield (r, c, slice(self.row_starts[r], self.row_starts[r + 1]),
                       slice(self.col_starts[c], self.col_starts[c + 1]))

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
                                                             _PROGRAM, _FAULTS, _DRIFT)
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
            prog = self.device.program(block, lambda: self._tile_draws(k, shape, _PROGRAM),
                                       lambda: self._tile_draws(k, shape, _FAULTS, uniform=True))
            g[:, rs, cs] = prog.g
            if nu is not None:
                exps = self.device.drift_exponents(block, lambda: self._tile_draws(k, shape, _DRIFT))
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
            z = self._tile_draws(k, (2, 1, cs.stop - cs.start), _ADC_ERRORS)
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
                derived = chip_on_device.conductances_at(self, t, (_SLOW_NOISE, bits))
            else:
                derived = self._conductances_at(t, bits)
            found = self._read_at_time = (chip, derived)
        g_read, gdiff, var, self._var_uniform, clamped = found[1]
        self._derived = (g_read, gdiff, var)
        self.counts["read_clamped"][:] = clamped
        self.time = t
        self._keys = self.stream_keys(_READS, bits)
        self._adc_keys = self.stream_keys(_ADC_NOISE, bits) if self._adc_noise_on() else _NO_KEYS
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
        return self._tile_draws(k, shape, _SLOW_NOISE, bits)

    # -- ranges ------------------------------------------------------------------------------
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
        keys = self.stream_keys(_CALIBRATION_READS, time_bits(self.time))
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
                         np.ones((1, self.grid_shape[1])), IDEAL, scales[r:r + 1], _EMPTY_DIVISOR, 1.0, y,
                         _EMPTY_2D, _EMPTY_2D, _NO_KEYS, 0.0, 0.0)
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

    # -- the product -----------------------------------------------------------------------
    def product(self, x, count: bool = True, divisor: Optional[np.ndarray] = None, alpha: float = 1.0) -> np.ndarray:
        """Outputs (batch, n_out) for inputs x (batch, n_in), after every tile's ADC:
        the sum over row blocks of each tile's converted output, divided by
        ``divisor[r, j]`` (R, n_out; digital scaling to weight units) where given, times
        ``alpha``. count=False leaves the conversion counts alone (reads that are not
        inference, such as drift compensation's reference read)."""
        if self.engine == "torch":
            if divisor is not None:
                divisor = torch.as_tensor(divisor, device=self.g_prog.device)
            return self._product_torch(x, count, divisor, alpha)
        x = self.check_input(x)
        ranges = self._require_ranges()
        xq, scales, clip = self._convert_inputs(x)

        def read(xc, clipped):
            partial, var, var_rows = self._products(xc)
            return self.read_out(partial, var, var_rows, scales, ranges, count, clipped, divisor, alpha)

        return self._read_cycles(self._cycles(xq), clip, read)

    def _read_cycles(self, cycles: list, clipped, read):
        """The digital sum over the input's ``cycles`` (:meth:`_cycles`) of ``read(cycle
        inputs, clipped per block)`` (one read per cycle, each through the ADCs; numpy or
        torch): y = sum_t 2^(p t) y_t. A clipped input is counted once, in its first
        cycle. Each cycle's inputs leave the list as they are read, so that a read that
        lets go of them once its products are formed can free them before its read-out."""
        total = None
        while cycles:
            weight = cycles[0][0]
            y = read(cycles.pop(0)[1], clipped)
            clipped = clipped * 0
            total = y if total is None else total + y * weight  # a power of two: exact in float32
        return total

    def _cycles(self, xq):
        """[(2^(p t), cycle t's inputs)] of DAC outputs xq (numpy or torch, float32):
        sign(q) digit_t(|q|) step for the DAC code q and p = ``dac.bits_per_cycle``
        (PHYSICS.md section 9); [(1, xq)] for one cycle."""
        dac = self.config.dac
        if dac.cycles == 1:
            return [(1, xq)]
        full_scale = 1.0 if dac.range_mode == "per_vector" else self.input_range
        step, inv_step = full_scale / self._dac_half, self._dac_half / full_scale
        p = dac.bits_per_cycle
        lib = torch if isinstance(xq, torch.Tensor) else np
        magnitude = lib.abs(xq).double() if lib is torch else np.abs(xq).astype(np.float64)
        codes = lib.floor(magnitude * inv_step + 0.5)  # the integers the DAC produced
        sign = lib.sign(xq)
        out = []
        for t in range(dac.cycles):
            digit = lib.remainder(lib.floor(codes / float(2 ** (p * t))), float(2 ** p))
            values = sign * (digit * step)
            out.append((2 ** (p * t), values.float() if lib is torch else values.astype(np.float32)))
        return out

    def read_out(self, partial, var, var_rows, scales, ranges, count: bool, clipped_per_block,
                 divisor=None, alpha: float = 1.0, out: Optional[np.ndarray] = None) -> np.ndarray:
        """The read-out/ADC kernel over products already formed (``partial``: R x vectors
        x n_out), for callers that form the products their own way (convolutions);
        ``var``, ``var_rows``, ``scales`` and ``divisor`` None where absent.
        ``clipped_per_block`` (R,): DAC values clipped in each row block's inputs; every
        tile of that row converted all rows x vectors of them. ``out`` (vectors, n_out),
        float32, C-contiguous: where to write (a new array if None)."""
        batch = partial.shape[1]
        if out is None:
            out = np.empty((batch, self.shape[1]), np.float32)
        saturated = grid_readout(partial, _EMPTY_3D if var is None else var, _EMPTY_2D if var_rows is None else var_rows,
                                 self.col_starts, self._keys, self._vectors_read, ranges, self._adc_half,
                                 _EMPTY_2D if scales is None else scales,
                                 _EMPTY_DIVISOR if divisor is None else divisor, float(alpha), out,
                                 *self._adc_error_args())
        self._vectors_read += batch
        if count:
            self._count_conversions(batch, clipped_per_block, saturated)
        return out

    def _adc_noise_on(self) -> bool:
        return self._adc_half != IDEAL and self.config.adc.noise_sigma > 0

    def _adc_error_args(self) -> tuple:
        """The read-out kernel's ADC-error arguments: (gain, offset, noise keys,
        noise_sigma, nonlinearity); empty arrays and zeros where off."""
        adc = self.config.adc
        if self._adc_half == IDEAL or not adc.has_errors:
            return _EMPTY_2D, _EMPTY_2D, _NO_KEYS, 0.0, 0.0
        gain, offset = (self._host(name) if getattr(self, name).numel() else _EMPTY_2D
                        for name in ("adc_gain", "adc_offset"))
        return gain, offset, self._adc_keys, float(adc.noise_sigma), float(adc.nonlinearity)

    def _count_conversions(self, batch: int, clipped_per_block, saturated) -> None:
        """Conversion counts of one product. The torch engine's (device tensors) add up
        on the device until the counts are read, so a product on a GPU never waits for
        the host."""
        rows = np.diff(self.row_starts)[:, None]
        cols = np.diff(self.col_starts)[None, :]
        self.counts["dac_converted"] += rows * batch
        self.counts["adc_converted"] += cols * batch
        for name, value in (("dac_clipped", clipped_per_block), ("adc_saturated", saturated)):
            if isinstance(value, torch.Tensor):
                # a new tensor, never an in-place sum: a deferred pass's rewind keeps the old one
                running = self._device_counts.get(name)
                self._device_counts[name] = value if running is None else running + value
            else:
                self._add_count(name, np.asarray(value, np.int64))

    def _add_count(self, name: str, value: np.ndarray) -> None:
        """Add (R,) clipped-input counts (every tile of a row block) or (R, C) counts."""
        self.counts[name] += value[:, None] if name == "dac_clipped" else value

    def read_state(self) -> tuple:
        """What a read changes: (vectors read, conversion counts on the host (copies),
        running counts on the device (their tensors, which no read changes in place))."""
        return (self._vectors_read, {name: self.counts[name].copy() for name in CONVERSION_COUNTS},
                dict(self._device_counts))

    def restore_read_state(self, state: tuple) -> None:
        """Put the grid back as ``read_state`` found it: the next read draws the same noise."""
        self._vectors_read, host, device = state
        for name, value in host.items():
            self.counts[name][...] = value
        self._device_counts = dict(device)

    def collect_device_counts(self) -> None:
        """Add the torch engine's running device counts into the host counts (one wait
        for the device); none are left running."""
        running, self._device_counts = self._device_counts, {}
        for name, value in running.items():
            self._add_count(name, value.cpu().numpy().astype(np.int64))

    def running_device_counts(self) -> dict:
        """{count name: the running device tensor} of reads since the counts were last
        collected: what a CUDA graph of a pass that starts with none produces."""
        return dict(self._device_counts)

    def add_device_reads(self, vectors: int, host_counts: dict, device_counts: dict) -> None:
        """Account for reads that ran on the device alone (a CUDA graph's replay of the
        reads a captured pass made): ``vectors`` more vectors read, which advanced the
        device's vector counter by as much; ``host_counts`` {name: array} added to the
        counts; ``device_counts`` {name: tensor} that the replay wrote (copied here,
        since the next replay writes them again)."""
        self._vectors_read += vectors
        if self._counter_holds is not None:
            self._counter_holds += vectors
        for name, value in host_counts.items():
            self.counts[name] += value
        for name, value in device_counts.items():
            running = self._device_counts.get(name)
            self._device_counts[name] = value.clone() if running is None else running + value

    def _convert_inputs(self, x: np.ndarray) -> tuple:
        """(quantized inputs (batch, n_in) float32, per-vector scales (R, batch) or empty,
        values clipped per row block (R,))."""
        r_in = self._require_input_range()
        batch = x.shape[0]
        per_vector = self.config.dac.range_mode == "per_vector"
        xq = np.empty(x.shape, np.float32)
        scales = np.empty((self.grid_shape[0], batch) if per_vector else (0, 0))
        clip = np.empty((batch, self.grid_shape[0]), np.int64)
        bad = np.empty(batch, np.int64)
        grid_dac_convert(x, xq, 1.0 if r_in is None else r_in, self._dac_half, per_vector, self.row_starts,
                         scales, clip, bad)
        n_bad = int(bad.sum())
        if n_bad:
            self._refuse_non_finite(n_bad, int(np.argwhere(~np.isfinite(x))[0, 1]))
        return xq, scales, clip.sum(axis=0)

    def _require_input_range(self) -> Optional[float]:
        r_in = self.input_range
        if self._dac_half != IDEAL and r_in is None:
            raise RuntimeError(f"{self.name}: DAC range is not calibrated: call calibrate(x_sample), set the "
                               f"input range, or use dac.range_mode 'fixed' or 'per_vector'")
        return r_in

    def _refuse_non_finite(self, n_bad: int, first: int) -> None:
        r = int(np.searchsorted(self.row_starts, first, side="right")) - 1
        raise ValueError(f"{self.name}: x contains {n_bad} NaN or Inf values (the first at input {first}, "
                         f"tile row {r} of {self.grid_shape[0]}); inputs must be finite")

    def _products(self, xq: np.ndarray) -> tuple:
        """Per row block: the analog product, and the per-read noise variance terms
        (numpy, on the host: the Numba engine, and calibration on either engine)."""
        xq_t = torch.from_numpy(xq)
        var = _EMPTY_3D
        var_rows = _EMPTY_2D
        gdiff = torch.from_numpy(self._gdiff_host)
        partial = self._block_products(xq_t, gdiff)
        if self._var_host is not None:
            var = self._block_products(xq_t * xq_t, torch.from_numpy(self._var_host)).numpy()
        elif self._var_uniform is not None:
            var_rows = np.empty((self.grid_shape[0], xq.shape[0]))
            grid_row_sum_squares(xq, self.row_starts, var_rows)
            var_rows *= self._var_uniform
        return partial.numpy(), var, var_rows

    def _block_products(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """(R, batch, n_out): x's row block r times g's, all column blocks in one product."""
        out = torch.empty((self.grid_shape[0], x.shape[0], self.shape[1]), dtype=torch.float32, device=x.device)
        with ieee_float32():  # never TF32 (see crossbar.precision)
            for r in range(self.grid_shape[0]):
                a, b = self.row_starts[r], self.row_starts[r + 1]
                torch.mm(x[:, a:b], g[a:b], out=out[r])
        return out

    # -- the torch engine ------------------------------------------------------------------
    def _product_torch(self, x: torch.Tensor, count: bool, divisor: Optional[torch.Tensor], alpha: float) -> torch.Tensor:
        """``product`` by the torch engine, on the grid's device: x (batch, n_in) there."""
        x = self.check_tensor(x)
        ranges = self._require_ranges()
        xq, scales, clipped = self._convert_inputs_torch(x)
        cycles = self._cycles(xq)
        del xq  # the cycles hold the converted inputs, until their products are formed

        def read(xc, clipped):
            partial, var, var_rows = self._products_torch(xc)
            del xc  # the read-out's working memory can reuse the inputs' (a GPU's peak)
            return self.read_out_torch(partial, var, var_rows, scales, ranges, count, clipped, divisor, alpha)

        return self._read_cycles(cycles, clipped, read)

    def _products_torch(self, xq: torch.Tensor) -> tuple:
        """``_products`` on the grid's device: (partial, var or None, var_rows or None)."""
        var = var_rows = None
        partial = self._block_products(xq, self._gdiff)
        if self._var is not None:
            var = self._block_products(xq * xq, self._var)
        elif self._var_uniform is not None:
            var_rows = torch_dac.row_sum_squares(xq, self.row_starts) * self._var_uniform
        return partial, var, var_rows

    def _convert_inputs_torch(self, x: torch.Tensor) -> tuple:
        r_in = self._require_input_range()
        xq, scales, clipped, bad = torch_dac.dac_convert(x, 1.0 if r_in is None else r_in, self._dac_half,
                                                         self.config.dac.range_mode == "per_vector",
                                                         self.row_starts, self._block_matrix)
        checks = deferred.current()
        if checks is not None:  # the pass runs again, checked, and refuses x then
            checks.flag(bad)
        elif bool(bad):
            first = int(torch.nonzero(~torch.isfinite(x))[0, 1])
            self._refuse_non_finite(int(bad), first)
        return xq, scales, clipped

    def read_out_torch(self, partial, var, var_rows, scales, ranges, count: bool, clipped_per_block,
                       divisor=None, alpha: float = 1.0) -> torch.Tensor:
        """``read_out`` by the torch engine: tensors on the grid's device (var, var_rows,
        scales, divisor None where absent); returns (vectors, n_out) float32 there."""
        batch = partial.shape[1]
        adc = self.config.adc
        errors = None
        if self._adc_half != IDEAL and adc.has_errors:
            errors = torch_engine.ADCErrors(self.adc_gain if self.adc_gain.numel() else None,
                                            self.adc_offset if self.adc_offset.numel() else None,
                                            self._adc_keys_t, float(adc.noise_sigma), float(adc.nonlinearity))
        checks = deferred.current()
        if checks is not None:
            checks.enter(self)
        counter = self.vector_counter()
        out, saturated = torch_engine.readout(partial, var, var_rows, self._columns, self._keys_t,
                                              counter, self._ranges_on_device(ranges), self._adc_half,
                                              scales, divisor, float(alpha), errors, checks)
        counter.add_(batch)  # on the device, in order after the read-out that used it
        self._vectors_read += batch
        self._counter_holds = self._vectors_read
        if count:
            self._count_conversions(batch, clipped_per_block, saturated)
        return out

    def vector_counter(self) -> torch.Tensor:
        """The vectors read so far as a 0-d int64 tensor on the grid's device: the first
        vector number of the torch engine's next read-out. It is advanced there by each
        read and set from the host only where the host count moved without it (a Numba
        read, ``at``, a rewind), never while a CUDA graph is being captured: a captured
        fill would replay the same noise at every replay."""
        device = self.g_prog.device
        counter = self._vector_counter
        if counter is None or counter.device != device:
            # a normal tensor even in a torch.inference_mode() block: an inference tensor
            # could not be advanced in place after the block
            with torch.inference_mode(False):
                counter = self._vector_counter = torch.zeros((), dtype=torch.int64, device=device)
            self._counter_holds = 0
        if self._counter_holds != self._vectors_read:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(f"{self.name}: the vector counter on {device} is out of step with the host "
                                   f"while a CUDA graph is captured: run a pass before capturing")
            counter.fill_(self._vectors_read)
            self._counter_holds = self._vectors_read
        return counter

    def forget_vector_counter(self) -> None:
        """Note that the device's vector counter and the host's count may differ (a CUDA
        graph's replay that is not kept; a capture's bookkeeping undone): the next read
        sets the counter from the host count."""
        self._counter_holds = None

    @normal_tensors
    def _ranges_on_device(self, ranges: np.ndarray) -> torch.Tensor:
        """The (R, C) ADC ranges that ``_require_ranges`` gave, on the grid's device:
        the buffer itself for fixed and calibrated ranges (already there), else uploaded
        when they change (worst-case ranges follow the DAC range; an ideal ADC reads
        none of them), not at every read: a copy from the host waits for the GPU."""
        if self._adc_half != IDEAL and self.config.adc.range_mode != "worst_case":
            return self.adc_ranges
        ranges = np.asarray(ranges, np.float64)
        uploaded = self._uploaded_ranges
        if uploaded is None or uploaded[1].device != self.g_prog.device or not np.array_equal(uploaded[0], ranges):
            uploaded = (ranges.copy(), torch.from_numpy(ranges.copy()).to(self.g_prog.device))
            self._uploaded_ranges = uploaded
        return uploaded[1]

    def check_tensor(self, x) -> torch.Tensor:
        self._require_programmed("product")
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{self.name}: x is a {type(x).__name__}: the torch engine takes a torch.Tensor "
                             f"on {self.g_prog.device}")
        if x.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"x has dtype {x.dtype}: expected float32 or float64")
        if x.dim() != 2 or x.shape[1] != self.shape[0]:
            raise ValueError(f"x has shape {tuple(x.shape)}: expected (batch, {self.shape[0]})")
        if x.device != self.g_prog.device:
            raise ValueError(f"{self.name}: x is on {x.device}, the grid on {self.g_prog.device}: "
                             f"move the input (or the model with .to()) to one device")
        return x.contiguous()

    # -- inspection, counts, persistence -----------------------------------------------------
    def conductances(self) -> np.ndarray:
        """(2, n_in, n_out): G+ and G- as read at the current time, uS, float32."""
        self._require_programmed("conductances")
        return _read_only(self._g_read)

    def read_variance(self) -> Optional[np.ndarray]:
        """Per-read noise variance of each pair, sigma+^2 + sigma-^2 in uS^2 (None: none)."""
        self._require_programmed("read_variance")
        if self._var_uniform is not None:
            return np.full(self.shape, self._var_uniform, dtype=np.float32)
        return None if self._var_host is None else _read_only(self._var_host)

    def reset_counts(self) -> None:
        """Zero the conversion counts (programming and calibration counts are kept)."""
        self._device_counts = {}
        for name in CONVERSION_COUNTS:
            self.counts[name][:] = 0

    def count_totals(self) -> dict:
        self.collect_device_counts()
        return {name: int(v.sum()) for name, v in self.counts.items()}

    def get_extra_state(self):
        self.collect_device_counts()
        return {"seeds": [(s.entropy, tuple(s.spawn_key), s.pool_size) for s in self.seeds], "time": self.time,
                "counts": {k: torch.from_numpy(v.copy()) for k, v in self.counts.items()}}

    def set_extra_state(self, state) -> None:
        self.seeds = [np.random.SeedSequence(e, spawn_key=tuple(k), pool_size=p) for e, k, p in state["seeds"]]
        for k, v in state["counts"].items():
            self.counts[k] = np.asarray(v, np.int64).copy()
        self._pending_time = float(state["time"])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        misfit = self._misfit(state_dict.get(prefix + "g_prog"), state_dict.get(prefix + "_extra_state"))
        if misfit is not None:  # load_state_dict raises with it; this grid keeps its chip
            error_msgs.append(f"{prefix}g_prog: {misfit}")
            return
        for name in ("g_prog", "nu", "adc_gain", "adc_offset"):  # sized at programming: the saved chip's size
            if name.startswith("adc_") and prefix + name not in state_dict:
                state_dict[prefix + name] = torch.zeros(0, dtype=torch.float64)  # saved before ADC errors existed
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name], device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if self.programmed and getattr(self, "_pending_time", None) is not None:
            t, self._pending_time = self._pending_time, None
            self.at(t)  # derive the read state from the loaded chip

    def _misfit(self, g_prog, extra) -> Optional[str]:
        """Why a saved chip (its g_prog and extra state) does not fit this grid's matrix
        and tiles; None where it does, or where there is no programmed chip to load."""
        if g_prog is None or extra is None or g_prog.numel() == 0:
            return None
        n_tiles = self.grid_shape[0] * self.grid_shape[1]
        saved = (tuple(g_prog.shape[1:]), len(extra["seeds"]))
        if saved == (self.shape, n_tiles):
            return None
        return (f"the saved chip holds a {saved[0]} matrix on {saved[1]} tiles; this grid holds {self.shape} on "
                f"{n_tiles} tiles of {self.config.rows} x {self.config.cols} (load a chip into a model converted "
                f"from the same model with the same tile size)")

    # -- helpers ---------------------------------------------------------------------------
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

    def _require_programmed(self, what: str) -> None:
        if not self.programmed:
            raise RuntimeError(f"{self.name}.{what}() needs a programmed grid: call program(g_plus, g_minus) first")

    def _require_ranges(self) -> np.ndarray:
        ranges = self.output_ranges()
        if self._adc_half != IDEAL and ranges is None:
            raise RuntimeError(f"{self.name}: ADC range is not calibrated: call calibrate(x_sample), set the "
                               f"output range, or use adc.range_mode 'fixed' or 'worst_case'")
        return np.ones(self.grid_shape) if ranges is None else ranges

    def check_input(self, x) -> np.ndarray:
        self._require_programmed("product")
        x = np.asarray(x)
        if x.dtype not in (np.float32, np.float64):
            raise ValueError(f"x has dtype {x.dtype}: expected float32 or float64")
        if x.ndim != 2 or x.shape[1] != self.shape[0]:
            raise ValueError(f"x has shape {x.shape}: expected (batch, {self.shape[0]})")
        return x if x.flags.c_contiguous else np.ascontiguousarray(x)

    def _check_targets(self, g_plus, g_minus) -> tuple:
        """(g_plus, g_minus) as float64 arrays, checked: their shape, finite, and within
        [g_min, g_max] up to the tolerance (each tile pulls its block in as it programs)."""
        dev = self.config.device
        checked = []
        for label, g in (("g_plus", g_plus), ("g_minus", g_minus)):
            g = np.asarray(g, dtype=np.float64)
            if g.shape != self.shape:
                raise ValueError(f"{label} has shape {g.shape}: expected {self.shape}")
            lo, hi = float(g.min()), float(g.max())
            if not (np.isfinite(lo) and np.isfinite(hi)):  # a NaN or an infinity shows in the extremes
                raise ValueError(f"{label} contains {int((~np.isfinite(g)).sum())} NaN or Inf values")
            tol = _RANGE_TOLERANCE * dev.g_max
            if lo < dev.g_min - tol or hi > dev.g_max + tol:
                raise ValueError(f"{label} spans [{lo:g}, {hi:g}] uS: targets must lie in "
                                 f"[g_min, g_max] = [{dev.g_min:g}, {dev.g_max:g}] uS")
            checked.append(g)
        return tuple(checked)


def _read_only(a: np.ndarray) -> np.ndarray:
    """A read-only view: what at(t) derived serves later calls of the same time."""
    view = a.view()
    view.flags.writeable = False
    return view


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
