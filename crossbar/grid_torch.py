"""A tile grid's product by the torch engine, on the grid's device without leaving
it: the DAC (``torch_dac.py``), the products (cuBLAS through torch on a GPU) and the
read-out (``torch_engine.py``), with the Numba engine's arithmetic and noise. The
position in the read-noise streams is a counter on the device, which each read
advances there, so that a CUDA graph's replay draws new noise.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from . import deferred, torch_dac, torch_engine
from .kernels import IDEAL
from .tensor_mode import normal_tensors


class TorchProduct:
    """Mixed into :class:`~crossbar.grid.TileGrid`: the torch engine's product, its
    vector counter (``_vector_counter``, with ``_counter_holds``, the count the host
    knows it holds) and the ADC ranges on the device."""

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
