"""A slow, obvious float64 implementation of the tile's matrix-vector product.

It shares the tile's programmed state (programming, drift and 1/f are numpy code in the
device models already, run by the tile grid) and re-implements everything on the hot path in plain numpy:
DAC, products, per-read noise and ADC. Per-read noise is sampled the slow way that the
fast path avoids: a fresh noisy copy of both conductance matrices for every input row.
"""
from __future__ import annotations

import numpy as np

from .tile import Tile


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

        g_plus, g_minus = (g.astype(np.float64) for g in self.conductances())
        if self.device.has_fast_noise:
            sd_plus = np.sqrt(self.device.read_variance(g_plus))
            sd_minus = np.sqrt(self.device.read_variance(g_minus))
            y = np.empty((x.shape[0], g_plus.shape[1]))
            for b in range(x.shape[0]):
                noisy_plus = g_plus + sd_plus * self._reference_rng.standard_normal(g_plus.shape)
                noisy_minus = g_minus + sd_minus * self._reference_rng.standard_normal(g_minus.shape)
                y[b] = xq[b] @ (noisy_plus - noisy_minus)
        else:
            y = xq @ (g_plus - g_minus)
        if cfg.adc.bits is not None and cfg.adc.has_errors:
            grid = self.grid
            gain = grid.adc_gain.numpy()[0] if grid.adc_gain.numel() else 1.0
            offset = grid.adc_offset.numpy()[0] if grid.adc_offset.numel() else 0.0
            noise = cfg.adc.noise_sigma * self._reference_rng.standard_normal(y.shape)
            y = adc_input_reference(y, r_out, cfg.adc.bits, gain, offset, noise, cfg.adc.nonlinearity)
        y, saturated = quantize_reference(y, r_out if r_out is not None else 1.0, cfg.adc.bits)
        y = y * scales[:, None]
        counts = self.grid.counts  # the 1 x 1 grid's (0, 0) entries are this tile's
        counts["dac_converted"][0, 0] += x.size
        counts["dac_clipped"][0, 0] += clipped
        counts["adc_converted"][0, 0] += y.size
        counts["adc_saturated"][0, 0] += saturated
        return y
