import numpy as np
import pytest


def z_bound(n: int, z: float = 5.0) -> float:
    """Half-width, in standard errors, for checks that must hold at fixed seeds: 5 sigma."""
    return z / np.sqrt(n)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
