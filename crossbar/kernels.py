"""The tile's hot path, compiled with Numba: DAC, noisy read-out and ADC.

The products themselves go through BLAS (torch's sgemm: on the 2-core machine it matched
numpy's OpenBLAS alone, and unlike OpenBLAS it does not fight torch's own thread pool
when a network alternates torch layers and tiles) or torch's convolutions; these
kernels are the stages around them, each run once over a whole tile grid
(``crossbar/grid.py``).

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

from .rng import counter_hash, first_wedge_test, normal_after_first_step, ziggurat_fast

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
    # np.floor (a float) rather than math.floor (an int in Numba): the same value, and the
    # loop stays in floating point, so it vectorizes
    q = min(np.floor(a * inv_step + 0.5), float(half)) * step
    return (q if v >= 0 else -q), clipped


_OUTPUTS_PER_ITEM = 4096  # outputs a parallel work item converts: scratch buffers stay in cache


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
        bad = 0  # the row blocks cover the row: their counts of non-finite values add up to the row's
        for r in range(n_blocks):
            a, b = row_starts[r], row_starts[r + 1]
            m = 1.0
            if per_vector:
                m = 0.0
                for j in range(a, b):
                    m = max(m, abs(np.float64(x[i, j])))
                scales[r, i] = m
            inv_m = 1.0 / m if m > 0.0 else 0.0
            n_bad, clip[i, r] = _convert_values(x[i, a:b], out[i, a:b], inv_m if per_vector else 1.0, full_scale,
                                                step, inv_step, half)
            bad += n_bad
        bad_rows[i] = bad


@njit(parallel=True, fastmath={"reassoc", "nsz", "arcp", "contract"}, cache=True)
def grid_row_sum_squares(x, row_starts, out):
    """out[r, i] = sum of x[i, j]^2 over row block r, float64 (per row: thread-count free)."""
    for i in prange(x.shape[0]):
        for r in range(row_starts.shape[0] - 1):
            acc = 0.0
            for j in range(row_starts[r], row_starts[r + 1]):
                v = np.float64(x[i, j])  # (Numba's float() keeps a float32 a float32: squares would round)
                acc += v * v
            out[r, i] = acc


@njit(inline="always", cache=True)
def _normals(key, first, n, z, at):
    """z[k] = normal number first + k of stream ``key``, k < n: rng.normal_from_hash in
    passes, so that the first has no branch and can vectorize (the fast path everywhere,
    NaN marking a rejection; LLVM vectorizes it only where it gathers from the tables,
    not with AVX2 alone) and the rare rejections (:func:`_finish_rejected`, ``at`` its
    (n,) int64 scratch) cost no branch per normal."""
    rejected = 0
    for k in range(n):
        x, accepted = ziggurat_fast(counter_hash(key, first + uint64(k)))
        z[k] = x if accepted else np.nan
        rejected += not accepted
    if rejected:
        _finish_rejected(key, first, n, z, at)


@njit(cache=True)
def _finish_rejected(key, first, n, z, at):
    """The normals that the fast path left NaN in z[:n], as rng.normal_rejected draws
    them. Their positions are compacted first, branch-free, and every one takes its
    first wedge test in a branch-free loop; only the misses and the tail's entries
    (1.2% of normals) walk on. A loop over z that branched on each NaN and walked each
    from the start mispredicted at every rejection and took the first wedge test twice
    on a miss: rejections (2.8% of normals) were 58% of the normals' time (0.83 ns a
    normal on the 2-core machine, 0.35 for the fast path alone; now 0.67)."""
    count = 0
    for k in range(n):
        at[count] = k
        count += z[k] != z[k]
    for j in range(count):
        z[at[j]] = first_wedge_test(counter_hash(key, first + uint64(at[j])))
    for j in range(count):
        k = at[j]
        if z[k] != z[k]:
            z[k] = normal_after_first_step(counter_hash(key, first + uint64(k)))


@njit(error_model="numpy", cache=True)
def _read_uniform(partial, var_rows, divisor, r, i0, m, a, b, z, fs, st, inv, half, acc):
    """``grid_readout``'s common case (uniform read noise, a finite ADC, digital
    scaling) for tile row r, columns a .. b - 1 and rows i0 .. i0 + m - 1: the noisy
    value, its conversion, the division by the digital scale and the float32 sum into
    ``acc``; returns the count beyond the range.

    Its loops vectorize (3-4x faster than when they did not): rows are taken as slices
    indexed from 0, so that no index can be negative (an index ii * w - a + j took a
    wraparound test per element), and a division is IEEE's, with no test for a zero
    divisor (``error_model``; the divisors are positive by construction:
    mapping.conductance.reference_weight is never 0). Inlined in the parallel loop's
    body, this loop did not vectorize either."""
    n_out = partial.shape[2]
    w = b - a
    d = divisor[r, a:b]
    sat = 0
    for ii in range(m):
        v, noise, total = partial[r, i0 + ii, a:b], z[ii * w:(ii + 1) * w], acc[ii * n_out + a:ii * n_out + b]
        sd = math.sqrt(var_rows[r, i0 + ii])
        for k in range(w):
            q, hit = quantize(v[k] + sd * noise[k], fs, st, inv, half)
            sat += hit
            total[k] = np.float32(total[k] + np.float32(np.float32(q) / d[k]))
    return sat


@njit(error_model="numpy", cache=True)
def _read_staged(partial, var, var_rows, scales, divisor, adc_gain, adc_offset, r, i0, m, a, b, z, zn, fs, st, inv,
                 half, noise_sigma, nonlinearity, tanh_a, adc_errors, acc):
    """``grid_readout`` in stages, for every case, for tile row r and columns a .. b - 1
    of rows i0 .. i0 + m - 1: the noise (z[ii * w + k], the normals of column a + k of
    row ii), then the ADC's errors, the conversion, the per-vector scale and the
    division by the digital scale, summed into ``acc`` in float32; returns the count
    beyond the range. Rows are taken as slices indexed from 0, so that no index can
    be negative and the loops vectorize; the arrays' own empty shapes say what is off,
    as in ``grid_readout``."""
    n_out = partial.shape[2]
    w = b - a
    by_element = var.shape[0] > 0
    noisy = by_element or var_rows.shape[0] > 0
    gained = adc_gain.shape[0] > 0
    offset = adc_offset.shape[0] > 0
    adc_noisy = noise_sigma > 0.0
    sat = 0
    for ii in range(m):
        i = i0 + ii
        v, zr, total = partial[r, i, a:b], z[ii * w:(ii + 1) * w], acc[ii * n_out + a:ii * n_out + b]
        if noisy:
            if by_element:
                vr = var[r, i, a:b]
                for k in range(w):
                    zr[k] = v[k] + math.sqrt(vr[k]) * zr[k]
            else:
                sd = math.sqrt(var_rows[r, i])
                for k in range(w):
                    zr[k] = v[k] + sd * zr[k]
        else:
            for k in range(w):
                zr[k] = v[k]
        if adc_errors:
            zq = zn[ii * w:(ii + 1) * w] if adc_noisy else zr
            for k in range(w):
                y = zr[k]
                if nonlinearity > 0.0:
                    y = fs * math.tanh(nonlinearity * y / fs) / tanh_a
                if gained:
                    y *= adc_gain[r, a + k]
                lsb = adc_offset[r, a + k] if offset else 0.0
                if adc_noisy:
                    lsb += noise_sigma * zq[k]
                zr[k] = y + lsb * st
        if half >= 0:
            for k in range(w):
                zr[k], hit = quantize(zr[k], fs, st, inv, half)
                sat += hit
        s = scales[r, i] if scales.shape[0] > 0 else 1.0
        if divisor.shape[0] > 0:
            d = divisor[r, a:b]
            for k in range(w):
                total[k] = np.float32(total[k] + np.float32(np.float32(zr[k] * s) / d[k]))
        else:
            for k in range(w):
                total[k] = np.float32(total[k] + np.float32(zr[k] * s))
    return sat


@njit(parallel=True, cache=True)
def grid_readout(partial, var, var_rows, col_starts, keys, first_vector, ranges, half, scales, divisor,
                 alpha, out, adc_gain, adc_offset, adc_keys, noise_sigma, nonlinearity):
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
    Returns the (R, C) counts of each tile's outputs beyond its range.

    ADC errors (PHYSICS.md section 10; a finite ADC only): the value v of column j of
    tile row r is converted as quantize(adc_gain[r, j] * nonlin(v) + (adc_offset[r, j]
    + noise_sigma * zeta) * step), adc_gain and adc_offset empty where not drawn, zeta
    normal number (first_vector + i) * width + (j - col_start) of stream adc_keys[r, c]
    (noise_sigma > 0 only) and nonlin(v) = fs tanh(a v / fs) / tanh(a), a =
    nonlinearity (0: linear).

    Work items are runs of whole rows of about _OUTPUTS_PER_ITEM outputs. A tile's
    counters run on across rows, so each tile's normals for the item are drawn in one
    flat loop (long loops vectorize; conv layers and small tiles have short rows).
    """
    n_blocks, batch, n_out = partial.shape
    n_cols = col_starts.shape[0] - 1
    by_element = var.shape[0] > 0
    noisy = by_element or var_rows.shape[0] > 0
    rescale = scales.shape[0] > 0
    divide = divisor.shape[0] > 0
    gained = adc_gain.shape[0] > 0
    offset = adc_offset.shape[0] > 0
    adc_noisy = noise_sigma > 0.0
    adc_errors = half >= 0 and (gained or offset or adc_noisy or nonlinearity > 0.0)
    tanh_a = math.tanh(nonlinearity)
    rows_per_item = max(1, _OUTPUTS_PER_ITEM // n_out)
    n_items = (batch + rows_per_item - 1) // rows_per_item
    per_item = np.zeros((n_items, n_blocks, n_cols), np.int64)  # race-free parallel counts
    for item in prange(n_items):
        saturated = per_item[item]
        i0 = item * rows_per_item
        i1 = min(batch, i0 + rows_per_item)
        m = i1 - i0
        z = np.empty(m * n_out)  # one tile's values at a time: row ii at ii * width
        zn = np.empty(m * n_out if adc_noisy else 0)  # the same for the ADC's own noise
        at = np.empty(m * n_out, np.int64)  # the normals' scratch (rejections' positions)
        acc = np.zeros(m * n_out, dtype=np.float32)
        for r in range(n_blocks):
            for c in range(n_cols):
                a, b = col_starts[c], col_starts[c + 1]
                w = b - a
                if noisy:  # a tile's counters run on across its rows: one flat range
                    _normals(keys[r, c], (uint64(first_vector) + uint64(i0)) * uint64(w), m * w, z, at)
                if adc_noisy:
                    _normals(adc_keys[r, c], (uint64(first_vector) + uint64(i0)) * uint64(w), m * w, zn, at)
                fs = ranges[r, c]
                st, inv = steps(fs, half)
                if noisy and not by_element and half >= 0 and divide and not rescale and not adc_errors:
                    # the common case (uniform read noise, a finite ADC, digital scaling) in
                    # one pass per row; _read_staged does the same in stages
                    saturated[r, c] += _read_uniform(partial, var_rows, divisor, r, i0, m, a, b, z, fs, st, inv,
                                                     half, acc)
                    continue
                saturated[r, c] += _read_staged(partial, var, var_rows, scales, divisor, adc_gain, adc_offset, r, i0,
                                                m, a, b, z, zn, fs, st, inv, half, noise_sigma, nonlinearity, tanh_a,
                                                adc_errors, acc)
        f = np.float32(alpha)
        for ii in range(m):
            for j in range(n_out):
                out[i0 + ii, j] = np.float32(acc[ii * n_out + j] * f) if alpha != 1.0 else acc[ii * n_out + j]
    return per_item.sum(axis=0)


@njit(parallel=True, cache=True)
def pixel_dac_convert(x, out, full_scale, half, seg_starts, squares, clipped):
    """One DAC range for a layer's input x (pixels, channels), converted into ``out``;
    per pixel p and channel segment s (channels seg_starts[s] .. seg_starts[s + 1]):
    squares[p, s], the sum of the converted values squared (skipped if empty), and
    clipped[p, s], the values beyond the range. Returns the count of non-finite values.
    The segment sums are what a convolution's read-noise variance and clip counts sum
    over each tile row's receptive field.

    Each work item converts a run of whole pixels in one flat loop, then forms the
    per-pixel sums while the run is in cache: converting a pixel's segments one call
    at a time ran loops of 1-32 values (an edge channel is a segment of its own), whose
    overheads made the DAC 1.4-1.7x slower on the 2-core machine."""
    n_pixels, channels = x.shape
    n_segments = seg_starts.shape[0] - 1
    want_squares = squares.shape[0] > 0
    step, inv_step = steps(full_scale, half)
    per_item = max(1, _OUTPUTS_PER_ITEM // max(channels, 1))
    flat_x, flat_out = x.reshape(-1), out.reshape(-1)
    n_bad = 0
    for item in prange((n_pixels + per_item - 1) // per_item):
        p0 = item * per_item
        p1 = min(n_pixels, p0 + per_item)
        bad, _ = _convert_values(flat_x[p0 * channels:p1 * channels], flat_out[p0 * channels:p1 * channels], 1.0,
                                 full_scale, step, inv_step, half)
        n_bad += bad
        for p in range(p0, p1):
            for s in range(n_segments):
                a, b = seg_starts[s], seg_starts[s + 1]
                if want_squares:
                    squares[p, s] = _sum_squares(out[p, a:b])
                clipped[p, s] = _count_beyond(x[p, a:b], full_scale) if half >= 0 else 0
    return n_bad


@njit(cache=True)
def _count_beyond(x, full_scale):
    """The values of x beyond the range (|v| > full_scale), as ``quantize`` counts them."""
    hits = 0
    for c in range(x.shape[0]):
        hits += abs(np.float64(x[c])) > full_scale
    return hits


@njit(cache=True)
def _convert_values(x, out, scale, full_scale, step, inv_step, half):
    """One DAC range over the values x, each times ``scale`` first (1.0, exact, or a
    vector's per-vector scale), into ``out`` (float32): (values of x not finite, values
    beyond the range). A function of its own over slices indexed from 0, so that its
    loop vectorizes (inlined in a parallel loop with offset indices, it ran scalar)."""
    n_bad = 0
    hits = 0
    for c in range(x.shape[0]):
        v = np.float64(x[c])
        n_bad += not math.isfinite(v)
        v *= scale
        if half >= 0:
            q, hit = quantize(v, full_scale, step, inv_step, half)
            hits += hit
        else:
            q = v
        out[c] = np.float32(q)
    return n_bad, hits


@njit(cache=True)
def _sum_squares(q):
    """The float64 sum of float32 values squared, in order. The squares are exact in
    float64; until 2026-11-24 they were float32 products (Numba's ``float()`` keeps a
    float32 a float32), 1e-8 off in relative terms, where the torch engine squares in
    float64."""
    acc = 0.0
    for c in range(q.shape[0]):
        v = np.float64(q[c])
        acc += v * v
    return acc
