"""Counter-based Gaussian sampling for Numba kernels.

Per-read noise needs one normal per output element per read, generated inside a
parallel kernel. Drawing it from one sequential stream would tie results to the
thread schedule, and numpy's sampler is about 5x slower than the rest of the MVM.
Instead the normal for element number ``n`` of a stream with 64-bit ``key`` is a pure
function of (key, n): a SplitMix64 hash of the counter feeds a 128-layer ziggurat
(Marsaglia and Tsang 2000). The layer index and the value come from disjoint bits of
the hash, which avoids the correlation of the original RNOR that Doornik (2005)
pointed out. Rejections draw further bits by hashing (hash + k), so every element
still depends on (key, n) alone: bitwise the same output for any thread count.
"""
from __future__ import annotations

import math

import numpy as np
from numba import float64, int64, njit, uint64

GOLDEN = 0x9E3779B97F4A7C15  # 2^64 / golden ratio, SplitMix64's increment
MIX1, MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # SplitMix64's finaliser multipliers
ZIGGURAT_R = 3.442619855899  # start of the tail for 128 layers


def _ziggurat_tables():
    """Marsaglia-Tsang tables for 128 layers over a signed 32-bit integer."""
    m1 = 2.0 ** 31
    dn = tn = ZIGGURAT_R
    vn = 9.91256303526217e-3  # area of each layer
    kn = np.zeros(128, np.int64)
    wn = np.zeros(128)
    fn = np.zeros(128)
    q = vn / math.exp(-0.5 * dn * dn)
    kn[0] = int((dn / q) * m1)
    wn[0] = q / m1
    wn[127] = dn / m1
    fn[0] = 1.0
    fn[127] = math.exp(-0.5 * dn * dn)
    for i in range(126, 0, -1):
        dn = math.sqrt(-2.0 * math.log(vn / dn + math.exp(-0.5 * dn * dn)))
        kn[i + 1] = int((dn / tn) * m1)
        tn = dn
        fn[i] = math.exp(-0.5 * dn * dn)
        wn[i] = dn / m1
    return kn, wn, fn


KN, WN, FN = _ziggurat_tables()
# KN as float64: every entry is an integer below 2^31, so comparing |hz| (an int32 turned
# float64, exact) with it decides exactly as the integer comparison does, and int32 ->
# float64 is a single instruction where int64 -> float64 is not
KN_FLOAT = KN.astype(np.float64)
# The probability that a draw leaves the fast path: the top 32 bits hz are a uniform
# int32 and layer i keeps the 2 KN[i] - 1 values with |hz| < KN[i] (KN[1] = 0 keeps
# none), each layer 1/128 of draws. 0.02756: the engines' bounds on exact re-reads use it.
REJECTION_RATE = float(1.0 - np.mean(np.maximum(2 * KN_FLOAT - 1, 0.0)) / 2.0 ** 32)
# The probability that a step of the tail (Marsaglia's: two uniforms, accepted if
# 2 b >= a^2) fails: 1 - its acceptance R e^(R^2/2) sqrt(2 pi) Q(R) = 1 - 0.9311.
TAIL_FAILURE = 1.0 - ZIGGURAT_R * math.exp(ZIGGURAT_R ** 2 / 2) * math.sqrt(2 * math.pi) * 0.5 * math.erfc(
    ZIGGURAT_R / math.sqrt(2))


@njit(inline="always", cache=True)
def mix64(z):
    """SplitMix64 finaliser: a bijective 64-bit hash with full avalanche."""
    z = (z ^ (z >> uint64(30))) * uint64(MIX1)
    z = (z ^ (z >> uint64(27))) * uint64(MIX2)
    return z ^ (z >> uint64(31))


@njit(inline="always", cache=True)
def counter_hash(key, n):
    return mix64(uint64(key) ^ (uint64(n) * uint64(GOLDEN)))


@njit(inline="always", cache=True)
def _uniform(h):
    """Uniform in (0, 1] from the top 53 bits."""
    return ((h >> uint64(11)) + uint64(1)) * (1.0 / 9007199254740992.0)


