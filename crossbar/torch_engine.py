"""The tile grid's hot path in torch, for any torch device (CUDA in particular).

The same stages as the Numba kernels of ``kernels.py`` (DAC, per-read noise, ADC, the
digital sum over row blocks), with the same arithmetic, so that a seed names the same
outputs on either engine:

- the counter-based normals of ``rng.py`` (SplitMix64 hash of (key, counter) into a
  128-layer ziggurat), computed on int64 tensors: multiplication and addition wrap
  modulo 2^64 exactly as uint64 does, and a logical right shift is an arithmetic one
  masked to the bits that remain. Rare rejections (about 1.3%) run the ziggurat's slow
  path on the rejected elements only, step by step, as ``rng.normal_rejected`` does;
- converters in float64 with the same step, inverse step and round half away from zero;
- float32 division by the digital scale and float32 accumulation over row blocks, in
  row-block order.

On the CPU device the two engines agree bitwise (the tests hold them to it); sums of
squares for the read-noise variance are float64 reductions whose order differs between
engines, so with per-read noise on, a value on an ADC step edge can round the other way.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import numpy as np
import torch

from .rng import FN, GOLDEN, KN_FLOAT, MIX1, MIX2, WN, ZIGGURAT_R


def _signed(c: int) -> int:
    """The int64 with the bits of the uint64 c."""
    return c - (1 << 64) if c >= 1 << 63 else c


def as_int64_keys(keys: np.ndarray) -> torch.Tensor:
    """uint64 stream keys as int64 tensors of the same bits."""
    return torch.from_numpy(np.ascontiguousarray(keys, dtype=np.uint64).view(np.int64))


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    z = (z ^ _shr(z, 30)) * _signed(MIX1)
    z = (z ^ _shr(z, 27)) * _signed(MIX2)
    return z ^ _shr(z, 31)


def counter_hash(key: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    return mix64(key ^ (n * _signed(GOLDEN)))


def _uniform(h: torch.Tensor) -> torch.Tensor:
    """Uniform in (0, 1] from the top 53 bits (exact in float64)."""
    return (_shr(h, 11) + 1).double() * (1.0 / 9007199254740992.0)


@functools.lru_cache(maxsize=None)
def _tables(device: torch.device) -> tuple:
    """The ziggurat tables (KN as float64, WN, FN) on one device, made once per device."""
    return tuple(torch.from_numpy(a).to(device) for a in (KN_FLOAT, WN, FN))


def _fast(h: torch.Tensor, kn: torch.Tensor, wn: torch.Tensor) -> tuple:
    hz = (h >> 32).double()  # the top 32 bits as a signed int32 (an arithmetic shift)
    iz = h & 127
    return hz * wn[iz], hz.abs() < kn[iz], hz, iz


def normals_from_hash(h: torch.Tensor) -> torch.Tensor:
    """A standard normal (float64) from each 64-bit hash: ``rng.normal_from_hash``."""
    kn, wn, fn = _tables(h.device)
    x, accepted, _, _ = _fast(h, kn, wn)
    rejected = (~accepted).view(-1).nonzero().view(-1)  # flat indices, whatever h's shape
    if rejected.numel():
        x.view(-1)[rejected] = _rejected(h.reshape(-1)[rejected], kn, wn, fn)
    return x


def _rejected(h: torch.Tensor, kn, wn, fn) -> torch.Tensor:
    """``rng.normal_rejected`` on a vector of hashes: each element walks the same steps
    (wedge tests and tail draws at its own k) until it is accepted."""
    out = torch.empty(h.shape, dtype=torch.float64, device=h.device)
    k = torch.ones_like(h)
    todo = torch.arange(h.numel(), device=h.device)
    while todo.numel():
        x, accepted, hz, iz = _fast(h, kn, wn)
        done = accepted.clone()
        out[todo[accepted]] = x[accepted]
        tail = ~accepted & (iz == 0)
        if tail.any():
            idx = tail.nonzero().flatten()
            out[todo[idx]] = _tail(h[idx], k[idx], hz[idx])
            done |= tail
        wedge = ~accepted & (iz != 0)
        if wedge.any():
            iw = iz[wedge]
            u = _uniform(mix64(h[wedge] + k[wedge]))
            inside = fn[iw] + u * (fn[iw - 1] - fn[iw]) < torch.exp(-0.5 * x[wedge] * x[wedge])
            idx = wedge.nonzero().flatten()
            out[todo[idx[inside]]] = x[wedge][inside]
            done[idx[inside]] = True
            again = idx[~inside]
            h[again] = mix64(h[again] + k[again] + 1)
            k[again] += 2
        keep = ~done
        todo, h, k = todo[keep], h[keep], k[keep]
    return out


def _tail(h: torch.Tensor, k: torch.Tensor, hz: torch.Tensor) -> torch.Tensor:
    """The ziggurat's tail beyond R (Marsaglia's exponential method), per element."""
    xx = torch.empty(h.shape, dtype=torch.float64, device=h.device)
    todo = torch.arange(h.numel(), device=h.device)
    while todo.numel():
        a = -torch.log(_uniform(mix64(h + k))) / ZIGGURAT_R
        b = -torch.log(_uniform(mix64(h + k + 1)))
        k = k + 2
        ok = b + b >= a * a
        xx[todo[ok]] = a[ok]
        todo, h, k = todo[~ok], h[~ok], k[~ok]
    return torch.where(hz > 0, ZIGGURAT_R + xx, -ZIGGURAT_R - xx)


def counter_normals(key: int, offset: int, n: int, device="cpu") -> torch.Tensor:
    """Normals number offset .. offset + n - 1 of stream ``key``: ``rng.counter_normals``."""
    k = torch.tensor(_signed(int(key)), dtype=torch.int64, device=device)
    counters = torch.arange(n, dtype=torch.int64, device=device) + _signed(int(offset) % (1 << 64))
    return normals_from_hash(counter_hash(k, counters))


def steps(full_scale, half: int) -> tuple:
    """(step, inv_step), float64, as ``kernels.steps`` computes them (tensor or float)."""
    if half <= 0:
        return full_scale, 1.0
    return full_scale / half, half / full_scale


def quantize(v: torch.Tensor, full_scale, half: int) -> tuple:
    """``kernels.quantize`` on a float64 tensor (half >= 0; full_scale a float or a
    tensor that broadcasts): (values, mask of values beyond the range)."""
    a = v.abs()
    clipped = a > full_scale
    if half == 0:
        fs = torch.as_tensor(full_scale, dtype=torch.float64, device=v.device)
        return torch.where(v >= 0, fs, -fs).expand_as(v).clone(), clipped
    step, inv_step = steps(full_scale, half)
    q = torch.clamp(torch.floor(a * inv_step + 0.5), max=float(half)) * step
    return torch.where(v >= 0, q, -q), clipped


def dac_convert(x: torch.Tensor, full_scale: float, half: int, per_vector: bool, row_starts) -> tuple:
    """``kernels.grid_dac_convert``: (converted float32 (batch, n_in), per-vector scales
    (R, batch) float64 or None, clipped values per row block (R,) int64, non-finite
    values in x)."""
    xd = x.double()
    bad = int((~torch.isfinite(xd)).sum())
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    n_blocks = len(row_starts) - 1
    scales = torch.empty((n_blocks, x.shape[0]), dtype=torch.float64, device=x.device) if per_vector else None
    clipped = torch.zeros(n_blocks, dtype=torch.int64, device=x.device)
    for r in range(n_blocks):
        a, b = int(row_starts[r]), int(row_starts[r + 1])
        v = xd[:, a:b]
        if per_vector:
            m = v.abs().amax(dim=1)
            scales[r] = m
            v = v * torch.where(m > 0, 1.0 / m, torch.zeros_like(m))[:, None]
        if half >= 0:
            v, hits = quantize(v, full_scale, half)
            clipped[r] = hits.sum()
        out[:, a:b] = v
    return out, scales, clipped, bad


def range_sums(a: torch.Tensor, starts) -> torch.Tensor:
    """(rows, S): each row's sum over columns starts[s] .. starts[s + 1]."""
    bounds = [int(b) for b in starts]
    return torch.stack([a[:, lo:hi].sum(dim=1) for lo, hi in zip(bounds[:-1], bounds[1:])], dim=1)


