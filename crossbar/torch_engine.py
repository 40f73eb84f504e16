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
import os
from typing import NamedTuple, Optional

import numpy as np
import torch

from .rng import FN, GOLDEN, KN_FLOAT, MIX1, MIX2, WN, ZIGGURAT_R


FUSED_ENV = "XBARSIM_FUSED"
_VARIANTS = 64  # compiled variants allowed per fused function


def use_fused(device: torch.device) -> bool:
    """Whether the elementwise stages run as fused kernels (torch.compile): on CUDA
    devices by default, where one kernel per stage instead of dozens of elementwise
    passes over float64 and int64 temporaries is most of the speed. The environment
    variable XBARSIM_FUSED = 0 runs them eagerly everywhere, 1 compiles them on any
    device (the CPU included: the tests compare the two)."""
    setting = os.environ.get(FUSED_ENV, "auto")
    if setting not in ("auto", "0", "1"):
        raise ValueError(f"{FUSED_ENV} = {setting!r} is invalid: expected 'auto', '0' or '1'")
    return setting == "1" or (setting == "auto" and device.type == "cuda")


@functools.lru_cache(maxsize=None)
def fused_version(fn):
    """``fn`` compiled into fused kernels, once per process (shapes are dynamic, so
    layers of other sizes reuse it). The arithmetic is fn's: integer hashing wraps as
    in eager torch, and float64 stays float64. Each combination of the stages that are
    on (noise, ADC errors, scales) is a variant of its own: dynamo's default limit of 8
    per function is raised so that none of them falls back to eager."""
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), _VARIANTS))
    return torch.compile(fn, dynamic=True, fullgraph=True)


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
    """``rng.normal_rejected`` on a vector of hashes. Every element walks the same steps
    (wedge tests and tail draws at its own k) until it is accepted; here all of them
    step together, masked, a few rounds per (fused) call, so that the number of
    kernels and device syncs does not grow with the elements' longest walk."""
    rounds = fused_version(_rejection_rounds) if use_fused(h.device) else _rejection_rounds
    k = torch.ones_like(h)
    phase = torch.zeros(h.shape, dtype=torch.int8, device=h.device)  # _WEDGES, _TAIL or _DONE
    out = torch.zeros(h.shape, dtype=torch.float64, device=h.device)
    positive = torch.zeros(h.shape, dtype=torch.bool, device=h.device)
    while True:
        h, k, phase, out, positive = rounds(h, k, phase, out, positive, kn, wn, fn)
        if not bool((phase != _DONE).any()):  # one sync per _ROUNDS steps; rarely more than one
            return out


_WEDGES, _TAIL, _DONE = 0, 1, 2
_ROUNDS = 6  # steps per call: few elements need more


def _rejection_rounds(h, k, phase, out, positive, kn, wn, fn) -> tuple:
    """``_ROUNDS`` steps of ``rng.normal_rejected`` for every element, masked by its
    phase: the ziggurat (fast test, then the wedge test with the uniform of h + k; a
    miss re-hashes h + k + 1), or the tail (two uniforms at k, k + 1) with the sign
    of the hash that entered it. Elements that are done keep their value."""
    for _ in range(_ROUNDS):
        in_wedges, in_tail = phase == _WEDGES, phase == _TAIL
        x, accepted, hz, iz = _fast(h, kn, wn)
        a = -torch.log(_uniform(mix64(h + k))) / ZIGGURAT_R
        b = -torch.log(_uniform(mix64(h + k + 1)))
        tail_ok = in_tail & (b + b >= a * a)
        layer = torch.where(iz == 0, torch.ones_like(iz), iz)  # the wedge test's layer (iz = 0 is the tail)
        wedge = in_wedges & ~accepted & (iz != 0)
        inside = wedge & (fn[layer] + _uniform(mix64(h + k)) * (fn[layer - 1] - fn[layer]) < torch.exp(-0.5 * x * x))
        enter_tail = in_wedges & ~accepted & (iz == 0)
        take_x = in_wedges & accepted | inside
        out = torch.where(take_x, x, torch.where(tail_ok, torch.where(positive, ZIGGURAT_R + a, -ZIGGURAT_R - a), out))
        positive = torch.where(enter_tail, hz > 0, positive)
        missed = wedge & ~inside
        k_next = torch.where(missed | in_tail, k + 2, k)
        h = torch.where(missed, mix64(h + k + 1), h)
        k = k_next
        phase = torch.where(take_x | tail_ok, torch.full_like(phase, _DONE),
                            torch.where(enter_tail, torch.full_like(phase, _TAIL), phase))
    return h, k, phase, out, positive


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


