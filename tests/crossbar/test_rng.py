import numba
import numpy as np
from scipy import stats

from crossbar.rng import counter_normals

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
