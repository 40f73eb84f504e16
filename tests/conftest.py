import numpy as np
import pytest
import torch

from crossbar.precision import _switches

# tests that need a real GPU skip without one, and say so
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")

REDUCED = {"fp32_precision": "tf32", "allow_tf32": True}


@pytest.fixture
def reduced_precision():
    """Every float32 precision switch (crossbar.precision) at a reduced precision, as a
    training script may leave them; restored after the test."""
    saved = [getattr(owner, attribute) for _, owner, attribute, _ in _switches()]
    for _, owner, attribute, _ in _switches():
        setattr(owner, attribute, REDUCED[attribute])
    yield
    for (_, owner, attribute, _), value in zip(_switches(), saved):
        setattr(owner, attribute, value)


def ieee() -> list:
    """The IEEE float32 value of every precision switch, in crossbar.precision's order."""
    return [value for *_, value in _switches()]


def z_bound(n: int, z: float = 5.0) -> float:
    """Half-width, in standard errors, for checks that must hold at fixed seeds: 5 sigma."""
    return z / np.sqrt(n)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def under_thread_counts(fn) -> list:
    """fn() under torch 1 and 2 threads x Numba 1 and all threads; the counts restored."""
    import numba
    import torch

    before = torch.get_num_threads(), numba.get_num_threads()
    outputs = []
    try:
        for torch_threads in (1, 2):
            for numba_threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
                torch.set_num_threads(torch_threads)
                numba.set_num_threads(numba_threads)
                outputs.append(fn())
    finally:
        torch.set_num_threads(before[0])
        numba.set_num_threads(before[1])
    return outputs
