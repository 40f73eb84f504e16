"""The tile's hot path, compiled with Numba: DAC, noisy read-out and ADC.

The products themselves go through BLAS (torch's sgemm: on the 2-core machine it matched
numpy's OpenBLAS alone, and unlike OpenBLAS it does not fight torch's own thread pool
when a network alternates torch layers and tiles); these kernels are the stages around
them.

Quantizer semantics, shared with ``reference.py``: ``half`` is the number of levels on
each side of zero (2^(b-1) - 1 for b >= 2 bits), step = range / half and
inv_step = half / range (both float64), and a value v becomes
sign(v) * min(floor(|v| * inv_step + 0.5), half) * step: round half away from zero,
|v| > range counted as clipped and held at the last level. ``half == 0`` is a 1-bit
sign converter (+-range; v >= 0 maps to +range); ``half < 0`` an ideal converter.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange, uint64

from .rng import counter_hash, normal_rejected, ziggurat_fast

IDEAL = -1


def levels_per_side(bits):
    """``half`` for a converter of ``bits`` (None: ideal)."""
    if bits is None:
        return IDEAL
    return (1 << (bits - 1)) - 1


@njit(cache=True)
def steps(full_scale, half):
    """(step, inv_step) of a converter, float64, computed the same way everywhere."""
    if half <= 0:
        return float(full_scale), 1.0
    return full_scale / half, half / full_scale


@njit(inline="always", cache=True)
def quantize(v, full_scale, step, inv_step, half):
    """Quantize one value (half >= 0); returns (value, 1 if beyond the range else 0)."""
    a = abs(v)
    clipped = 1 if a > full_scale else 0
    if half == 0:
        return (full_scale if v >= 0 else -full_scale), clipped
    q = min(math.floor(a * inv_step + 0.5), half) * step
    return (q if v >= 0 else -q), clipped


@njit(parallel=True, cache=True)
def dac_convert(x, out, full_scale, half, per_vector, scales, clip_rows, bad_rows):
    """Convert inputs x (batch, rows) into ``out`` (float32).

    per_vector: each row is divided by its abs-max first (kept in ``scales``, 0 for an
    all-zero row) so that the converter sees [-1, 1]. Per row, the number clipped and
    the number not finite go to ``clip_rows``/``bad_rows``: per-row slots keep the
    parallel reduction deterministic. Each loop is kept simple enough to vectorize.
    """
    batch, rows = x.shape
    step, inv_step = steps(full_scale, half)
    for i in prange(batch):
        bad = 0
        for j in range(rows):
            bad += not math.isfinite(x[i, j])
        bad_rows[i] = bad
        m = 1.0
        if per_vector:
            m = 0.0
            for j in range(rows):
                m = max(m, abs(float(x[i, j])))
            scales[i] = m
        inv_m = 1.0 / m if m > 0.0 else 0.0
        clipped = 0
        if half >= 0:
            for j in range(rows):
                v = float(x[i, j]) * inv_m if per_vector else float(x[i, j])
                q, c = quantize(v, full_scale, step, inv_step, half)
                out[i, j] = q
                clipped += c
        else:
            for j in range(rows):
                out[i, j] = float(x[i, j]) * inv_m if per_vector else x[i, j]
        clip_rows[i] = clipped


@njit(parallel=True, fastmath={"reassoc", "nsz", "arcp", "contract"}, cache=True)
def row_sum_squares(x, out):
    """out[i] = sum_j x[i, j]^2 in float64 (the order of the sum is free; per row, so
    the result does not depend on the thread count)."""
    for i in prange(x.shape[0]):
        acc = 0.0
        for j in range(x.shape[1]):
            acc += float(x[i, j]) * float(x[i, j])
        out[i] = acc


_ROWS_PER_CHUNK = 64  # rows sharing one scratch buffer: allocation per row costs more than the work


@njit(parallel=True, cache=True)
def readout_convert(y, var, var_rows, key, offset, full_scale, half, scales, sat_rows):
    """In place on y (batch, cols): add per-read noise, convert, undo per-vector scaling.

    The noise variance of y[i, j] is var[i, j] (a matrix), else var_rows[i] (one value a
    row, when every device has the same read variance), else there is none (both
    empty). Its normal is number offset + i * cols + j of stream ``key``. ``scales``
    (empty: none) multiplies each converted row.
    """
    batch, cols = y.shape
    by_element = var.shape[0] > 0
    noisy = by_element or var_rows.shape[0] > 0
    rescale = scales.shape[0] > 0
    step, inv_step = steps(full_scale, half)
    n_chunks = (batch + _ROWS_PER_CHUNK - 1) // _ROWS_PER_CHUNK
    for chunk in prange(n_chunks):
        z = np.empty(cols)
        for i in range(chunk * _ROWS_PER_CHUNK, min(batch, (chunk + 1) * _ROWS_PER_CHUNK)):
            if noisy:
                # rng.normal_from_hash split in two passes so that the first vectorizes:
                # the fast path everywhere (NaN marks a rejection), then the rare rejections
                base = uint64(offset) + uint64(i) * uint64(cols)
                rejected = 0
                for j in range(cols):
                    x, accepted = ziggurat_fast(counter_hash(key, base + uint64(j)))
                    z[j] = x if accepted else np.nan
                    rejected += not accepted
                if rejected:
                    for j in range(cols):
                        if np.isnan(z[j]):
                            z[j] = normal_rejected(counter_hash(key, base + uint64(j)))
                if by_element:
                    for j in range(cols):
                        z[j] = y[i, j] + math.sqrt(var[i, j]) * z[j]
                else:
                    sd = math.sqrt(var_rows[i])
                    for j in range(cols):
                        z[j] = y[i, j] + sd * z[j]
            else:
                for j in range(cols):
                    z[j] = y[i, j]
            s = scales[i] if rescale else 1.0
            saturated = 0
            if half >= 0:
                for j in range(cols):
                    q, c = quantize(z[j], full_scale, step, inv_step, half)
                    saturated += c
                    y[i, j] = q * s
            else:
                for j in range(cols):
                    y[i, j] = z[j] * s
            sat_rows[i] = saturated