def block_normals(key_of_column: torch.Tensor, first_vector: torch.Tensor, batch: int, columns: "ColumnMap",
                  fused: bool) -> torch.Tensor:
    """(batch, n_out) float64: normal (first_vector + i) * width + (j - start) of the
    stream of output column j's tile, for i < batch. The fast path of every element
    is one elementwise pass (a single fused kernel where ``fused``); the rare
    rejections are then redone on the rejected elements alone."""
    kn, wn, fn = _tables(key_of_column.device)
    fast = fused_version(_fast_block) if fused else _fast_block
    x, accepted = fast(key_of_column, first_vector, batch, columns.width, columns.offset, kn, wn)
    rejected = (~accepted).view(-1).nonzero().view(-1)
    if rejected.numel():
        hashes = fused_version(_hashes_at) if fused else _hashes_at
        h = hashes(rejected, key_of_column, first_vector, columns.width, columns.offset)
        x.view(-1)[rejected] = _rejected(h, kn, wn, fn)
    return x


def _hashes_at(flat, key_of_column, first_vector, width, offset) -> torch.Tensor:
    """The hashes of ``_fast_block`` at flat indices of its (batch, n_out) block."""
    i, j = flat // width.shape[0], flat % width.shape[0]
    return counter_hash(key_of_column[j], (i + first_vector) * width[j] + offset[j])


def _fast_block(key_of_column, first_vector, batch: int, width, offset, kn, wn) -> tuple:
    """The ziggurat's fast path on a block's hashes: (values, accepted)."""
    counters = (torch.arange(batch, dtype=torch.int64, device=width.device)[:, None] + first_vector) * width + offset
    x, accepted, _, _ = _fast(counter_hash(key_of_column, counters), kn, wn)
    return x, accepted


def read_block(partial: torch.Tensor, var_pairs, var_rows, z, fs, half: int, gain, offset, zeta, nonlinearity: float,
               scale, divisor, acc: torch.Tensor) -> tuple:
    """One tile row's read-out, elementwise: per-read noise (the square roots of
    var_pairs (vectors, n_out) float32 or var_rows (vectors,) float64, times the normals z),
    the ADC (full scales fs (n_out,), its errors: gain, offset and noise zeta (LSB),
    tanh nonlinearity), the per-vector scale, the division by the digital scale and the
    float32 sum into acc. Returns (acc, mask of the values beyond the ADC range): the
    caller counts them, since a column sum inside a fused elementwise kernel is a
    reduction over few outputs, which GPUs run slowly."""
    v = partial.double()
    if z is not None:
        sd = torch.sqrt(var_pairs).double() if var_pairs is not None else torch.sqrt(var_rows)[:, None]
        v = v + sd * z
    hits = None
    if half >= 0:
        if nonlinearity > 0:
            v = fs * torch.tanh(nonlinearity * v / fs) / math.tanh(nonlinearity)
        if gain is not None:
            v = v * gain
        lsb = None
        if offset is not None:
            lsb = offset.expand_as(v)
        if zeta is not None:
            lsb = zeta if lsb is None else lsb + zeta
        if lsb is not None:
            v = v + lsb * steps(fs, half)[0]
        v, hits = quantize(v, fs, half)
    if scale is not None:
        v = v * scale[:, None]
    v = v.float()
    if divisor is not None:
        v = v / divisor
    return acc + v, hits


