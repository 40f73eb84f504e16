"""A slow, obvious float64 implementation of the tile's matrix-vector product.

It shares the tile's programmed state (programming, drift and 1/f are numpy code in the
device models already, run by the tile grid) and re-implements everything on the hot path in plain numpy:
DAC, products, per-read noise and ADC. Per-read noise is sampled the slow way that the
fast path avoids: a fresh noisy copy of both conductance matrices for every input row.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse
import scipy.sparse.linalg

from .tile import Tile
from .wires import MICROSIEMENS_PER_SIEMENS


def quantize_reference(v: np.ndarray, full_scale: float, bits) -> tuple:
    """Signed converter of ``bits`` (None: ideal). Returns (values, number clipped)."""
    v = np.asarray(v, dtype=np.float64)
    if bits is None:
        return v.copy(), 0
    clipped = int(np.count_nonzero(np.abs(v) > full_scale))
    if bits == 1:
        return np.where(v >= 0, full_scale, -full_scale), clipped
    half = 2 ** (bits - 1) - 1
    step, inv_step = full_scale / half, half / full_scale
    code = np.minimum(np.floor(np.abs(v) * inv_step + 0.5), half)
    return np.where(v >= 0, code * step, -code * step), clipped


def adc_input_reference(v: np.ndarray, full_scale: float, bits: int, gain, offset_lsb, noise_lsb,
                        nonlinearity: float) -> np.ndarray:
    """What a non-ideal ADC quantizes (PHYSICS.md section 10): gain * nonlin(v) + (offset
    + noise) * step, nonlin(v) = r tanh(a v / r) / tanh(a) (a = 0: v)."""
    step = full_scale / (2 ** (bits - 1) - 1) if bits > 1 else full_scale
    v = np.asarray(v, dtype=np.float64)
    if nonlinearity > 0:
        v = full_scale * np.tanh(nonlinearity * v / full_scale) / np.tanh(nonlinearity)
    return gain * v + (offset_lsb + noise_lsb) * step


def ir_drop_reference(x: np.ndarray, g: np.ndarray, r_row: float, r_col: float) -> np.ndarray:
    """Column currents (m,) of one array g (rows, cols) uS of the whole physical tile
    (empty cross points 0) for one input vector x (rows,), node by node (PHYSICS.md
    section 8): Kirchhoff's current law at every word- and bit-line node, one sparse
    solve. A wire of 0 ohms fixes its nodes instead (word lines at x_i, bit lines at
    0 V)."""
    rows, cols = g.shape
    word = np.arange(rows * cols).reshape(rows, cols)
    bit = word + rows * cols
    n_nodes = 2 * rows * cols
    entries, rhs = [], np.zeros(n_nodes)
    known = np.full(n_nodes, np.nan)  # node voltages fixed by ideal wires
    if r_row == 0:
        known[word] = np.broadcast_to(x[:, None], (rows, cols))
    if r_col == 0:
        known[bit] = 0.0

    def link(a, b, conductance):
        """A conductance between nodes a and b (b None: to a fixed voltage ``rhs_v``)."""
        entries.append((a, a, conductance))
        if b is not None:
            entries.append((b, b, conductance))
            entries.append((a, b, -conductance))
            entries.append((b, a, -conductance))

    g_r = MICROSIEMENS_PER_SIEMENS / r_row if r_row else 0.0
    g_c = MICROSIEMENS_PER_SIEMENS / r_col if r_col else 0.0
    for i in range(rows):
        if r_row:
            link(word[i, 0], None, g_r)  # the driver at x_i
            rhs[word[i, 0]] += g_r * x[i]
            for j in range(1, cols):
                link(word[i, j - 1], word[i, j], g_r)
        for j in range(cols):
            link(word[i, j], bit[i, j], g[i, j])
    if r_col:
        for j in range(cols):
            for i in range(1, rows):
                link(bit[i - 1, j], bit[i, j], g_c)
            link(bit[rows - 1, j], None, g_c)  # the sense amplifier's virtual ground
    a = scipy.sparse.coo_matrix(([e[2] for e in entries], ([e[0] for e in entries], [e[1] for e in entries])),
                                shape=(n_nodes, n_nodes)).tocsr()
    fixed = ~np.isnan(known)
    free = np.flatnonzero(~fixed)
    v = np.where(fixed, known, 0.0)
    if free.size:
        b = rhs[free] - a[free][:, np.flatnonzero(fixed)] @ known[fixed]
        v[free] = scipy.sparse.linalg.spsolve(a[free][:, free].tocsc(), b)
    if r_col:
        return g_c * v[bit[rows - 1]]
    return (g * (v[word] - v[bit])).sum(axis=0)  # every device's current reaches its sense amplifier


def bit_serial_cycles(xq: np.ndarray, r_in, dac) -> list:
    """[(2^(p t), cycle t's inputs)] (PHYSICS.md section 9): the DAC code q = xq / step,
    cycle t carrying sign(q) times bits [p t, p t + p) of |q| times the step; [(1, xq)]
    where the whole value goes in one cycle."""
    if dac.bits_per_cycle is None:
        return [(1, xq)]
    half = 2 ** (dac.bits - 1) - 1
    step = (1.0 if dac.range_mode == "per_vector" else r_in) / half
    codes = np.rint(np.abs(xq) / step).astype(np.int64)
    p = dac.bits_per_cycle
    return [(2 ** (p * t), np.sign(xq) * ((codes >> (p * t)) & ((1 << p) - 1)) * step) for t in range(dac.cycles)]


def sliced_product_reference(x: np.ndarray, w: np.ndarray, w_ref: float, g_min: float, g_max: float, slices: int,
                             bits_per_slice: int, adc_range: float, adc_bits) -> np.ndarray:
    """x (batch, in) @ a sliced w (in, out), ideal devices, one ADC of ``adc_bits``
    and full scale ``adc_range`` per slice column, written out from PHYSICS.md section 9:

        y = w_ref / (2^n - 1) sum_s 2^(b s) (2^b - 1) / (g_max - g_min) ADC(x @ (G+_s - G-_s))
    """
    n = slices * bits_per_slice
    top = 2 ** n - 1
    m = np.rint(np.minimum(np.abs(w) / w_ref, 1.0) * top).astype(np.int64)
    y = np.zeros((x.shape[0], w.shape[1]))
    for s in range(slices):
        digit = (m >> (bits_per_slice * s)) & (2 ** bits_per_slice - 1)
        g = digit / (2 ** bits_per_slice - 1) * (g_max - g_min)
        g_plus = g_min + np.where(w > 0, g, 0.0)
        g_minus = g_min + np.where(w < 0, g, 0.0)
        converted, _ = quantize_reference(x @ (g_plus - g_minus), adc_range, adc_bits)
        y += 2.0 ** (bits_per_slice * s) * (2 ** bits_per_slice - 1) / (g_max - g_min) * converted
    return w_ref / top * y


class ReferenceTile(Tile):
    """A :class:`Tile` whose ``mvm`` is the float64 reference. Seeds its per-read noise
    from ``read_seed`` (numpy's generator, so samples differ from the fast path's)."""

    def __init__(self, config, read_seed: int = 0) -> None:
        super().__init__(config)
        self._reference_rng = np.random.default_rng(read_seed)

    def mvm(self, x) -> np.ndarray:
        x = np.asarray(self._check_input(x), dtype=np.float64)
        cfg = self.config
        r_in = self.input_range
        r_out = self.output_range
        if cfg.dac.bits is not None and r_in is None:
            raise RuntimeError("DAC range is not calibrated")
        if cfg.adc.bits is not None and r_out is None:
            raise RuntimeError("ADC range is not calibrated")
        if not np.all(np.isfinite(x)):
            raise ValueError("x contains NaN or Inf values; inputs must be finite")
        scales = np.ones(x.shape[0])
        if cfg.dac.range_mode == "per_vector":
            scales = np.abs(x).max(axis=1)
            x = np.divide(x, scales[:, None], out=np.zeros_like(x), where=scales[:, None] > 0)
        xq, clipped = quantize_reference(x, r_in if r_in is not None else 1.0, cfg.dac.bits)
        y = np.zeros((x.shape[0], self.grid.shape[1]))
        saturated = 0
        for weight, cycle in bit_serial_cycles(xq, r_in, cfg.dac):
            converted, hits = self._read_and_convert(cycle, r_out)
            y += weight * converted
            saturated += hits
        y = y * scales[:, None]
        counts = self.grid.counts  # the 1 x 1 grid's (0, 0) entries are this tile's
        counts["dac_converted"][0, 0] += x.size * cfg.dac.cycles
        counts["dac_clipped"][0, 0] += clipped
        counts["adc_converted"][0, 0] += y.size * cfg.dac.cycles
        counts["adc_saturated"][0, 0] += saturated
        return y

    def _read_and_convert(self, xq: np.ndarray, r_out) -> tuple:
        """One read of converted inputs xq (batch, rows): per-read noise sampled on every
        device, the wires, the ADC's errors and the ADC. (values, saturated)."""
        cfg = self.config
        g_plus, g_minus = (g.astype(np.float64) for g in self.conductances())
        if self.device.has_fast_noise:
            sd_plus = np.sqrt(self.device.read_variance(g_plus))
            sd_minus = np.sqrt(self.device.read_variance(g_minus))
            y = np.empty((xq.shape[0], g_plus.shape[1]))
            for b in range(xq.shape[0]):
                noisy_plus = g_plus + sd_plus * self._reference_rng.standard_normal(g_plus.shape)
                noisy_minus = g_minus + sd_minus * self._reference_rng.standard_normal(g_minus.shape)
                y[b] = self._column_currents(xq[b], noisy_plus) - self._column_currents(xq[b], noisy_minus)
        else:
            y = np.stack([self._column_currents(v, g_plus) - self._column_currents(v, g_minus) for v in xq])
        if cfg.adc.bits is not None and cfg.adc.has_errors:
            grid = self.grid
            gain = grid.adc_gain.numpy()[0] if grid.adc_gain.numel() else 1.0
            offset = grid.adc_offset.numpy()[0] if grid.adc_offset.numel() else 0.0
            noise = cfg.adc.noise_sigma * self._reference_rng.standard_normal(y.shape)
            y = adc_input_reference(y, r_out, cfg.adc.bits, gain, offset, noise, cfg.adc.nonlinearity)
        return quantize_reference(y, r_out if r_out is not None else 1.0, cfg.adc.bits)

    def _column_currents(self, x: np.ndarray, g: np.ndarray) -> np.ndarray:
        """One array's column outputs for one input vector: x @ g, or through the wires
        of the whole physical tile (its empty rows holding no device)."""
        wires = self.config.ir_drop
        if not wires.on:
            return x @ g
        rows = self.config.rows
        padded_x, padded_g = np.zeros(rows), np.zeros((rows, g.shape[1]))
        padded_x[:len(x)], padded_g[:len(x)] = x, g
        return ir_drop_reference(padded_x, padded_g, wires.r_row, wires.r_col)
