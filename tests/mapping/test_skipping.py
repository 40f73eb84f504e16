"""Models that choose their layers per call (a head per task, an early exit): strict by
default, every analog layer in every pass; ``AnalogModel.allow_skipping`` names those a
pass may leave out."""
import warnings

import pytest
import torch
from torch import nn

from crossbar import presets
from mapping import convert
from tests.mapping.test_graphs import emulating

IDEAL = presets.ideal(rows=16, cols=16)


class MultiTask(nn.Module):
    """A shared body and one head per task, chosen by an argument."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(8)
        self.body = nn.Linear(8, 16)
        self.heads = nn.ModuleDict({"a": nn.Linear(16, 3), "b": nn.Linear(16, 5)})
        self.alias = self.heads["b"]  # (a second name of a head)

    def forward(self, x, task="a"):
        return self.heads[task](torch.relu(self.body(x)))


X = torch.rand(6, 8, generator=torch.Generator().manual_seed(2))
BOTH_TASKS = [{"x": X, "task": "a"}, {"x": X, "task": "b"}]


def converted(config=IDEAL):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert(MultiTask().eval(), config, seed=0)


def test_by_default_a_layer_left_out_of_a_pass_is_an_error_that_names_the_way_out():
    analog = converted()
    with pytest.raises(RuntimeError, match=r"analog layer 'heads.b' was not called during the calibration: .*"
                                           r"allow it with analog_model.allow_skipping\(name\)"):
        analog.calibrate([X])


@pytest.mark.parametrize("patterns", [("heads.*",), ("heads.a", "alias"), ("*",)])
def test_allowed_layers_may_be_left_out_and_each_calibrates_on_the_batches_that_used_it(patterns):
    model, analog = MultiTask().eval(), converted().allow_skipping(*patterns)
    analog.calibrate(BOTH_TASKS)
    for task in ("a", "b"):
        want = model(X, task)
        assert torch.allclose(analog(X, task), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    counts = analog.counts()
    assert counts["heads.a"]["dac_converted"] == counts["heads.b"]["dac_converted"] == 6 * 16


def test_a_layer_no_calibration_batch_used_cannot_calibrate():
    analog = converted().allow_skipping("heads.*")
    with pytest.raises(RuntimeError, match="'heads.b' was never called during calibration: its ranges come from"):
        analog.calibrate([{"x": X, "task": "a"}])


def test_names_are_checked_and_no_names_is_strict_again():
    analog = converted()
    with pytest.raises(ValueError, match=r"layers: 'head.\*' is invalid: expected the name or a pattern of an analog "
                                         r"layer; they are 'body', 'heads.a', 'heads.b', 'alias'"):
        analog.allow_skipping("head.*")
    with pytest.raises(ValueError, match="layers: 3 is invalid"):
        analog.allow_skipping(3)
    analog.allow_skipping("heads.*").allow_skipping()
    with pytest.raises(RuntimeError, match="'heads.b' was not called"):
        analog.calibrate([X])


def test_replays_of_each_task_equal_eager_passes_with_their_counts():
    config = presets.pcm(rows=16, cols=16)
    eager, graphed = converted(config), emulating(converted(config))
    for analog in (eager, graphed):
        analog.allow_skipping("heads.*").calibrate(BOTH_TASKS).set_engine("torch").at(3600.0)
    for task in ("a", "b", "a", "b", "b"):
        assert torch.equal(graphed(X, task=task), eager(X, task=task)), task
    assert graphed.counts() == eager.counts()
    assert graphed._graphs.captures == 2  # one per task: a signature holds its hashable arguments
