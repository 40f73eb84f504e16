"""A tile grid's product: the DAC once per layer input, one analog product per row
block (all its tiles), then one read-out/ADC kernel over every tile's outputs, with
per-tile ranges and keys, that also forms the digital sum over row blocks; a
bit-serial input (``dac.cycles`` > 1) is one such read per cycle, summed digitally.
Here the Numba engine's, on the host; the torch engine's is ``grid_torch.py``.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .kernels import IDEAL, grid_dac_convert, grid_readout, grid_row_sum_squares
from .precision import ieee_float32

# what the Numba kernels take for an absent argument
EMPTY_3D = np.empty((0, 0, 0), dtype=np.float32)
EMPTY_2D = np.empty((0, 0), dtype=np.float64)
EMPTY_DIVISOR = np.empty((0, 0), dtype=np.float32)
NO_KEYS = np.zeros((0, 0), np.uint64)


class Product:
    """Mixed into :class:`~crossbar.grid.TileGrid`: ``product`` on either engine, the
    bit-serial cycles and the Numba engine's DAC, products and read-out. A read
    advances ``_vectors_read`` (the position in the read-noise streams) and adds the
    conversion counts (``grid_counts.py``)."""

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
        saturated = grid_readout(partial, EMPTY_3D if var is None else var, EMPTY_2D if var_rows is None else var_rows,
                                 self.col_starts, self._keys, self._vectors_read, ranges, self._adc_half,
                                 EMPTY_2D if scales is None else scales,
                                 EMPTY_DIVISOR if divisor is None else divisor, float(alpha), out,
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
            return EMPTY_2D, EMPTY_2D, NO_KEYS, 0.0, 0.0
        gain, offset = (self._host(name) if getattr(self, name).numel() else EMPTY_2D
                        for name in ("adc_gain", "adc_offset"))
        return gain, offset, self._adc_keys, float(adc.noise_sigma), float(adc.nonlinearity)

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

    def _refuse_non_finite(self, n_bad: int, first: int) -> None:
        r = int(np.searchsorted(self.row_starts, first, side="right")) - 1
        raise ValueError(f"{self.name}: x contains {n_bad} NaN or Inf values (the first at input {first}, "
                         f"tile row {r} of {self.grid_shape[0]}); inputs must be finite")

    def _products(self, xq: np.ndarray) -> tuple:
        """Per row block: the analog product, and the per-read noise variance terms
        (numpy, on the host: the Numba engine, and calibration on either engine)."""
        xq_t = torch.from_numpy(xq)
        var = EMPTY_3D
        var_rows = EMPTY_2D
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
