"""The tile grid's hot path in torch, for any torch device (CUDA in particular).

The same stages as the Numba kernels of ``kernels.py`` (DAC, per-read noise, ADC, the
digital sum over row blocks), with the same arithmetic, so that a seed names the same
outputs on either engine:

- the counter-based normals of ``rng.py`` (SplitMix64 hash of (key, counter) into a
  128-layer ziggurat), computed on int64 tensors: multiplication and addition wrap
  modulo 2^64 exactly as uint64 does, and a logical right shift is an arithmetic one
  masked to the bits that remain. The rare rejections (2.7% of normals) run the
  ziggurat's slow path on the rejected elements only, step by step, as
  ``rng.normal_rejected`` does;
- converters in float64 with the same step, inverse step and round half away from zero;
- float32 division by the digital scale and float32 accumulation over row blocks, in
  row-block order.

Within a converted model's forward pass (``crossbar.deferred``) nothing is read from the
device until the pass ends: the outputs to read again exactly are compacted into a
buffer of fixed size, and the checks become device flags.

On the CPU device the two engines agree bitwise (the tests hold them to it); sums of
squares for the read-noise variance are float64 reductions whose order differs between
engines, so with per-read noise on, a value on an ADC step edge can round the other way.
"""
from __future__ import annotations

import functools
import math
import os
import warnings
from typing import NamedTuple, Optional

import numpy as np
import torch

from .rng import FN, GOLDEN, KN_FLOAT, MIX1, MIX2, REJECTION_RATE, TAIL_FAILURE, WN, ZIGGURAT_R
from .tensor_mode import normal_tensors


FUSED_ENV = "XBARSIM_FUSED"
_VARIANTS = 64  # compiled variants allowed per fused function
# device types whose stages are compiled unless XBARSIM_FUSED says otherwise
FUSED_BY_DEFAULT = ("cuda",)
# device type -> why torch.compile failed there in this process; by default the stages
# then run eagerly there (see fused_version)
_COMPILE_FAILED: dict = {}


def fused_setting() -> str:
    """XBARSIM_FUSED: 'auto' (the default), '0' or '1'."""
    setting = os.environ.get(FUSED_ENV, "auto")
    if setting not in ("auto", "0", "1"):
        raise ValueError(f"{FUSED_ENV} = {setting!r} is invalid: expected 'auto', '0' or '1'")
    return setting


def use_fused(device: torch.device) -> bool:
    """Whether the elementwise stages run as fused kernels (torch.compile): on CUDA
    devices by default, where one kernel per stage instead of dozens of elementwise
    passes over float64 and int64 temporaries is most of the speed, unless compiling
    failed there earlier in the process. The environment variable XBARSIM_FUSED = 0
    runs them eagerly everywhere, 1 compiles them on any device (the CPU included: the
    tests compare the two), a failure to compile being an error then."""
    setting = fused_setting()
    if setting == "auto":
        return device.type in FUSED_BY_DEFAULT and device.type not in _COMPILE_FAILED
    return setting == "1"


