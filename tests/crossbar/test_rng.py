import numba
import numpy as np
from scipy import stats

from crossbar.kernels import _normals
from crossbar.rng import counter_hash, counter_normals, first_wedge_test, ziggurat_fast

N = 400_000


def test_counter_normals_are_standard_normal():
    z = counter_normals(np.uint64(2024), 0, N)
    assert abs(z.mean()) < 5 / np.sqrt(N)
    assert abs(z.var() - 1) < 5 * np.sqrt(2 / N)
    assert stats.kstest(z, "norm").pvalue > 1e-4
    # both tails, including the ziggurat's tail beyond r = 3.44
    for a in (2.0, 3.5):
        p = 2 * stats.norm.sf(a)
        assert abs((np.abs(z) > a).mean() - p) < 5 * np.sqrt(p * (1 - p) / N)


def test_streams_and_offsets_are_independent_and_reproducible():
    a = counter_normals(np.uint64(1), 0, N)
    b = counter_normals(np.uint64(2), 0, N)
    assert abs(np.corrcoef(a, b)[0, 1]) < 5 / np.sqrt(N)
    assert abs(np.corrcoef(a[:-1], a[1:])[0, 1]) < 5 / np.sqrt(N)
    assert np.array_equal(counter_normals(np.uint64(1), 1000, 10), a[1000:1010])
    numba.set_num_threads(1)
    try:
        assert np.array_equal(counter_normals(np.uint64(1), 0, 1000), a[:1000])
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


@numba.njit
def _kernel_normals(key, first, n):
    z = np.empty(n)
    _normals(key, first, n, z, np.empty(n, np.int64))
    return z


@numba.njit
def _slow_path_cases(key, first, n):
    """(rejections, wedge misses, tail entries) among the normals first .. first + n - 1."""
    rejected = missed = tail = 0
    for k in range(n):
        h = counter_hash(key, first + numba.uint64(k))
        if not ziggurat_fast(h)[1]:
            rejected += 1
            if h & numba.uint64(127) == 0:
                tail += 1
            elif np.isnan(first_wedge_test(h)):
                missed += 1
    return rejected, missed, tail


def test_the_kernels_normals_equal_the_stream_bitwise_wedge_misses_and_tails_included():
    # the read-out's normals take the slow path in passes (compacted, a branch-free first
    # wedge test, then the walks); counter_normals walks each normal from its start
    for key, first, n in ((2024, 0, N), (7, 2 ** 64 - 1000, 4099)):
        key, first = np.uint64(key), np.uint64(first)
        assert np.array_equal(_kernel_normals(key, first, n), counter_normals(key, first, n))
    rejected, missed, tail = _slow_path_cases(np.uint64(2024), np.uint64(0), N)
    # the sample holds each case: 2.8% rejections, 1.2% wedge misses, 0.06% tail entries
    assert rejected > 0.025 * N and missed > 0.01 * N and tail > 0.0004 * N
