"""Empty batches, which torch's layers take: an analog layer returns the float layer's
empty output and reads nothing (no noise drawn, nothing counted), and calibration
skips them, or says so when it saw nothing else."""
import copy
import warnings

import pytest
import torch
from torch import nn

from crossbar import presets
from mapping import convert

CONFIG = presets.pcm(rows=16, cols=16)


def cases():
    """name -> (float module, an empty input, a non-empty input of the same layout)."""
    torch.manual_seed(0)
    r = torch.rand
    return {
        "linear": (nn.Linear(5, 3), r(0, 5), r(4, 5)),
        "linear_3d": (nn.Linear(5, 3), r(2, 0, 5), r(2, 3, 5)),
        "conv1d": (nn.Conv1d(2, 3, 3), r(0, 2, 7), r(2, 2, 7)),
        "conv2d_grouped": (nn.Conv2d(4, 6, 3, padding=1, groups=2), r(0, 4, 5, 5), r(2, 4, 5, 5)),
        "conv_transpose2d": (nn.ConvTranspose2d(2, 3, 3, stride=2), r(0, 2, 4, 4), r(2, 2, 4, 4)),
        "conv3d": (nn.Conv3d(2, 3, 2), r(0, 2, 3, 3, 3), r(2, 2, 3, 3, 3)),
        "lstm": (nn.LSTM(4, 6, batch_first=True), r(0, 5, 4), r(2, 5, 4)),
        "gru_bidirectional": (nn.GRU(4, 6, bidirectional=True), r(5, 0, 4), r(5, 2, 4)),
        "transformer": (nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), r(0, 3, 8), r(2, 3, 8)),
    }


def first(out):
    return out[0] if isinstance(out, tuple) else out


def converted(module, sample):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the transformer's LayerNorms stay digital)
        analog = convert(copy.deepcopy(module).eval(), CONFIG, seed=0)
    return analog.calibrate([sample])


@pytest.mark.parametrize("engine", ["numba", "torch"])
@pytest.mark.parametrize("name", sorted(cases()))
def test_an_empty_batch_gives_the_float_layers_empty_output_and_reads_nothing(name, engine):
    module, empty, sample = cases()[name]
    module.eval()
    seen, unseen = converted(module, sample), converted(module, sample)
    for analog in (seen, unseen):
        analog.set_engine(engine).at(3600.0)
    with torch.no_grad():
        want = first(module(empty))
    got = first(seen(empty))
    assert got.shape == want.shape and got.dtype == want.dtype
    # the chip read nothing: its next pass and counts are those of a chip that never saw it
    assert torch.equal(first(seen(sample)), first(unseen(sample)))
    assert seen.counts() == unseen.counts()


def test_calibration_skips_empty_batches_and_refuses_only_empty_ones():
    for name in ("linear", "conv2d_grouped", "conv3d"):
        module, empty, sample = cases()[name]
        with_empty = convert(copy.deepcopy(module).eval(), CONFIG, seed=0).calibrate([empty, sample, empty])
        without = convert(copy.deepcopy(module).eval(), CONFIG, seed=0).calibrate([sample])
        assert torch.equal(with_empty(sample), without(sample)), name  # the same ranges, the same chip
        only_empty = convert(copy.deepcopy(module).eval(), CONFIG, seed=0)
        with pytest.raises(ValueError, match="saw only empty batches during calibration"):
            only_empty.calibrate([empty, empty])


def test_a_recurrent_layer_refuses_an_empty_sequence_as_torch_does():
    module, _, sample = cases()["lstm"]
    analog = converted(module, sample)
    steps_zero = torch.rand(2, 0, 4)  # batch_first: two sequences of no steps
    with pytest.raises(RuntimeError) as float_error:
        module(steps_zero)
    with pytest.raises(RuntimeError, match="sequence length to be larger than 0") as analog_error:
        analog(steps_zero)
    assert str(analog_error.value) == str(float_error.value)