def readout(partial: torch.Tensor, var, var_rows, columns: ColumnMap, keys: torch.Tensor, first_vector: int,
            ranges: torch.Tensor, half: int, scales, divisor, alpha: float,
            errors: Optional[ADCErrors] = None) -> tuple:
    """``kernels.grid_readout``: every tile's per-read noise and ADC, the division by the
    digital scale and the float32 sum over row blocks, times alpha. ``partial`` (R,
    vectors, n_out) float32; ``var`` (R, vectors, n_out) float32 or None; ``var_rows``
    (R, vectors) float64 or None; ``columns`` the grid's :func:`column_map`; ``keys``
    (R, C) int64; ``ranges`` (R, C) float64;
    ``scales`` (R, vectors) float64 or None; ``divisor`` (R, n_out) float32 or None;
    ``errors`` the ADC's non-idealities or None. Returns (outputs (vectors, n_out)
    float32, saturated counts (R, C) int64). On a GPU each tile row is two fused kernels
    (the normals' fast path, then everything else; see :func:`fused_version`)."""
    n_blocks, batch, n_out = partial.shape
    device = partial.device
    fused = use_fused(device)
    step = fused_version(read_block) if fused else read_block
    tile_of = columns.tile
    noisy = var is not None or var_rows is not None
    errors = errors if half >= 0 else None
    first = torch.tensor(int(first_vector), dtype=torch.int64, device=device)
    acc = torch.zeros((batch, n_out), dtype=torch.float32, device=device)
    saturated = torch.zeros(ranges.shape, dtype=torch.int64, device=device)
    for r in range(n_blocks):
        z = block_normals(keys[r][tile_of], first, batch, columns, fused) if noisy else None
        zeta = gain = offset = None
        if errors is not None:
            gain = None if errors.gain is None else errors.gain[r]
            offset = None if errors.offset is None else errors.offset[r]
            if errors.noise_sigma > 0:
                zeta = errors.noise_sigma * block_normals(errors.keys[r][tile_of], first, batch, columns, fused)
        acc, hits = step(partial[r], None if var is None else var[r], None if var_rows is None else var_rows[r],
                         z, ranges[r][tile_of] if half >= 0 else None, half, gain, offset, zeta,
                         0.0 if errors is None else errors.nonlinearity,
                         None if scales is None else scales[r], None if divisor is None else divisor[r], acc)
        if hits is not None:
            saturated[r] = torch.zeros(columns.n_tiles, dtype=torch.int64, device=device).index_add_(
                0, tile_of, hits.sum(dim=0))
    if alpha != 1.0:
        acc *= np.float32(alpha)
    return acc, saturated


def dac_values(x: torch.Tensor, full_scale: float, half: int) -> tuple:
    """A DAC over x with one range: (converted float32, mask of values beyond the
    range, count of non-finite values as a tensor); half < 0 passes values through."""
    xd = x.double()
    bad = (~torch.isfinite(xd)).sum()
    if half >= 0:
        q, hits = quantize(xd, full_scale, half)
    else:
        q, hits = xd, torch.zeros(xd.shape, dtype=torch.bool, device=xd.device)
    return q.float(), hits, bad


def pixel_dac_convert(pixels: torch.Tensor, full_scale: float, half: int, seg_starts, want_squares: bool) -> tuple:
    """``kernels.pixel_dac_convert``: a layer input (pixels, channels) through one DAC
    range. Returns (converted float32, per pixel and channel segment the sum of the
    converted values squared (float32; None unless asked), the values beyond the range
    (float32), the count of non-finite values)."""
    convert = fused_version(dac_values) if use_fused(pixels.device) else dac_values
    xq, hits, bad = convert(pixels, float(full_scale), half)
    squares = range_sums(xq.double().square(), seg_starts).float() if want_squares else None
    return xq, squares, range_sums(hits, seg_starts).float(), int(bad)
