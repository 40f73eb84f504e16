"""A converted model runs every layer it reports as analog, takes the inputs the float
model takes (several, by position or keyword) and refuses what the float model refuses."""
import collections
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from crossbar import presets
from mapping import convert


def quiet_convert(model, config, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # layers kept digital
        return convert(model, config, **kwargs)


def encoder_layer():
    torch.manual_seed(0)
    return nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True,
                                      dropout=0.0).eval()


def test_transformer_layers_run_on_tiles_not_on_the_fused_fast_path():
    layer = encoder_layer()
    x = torch.randn(4, 10, 32)
    analog = quiet_convert(layer, presets.ideal(rows=16, cols=16), seed=0)
    with torch.no_grad():
        expected = layer(x)
    got = analog(x)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)
    counts = analog.counts()
    # every token's features went through the DACs of both feed-forward layers
    assert counts["linear1"]["dac_converted"] == 4 * 10 * 32 * 4  # 64 outputs: four 16-column tiles
    assert counts["linear2"]["dac_converted"] == 4 * 10 * 64 * 2
    assert torch.backends.mha.get_fastpath_enabled()  # torch's switch is restored


def test_calibrated_transformer_and_nested_tensor_encoder():
    torch.manual_seed(1)
    encoder = nn.TransformerEncoder(encoder_layer(), 2, enable_nested_tensor=True).eval()
    x = torch.randn(4, 10, 32)
    mask = torch.zeros(4, 10, dtype=torch.bool)
    mask[:, 7:] = True
    analog = quiet_convert(encoder, presets.pcm(rows=32, cols=32), seed=0)
    analog.calibrate([x])  # failed before: the fast path never called the analog layers
    analog.reset_counts()
    y = analog.at(3600.0)(x, src_key_padding_mask=mask)
    assert y.shape == (4, 10, 32) and torch.isfinite(y).all()
    assert all(c["dac_converted"] > 0 for c in analog.counts().values())


class ReadsWeightDirectly(nn.Module):
    """A custom fused path: uses fc's weight without calling fc."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(F.linear(x, self.fc.weight, self.fc.bias))


def test_a_bypassed_analog_layer_is_an_error_naming_it():
    analog = quiet_convert(ReadsWeightDirectly().eval(), presets.ideal(rows=8, cols=8), seed=0)
    with pytest.raises(RuntimeError, match=r"analog layer 'fc' was not called during the forward pass: .*fast path"):
        analog(torch.rand(3, 8))
    calibrated = quiet_convert(ReadsWeightDirectly().eval(), presets.pcm(rows=8, cols=8), seed=0)
    with pytest.raises(RuntimeError, match=r"'fc' was not called during the calibration"):
        calibrated.calibrate([torch.rand(3, 8)])


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 5)
        self.b = nn.Linear(3, 5)

    def forward(self, left, right):
        return self.a(left) + self.b(right)


@pytest.mark.parametrize("make_batch", [
    lambda l, r, y: ((l, r), y),                      # (positional inputs, labels)
    lambda l, r, y: ({"left": l, "right": r}, y),     # (keyword inputs, labels)
    lambda l, r, y: {"left": l, "right": r},          # keyword inputs alone
])
def test_models_of_several_inputs_calibrate_and_run(make_batch):
    torch.manual_seed(2)
    model = TwoInputs().eval()
    left, right, labels = torch.randn(20, 6), torch.randn(20, 3), torch.randint(0, 5, (20,))
    analog = quiet_convert(model, presets.ideal(rows=8, cols=8, dac_bits=10, adc_bits=12), seed=0)
    analog.calibrate([make_batch(left, right, labels)])
    with torch.no_grad():
        expected = model(left, right)
    got = analog(left, right)
    assert torch.allclose(got, expected, atol=0.02 * expected.abs().max().item())
    assert torch.allclose(analog(left=left, right=right), got)


Pair = collections.namedtuple("Pair", "left right")


@pytest.mark.parametrize("pack", [tuple, Pair._make], ids=["tuple", "namedtuple"])
def test_experiment_api_takes_tuple_inputs(pack):
    from eval.experiment import _materialise
    from eval.train import accuracy

    torch.manual_seed(3)
    model = TwoInputs().eval()
    left, right = torch.randn(30, 6), torch.randn(30, 3)
    labels = model(left, right).argmax(1)
    batches = _materialise([(pack((left[:16], right[:16])), labels[:16]),
                            (pack((left[16:], right[16:])), labels[16:])], limit=20)
    assert [len(y) for _, y in batches] == [16, 4] and batches[1][0][1].shape == (4, 3)
    assert type(batches[1][0]) is type(pack((left, right)))  # sliced, the inputs keep their type
    analog = quiet_convert(model, presets.ideal(rows=8, cols=8), seed=0)
    assert accuracy(analog, batches) == 1.0


@pytest.mark.parametrize("layer,x", [
    (nn.Linear(4, 3), torch.arange(8).reshape(2, 4)),
    (nn.Conv2d(2, 3, 3), torch.ones(1, 2, 5, 5, dtype=torch.int32)),
    (nn.Linear(4, 3), torch.rand(2, 4, dtype=torch.float64)),
])
def test_inputs_the_float_layer_refuses_are_refused(layer, x):
    model = nn.Sequential(layer).eval()
    with pytest.raises(RuntimeError):
        model(x)  # the float model refuses it
    analog = quiet_convert(model, presets.ideal(rows=8, cols=8), seed=0)
    with pytest.raises(ValueError, match=rf"layer '0': input has dtype {x.dtype}: expected torch.float32"):
        analog(x)


def test_calibration_fallbacks_are_reported_per_layer():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(128, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.rand(64, 128)
    x[:, 64:] = 0.0  # the second row of tiles of layer 0 sees nothing
    analog = quiet_convert(model, presets.pcm(rows=64, cols=64), seed=0).calibrate([x])
    assert analog.calibration_fallbacks() == {"0": (1, 2)}
    entry = next(e for e in analog.report if e["layer"] == "0")
    assert entry["adc_range_fallback_tiles"] == 1 and entry["dac_range_fallback"] == 0