def row_sum_squares(xq: torch.Tensor, row_starts) -> torch.Tensor:
    """(R, batch) float64: each vector's sum of squares over each row block."""
    return range_sums(xq.double().square(), row_starts).t()


class ColumnMap(NamedTuple):
    """Where each output column sits in the tile columns of a grid, on one device: its
    tile (``tile``), that tile's width (``width``) and its offset in the tile
    (``offset``); ``n_tiles`` tile columns."""

    tile: torch.Tensor
    width: torch.Tensor
    offset: torch.Tensor
    n_tiles: int


def column_map(col_starts, device) -> ColumnMap:
    starts = torch.as_tensor(np.asarray(col_starts), dtype=torch.int64, device=device)
    widths = starts[1:] - starts[:-1]
    tile = torch.repeat_interleave(torch.arange(len(widths), device=device), widths)
    return ColumnMap(tile, widths[tile], torch.arange(len(tile), device=device) - starts[:-1][tile], len(widths))


class ADCErrors(NamedTuple):
    """A finite ADC's non-idealities on the grid's device (PHYSICS.md section 10):
    fixed ``gain`` and ``offset`` (LSB) per tile row and output column, (R, n_out)
    float64 or None; the noise streams' ``keys`` (R, C) int64 (None: no noise)."""

    gain: Optional[torch.Tensor]
    offset: Optional[torch.Tensor]
    keys: Optional[torch.Tensor]
    noise_sigma: float
    nonlinearity: float