@functools.lru_cache(maxsize=None)
def fused_version(fn):
    """``fn`` compiled into fused kernels, once per process (shapes are dynamic, so
    layers of other sizes reuse it). The arithmetic is fn's: integer hashing wraps as
    in eager torch, and float64 stays float64. Each combination of the stages that are
    on (noise, ADC errors, scales) is a variant of its own: dynamo's default limit of 8
    per function is raised so that none of them falls back to eager.

    Compiling dominates a GPU run's start (resnet56: over two minutes on an H100), so
    calls avoid what would compile a variant again for nothing: they run without
    autograd (no gradient flows through a chip; a grad mode is part of a compiled
    variant's guards, so calibration, run with autograd on, compiled every variant a
    second time), with views passed as tensors of their own (a view's base is guarded
    on too), and with two of torch's symbolic-shape settings (:data:`_SHAPE_SETTINGS`):
    duck shaping off, which would otherwise tie sizes that happen to be equal in the
    first call (a 128-entry ziggurat table and 128 vectors, say) and compile again when
    they differ, and sizes of 1 not specialized (``backed_size_oblivious``): otherwise
    a grid of one row block, a layer of one pixel and the rest each compile a variant
    (resnet56 on the CPU: 11 compiled graphs, now 6, and 80 s of compiling, now 66 s).
    A size-1 operand that a graph would need to broadcast is still told apart: torch
    then checks, or specializes, rather than assume.

    Where the kernels cannot be built (an old GPU, no Triton, no C compiler), the stages
    run uncompiled instead, with a warning, unless XBARSIM_FUSED = 1 asked for them
    compiled (:func:`_uncompiled_after`)."""
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), _VARIANTS))
    compiled = _compiled(fn)

    @functools.wraps(fn)
    def call(*args):
        # (use_fused is false there by now, but a caller's loop may hold on to this call)
        if _COMPILE_FAILED and _device_type(args) in _COMPILE_FAILED and fused_setting() == "auto":
            return fn(*args)
        # views as tensors of their own (a view is guarded on its base's sizes and strides
        # too); only views: a detach costs 0.6 us, the test 0.1 us, and a read-out takes ~15 tensors
        args = tuple(a.detach() if isinstance(a, torch.Tensor) and a._is_view() else a for a in args)
        with torch.no_grad():
            # set and restored by hand: the config's patch() cost 35 us a call, this 3 us a setting
            saved = [getattr(_SHAPE_CONFIG, name) for name, _ in _SHAPE_SETTINGS]
            for name, value in _SHAPE_SETTINGS:
                setattr(_SHAPE_CONFIG, name, value)
            try:
                return compiled(*args)
            except Exception as error:
                if isinstance(error, torch.cuda.OutOfMemoryError) or fused_setting() != "auto":
                    raise
                return _uncompiled_after(error, fn, args)
            finally:
                for (name, _), value in zip(_SHAPE_SETTINGS, saved):
                    setattr(_SHAPE_CONFIG, name, value)

    return call


def _compiled(fn):
    """torch.compile of ``fn``, or a function raising why torch refuses to compile here
    (its dynamo does not run on every Python version), which a call then handles as it
    handles a failure to build the kernels."""
    try:
        return torch.compile(fn, dynamic=True, fullgraph=True)
    except Exception as error:
        refusal = error  # (the except clause unbinds its own name)

        def refused(*args):
            raise refusal
        return refused


def _device_type(args: tuple) -> str:
    """The device type of a fused call's first tensor argument."""
    return next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")


def _uncompiled_after(error: Exception, fn, args: tuple):
    """``fn(*args)`` run eagerly after its compiled version failed with ``error``, and
    eager stages on that device type for the rest of the process, with one warning.

    Building the kernels fails on machines the default cannot know about: a GPU too old
    for Triton (compute capability below 7.0), no Triton, no C compiler for Triton's
    launcher. The eager stages compute the same chip and noise (the tests hold the two
    equal), more slowly and with more memory. An error of the inputs' own is raised by
    the eager call itself, as it would be without compiling."""
    result = fn(*args)
    device_type = _device_type(args)
    while isinstance(getattr(error, "inner_exception", None), Exception):
        error = error.inner_exception  # what dynamo's BackendCompilerFailed wraps: the cause
    lines = [line for line in str(error).splitlines() if line.strip()]
    cause = f"{type(error).__name__}: {lines[0][:300] if lines else ''}"
    warnings.warn(f"torch.compile could not build xbarsim's fused kernels for {device_type} ({cause}); they run "
                  f"uncompiled there for the rest of this process: the same chip and noise, more slowly and "
                  f"with more memory. {FUSED_ENV}=0 skips the attempt; {FUSED_ENV}=1 makes it an error, "
                  f"with torch's whole message", RuntimeWarning)
    _COMPILE_FAILED[device_type] = cause  # (after the warning, which an error filter raises)
    return result


def _shape_settings() -> tuple:
    """torch's symbolic-shape settings module and the (name, value) pairs a fused call
    runs under, those of them this torch has (older ones duck-shape and specialize
    sizes of 1 always)."""
    try:
        from torch.fx.experimental import _config
    except ImportError:
        return None, ()
    wanted = (("use_duck_shape", False), ("backed_size_oblivious", True))
    return _config, tuple((name, value) for name, value in wanted if hasattr(_config, name))


_SHAPE_CONFIG, _SHAPE_SETTINGS = _shape_settings()


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


