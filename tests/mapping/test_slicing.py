"""Bit slicing of weights (PHYSICS.md section 9): exact with ideal devices and
converters, the reference's shift-and-add with a finite ADC, and the tiles it costs."""
import numpy as np
import pytest
import torch
from torch import nn

from crossbar import presets
from crossbar.config import SlicingConfig, TileConfig
from crossbar.kernels import levels_per_side, steps
from crossbar.reference import sliced_product_reference
from mapping import MappingConfig
from mapping.conductance import quantized_weights
from mapping.matrix import AnalogMatrix

PLAIN = MappingConfig(drift_compensation=False)


def sliced(cfg, k, b):
    return cfg.with_path("slicing.bits_per_slice", b).with_path("slicing.weight_slices", k)


@pytest.mark.parametrize("k,b", [(1, 4), (2, 2), (4, 1), (3, 3), (2, 8)])
@pytest.mark.parametrize("scale", ["layer", "column", "tile"])
def test_ideal_sliced_matrix_is_the_quantized_product(rng, k, b, scale):
    w = rng.uniform(-1, 1, (10, 40))
    x = rng.uniform(-1, 1, (7, 40)).astype(np.float32)
    cfg = sliced(presets.ideal(rows=16, cols=12, dac_bits=None, adc_bits=None), k, b)
    a = AnalogMatrix(w, cfg, seed=0, mapping=MappingConfig(scale=scale, drift_compensation=False))
    y = a.matmul(x)
    if scale == "layer":
        want = x.astype(np.float64) @ quantized_weights(w.T, np.abs(w).max(), k, b)
        assert np.allclose(y, want, rtol=1e-5, atol=1e-5)
        assert np.allclose(a.weight_read(), quantized_weights(w.T, np.abs(w).max(), k, b).T, atol=1e-6)
    # n = k b bits: within half a quantization step per weight of x @ W
    w_ref = np.abs(w).max()
    assert np.abs(y - x @ w.T).max() <= np.abs(x).sum(1).max() * w_ref / (2 ** (k * b) - 1)


@pytest.mark.parametrize("k,b", [(2, 2), (4, 1), (1, 4)])
def test_finite_adc_slices_shift_and_add_as_the_reference(rng, k, b):
    w = rng.uniform(-1, 1, (6, 24))
    x = rng.uniform(-1, 1, (300, 24)).astype(np.float32)
    r_out = 60.0
    cfg = sliced(presets.ideal(rows=32, cols=12, dac_bits=None, adc_bits=6, adc_range_mode="fixed"), k, b)
    cfg = cfg.with_path("adc.range", r_out)
    a = AnalogMatrix(w, cfg, seed=0, mapping=PLAIN)
    y = a.matmul(x)
    dev = cfg.device
    want = sliced_product_reference(x.astype(np.float64), w.T, np.abs(w).max(), dev.g_min, dev.g_max, k, b, r_out, 6)
    step, _ = steps(r_out, levels_per_side(6))
    weight_step = np.abs(w).max() / (2 ** (k * b) - 1) * (2 ** b - 1) / (dev.g_max - dev.g_min) * step
    differ = np.abs(y - want) > 1e-3 * weight_step
    assert differ.mean() < 0.01  # float32 products on a decision edge
    exact = x.astype(np.float64) @ quantized_weights(w.T, np.abs(w).max(), k, b)
    assert np.abs(y - exact).max() > weight_step / 4  # the ADC acts


def test_slicing_costs_tiles_and_devices(rng):
    w = rng.uniform(-1, 1, (20, 30))
    base = presets.ideal(rows=32, cols=16)
    counts = {k: AnalogMatrix(w, sliced(base, k, 2) if k > 1 else base, seed=0, mapping=PLAIN).counts()
              for k in (1, 2, 4)}
    assert [counts[k]["tiles"] for k in (1, 2, 4)] == [2, 3, 5]   # ceil(20 k / 16) column blocks
    assert [counts[k]["devices"] for k in (1, 2, 4)] == [2 * 600 * k for k in (1, 2, 4)]


def test_sliced_convolution_paths_agree(rng):
    from mapping import convert
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3))
    x = torch.randn(4, 3, 9, 9)
    cfg = sliced(presets.ideal(rows=32, cols=16, dac_bits=8, adc_bits=8), 2, 3)
    analog = convert(model, cfg, seed=1)
    analog.calibrate([x])
    conv_path = analog(x)
    for layer in analog.modules():
        if hasattr(layer, "unrolled"):
            layer.unrolled = True
    assert torch.equal(analog(x), conv_path)


def test_slicing_is_validated():
    with pytest.raises(ValueError, match=r"SlicingConfig.bits_per_slice = None is invalid with weight_slices = 2"):
        SlicingConfig(weight_slices=2)
    with pytest.raises(ValueError, match=r"weight_slices \* bits_per_slice = 36 must be <= 32"):
        SlicingConfig(weight_slices=4, bits_per_slice=9)
    with pytest.raises(ValueError, match=r"TileConfig.cols = 10 is invalid with slicing.weight_slices = 4"):
        TileConfig(cols=10, slicing=SlicingConfig(weight_slices=4, bits_per_slice=2))
