"""The counter-based normals on torch tensors against the Numba generator, bitwise."""
import numpy as np
import pytest

from crossbar import rng, torch_normals

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("key,offset", [(0, 0), (12345, 10 ** 12), (2 ** 64 - 1, 2 ** 63 + 5)])
def test_normals_equal_the_numba_generator_bitwise_rejections_included(key, offset):
    n = 200_000  # about 2,600 rejections, some of them in the tail
    want = rng.counter_normals(np.uint64(key), np.uint64(offset), n)
    got = torch_normals.counter_normals(key, offset, n).numpy()
    assert np.array_equal(got, want)


def test_hash_equals_the_numba_hash_on_extreme_words():
    words = np.array([0, 1, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1, 0x9E3779B97F4A7C15], np.uint64)
    key = torch_normals.as_int64_keys(np.full(len(words), 0xDEADBEEF, np.uint64))
    got = torch_normals.counter_hash(key, torch_normals.as_int64_keys(words)).numpy().view(np.uint64)
    want = np.array([rng.counter_hash(np.uint64(0xDEADBEEF), w) for w in words], np.uint64)
    assert np.array_equal(got, want)