def uniforms_from_hash(h: torch.Tensor) -> torch.Tensor:
    """A uniform in (0, 1] (float64) from each 64-bit hash's top 53 bits (exact):
    ``rng._uniform``."""
    return (_shr(h, 11) + 1).double() * (1.0 / 9007199254740992.0)


@functools.lru_cache(maxsize=None)
@normal_tensors
def _tables(device: torch.device) -> tuple:
    """The ziggurat tables (KN as float64, WN, FN) on one device, made once per device
    (normal tensors even if first made in a torch.inference_mode() block)."""
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
    return _finish_walks(_start_walks(h), kn, wn, fn)


def _start_walks(h: torch.Tensor) -> tuple:
    """The walks' state (h, k, phase, out, positive) before their first step."""
    return (h, torch.ones_like(h), torch.zeros(h.shape, dtype=torch.int8, device=h.device),  # phase _WEDGES
            torch.zeros(h.shape, dtype=torch.float64, device=h.device),
            torch.zeros(h.shape, dtype=torch.bool, device=h.device))


def _finish_walks(state: tuple, kn, wn, fn) -> torch.Tensor:
    """Step every walk until all are done (their steps are unchanged once done): the
    normals."""
    rounds = fused_version(_rejection_rounds) if use_fused(state[0].device) else _rejection_rounds
    while True:
        state = rounds(*state, kn, wn, fn)
        if not bool((state[2] != _DONE).any()):  # one sync per _ROUNDS steps; rarely more than one
            return state[3]


_WEDGES, _TAIL, _DONE = 0, 1, 2
# Steps per call. A walk outlasts k steps mostly in the tail: it is entered by 5.7e-4 of
# all normals, and each of its steps fails with probability TAIL_FAILURE = 0.0689, so k
# steps are outlasted by about 5.7e-4 x 0.0689^(k-1) of normals: 8.8e-10 for 6 steps, 9.4e-17
# for 12. An exact re-read walks 12 steps (_EXACT_CALLS x _ROUNDS), since a pass of 10^9
# normals (resnet56 at batch 1024) meets one of 6 or more in one pass of two, and one of
# 12 in one pass of 10^7: a deferred pass flags it (and runs again, checked), a checked
# read finishes the walk. Checked and deferred reads walk the same steps, so that one
# compiled variant serves both.
_ROUNDS = 6
_EXACT_CALLS = 2
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


def _rejection_rounds(h, k, phase, out, positive, kn, wn, fn, steps: Optional[int] = None) -> tuple:
    """``steps`` (default ``_ROUNDS``) steps of ``rng.normal_rejected`` for every
    element, masked by its phase: the ziggurat (fast test, then the wedge test with the
    uniform of h + k; a miss re-hashes h + k + 1), or the tail (two uniforms at k,
    k + 1) with the sign of the hash that entered it. Elements that are done keep
    their state."""
    for _ in range(_ROUNDS if steps is None else steps):
        in_wedges, in_tail = phase == _WEDGES, phase == _TAIL
        x, accepted, hz, iz = _fast(h, kn, wn)
        a, tail_accepts = _tail_attempt(h, k)
        tail_ok = in_tail & tail_accepts
        wedge = in_wedges & ~accepted & (iz != 0)
        inside = wedge & _under_wedge(h, k, x, iz, fn)
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


def _under_wedge(h, k, x, iz, fn) -> torch.Tensor:
    """The ziggurat's wedge test of x in layer iz with the uniform of h + k: whether x
    lies under the density (iz = 0, the tail's layer, is tested as layer 1: unused)."""
    layer = torch.where(iz == 0, torch.ones_like(iz), iz)
    return fn[layer] + uniforms_from_hash(mix64(h + k)) * (fn[layer - 1] - fn[layer]) < torch.exp(-0.5 * x * x)


def _tail_attempt(h, k) -> tuple:
    """Marsaglia's tail attempt with the uniforms of h + k and h + k + 1: (a, whether
    it is accepted); the normal is R + a, signed."""
    a = -torch.log(uniforms_from_hash(mix64(h + k))) / ZIGGURAT_R
    b = -torch.log(uniforms_from_hash(mix64(h + k + 1)))
    return a, b + b >= a * a