@njit(inline="always", cache=True)
def ziggurat_fast(h):
    """The ziggurat's fast path (97.3% of draws) on 64 random bits: (value, accepted).
    Bits 32-63 give the value, bits 0-6 the layer, so the two are independent."""
    hz = float64(np.int32(np.uint32(h >> uint64(32))))
    iz = np.int32(h & uint64(127))
    return hz * WN[iz], abs(hz) < KN_FLOAT[iz]


@njit(cache=True)
def normal_rejected(h):
    """The ziggurat's slow path, for bits the fast path rejected: wedges and the tail."""
    return normal_walk(h, uint64(1))


@njit(cache=True)
def normal_walk(h, k):
    """The slow path's walk from its state (h, k): the fast test on h; layer 0 enters
    the tail, which draws its uniforms at k, k + 1, k + 2, ...; a wedge test takes the
    uniform of h + k and, if it misses, the walk goes on from (mix64(h + k + 1), k + 2).
    ``normal_rejected(h)`` is the walk from (h, 1)."""
    while True:
        x, accepted = ziggurat_fast(h)
        if accepted:
            return x
        iz = int64(h & uint64(127))
        if iz == 0:
            hz = int64(np.int32(np.uint32(h >> uint64(32))))
            while True:
                xx = -math.log(_uniform(mix64(h + k))) / ZIGGURAT_R
                yy = -math.log(_uniform(mix64(h + k + uint64(1))))
                k += uint64(2)
                if yy + yy >= xx * xx:
                    break
            return ZIGGURAT_R + xx if hz > 0 else -ZIGGURAT_R - xx
        if _under_wedge(h, k, x, iz):
            return x
        h = mix64(h + k + uint64(1))
        k += uint64(2)


@njit(inline="always", cache=True)
def _under_wedge(h, k, x, iz):
    """The ziggurat's wedge test of x in layer iz (>= 1) with the uniform of h + k:
    whether x lies under the density."""
    return FN[iz] + _uniform(mix64(h + k)) * (FN[iz - 1] - FN[iz]) < math.exp(-0.5 * x * x)


@njit(inline="always", cache=True)
def first_wedge_test(h):
    """The slow path's first step on rejected bits h, without a branch: the normal if
    h's wedge test accepts it (the first step of ``normal_rejected(h)``), else NaN (layer
    0, the tail's, or a miss; the walk then goes on: :func:`normal_after_first_step`).
    Branch-free, so that a loop over many rejections does not mispredict at each."""
    x, _ = ziggurat_fast(h)
    iz = int64(h & uint64(127))
    layer = iz if iz != 0 else 1  # layer 0 tested as layer 1, and the result not taken
    return x if _under_wedge(h, uint64(1), x, layer) and iz != 0 else np.nan


@njit(cache=True)
def normal_after_first_step(h):
    """``normal_rejected(h)`` where :func:`first_wedge_test` gave NaN: the tail from
    (h, 1), or, after a wedge miss, the walk from (mix64(h + 2), 3)."""
    if h & uint64(127) == uint64(0):
        return normal_walk(h, uint64(1))
    return normal_walk(mix64(h + uint64(2)), uint64(3))


@njit(inline="always", cache=True)
def normal_from_hash(h):
    """A standard normal from 64 random bits (further bits derived if rejected)."""
    x, accepted = ziggurat_fast(h)
    return x if accepted else normal_rejected(h)


@njit(cache=True)
def counter_normals(key, offset, n):
    """Normals number offset .. offset + n - 1 of stream ``key`` (for tests and tools)."""
    out = np.empty(n)
    for i in range(n):
        out[i] = normal_from_hash(counter_hash(key, uint64(offset) + uint64(i)))
    return out


def stream_key(seed_sequence: np.random.SeedSequence) -> int:
    """A 64-bit stream key drawn from a SeedSequence."""
    return int(seed_sequence.generate_state(1, np.uint64)[0])
