"""The tile grid's read-out in torch, for any torch device (CUDA in particular).

The same stages as the Numba kernels of ``kernels.py``, with the same arithmetic, so
that a seed names the same outputs on either engine: per-read noise from the
counter-based normals of ``torch_normals.py``, the ADC (``torch_dac.quantize``), float32
division by the digital scale and float32 accumulation over row blocks, in row-block
order. The DAC is ``torch_dac.py``; ``fused.py`` compiles the stages into fused kernels.

Within a converted model's forward pass (``crossbar.deferred``) nothing is read from the
device until the pass ends: the outputs to read again exactly are compacted into a
buffer of fixed size, and the checks become device flags.

On the CPU device the two engines agree bitwise (the tests hold them to it); sums of
squares for the read-noise variance are float64 reductions whose order differs between
engines, so with per-read noise on, a value on an ADC step edge can round the other way.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import numpy as np
import torch

from .fused import fused_version, use_fused
from .rng import REJECTION_RATE, TAIL_FAILURE
from .torch_dac import quantize, steps
from .torch_normals import (DONE, ROUNDS, as_int64_keys, counter_hash, fast_path, finish_walks, rejection_rounds,
                            start_walks, steps_at_once, tables)

# An exact re-read walks the steps of two calls of rejection_rounds (the reasons for that
# length are given at torch_normals.ROUNDS)
_EXACT_STEPS = 2 * ROUNDS
# An exact re-read walks every normal _OPEN_STEPS steps, then only the walks still going,
# compacted into a buffer of late_walk_bound(walks): 99% of the walks end within two
# steps, and the remaining steps on all of them were most of a re-read's work.
_OPEN_STEPS = 2
# The share of walks still going after two steps is at most that of the second step's
# failures, whatever the first: a fresh hash leaves the fast path and misses its wedge
# (at most REJECTION_RATE), or a tail step fails (TAIL_FAILURE). Measured: 0.75% of
# walks from rejected hashes.
LATE_WALK_SHARE = max(REJECTION_RATE, TAIL_FAILURE)


def late_walk_bound(walks: int) -> int:
    """A buffer size for the walks, of ``walks``, still going after ``_OPEN_STEPS``
    steps: the binomial mean at LATE_WALK_SHARE plus 10 standard deviations, plus 16.
    Walks that do not fit stay unfinished, which a checked read finishes and a deferred
    pass flags: the size costs time, never correctness."""
    return _binomial_bound(walks, LATE_WALK_SHARE)


def _binomial_bound(n: int, p: float) -> int:
    """At most n: the mean of a binomial count of n trials of probability p plus 10
    standard deviations, plus 16 for small means; exceeded far less often than once in
    10^20 draws."""
    mean = n * p
    return min(n, math.ceil(mean + 10.0 * math.sqrt(mean * (1.0 - p)) + 16.0))


class ColumnMap(NamedTuple):
    """Where each output column sits in the tile columns of a grid, on one device: its
    tile (``tile``), that tile's width (``width``) and its offset in the tile
    (``offset``)."""

    tile: torch.Tensor
    width: torch.Tensor
    offset: torch.Tensor


def column_keys(keys: np.ndarray, columns: ColumnMap) -> torch.Tensor:
    """(R, C) uint64 stream keys of a grid's tiles as the (R, n_out) int64 key of each
    output column's tile, on the columns' device: gathered once, not at every read."""
    return as_int64_keys(keys).to(columns.tile.device)[:, columns.tile]


def column_map(col_starts, device) -> ColumnMap:
    starts = torch.as_tensor(np.asarray(col_starts), dtype=torch.int64, device=device)
    widths = starts[1:] - starts[:-1]
    tile = torch.repeat_interleave(torch.arange(len(widths), device=device), widths)
    return ColumnMap(tile, widths[tile], torch.arange(len(tile), device=device) - starts[:-1][tile])


class ADCErrors(NamedTuple):
    """A finite ADC's non-idealities on the grid's device (PHYSICS.md section 10):
    fixed ``gain`` and ``offset`` (LSB) per tile row and output column, (R, n_out)
    float64 or None; the noise streams' ``keys`` per output column, (R, n_out) int64
    (None: no noise)."""

    gain: Optional[torch.Tensor]
    offset: Optional[torch.Tensor]
    keys: Optional[torch.Tensor]
    noise_sigma: float
    nonlinearity: float


def read_values(partial: torch.Tensor, var_pairs, var_rows, z, fs, half: int, gain, offset, zeta,
                nonlinearity: float, scale, divisor) -> tuple:
    """Tile outputs read out, elementwise, every argument broadcast to ``partial``'s
    shape: per-read noise (the square roots of var_pairs (float32) or var_rows
    (float64), times the normals z), the ADC (full scales fs, its errors: gain, offset
    and noise zeta (LSB), tanh nonlinearity), the per-vector scale and the division by
    the digital scale. Returns (float32 values, mask of the values beyond the ADC range
    or None): the caller counts the mask, since a column sum inside a fused elementwise
    kernel is a reduction over few outputs, which GPUs run slowly."""
    v = partial.double()
    if z is not None:
        sd = torch.sqrt(var_pairs).double() if var_pairs is not None else torch.sqrt(var_rows)
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
        v = v * scale
    v = v.float()
    if divisor is not None:
        v = v / divisor
    return v, hits


def readout(partial: torch.Tensor, var, var_rows, columns: ColumnMap, keys: torch.Tensor, first_vector: torch.Tensor,
            ranges: torch.Tensor, half: int, scales, divisor, alpha: float,
            errors: Optional[ADCErrors] = None, checks=None) -> tuple:
    """``kernels.grid_readout``: every tile's per-read noise and ADC, the division by the
    digital scale and the float32 sum over row blocks, times alpha. ``partial`` (R,
    vectors, n_out) float32; ``var`` (R, vectors, n_out) float32 or None; ``var_rows``
    (R, vectors) float64 or None; ``columns`` the grid's :func:`column_map`; ``keys``
    (R, n_out) int64, each output column's key of its tile's per-read noise stream
    (:func:`column_keys`); ``first_vector`` the number of the first vector, a 0-d int64 tensor on
    the device (a graph's replay reads it there); ``ranges`` (R, C) float64;
    ``scales`` (R, vectors) float64 or None; ``divisor`` (R, n_out) float32 or None;
    ``errors`` the ADC's non-idealities or None; ``checks`` a pass's
    :class:`~crossbar.deferred.DeferredChecks` (None: check at once). Returns (outputs
    (vectors, n_out) float32, saturated counts (R, C) int64).

    Every tile output of the grid is read in one call, whatever the row blocks (on a
    GPU one fused kernel: a call of a compiled function costs far more host time than
    the kernel it launches), with every normal from the ziggurat's fast path. The tile
    outputs (a row block's output, not all row blocks of it) that drew one of its rare
    rejections (2.7% of normals) are then read again with exact normals and replace the
    first values, and the row blocks are summed in order. With ``checks``, nothing is
    read from the device: those tile outputs are found in a buffer of fixed size
    (:func:`rejected_bound`) and a buffer too small or a walk too long is flagged
    there."""
    n_blocks, batch, n_out = partial.shape
    device = partial.device
    fused = use_fused(device)
    tile_of = columns.tile
    errors = errors if half >= 0 else None
    args = _ReadArgs(partial, var, var_rows, ranges[:, tile_of] if half >= 0 else None, half,
                     None if errors is None else errors.gain, None if errors is None else errors.offset,
                     0.0 if errors is None else errors.nonlinearity, scales, divisor)
    # each normal an output draws per row block: its stream's (R, n_out) column keys, and factor
    streams, factors = [], []
    if var is not None or var_rows is not None:
        streams, factors = [keys], [1.0]
    if errors is not None and errors.noise_sigma > 0:
        streams.append(errors.keys)
        factors.append(float(errors.noise_sigma))
    streams, factors = tuple(streams), tuple(factors)
    kn, wn, _ = tables(device)
    read = fused_version(_read_fast) if fused else _read_fast
    numbers = first_vector + torch.arange(batch, device=device)  # each vector's number
    values, hits, rejected = read(*args, streams, factors, numbers, columns.width, columns.offset, kn, wn)
    if rejected is not None:
        if checks is None:
            flat = rejected.nonzero().view(-1)
        else:
            flat = _bounded_indices(rejected, n_blocks, len(streams), checks)
        if flat.numel():
            exact, exact_hits = _read_exact(args, streams, factors, flat, first_vector, columns, fused, checks)
            # flat indices; padding repeats an index in a spare column, which is never
            # read. index_put_, not put_: put_ refuses to run under
            # torch.use_deterministic_algorithms(True), index_put_ runs deterministically
            values.view(-1).index_put_((flat,), exact)
            if hits is not None:
                hits.view(-1).index_put_((flat,), exact_hits)
    n = batch * n_out
    # the digital sum, in row-block order as the Numba kernel adds (0 + y0 + y1 + ...:
    # starting from y0 changes only the sign of a zero sum), with no zero-filled start
    blocks = values[:, :n].view(n_blocks, batch, n_out)
    acc = blocks[0] if n_blocks == 1 else blocks[0] + blocks[1]  # one block: the read-out's own memory
    for block in blocks[2:]:
        acc += block
    column_hits = None
    if hits is not None:
        count = fused_version(column_counts) if fused else column_counts
        column_hits = count(hits, batch, n_out)
    saturated = torch.zeros(ranges.shape, dtype=torch.int64, device=device)
    if column_hits is not None:
        saturated.index_add_(1, tile_of, column_hits)
    if alpha != 1.0:
        acc *= np.float32(alpha)
    return acc, saturated


def column_counts(mask: torch.Tensor, vectors: int, n_out: int) -> torch.Tensor:
    """(R, n_out) int64: the true values of a bool mask in the read-out's layout (R,
    vectors x n_out + 1), spare column left out, over the vectors. A kernel of its own
    on a GPU: torch's eager sum of a bool tensor first copies it to int64, eight bytes
    per tile output, and inside the read-out's kernel this reduction over few outputs
    would slow the elementwise work. The mask is taken whole, not as a (R, vectors,
    n_out) view, and its strides are given, not inferred: the inference tests whether
    there is one row block, and a first call with one compiled a variant for it alone."""
    return mask.as_strided((mask.shape[0], vectors, n_out), (vectors * n_out + 1, n_out, 1)).sum(dim=1)


def rejected_bound(outputs: int, draws: int) -> int:
    """A buffer size for the tile outputs, of ``outputs``, that draw at least one
    rejected normal among their ``draws`` normals: each does so independently (the
    hashes of distinct counters and keys) with probability p = 1 - (1 - REJECTION_RATE)^draws;
    the :func:`_binomial_bound` of that is flagged when it is exceeded."""
    return _binomial_bound(outputs, 1.0 - (1.0 - REJECTION_RATE) ** draws)


def _bounded_indices(rejected: torch.Tensor, n_blocks: int, draws: int, checks) -> torch.Tensor:
    """The flat indices of the tile outputs that drew a rejected normal (``rejected``,
    the flat (R x (vectors x n_out + 1),) mask of ``n_blocks`` row blocks, each with a
    spare column last), with no read of the device: :func:`rejected_bound` of them,
    padded with the first row block's spare column; more of them than that is flagged.
    The excess is found without counting the mask (torch's sum of a bool tensor copies
    it to int64 first, eight bytes per tile output): one index more is compacted, and
    it is a real one (never a spare column, which is never rejected) only then."""
    width = rejected.numel() // n_blocks
    size = rejected_bound(n_blocks * (width - 1), draws)
    flat = torch.nonzero_static(rejected, size=size + 1, fill_value=width - 1).view(-1)
    checks.flag(flat[size] != width - 1)
    return flat[:size]


class _ReadArgs(NamedTuple):
    """What a read-out takes besides its normals: ``partial`` (R, vectors, n_out),
    ``var`` like it, ``var_rows`` and ``scales`` (R, vectors), ``fs``, ``gain``,
    ``offset`` and ``divisor`` (R, n_out); None where absent."""

    partial: torch.Tensor
    var: Optional[torch.Tensor]
    var_rows: Optional[torch.Tensor]
    fs: Optional[torch.Tensor]
    half: int
    gain: Optional[torch.Tensor]
    offset: Optional[torch.Tensor]
    nonlinearity: float
    scales: Optional[torch.Tensor]
    divisor: Optional[torch.Tensor]


def _read_fast(partial, var, var_rows, fs, half: int, gain, offset, nonlinearity: float, scales, divisor,
               keys: tuple, factors: tuple, numbers: torch.Tensor, width, col_offset, kn, wn) -> tuple:
    """The read-out of every tile output (R, vectors, n_out), each normal from the
    ziggurat's fast path: normal numbers[i] * width + offset of output column j's tile
    stream for vector i (``numbers``: each vector's number, int64; a tensor, not an
    arange made here: inductor indexes the ziggurat's tables with an int32 copy of an
    arange, which differs from the int64 one the values use, and a GPU kernel then
    computed every hash twice). ``keys``: per stream (per-read noise, ADC noise) the
    (R, n_out) key of each column, its normals times ``factors``. Returns (values,
    ADC range mask, each (R, vectors x n_out + 1) with a spare column, and the mask
    of the tile outputs that drew a rejected normal (None without noise) in the same
    layout, flat)."""
    counters = numbers[:, None] * width + col_offset
    drawn = []
    for key, factor in zip(keys, factors):
        x, accepted, _, _ = fast_path(counter_hash(key[:, None, :], counters), kn, wn)
        x = torch.where(accepted, x, math.nan)  # NaN through to the value: see the return
        drawn.append(x if factor == 1.0 else factor * x)
    z, zeta = _by_stream(drawn, var is not None or var_rows is not None)

    def per_column(a):  # (R, n_out) -> (R, 1, n_out)
        return None if a is None else a[:, None, :]

    def per_vector(a):  # (R, vectors) -> (R, vectors, 1)
        return None if a is None else a[:, :, None]

    values, hits = read_values(partial, var, per_vector(var_rows), z, per_column(fs), half, per_column(gain),
                               per_column(offset), zeta, nonlinearity, per_vector(scales), per_column(divisor))
    # the outputs that drew a rejected normal are those whose value is NaN (every stage
    # carries a NaN through; partials, variances, ranges and divisors are finite, and
    # ranges and divisors > 0). Read from the values, the mask is written by the values'
    # kernel: computed from `accepted`, it took a kernel of its own on GPUs (Triton's
    # scheduler fuses nodes that share a buffer), which hashed every counter again
    rejected = _spare_column(values.isnan()).view(-1) if drawn else None
    return _spare_column(values), _spare_column(hits), rejected


def _spare_column(a: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """(R, vectors, n_out) -> (R, vectors x n_out + 1): one column more, where the
    padding of a bounded exact re-read (:func:`_bounded_indices`) writes."""
    if a is None:
        return None
    flat = a.reshape(a.shape[0], -1)
    return torch.cat([flat, torch.zeros((a.shape[0], 1), dtype=a.dtype, device=a.device)], dim=1)


def _by_stream(drawn: list, read_noise: bool) -> tuple:
    """(z, zeta) from the normals drawn, per-read noise's first."""
    if read_noise:
        return drawn[0], drawn[1] if len(drawn) > 1 else None
    return None, drawn[0] if drawn else None


def _read_exact(args: _ReadArgs, keys: tuple, factors: tuple, flat: torch.Tensor, first_vector: torch.Tensor,
                columns: ColumnMap, fused: bool, checks=None) -> tuple:
    """The read-out of the tile outputs at ``flat`` (indices into the (R, vectors x n_out
    + 1) read-out, whose spare column is padding) with exact normals: (their values
    (E,), their ADC range masks (E,) or None). One call walks their normals
    ``_EXACT_STEPS`` steps (:func:`_walked_normals`), a second reads them
    (:func:`_read_at`). In the rare case that a walk is longer, the walks are finished
    before the read, or, with ``checks``, that is flagged there.

    The walks and the read are compiled apart: the walks are most of what a run
    compiles (27 s of resnet56's 44 s on a 2-core CPU), and apart they are the same for
    every read setting (noise, ADC errors, scales), compiled once instead of once per
    variant."""
    kn, wn, fn = tables(flat.device)
    walk = fused_version(_walked_normals) if fused else _walked_normals
    read = fused_version(_read_at) if fused else _read_at
    late = late_walk_bound(len(keys) * flat.numel())
    _, vectors, n_out = args.partial.shape
    # keys flat (R x n_out,): the walks do not depend on the row blocks, and a torch
    # without backed_size_oblivious would compile a (1, n_out) key's variant of its own
    flat_keys = tuple(key.reshape(-1) for key in keys)
    state, unfinished = walk(flat_keys, flat, first_vector, columns.width, columns.offset, vectors, n_out,
                             kn, wn, fn, late)
    normals = state[3]
    if checks is not None:
        checks.flag(unfinished)
    elif bool(unfinished):
        normals = finish_walks(state, kn, wn, fn)
    return read(*args, flat, normals, factors)


def _located(flat: torch.Tensor, vectors: int, n_out: int) -> tuple:
    """(row block, vector, column) of each tile output at ``flat`` in the (R, vectors x
    n_out + 1) read-out of a product of ``vectors`` x ``n_out`` per row block; a spare
    column (padding) is taken as its row block's last output."""
    per_block = vectors * n_out
    block = flat // (per_block + 1)
    output = (flat % (per_block + 1)).clamp(max=per_block - 1)
    return block, output // n_out, output % n_out


def _walked_normals(keys: tuple, flat, first_vector: torch.Tensor, width, col_offset, vectors: int, n_out: int,
                    kn, wn, fn, late: int) -> tuple:
    """The exact normals of the tile outputs at ``flat`` (:func:`_located`), per stream
    of ``keys`` (each stream's (R, n_out) column keys, flat): walks of
    ``_EXACT_STEPS`` steps, all of them ``_OPEN_STEPS`` steps and the rest on at most
    ``late`` walks still going. Returns (the walks' state, whose normals (streams, E)
    float64 are exact where every walk is done; whether a walk is unfinished)."""
    block, i, j = _located(flat, vectors, n_out)
    counters = (i + first_vector) * width[j] + col_offset[j]
    h = torch.stack([counter_hash(key[block * n_out + j], counters) for key in keys])  # (streams, E)
    opening = min(_EXACT_STEPS, _OPEN_STEPS)
    state = rejection_rounds(*start_walks(h), kn, wn, fn, opening)
    if _EXACT_STEPS > opening:
        state = _late_rounds(state, late, kn, wn, fn, _EXACT_STEPS - opening)
    return state, (state[2] != DONE).any()


def _read_at(partial, var, var_rows, fs, half: int, gain, offset, nonlinearity: float, scales, divisor,
             flat, normals, factors: tuple) -> tuple:
    """The read-out of the tile outputs at ``flat`` (:func:`_located`) with their
    ``normals`` (streams, E): (values, ADC range masks), each (E,). Padding (a spare
    column) reads its row block's last output."""
    args = _ReadArgs(partial, var, var_rows, fs, half, gain, offset, nonlinearity, scales, divisor)
    return _read_gathered(_gathered(args, *_located(flat, *partial.shape[1:])), normals, factors)


def _late_rounds(state: tuple, size: int, kn, wn, fn, steps: int) -> tuple:
    """``steps`` more steps (:func:`steps_at_once`) of the walks in ``state`` that
    are still going, at most ``size`` of them (the first ones; the others are left as
    they are), compacted first. Padding repeats the first walk: its copies take the
    same steps, so that whichever write lands, the value is the same."""
    at = torch.nonzero_static(state[2].reshape(-1) != DONE, size=size, fill_value=0).view(-1)
    late = steps_at_once(*(a.reshape(-1)[at] for a in state), kn, wn, fn, steps)
    return tuple(a.reshape(-1).index_put((at,), b).view(a.shape) for a, b in zip(state, late))


def _gathered(args: _ReadArgs, block: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> _ReadArgs:
    """The read-out's inputs at the tile outputs of row blocks ``block``, vectors ``i``
    and columns ``j`` alone, each (E,)."""

    def per_output(a):
        return None if a is None else a[block, i, j]

    def per_column(a):
        return None if a is None else a[block, j]

    def per_vector(a):
        return None if a is None else a[block, i]

    return _ReadArgs(per_output(args.partial), per_output(args.var), per_vector(args.var_rows),
                     per_column(args.fs), args.half, per_column(args.gain), per_column(args.offset),
                     args.nonlinearity, per_vector(args.scales), per_column(args.divisor))


def _read_gathered(args: _ReadArgs, normals: torch.Tensor, factors: tuple) -> tuple:
    """The read-out of gathered tile outputs (:func:`_gathered`) with their normals
    (streams, E), each stream's times its factor: (values, ADC range mask)."""
    drawn = [z if factor == 1.0 else factor * z for z, factor in zip(normals, factors)]
    z, zeta = _by_stream(drawn, args.var is not None or args.var_rows is not None)
    return read_values(args.partial, args.var, args.var_rows, z, args.fs, args.half, args.gain, args.offset, zeta,
                       args.nonlinearity, args.scales, args.divisor)
