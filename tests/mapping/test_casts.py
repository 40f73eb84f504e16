"""Casting a converted model (``.half()``, ``.bfloat16()``, ``.double()``, ``.to(dtype)``):
the float weights and biases follow the cast as torch's would, the chip keeps its
precision, and 16-bit inputs are computed in float32 and returned in their dtype."""
import copy
import warnings

import pytest
import torch
from torch import nn

from crossbar import presets
from crossbar.grid import TileGrid
from mapping import AnalogLayer, AnalogMatrix, convert

CASTS = {"half": lambda m: m.half(), "bfloat16": lambda m: m.bfloat16(), "double": lambda m: m.double(),
         "to float16": lambda m: m.to(torch.float16)}


def quiet_convert(model, config, seed=0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert(model, config, seed=seed)


def small_model():
    """A conv and a linear layer whose biases every cast holds exactly (bfloat16 values):
    biases are digital and round in a cast, as torch's own would."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5)).eval()
    with torch.no_grad():
        for layer in (model[0], model[3]):
            layer.bias.copy_(layer.bias.bfloat16().float())
    return model


def chip_state(model) -> dict:
    """Every tensor of the chip: the grids' and matrices' buffers."""
    return {f"{name}.{b}": t.clone() for name, m in model.named_modules() if isinstance(m, (TileGrid, AnalogMatrix))
            for b, t in m.named_buffers(recurse=False)}


@pytest.mark.parametrize("cast", sorted(CASTS))
def test_a_cast_moves_the_chip_but_never_rounds_it(cast):
    x = torch.rand(4, 3, 6, 6)
    model = quiet_convert(small_model(), presets.pcm(rows=32, cols=32))
    model.calibrate([x])
    model.at(3600.0)
    untouched = copy.deepcopy(model)
    before = chip_state(model)
    CASTS[cast](model)
    after = chip_state(model)
    assert before.keys() == after.keys() and len(before) >= 8
    for name, t in before.items():
        assert after[name].dtype == t.dtype, name
        assert torch.equal(after[name], t), name
    dtype = {"half": torch.float16, "to float16": torch.float16, "bfloat16": torch.bfloat16,
             "double": torch.float64}[cast]
    layers = [m for m in model.modules() if isinstance(m, AnalogLayer)]
    assert all(m.weight.dtype == dtype and m.bias.dtype == dtype for m in layers)  # the float copies, as torch
    model.float()
    # a chip cast there and back reads as it did: the first passes equal bitwise
    assert torch.equal(model(x), untouched(x))


def one_layer_models():
    torch.manual_seed(1)
    return {"linear": (nn.Linear(20, 7), (5, 20)),
            "conv2d": (nn.Conv2d(4, 6, 3, padding=1, groups=2), (2, 4, 5, 5)),
            "conv1d": (nn.Conv1d(3, 4, 3), (2, 3, 9)),
            "conv_transpose2d": (nn.ConvTranspose2d(3, 4, 3, stride=2), (2, 3, 4, 4)),
            "conv3d": (nn.Conv3d(2, 3, 2), (2, 2, 3, 4, 4))}


@pytest.mark.parametrize("engine", ["numba", "torch"])
@pytest.mark.parametrize("name", sorted(one_layer_models()))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_16_bit_layer_computes_in_float32_on_the_same_chip(name, engine, dtype):
    """A layer cast to 16 bits gives, for a 16-bit input x, the float32 layer's output for
    x widened, rounded once to x's dtype: same chip, same per-read noise, same ranges
    (calibrated on the 16-bit sample), bias added in float32."""
    layer, shape = one_layer_models()[name]
    with torch.no_grad():  # a bias the 16-bit copy holds exactly
        layer.bias.copy_(layer.bias.to(dtype).float())
    x = (torch.rand(shape, generator=torch.Generator().manual_seed(2)) * 2 - 1).to(dtype)
    narrow = quiet_convert(copy.deepcopy(layer).eval(), presets.pcm(rows=16, cols=16))
    wide = quiet_convert(copy.deepcopy(layer).eval(), presets.pcm(rows=16, cols=16))
    CASTS["half" if dtype == torch.float16 else "bfloat16"](narrow)
    for model in (narrow, wide):
        model.set_engine(engine)
    narrow.calibrate([x])
    wide.calibrate([x.float()])
    for model in (narrow, wide):
        model.at(86400.0)
    assert chip_state(narrow).keys() == chip_state(wide).keys()
    for key, t in chip_state(wide).items():  # the ranges included
        assert torch.equal(chip_state(narrow)[key], t), key
    for _ in range(2):  # the second pass continues the per-read noise streams alike
        y = narrow(x)
        expected = wide(x.float())
        assert y.dtype == dtype
        assert torch.equal(y, expected.to(dtype))
