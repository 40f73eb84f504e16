"""Calibration samples: the first rows for a layer called once per pass, a uniform
reservoir over every call for one called several times (a recurrence's hidden-to-hidden
matrix, a stepped cell, a shared module)."""
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from crossbar import presets
from mapping import MappingConfig, convert
from mapping.calibration_sample import FirstRows, Reservoir
from tests.mapping.test_attention_recurrent import Decoder
from tests.mapping.test_convert import SharedBlocks
from tests.mapping.test_torch_engine_models import X, converted


def offered(sample, calls, size):
    """Offer ``calls`` calls of ``size`` rows whose one value is the row's global index;
    return the rows fetched in all."""
    fetched = 0
    for c in range(calls):
        def fetch(rows, start=c * size):
            nonlocal fetched
            rows = np.arange(size) if rows is None else rows
            fetched += len(rows)
            return (start + rows)[:, None].astype(np.float32)
        sample.offer(size, fetch)
    return fetched


def test_a_reservoir_is_a_uniform_sample_of_every_call_fetching_only_what_it_keeps():
    keep, calls, size = 1000, 60, 250
    total = calls * size
    reservoir = Reservoir(keep, 1, np.random.default_rng(0))
    fetched = offered(reservoir, calls, size)
    kept = reservoir.rows()[:, 0].numpy().astype(int)
    assert len(kept) == keep and len(np.unique(kept)) == keep
    # uniform without replacement: the share from the last half of the calls is 1/2
    share = np.mean(kept >= total // 2)
    sigma = np.sqrt(0.25 / keep * (total - keep) / (total - 1))
    assert abs(share - 0.5) < 5 * sigma
    # row k is fetched with probability min(1, keep / (k + 1)): about keep (1 + ln(total / keep)) rows
    p = np.minimum(1.0, keep / (np.arange(total) + 1))
    assert abs(fetched - p.sum()) < 5 * np.sqrt((p * (1 - p)).sum()) + 1
    again = Reservoir(keep, 1, np.random.default_rng(0))
    offered(again, calls, size)
    assert torch.equal(again.rows(), reservoir.rows())  # the seed names the sample


def test_a_reservoir_not_filled_keeps_every_row_in_order():
    reservoir = Reservoir(1000, 1, np.random.default_rng(0))
    offered(reservoir, 3, 200)
    assert np.array_equal(reservoir.rows()[:, 0].numpy(), np.arange(600))


def test_first_rows_take_the_first_calls_and_a_random_subset_of_the_one_that_fills_them():
    first = FirstRows(1000, 1, np.random.default_rng(0))
    full = [first.offer(400, lambda rows, c=c: (c * 400 + (np.arange(400) if rows is None else rows))[:, None])
            for c in range(3)]
    assert full == [False, False, True]
    kept = first.rows()[:, 0].numpy()
    assert np.array_equal(kept[:800], np.arange(800)) and len(kept) == 1000 and np.all(kept[800:] >= 800)


def ramp_lstm():
    """An LSTM whose input ramps up over 60 steps, so its hidden state grows over them."""
    torch.manual_seed(0)
    lstm = nn.LSTM(16, 32, batch_first=True).eval()
    ramp = torch.linspace(0, 1, 60)[None, :, None]
    x = torch.randn(256, 60, 16, generator=torch.Generator().manual_seed(1)) * 0.3 + 2.0 * ramp
    return lstm, x


def test_a_recurrent_layers_hidden_matrix_calibrates_on_every_time_step():
    """Its first 4096 input vectors are the first 16 of 60 steps: ranges calibrated on them
    clipped 12.7% of the hidden-to-hidden DAC inputs and saturated 0.8% of its ADC outputs."""
    lstm, x = ramp_lstm()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analog = convert(lstm, presets.pcm(), seed=0)
    analog.calibrate([x]).at(3600.0)
    analog.reset_counts()
    analog(x)
    counts = analog.counts()["hh_l0"]
    # a 99.99th-percentile range over a uniform sample of every step clips about 1e-4 of them
    assert counts["dac_clipped"] / counts["dac_converted"] < 2e-3
    assert counts["adc_saturated"] / counts["adc_converted"] < 2e-3


def test_layers_called_several_times_per_pass_are_found():
    for model, x, want in ((SharedBlocks().eval(), torch.rand(5, 16), {"blocks.0", "convs.0"}),
                           (Decoder(nn.GRUCell(9, 20)).eval(), torch.rand(3, 9), {"cell.ih", "cell.hh", "out"}),
                           (ramp_lstm()[0], ramp_lstm()[1][:4], {"hh_l0"})):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            analog = convert(model, presets.pcm(), seed=0)
        found = analog._called_repeatedly(x)
        assert {name for name, layer in analog.analog_layers() if id(layer) in found} == want


@pytest.mark.parametrize("rows_per_chunk", [8192, 1])
def test_layers_called_once_per_pass_sample_as_before(monkeypatch, rows_per_chunk):
    """The counting pass draws nothing and changes nothing: the calibration equals one
    without it, every layer on its first rows, bitwise. A layer that offers a pass in
    chunks (1 row: every layer in 2 or more) is called once: it counted as repeated in
    a first version, which moved the main job's table."""
    mapping = MappingConfig(max_rows_per_chunk=rows_per_chunk)
    analog = converted(presets.pcm(rows=32, cols=16), mapping=mapping)
    assert analog._called_repeatedly(X) == set()
    analog.calibrate([X])
    forced = converted(presets.pcm(rows=32, cols=16), mapping=mapping)
    monkeypatch.setattr(type(forced), "_called_repeatedly", lambda self, inputs: set())
    forced.calibrate([X])
    for (_, a), (_, b) in zip(analog.analog_layers(), forced.analog_layers()):
        for m, n in zip(a.matrices, b.matrices):
            assert m.grid.input_range == n.grid.input_range
            assert np.array_equal(m.grid.output_ranges(), n.grid.output_ranges())