def adc_transfer(v: torch.Tensor, r: int, fs: torch.Tensor, step: torch.Tensor, errors: ADCErrors,
                 counters, tile_of) -> torch.Tensor:
    """``kernels.grid_readout``'s ADC errors on tile row r's values v (vectors, n_out)
    float64, before quantization."""
    a = errors.nonlinearity
    if a > 0:
        v = fs * torch.tanh(a * v / fs) / math.tanh(a)
    if errors.gain is not None:
        v = v * errors.gain[r]
    lsb = None
    if errors.offset is not None:
        lsb = errors.offset[r].expand_as(v)
    if errors.noise_sigma > 0:
        zeta = errors.noise_sigma * normals_from_hash(counter_hash(errors.keys[r][tile_of], counters))
        lsb = zeta if lsb is None else lsb + zeta
    return v if lsb is None else v + lsb * step


def readout(partial: torch.Tensor, var, var_rows, columns: ColumnMap, keys: torch.Tensor, first_vector: int,
            ranges: torch.Tensor, half: int, scales, divisor, alpha: float,
            errors: Optional[ADCErrors] = None) -> tuple:
    """``kernels.grid_readout``: every tile's per-read noise and ADC, the division by the
    digital scale and the float32 sum over row blocks, times alpha. ``partial`` (R,
    vectors, n_out) float32; ``var`` (R, vectors, n_out) float32 or None; ``var_rows``
    (R, vectors) float64 or None; ``columns`` the grid's :func:`column_map`; ``keys``
    (R, C) int64; ``ranges`` (R, C) float64;
    ``scales`` (R, vectors) float64 or None; ``divisor`` (R, n_out) float32 or None;
    ``errors`` the ADC's non-idealities or None. Returns (outputs (vectors, n_out) float32, saturated counts (R, C) int64)."""
    n_blocks, batch, n_out = partial.shape
    device = partial.device
    tile_of = columns.tile
    noisy = var is not None or var_rows is not None
    errors = errors if half >= 0 else None
    if noisy or (errors is not None and errors.noise_sigma > 0):  # normal (first_vector + i) * width + (j - start) of each tile's stream
        counters = (torch.arange(batch, dtype=torch.int64, device=device)[:, None] + int(first_vector)) \
            * columns.width + columns.offset
    acc = torch.zeros((batch, n_out), dtype=torch.float32, device=device)
    saturated = torch.zeros(ranges.shape, dtype=torch.int64, device=device)
    for r in range(n_blocks):
        v = partial[r].double()
        if noisy:
            z = normals_from_hash(counter_hash(keys[r][tile_of], counters))
            sd = torch.sqrt(var[r]).double() if var is not None else torch.sqrt(var_rows[r])[:, None]
            v = v + sd * z
        if half >= 0:
            fs = ranges[r][tile_of]
            if errors is not None:
                v = adc_transfer(v, r, fs, steps(fs, half)[0], errors, counters, tile_of)
            v, hits = quantize(v, fs, half)
            saturated[r] = torch.zeros(columns.n_tiles, dtype=torch.int64, device=device).index_add_(
                0, tile_of, hits.sum(dim=0))
        if scales is not None:
            v = v * scales[r][:, None]
        v = v.float()
        if divisor is not None:
            v = v / divisor[r]
        acc += v
    if alpha != 1.0:
        acc *= np.float32(alpha)
    return acc, saturated


def pixel_dac_convert(pixels: torch.Tensor, full_scale: float, half: int, seg_starts, want_squares: bool) -> tuple:
    """``kernels.pixel_dac_convert``: a layer input (pixels, channels) through one DAC
    range. Returns (converted float32, per pixel and channel segment the sum of the
    converted values squared (float32; None unless asked), the values beyond the range
    (float32), the count of non-finite values)."""
    xd = pixels.double()
    bad = int((~torch.isfinite(xd)).sum())
    if half >= 0:
        q, hits = quantize(xd, full_scale, half)
    else:
        q, hits = xd, torch.zeros(xd.shape, dtype=torch.bool, device=xd.device)
    xq = q.float()
    squares = range_sums(xq.double().square(), seg_starts).float() if want_squares else None
    return xq, squares, range_sums(hits, seg_starts).float(), bad