def _steps_at_once(h, k, phase, out, positive, kn, wn, fn, steps: int) -> tuple:
    """``steps`` steps of :func:`_rejection_rounds`, the same state after them, with the
    steps side by side, not one after another: compiled, the rounds' code is unrolled
    once per step (about 4 s of compiling a step on 2 CPU cores), and an exact
    re-read's 10 late steps were most of a cold start's compiling: its walks took 49 s
    to compile for resnet56, 27 s with these. A walk's steps are laid out in advance,
    since each is a function of the walk's state where its phase began: in the
    ziggurat, a missed wedge test re-hashes (h + k + 1) and takes k + 2, so the hashes
    it would try form a chain, and each step's outcome follows from its hash alone; in
    the tail, attempt m draws at k + 2 m. The first step that ends a phase ends it.
    Each walk computes every step, needed or not: for the few walks still going after
    the open steps (:func:`_late_rounds`), not for all of them."""
    at = torch.arange(steps, device=h.device)
    hs, ks = [h], [k]
    for _ in range(steps):  # the chain: the hash and k of every step the walk would take in the ziggurat
        hs.append(mix64(hs[-1] + ks[-1] + 1))
        ks.append(ks[-1] + 2)
    chain_h, chain_k = torch.stack(hs[:steps], dim=-1), torch.stack(ks[:steps], dim=-1)  # (walks, steps)
    x, accepted, hz, iz = _fast(chain_h, kn, wn)
    inside = ~accepted & (iz != 0) & _under_wedge(chain_h, chain_k, x, iz, fn)
    enters = ~accepted & (iz == 0)
    # the step at which each walk leaves the ziggurat (steps: none does)
    first = torch.where(accepted | inside | enters, at, steps).amin(dim=-1)
    ending = first.clamp(max=steps - 1)[..., None]

    def at_end(a):
        return a.gather(-1, ending).squeeze(-1)

    end_h, end_k, ends_in_tail = at_end(chain_h), at_end(chain_k), at_end(enters)
    in_wedges, in_tail = phase == _WEDGES, phase == _TAIL
    leaves = in_wedges & (first < steps)
    takes_x = leaves & ~ends_in_tail
    to_tail = leaves & ends_in_tail
    # the tail: its hash and first k, and the attempts left to it within the steps
    tail_h = torch.where(to_tail, end_h, h)
    tail_k = torch.where(to_tail, end_k, k)
    tries = torch.where(to_tail, steps - 1 - first, steps)
    positive = torch.where(to_tail, at_end(hz) > 0, positive)
    a, accepts = _tail_attempt(tail_h[..., None], tail_k[..., None] + 2 * at)
    success = torch.where(accepts & (at < tries[..., None]), at, steps).amin(dim=-1)
    tailing = in_tail | to_tail
    tail_done = tailing & (success < steps)
    tail_a = a.gather(-1, success.clamp(max=steps - 1)[..., None]).squeeze(-1)
    out = torch.where(takes_x, at_end(x), torch.where(
        tail_done, torch.where(positive, ZIGGURAT_R + tail_a, -ZIGGURAT_R - tail_a), out))
    still_wedges = in_wedges & ~leaves
    h = torch.where(still_wedges, hs[steps], torch.where(leaves, end_h, h))  # a walk keeps its hash in the tail
    k = torch.where(still_wedges, ks[steps], torch.where(takes_x, end_k, torch.where(
        tailing, tail_k + 2 * torch.where(tail_done, success + 1, tries), k)))
    phase = torch.where(takes_x | tail_done, torch.full_like(phase, _DONE),
                        torch.where(tailing, torch.full_like(phase, _TAIL), phase))
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
    tensor that broadcasts): (values, mask of values beyond the range). A NaN stays NaN
    (:func:`_read_fast` marks an output to read again so)."""
    a = v.abs()
    clipped = a > full_scale
    if half == 0:  # the sign's full scale (a float is a scalar to where: no copy from the host on a GPU)
        return torch.where(v >= 0, full_scale, torch.where(v < 0, -full_scale, v)), clipped
    step, inv_step = steps(full_scale, half)
    q = torch.clamp(torch.floor(a * inv_step + 0.5), max=float(half)) * step
    return torch.where(v >= 0, q, -q), clipped


def dac_convert(x: torch.Tensor, full_scale: float, half: int, per_vector: bool, row_starts,
                block_matrix: torch.Tensor) -> tuple:
    """``kernels.grid_dac_convert``: (converted float32 (batch, n_in), per-vector scales
    (R, batch) float64 or None, clipped values per row block (R,) int64, the count of
    non-finite values in x as a device tensor). ``block_matrix`` (n_in, R) float64 is 1
    where an input is in a row block.

    With fused kernels, one range (not per vector) converts in one kernel
    (:func:`dac_values`), its clips summed per row block by a matrix product: the eager
    conversion holds float64 temporaries of the whole input, which were a transformer's
    peak memory (the feed-forward's second layer: 784 MB of working memory against
    float's peak of 300 MB at batch 256, estimated by ``benchmarks/bench_memory.py``)."""
    if not per_vector and use_fused(x.device):
        xq, _, clips, bad = pixel_dac_convert(x.view(x.shape[0], 1, x.shape[1]), full_scale, half, block_matrix,
                                              False)
        return xq.view(x.shape), None, clips.view(-1).to(torch.int64), bad
    xd = x.double()
    bad = (~torch.isfinite(xd)).sum()
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


def block_matrix(bounds, device) -> torch.Tensor:
    """(n, K) float64: 1 where item i lies in block k, the blocks ``bounds[k] ..
    bounds[k + 1] - 1`` (a grid's row starts: its inputs' row blocks; a convolution's
    channel segments)."""
    bounds = np.asarray(bounds, np.int64)
    blocks = np.repeat(np.arange(len(bounds) - 1), np.diff(bounds))
    out = torch.zeros((int(bounds[-1]), len(bounds) - 1), dtype=torch.float64)
    out[np.arange(len(blocks)), blocks] = 1.0
    return out.to(device)


def row_sum_squares(xq: torch.Tensor, row_starts) -> torch.Tensor:
    """(R, batch) float64: each vector's sum of squares over each row block, in
    row-major memory as the convolutions' sums are (a transposed view would make the
    fused read-out compile a variant for each layout). Squared a row block at a time:
    float64 squares of a whole input were a transformer's peak memory."""
    bounds = [int(b) for b in row_starts]
    return torch.stack([xq[:, lo:hi].double().square_().sum(dim=1) for lo, hi in zip(bounds[:-1], bounds[1:])])


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
    kn, wn, _ = _tables(device)
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
        x, accepted, _, _ = _fast(counter_hash(key[:, None, :], counters), kn, wn)
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
    ``_EXACT_CALLS`` x ``_ROUNDS`` steps (:func:`_walked_normals`), a second reads them
    (:func:`_read_at`). In the rare case that a walk is longer, the walks are finished
    before the read, or, with ``checks``, that is flagged there.

    The walks and the read are compiled apart: the walks are most of what a run
    compiles (27 s of resnet56's 44 s on a 2-core CPU), and apart they are the same for
    every read setting (noise, ADC errors, scales), compiled once instead of once per
    variant."""
    kn, wn, fn = _tables(flat.device)
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
        normals = _finish_walks(state, kn, wn, fn)
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
    of ``keys`` (each stream's (R, n_out) column keys, flat): walks of ``_EXACT_CALLS``
    x ``_ROUNDS`` steps, all of them ``_OPEN_STEPS`` steps and the rest on at most
    ``late`` walks still going. Returns (the walks' state, whose normals (streams, E)
    float64 are exact where every walk is done; whether a walk is unfinished)."""
    block, i, j = _located(flat, vectors, n_out)
    counters = (i + first_vector) * width[j] + col_offset[j]
    h = torch.stack([counter_hash(key[block * n_out + j], counters) for key in keys])  # (streams, E)
    steps = _EXACT_CALLS * _ROUNDS
    opening = min(steps, _OPEN_STEPS)
    state = _rejection_rounds(*_start_walks(h), kn, wn, fn, opening)
    if steps > opening:
        state = _late_rounds(state, late, kn, wn, fn, steps - opening)
    return state, (state[2] != _DONE).any()


def _read_at(partial, var, var_rows, fs, half: int, gain, offset, nonlinearity: float, scales, divisor,
             flat, normals, factors: tuple) -> tuple:
    """The read-out of the tile outputs at ``flat`` (:func:`_located`) with their
    ``normals`` (streams, E): (values, ADC range masks), each (E,). Padding (a spare
    column) reads its row block's last output."""
    args = _ReadArgs(partial, var, var_rows, fs, half, gain, offset, nonlinearity, scales, divisor)
    return _read_gathered(_gathered(args, *_located(flat, *partial.shape[1:])), normals, factors)


def _late_rounds(state: tuple, size: int, kn, wn, fn, steps: int) -> tuple:
    """``steps`` more steps (:func:`_steps_at_once`) of the walks in ``state`` that
    are still going, at most ``size`` of them (the first ones; the others are left as
    they are), compacted first. Padding repeats the first walk: its copies take the
    same steps, so that whichever write lands, the value is the same."""
    at = torch.nonzero_static(state[2].reshape(-1) != _DONE, size=size, fill_value=0).view(-1)
    late = _steps_at_once(*(a.reshape(-1)[at] for a in state), kn, wn, fn, steps)
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


def dac_values(x: torch.Tensor, full_scale: float, half: int, segment_matrix: Optional[torch.Tensor]) -> tuple:
    """A DAC over a layer input x (images, pixels, channels) with one range: (converted
    float32, per image and pixel the sums of the converted values squared over each
    channel segment of ``segment_matrix`` (channels, segments) float64, 1 where a channel
    is in a segment, as float32 (None without it), per pixel and channel the count over
    the images of values beyond the range (pixels, channels) float64, count of
    non-finite values as a tensor); half < 0 passes values through. The clip counts are
    summed over images here, not kept per image: the layer's clip counts need no more,
    and a float64 map of every image would cost two passes over eight bytes per input
    value.

    The squares are exact in float64 and summed in float64 (in an order that may
    differ from the Numba kernel's, which float32 rounds away but for rare ties).
    Compiled, each segment's sum is a reduction of the kernel that converts: the float64
    squares of every input are never written (they were, 8 bytes per input, then read
    by a matrix product); eager, it is that product (the compiled reduction's broadcast
    would hold a float64 copy of the input per segment)."""
    xd = x.double()
    # counted per pixel and channel first, as the clips are: on a GPU the two sums then
    # share one pass over x (a sum over all of x took a pass of its own)
    bad = (~torch.isfinite(xd)).sum(0).sum()
    if half >= 0:
        q, hits = quantize(xd, full_scale, half)
        clips = hits.double().sum(0)
    else:
        q, clips = xd, torch.zeros(xd.shape[1:], dtype=torch.float64, device=xd.device)
    q = q.float()
    if segment_matrix is None:
        return q, None, clips, bad
    qd = q.double()
    if torch.compiler.is_compiling():
        # where, not a product: a NaN's square times 0 would make every segment NaN
        sums = torch.where(segment_matrix > 0, qd.square()[..., None], 0.0).sum(dim=-2)
    else:
        sums = torch.mm(qd.square().view(-1, qd.shape[-1]), segment_matrix).view(*qd.shape[:2], -1)
    return q, sums.float(), clips, bad


def pixel_dac_convert(images: torch.Tensor, full_scale: float, half: int, segment_matrix: torch.Tensor,
                      want_squares: bool) -> tuple:
    """``kernels.pixel_dac_convert``: a layer input (images, pixels, channels) through one
    DAC range. ``segment_matrix`` (channels, segments) float64 is 1 where a channel is in
    a segment. Returns (converted float32, per image, pixel and channel segment the sum
    of the converted values squared (float32; None unless asked), per pixel and segment
    the values beyond the range summed over the images (pixels, segments) float64, the
    count of non-finite values as a device tensor). Each segment sum is a sum against
    the matrix, whatever the number of segments: on a GPU, a kernel per segment costs
    more host time than the sums."""
    convert = fused_version(dac_values) if use_fused(images.device) else dac_values
    xq, squares, clips, bad = convert(images, float(full_scale), half, segment_matrix if want_squares else None)
    return xq, squares, torch.mm(clips, segment_matrix), bad
