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


# -- the tile grid: every tile of one weight matrix at once ------------------------------
@njit(parallel=True, cache=True)
def grid_dac_convert(x, out, full_scale, half, per_vector, row_starts, scales, clip, bad_rows):
    """Convert a layer's inputs x (batch, n_in) once for every tile of the grid.

    Row block r (inputs row_starts[r] .. row_starts[r+1]) feeds the tiles of grid row r.
    With per_vector each block of each row is divided by its own abs-max first (kept in
    scales[r, i]), as each tile's DACs would see it. clip[i, r] counts the values of row
    i beyond the range in block r; bad_rows[i] the values that are not finite.
    """
    batch = x.shape[0]
    n_blocks = row_starts.shape[0] - 1
    step, inv_step = steps(full_scale, half)
    for i in prange(batch):
        bad = 0
        for j in range(x.shape[1]):
            bad += not math.isfinite(x[i, j])
        bad_rows[i] = bad
        for r in range(n_blocks):
            a, b = row_starts[r], row_starts[r + 1]
            m = 1.0
            if per_vector:
                m = 0.0
                for j in range(a, b):
                    m = max(m, abs(float(x[i, j])))
                scales[r, i] = m
            inv_m = 1.0 / m if m > 0.0 else 0.0
            clipped = 0
            if half >= 0:
                for j in range(a, b):
                    v = float(x[i, j]) * inv_m if per_vector else float(x[i, j])
                    q, c = quantize(v, full_scale, step, inv_step, half)
                    out[i, j] = q
                    clipped += c
            else:
                for j in range(a, b):
                    out[i, j] = float(x[i, j]) * inv_m if per_vector else x[i, j]
            clip[i, r] = clipped


@njit(parallel=True, fastmath={"reassoc", "nsz", "arcp", "contract"}, cache=True)
def grid_row_sum_squares(x, row_starts, out):
    """out[r, i] = sum of x[i, j]^2 over row block r, float64 (per row: thread-count free)."""
    for i in prange(x.shape[0]):
        for r in range(row_starts.shape[0] - 1):
            acc = 0.0
            for j in range(row_starts[r], row_starts[r + 1]):
                acc += float(x[i, j]) * float(x[i, j])
            out[r, i] = acc


@njit(parallel=True, cache=True)
def grid_readout(partial, var, var_rows, col_starts, keys, first_vector, ranges, half, scales, divisor,
                 alpha, out, saturated):
    """Every tile's read-out and ADC, then the digital sum over row blocks, in one pass.

    partial[r, i, j]: the analog product of row block r for input vector i and output
    column j (uS x normalised volts). Tile (r, c) owns columns col_starts[c] ..
    col_starts[c + 1]. Its per-read noise has variance var[r, i, j] (a full array), else
    var_rows[r, i] (one value per vector when every device reads alike), else none (both
    empty); the normal of its output (i, j) is number (first_vector + i) * width +
    (j - col_start) of stream keys[r, c], so that consecutive products continue one
    stream per tile. ranges[r, c] is the tile's ADC full scale; scales[r, i] (empty:
    none) undoes per-vector DAC scaling. Each converted value is divided by divisor[r, j]
    (empty: not) and summed over r in float32, in order; the sum is multiplied by alpha.
    saturated[k, r, c] counts outputs beyond the range for the k-th chunk of vectors.
    """
    n_blocks, batch, n_out = partial.shape
    n_cols = col_starts.shape[0] - 1
    by_element = var.shape[0] > 0
    noisy = by_element or var_rows.shape[0] > 0
    rescale = scales.shape[0] > 0
    divide = divisor.shape[0] > 0
    step = np.empty((n_blocks, n_cols))
    inv_step = np.empty((n_blocks, n_cols))
    for r in range(n_blocks):
        for c in range(n_cols):
            step[r, c], inv_step[r, c] = steps(ranges[r, c], half)
    n_chunks = (batch + _ROWS_PER_CHUNK - 1) // _ROWS_PER_CHUNK
    for chunk in prange(n_chunks):
        z = np.empty(n_out)
        acc = np.empty(n_out, dtype=np.float32)
        for i in range(chunk * _ROWS_PER_CHUNK, min(batch, (chunk + 1) * _ROWS_PER_CHUNK)):
            for j in range(n_out):
                acc[j] = 0.0
            for r in range(n_blocks):
                for c in range(n_cols):
                    a, b = col_starts[c], col_starts[c + 1]
                    if noisy:
                        # rng.normal_from_hash in two passes so that the first vectorizes:
                        # the fast path everywhere (NaN marks a rejection), then the rare rest
                        base = (uint64(first_vector) + uint64(i)) * uint64(b - a)
                        key = keys[r, c]
                        rejected = 0
                        for j in range(a, b):
                            x, accepted = ziggurat_fast(counter_hash(key, base + uint64(j - a)))
                            z[j] = x if accepted else np.nan
                            rejected += not accepted
                        if rejected:
                            for j in range(a, b):
                                if np.isnan(z[j]):
                                    z[j] = normal_rejected(counter_hash(key, base + uint64(j - a)))
                        if by_element:
                            for j in range(a, b):
                                z[j] = partial[r, i, j] + math.sqrt(var[r, i, j]) * z[j]
                        else:
                            sd = math.sqrt(var_rows[r, i])
                            for j in range(a, b):
                                z[j] = partial[r, i, j] + sd * z[j]
                    else:
                        for j in range(a, b):
                            z[j] = partial[r, i, j]
                    s = scales[r, i] if rescale else 1.0
                    if half >= 0:
                        sat = 0
                        fs, st, inv = ranges[r, c], step[r, c], inv_step[r, c]
                        for j in range(a, b):
                            q, hit = quantize(z[j], fs, st, inv, half)
                            sat += hit
                            z[j] = q
                        saturated[chunk, r, c] += sat
                    for j in range(a, b):
                        v = np.float32(z[j] * s)
                        if divide:
                            v = np.float32(v / divisor[r, j])
                        acc[j] = np.float32(acc[j] + v)
            if alpha != 1.0:
                f = np.float32(alpha)
                for j in range(n_out):
                    out[i, j] = np.float32(acc[j] * f)
            else:
                for j in range(n_out):
                    out[i, j] = acc[j]
