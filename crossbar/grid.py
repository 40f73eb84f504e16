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

This file holds the grid's state, its device and engine, its checks and its
persistence; the rest of ``TileGrid`` is written by concept in mixins: programming and
``at(t)`` (``grid_programming.py``), the converters' ranges and their calibration
(``grid_ranges.py``), the product (``grid_product.py``, the Numba engine's; the torch
engine's in ``grid_torch.py``) and the counts (``grid_counts.py``).

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
from typing import Optional

import numpy as np
import torch
from torch import nn

from . import torch_dac, torch_engine
from .config import TileConfig
from .devices import make_device
from .grid_counts import CONVERSION_COUNTS, PROGRAM_COUNTS, Counts
from .grid_product import NO_KEYS, Product
from .grid_programming import Programming
from .grid_ranges import ConverterRanges
from .grid_torch import TorchProduct
from .kernels import levels_per_side
from .precision import moves_only
from .state_changes import CountsChanges
from .tensor_mode import normal_tensors

# Targets a hair outside [g_min, g_max] from float rounding in the weight mapping are
# accepted and pulled in; anything further out is an error.
_RANGE_TOLERANCE = 1e-6

ENGINES = ("auto", "numba", "torch")
# (torch device, engine) of the grids made without a device of their own: see grids_made_on
_MADE_ON: ContextVar = ContextVar("xbarsim_grids_made_on", default=(None, "auto"))


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


class TileGrid(Programming, ConverterRanges, Product, TorchProduct, Counts, CountsChanges, nn.Module):
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
        self._adc_keys = NO_KEYS  # the ADC noise's streams (noise_sigma > 0 only)
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

    @property
    def programmed(self) -> bool:
        return self.g_prog.numel() > 0

    def tiles(self):
        """(r, c, row slice, column slice) of every tile, row-major."""
        for r in range(self.grid_shape[0]):
            for c in range(self.grid_shape[1]):
                yield (r, c, slice(self.row_starts[r], self.row_starts[r + 1]),
                       slice(self.col_starts[c], self.col_starts[c + 1]))

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

    def _require_programmed(self, what: str) -> None:
        if not self.programmed:
            raise RuntimeError(f"{self.name}.{what}() needs a programmed grid: call program(g_plus, g_minus) first")

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

