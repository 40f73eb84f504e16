"""A weight matrix on a grid of crossbar tiles that behaves like a matrix."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import nn

from crossbar import TileConfig
from crossbar.grid import TileGrid
from crossbar.grid_ranges import percentile_range
from crossbar.precision import moves_only
from crossbar.state_changes import CountsChanges
from crossbar.tensor_mode import normal_tensors
from crossbar.seeding import SeedLike, as_seed_sequence, derive

from .conductance import reference_weight, sliced_conductances, weights_to_conductances
from .config import MappingConfig

# calibration inputs kept for drift compensation's reference read: enough for a stable
# mean |y|, few enough to read at every at(t) for free
COMPENSATION_ROWS = 128
# one-hot reference vectors read at a time (each is a full product over the grid)
_ONE_HOT_CHUNK = 256
# bytes a GPU product holds per tile output of one vector while it is read out: the
# products and their variances (float32), the read values (float32), the range and
# rejection masks, and the gathered outputs that drew a rejected normal; an estimate,
# measured when the normals (float64) were held too (resnet56 at batch 1024 in one
# chunk per layer peaked at 1.9x float's GPU memory on an H100), so generous now
_GPU_BYTES_PER_OUTPUT = 48
# a convolution that convolves per row block spends on its products the memory of
# max_rows_per_chunk unrolled vectors of at least this many inputs (32 MiB at the default
# 8192). Counting its own inputs alone, resnet20's 16-channel layers (144 inputs) ran in
# chunks of 36 images; whole batches of 256 made the ResNets' passes 15% faster on the
# 2-core machine (benchmarks/bench_network.py), the convolutional networks' peak memory
# 1.3-1.7x float's (1.3-1.6x before)
_CONV_CHUNK_MIN_INPUTS = 1024


class AnalogMatrix(CountsChanges, nn.Module):
    """W (out, in) on a :class:`crossbar.grid.TileGrid`: inputs along tile rows, outputs
    along tile columns, edge tiles partly used.

    Each tile converts its own columns with its own ADC; the partial sums are scaled back
    to weight units (``divisor``: uS per unit weight of each row block and column) and
    added digitally, and with drift compensation on multiplied by alpha = r0 / r(t)
    (PHYSICS.md sections 5-6). The programmed chip, its ranges and the compensation
    reference are buffers: ``state_dict()`` saves the chip bitwise.

        A = AnalogMatrix(W, presets.pcm(), seed=0)
        A.calibrate(X_sample)       # calibrated DAC/ADC ranges, at t = 0
        Y = A.at(86400).matmul(X)   # X (batch, in) -> Y (batch, out), ~ X @ W.T
    """

    @normal_tensors
    def __init__(self, weight, tile_config: TileConfig, seed: SeedLike = None,
                 mapping: Optional[MappingConfig] = None, name: str = "matrix") -> None:
        super().__init__()
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
        self.slices = tile_config.slicing.weight_slices
        # a sliced weight column j occupies physical columns j * slices .. (j + 1) * slices
        self.grid = TileGrid(tile_config, w.shape[1], w.shape[0] * self.slices, name=f"layer {name!r}")
        self.alpha = 1.0
        self.dac_range_fallback = False  # the calibration sample was all zero (see calibrate)
        self.register_buffer("divisor", torch.zeros(0, dtype=torch.float32))               # (R, out) uS per unit weight
        self.register_buffer("r0", torch.tensor(float("nan"), dtype=torch.float64))
        self.register_buffer("compensation_x", torch.zeros(0, dtype=torch.float32))        # the reference read's inputs
        self.to(self.grid.torch_device)  # a grid made on another device (crossbar.grid.grids_made_on) programs there
        self.register_load_state_dict_post_hook(_after_load)
        self._program(w.T, as_seed_sequence(seed))
        if self._ranges_ready():
            self._measure_r0()

    # -- construction ----------------------------------------------------------------------
    def _program(self, wt: np.ndarray, seed: np.random.SeedSequence) -> None:
        """Targets and the digital scale of every tile from W^T (in, out); tile k draws
        from sub-stream k of ``seed``."""
        dev, m, grid, k = self.tile_config.device, self.mapping, self.grid, self.slices
        slicing = self.tile_config.slicing
        g_plus, g_minus = np.empty((wt.shape[0], grid.shape[1])), np.empty((wt.shape[0], grid.shape[1]))
        divisor = np.empty((grid.grid_shape[0], grid.shape[1]), np.float32)
        layer_ref = reference_weight(wt, m.clip, m.clip_value) if m.scale == "layer" else None
        self.clipped_weights = 0
        for r, _, rs, cs in grid.tiles():
            block = wt[rs, cs.start // k:cs.stop // k]  # the weight columns whose slices the tile holds
            w_ref = layer_ref if m.scale == "layer" else \
                reference_weight(block, m.clip, m.clip_value, axis=0 if m.scale == "column" else None)
            if slicing.on:
                g_plus[rs, cs], g_minus[rs, cs], scales, clipped = sliced_conductances(
                    block, dev.g_min, dev.g_max, w_ref, k, slicing.bits_per_slice)
                # (k,) or (k, columns) -> each physical column's, slices interleaved
                scale = np.broadcast_to(scales.reshape(k, -1), (k, block.shape[1])).T.reshape(-1)
            else:
                g_plus[rs, cs], g_minus[rs, cs], scale, clipped = weights_to_conductances(block, dev.g_min,
                                                                                         dev.g_max, w_ref)
            self.clipped_weights += clipped
            divisor[r, cs] = np.asarray(scale, np.float32)
        self.divisor = torch.from_numpy(divisor).to(grid.torch_device)
        n_tiles = grid.grid_shape[0] * grid.grid_shape[1]
        grid.program(g_plus, g_minus, [derive(seed, k) for k in range(n_tiles)])

    @normal_tensors
    def _apply(self, fn, recurse=True):
        # the digital scales and the compensation reference are the chip's: moved, never
        # cast (crossbar.precision)
        return super()._apply(moves_only(fn), recurse)

    @property
    def n_tiles(self) -> int:
        return self.grid.grid_shape[0] * self.grid.grid_shape[1]

    @property
    def time(self) -> float:
        return self.grid.time

    # -- the product --------------------------------------------------------------------------
    def matmul(self, x):
        """X (batch, in) -> (batch, out) in weight units, float32: numpy on the CPU
        (Numba engine), a tensor on the grid's device for the torch engine."""
        if self.grid.engine == "torch":
            self._require_ready()
            return self._chunked(x, lambda part: self._product(part, count=True), torch.cat)
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.shape[1]:
            raise ValueError(f"layer {self.name!r}: input has shape {x.shape}: expected (batch, {self.shape[1]})")
        if x.dtype not in (np.float32, np.float64):
            raise ValueError(f"layer {self.name!r}: input has dtype {x.dtype}: expected float32 or float64")
        self._require_ready()
        return self._chunked(x, lambda part: self._product(part, count=True), np.concatenate)

    def vectors_per_chunk(self, unrolled: bool = True) -> int:
        """Input vectors per product, which bounds the memory a layer's product holds.
        On the CPU: ``mapping.max_rows_per_chunk`` unrolled vectors, or as many vectors
        as spend the same memory on their products where the inputs are not unrolled
        (convolutions), counting at least ``_CONV_CHUNK_MIN_INPUTS`` inputs. On a GPU:
        as many as keep the read-out's working set within ``mapping.gpu_chunk_mb`` (GPU
        kernels want large products; few chunks keep the launches few)."""
        grid = self.grid
        if grid.torch_device.type != "cpu":
            return self.gpu_vectors_per_chunk(unrolled)
        n_in, n_out = grid.shape
        row_blocks = grid.grid_shape[0]
        vectors = self.mapping.max_rows_per_chunk
        if unrolled:
            return vectors
        floats_per_vector = row_blocks * n_out * (2 if grid._var is not None else 1) + n_out
        return max(vectors, vectors * max(n_in, _CONV_CHUNK_MIN_INPUTS) // floats_per_vector)

    def gpu_vectors_per_chunk(self, unrolled: bool = True) -> int:
        """:meth:`vectors_per_chunk` on a GPU, whatever the grid's device (``benchmarks/bench_memory.py``
        takes it on the CPU)."""
        n_in, n_out = self.grid.shape
        per_vector = _GPU_BYTES_PER_OUTPUT * self.grid.grid_shape[0] * n_out + (4 * n_in if unrolled else 0)
        return max(1, self.mapping.gpu_chunk_mb * 2 ** 20 // per_vector)

    def _chunked(self, x, product, join):
        chunk = self.vectors_per_chunk()
        if x.shape[0] <= chunk:
            return product(x)
        return join([product(x[i:i + chunk]) for i in range(0, x.shape[0], chunk)])

    def _product(self, x, count: bool, compensated: bool = True):
        divisor = self.divisor if self.grid.engine == "torch" else self.divisor.numpy()
        y = self.grid.product(x, count=count, divisor=divisor, alpha=self.alpha if compensated else 1.0)
        return self.combine_slices(y)

    def combine_slices(self, y):
        """(vectors, out * slices) per-slice outputs in weight units -> (vectors, out):
        the digital shift-and-add of the slices (their scales hold the 2^(b s))."""
        if self.slices == 1:
            return y
        return y.reshape(y.shape[0], self.shape[0], self.slices).sum(-1)

    # -- time, calibration, drift compensation ------------------------------------------------
    def at(self, t: float) -> "AnalogMatrix":
        """Set the inference time (s since programming) of every tile; re-measure alpha."""
        self.grid.at(t)
        if self.mapping.drift_compensation and not torch.isnan(self.r0):
            r_t = self._readout()
            if not r_t > 0:
                raise RuntimeError(f"layer {self.name!r}: drift compensation read back 0 at t = {t} s; "
                                   f"the array no longer conducts (check stuck-at and clamp counts)")
            self.alpha = float(self.r0) / r_t
        return self

    @normal_tensors
    def calibrate(self, x) -> "AnalogMatrix":
        """Calibrate DAC (one range per layer) and ADC (one per tile) ranges on sample
        inputs X (batch, in), right after programming (t = 0), then measure r0.

        X is a numpy array or a tensor; the torch engine calibrates on the grid's device
        (a GPU's sample never visits the host), the Numba engine on the host, to the same
        ranges (``crossbar.percentile``). A sample too sparse for the percentile takes its
        maximum. A layer whose sample is all zero keeps a DAC range of 1 (normalised volts)
        and ``dac_range_fallback``; a tile whose inputs are all zero takes its ADC range
        from its conductances (``TileGrid.calibrate_output``); both are counted, and the
        run goes on."""
        x = self._calibration_input(x)
        t = self.time
        self.grid.at(0.0)
        cfg = self.tile_config
        if cfg.dac.range_mode == "calibrated":
            found = percentile_range(abs(x), cfg.dac.percentile)
            self.dac_range_fallback = found is None
            self.grid.set_input_range(1.0 if found is None else found)
        else:
            self.dac_range_fallback = False
        if cfg.adc.range_mode == "calibrated":
            self.grid.calibrate_output(x)
        compensation_x = x[:COMPENSATION_ROWS]
        if not compensation_x.any():
            # all-zero inputs read zero at every time; every line at full scale reads the array
            compensation_x = np.full((1, self.shape[1]), self.grid.input_range or 1.0, np.float32)
        # a copy: a view would keep the whole calibration sample alive with the layer
        self.compensation_x = torch.as_tensor(compensation_x).to(self.divisor.device, torch.float32, copy=True)
        self._measure_r0()
        self.at(t)
        return self

    def _calibration_input(self, x):
        """A calibration sample as the grid's engine takes it (float32: a tensor on the
        grid's device, or numpy), checked: (batch > 0, in), finite."""
        if self.grid.engine == "torch":
            x = torch.as_tensor(x).detach().to(self.grid.torch_device, torch.float32)
        else:
            x = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.shape[1] or x.shape[0] == 0:
            raise ValueError(f"layer {self.name!r}: calibration input has shape {tuple(x.shape)}: "
                             f"expected (batch > 0, {self.shape[1]})")
        n_bad = int((~torch.isfinite(x)).sum()) if isinstance(x, torch.Tensor) else int((~np.isfinite(x)).sum())
        if n_bad:
            raise ValueError(f"layer {self.name!r}: calibration input has {n_bad} NaN or Inf values: ranges "
                             f"calibrated on them would be undefined; calibrate on finite inputs")
        return x

    def _measure_r0(self) -> None:
        self.alpha = 1.0
        if self.mapping.drift_compensation:
            r0 = self._readout()
            if not r0 > 0:
                raise RuntimeError(f"layer {self.name!r}: drift compensation reference read is 0: every output "
                                   f"of the reference input rounds to zero (all weights zero, or an ADC too "
                                   f"coarse for them); set mapping.drift_compensation = false for this model")
            self.r0.fill_(r0)

    def _readout(self) -> float:
        """Mean |output|, in weight units, for the fixed compensation input."""
        r_in = self.grid.input_range or 1.0
        n_out, n_in = self.shape
        if self.mapping.compensation_input == "calibration" and self.compensation_x.numel():
            y = self._product(self._engine_input(self.compensation_x), count=False, compensated=False)
            return _mean_abs(y)
        if self.mapping.compensation_input == "ones":
            y = self._product(self._engine_input(np.full((1, n_in), r_in, dtype=np.float32)), count=False,
                              compensated=False)
            return _mean_abs(y)
        # one-hot: each input line alone at full scale; the other row blocks see zero
        # input and return exactly zero, so the sum over the grid is each line's read
        total = 0.0
        for start in range(0, n_in, _ONE_HOT_CHUNK):
            eye = np.zeros((min(_ONE_HOT_CHUNK, n_in - start), n_in), np.float32)
            eye[np.arange(eye.shape[0]), start + np.arange(eye.shape[0])] = r_in
            y = self._product(self._engine_input(eye), count=False, compensated=False)
            total += _sum_abs(y)
        return total / (n_in * n_out)

    def _engine_input(self, x):
        """x as the grid's engine takes it: a tensor on its device, or numpy."""
        if self.grid.engine == "torch":
            return torch.as_tensor(x).to(self.grid.torch_device)
        return x.numpy() if isinstance(x, torch.Tensor) else x

    def _ranges_ready(self) -> bool:
        cfg = self.tile_config
        return not ((cfg.dac.bits is not None and self.grid.input_range is None)
                    or (cfg.adc.bits is not None and self.grid.output_ranges() is None))

    def _require_ready(self) -> None:
        if not self._ranges_ready():
            raise RuntimeError(f"layer {self.name!r}: DAC/ADC ranges are not calibrated: call calibrate() "
                               f"with sample inputs first (calibrated range modes)")

    # -- reporting and persistence ------------------------------------------------------------
    def counts(self) -> dict:
        """Summed tile counts plus the weights clipped by the mapping."""
        total = self.grid.count_totals()
        total["weights"] = self.shape[0] * self.shape[1]
        total["clipped_weights"] = self.clipped_weights
        total["tiles"] = self.n_tiles
        total["dac_range_fallback"] = int(self.dac_range_fallback)
        return total

    def reset_counts(self) -> None:
        self.grid.reset_counts()

    def weight_read(self) -> np.ndarray:
        """The weights the tiles hold now, (G+ - G-) / scale at the current time, (out, in)."""
        g = self.grid.conductances()
        per_row = np.repeat(self.divisor.cpu().numpy(), np.diff(self.grid.row_starts), axis=0)
        w = (g[0].astype(np.float64) - g[1]) / per_row
        return w.reshape(w.shape[0], self.shape[0], self.slices).sum(-1).T * self.alpha

    def get_extra_state(self):
        return {"clipped_weights": self.clipped_weights, "dac_range_fallback": self.dac_range_fallback}

    def set_extra_state(self, state) -> None:
        self.clipped_weights = int(state["clipped_weights"])
        self.dac_range_fallback = bool(state["dac_range_fallback"])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("divisor", "compensation_x"):  # sized at programming and calibration
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name], device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        r, c = self.grid.grid_shape
        return (f"name={self.name!r}, shape={self.shape}, tiles={r} x {c} of "
                f"{self.tile_config.rows}x{self.tile_config.cols}")


def _sum_abs(y) -> float:
    """Sum of |y| in float64, of numpy or torch outputs."""
    if isinstance(y, torch.Tensor):
        return float(y.abs().double().sum())
    return float(np.abs(y).sum(dtype=np.float64))


def _mean_abs(y) -> float:
    """Mean |y| (numpy's mean is its float64 sum over the count, bitwise)."""
    return _sum_abs(y) / (y.shape[0] * y.shape[1])


def _after_load(matrix: AnalogMatrix, _incompatible) -> None:
    """Once the grid has loaded its chip: alpha at the loaded time."""
    if matrix.grid.programmed:
        matrix.alpha = 1.0
        matrix.at(matrix.grid.time)
