"""crossbar.percentile against np.percentile: the same bits, on numpy arrays and on
torch tensors, float32 and float64, at sizes and percentiles that hit every branch of
numpy's interpolation (gamma below and above 1/2, the last value, ties)."""
import numpy as np
import pytest
import torch

from crossbar.percentile import percentile


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 2, 3, 10, 999, 4097])
def test_equals_numpy_bitwise_on_arrays_and_tensors(dtype, n):
    rng = np.random.default_rng(n)
    a = np.abs(rng.standard_normal(n) * 3.0).astype(dtype)
    a[: n // 3] = 0.0  # ties, as ReLU outputs have
    for q in (0.0, 0.1, 12.5, 37.3, 50.0, 99.0, 99.9, 99.99, 100.0):
        want = np.percentile(a, q)
        for got in (percentile(a, q), percentile(torch.from_numpy(a), q), percentile(a.reshape(1, -1), q)):
            assert got == want and np.asarray(got).dtype == np.asarray(want).dtype


def test_an_empty_sample_is_refused():
    with pytest.raises(ValueError, match="empty sample"):
        percentile(np.zeros(0), 50.0)
