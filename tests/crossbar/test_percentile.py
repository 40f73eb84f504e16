"""crossbar.percentile against np.percentile: the same bits, on numpy arrays and on
torch tensors, float32 and float64, at sizes and percentiles that hit every branch of
numpy's interpolation (gamma below and above 1/2, the last value, ties)."""
import numpy as np
import pytest
import torch

from crossbar.percentile import percentile
from tests.conftest import needs_cuda


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


@needs_cuda
@pytest.mark.gpu
def test_a_cuda_percentile_runs_under_deterministic_algorithms():
    """CUDA's kthvalue refuses to run under torch.use_deterministic_algorithms(True),
    which reproducibility-minded code sets: a GPU calibration failed there."""
    a = np.abs(np.random.default_rng(0).standard_normal(100_000)).astype(np.float32)
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        got = [percentile(torch.from_numpy(a).cuda(), q) for q in (12.5, 99.99)]
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    assert got == [np.percentile(a, 12.5), np.percentile(a, 99.99)]
