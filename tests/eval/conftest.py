"""Fixtures of the eval tests: the bundled digits data and an MLP trained on it."""
import pytest

from eval.datasets import load_digits
from eval.train import seeded_model, train


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def trained_mlp(digits):
    model = seeded_model("mlp", digits, False, seed=0)  # the same weights whatever ran before
    train(model, digits, 8, seed=0, progress=False)
    return model
