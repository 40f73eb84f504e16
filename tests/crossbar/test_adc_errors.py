"""ADC non-idealities (PHYSICS.md section 10): fixed per-ADC offsets and gains drawn from
each tile's seed, per-conversion noise, and the tanh transfer curve; the kernel against
the reference, the statistics against bounds from the sample size, both engines alike."""
import numpy as np
import pytest

from crossbar import Tile, presets
from crossbar.config import ADCConfig
from crossbar.kernels import levels_per_side, steps
from tests.conftest import z_bound
from tests.crossbar.test_tile import random_pair, tile_and_reference


def errors(cfg, **adc):
    for name, value in adc.items():
        cfg = cfg.with_path(f"adc.{name}", value)
    return cfg


@pytest.mark.parametrize("adc", [dict(offset_sigma=1.5), dict(gain_sigma=0.05), dict(nonlinearity=1.5),
                                 dict(offset_sigma=0.7, gain_sigma=0.02, nonlinearity=0.5)])
@pytest.mark.parametrize("bits", [4, 8])
def test_kernel_equals_reference_with_fixed_adc_errors(rng, adc, bits):
    cfg = errors(presets.ideal(rows=64, cols=32, dac_bits=8, adc_bits=bits), **adc)
    g_plus, g_minus = random_pair(rng, 60, 32)
    x = rng.uniform(-1, 1, (300, 60))
    tile, ref = tile_and_reference(cfg, g_plus, g_minus, seed=1, calibration=x[:100])
    y, y_ref = tile.mvm(x), ref.mvm(x)
    step, _ = steps(tile.output_range, levels_per_side(bits))
    differ = y != y_ref.astype(np.float32)
    # float32 products: a value within rounding of a decision edge may go one step the other way
    assert differ.mean() < 0.01
    assert np.allclose(np.abs(y - y_ref)[differ], step, rtol=1e-4)
    assert abs(tile.counts.adc_saturated - ref.counts.adc_saturated) <= int(differ.sum())
    ideal = Tile(presets.ideal(rows=64, cols=32, dac_bits=8, adc_bits=bits)).program(g_plus, g_minus, seed=1)
    ideal.calibrate(x[:100])
    assert np.abs(ideal.mvm(x) - y).max() >= step  # the errors act


def test_fixed_errors_have_the_configured_statistics():
    n = 8192  # ADCs: one per column
    cfg = errors(presets.ideal(rows=2, cols=n, dac_bits=8, adc_bits=8, dac_range_mode="fixed", adc_range_mode="fixed"),
                 offset_sigma=1.5, gain_sigma=0.03)
    tile = Tile(cfg).program(np.zeros((2, n)), np.zeros((2, n)), seed=3)
    offset, gain = tile.grid.adc_offset.numpy()[0], tile.grid.adc_gain.numpy()[0]
    for values, mean, sigma in ((offset, 0.0, 1.5), (gain, 1.0, 0.03)):
        assert abs(values.mean() - mean) < 5 * sigma / np.sqrt(n)
        assert abs(values.std(ddof=1) / sigma - 1) < 5 * np.sqrt(1 / (2 * (n - 1)))
    assert abs(np.corrcoef(offset, gain)[0, 1]) < z_bound(n)


def test_conversion_noise_has_the_configured_variance():
    """Zero input: each output is noise * step rounded to a step, whose code variance is
    sigma^2 + 1/12 (Sheppard's correction, exact to 1e-9 for sigma = 2 LSB)."""
    sigma, n_vec, cols = 2.0, 400, 64
    cfg = errors(presets.ideal(rows=4, cols=cols, dac_bits=8, adc_bits=8, dac_range_mode="fixed", adc_range_mode="fixed"), noise_sigma=sigma)
    tile = Tile(cfg).program(np.full((4, cols), 5.0), np.zeros((4, cols)), seed=4)
    y = tile.mvm(np.zeros((n_vec, 4)))
    step, _ = steps(1.0, levels_per_side(8))
    codes = y.astype(np.float64) / step
    assert np.allclose(codes, np.round(codes), atol=1e-3)
    n = codes.size
    want = sigma ** 2 + 1 / 12
    assert abs(codes.mean()) < 5 * np.sqrt(want / n)
    assert abs(codes.var(ddof=1) / want - 1) < 5 * np.sqrt(2 / (n - 1))
    # fresh on every conversion: consecutive reads of one column are uncorrelated
    assert abs(np.corrcoef(codes[:-1, 0], codes[1:, 0])[0, 1]) < z_bound(n_vec)


def test_nonlinearity_is_the_tanh_transfer_curve():
    a, r = 2.0, 10.0
    cfg = errors(presets.ideal(rows=1, cols=1, dac_bits=None, adc_bits=24, adc_range_mode="fixed"), nonlinearity=a)
    cfg = cfg.with_path("adc.range", r)
    tile = Tile(cfg).program(np.array([[10.0]]), np.array([[0.0]]), seed=0)
    x = np.linspace(-1.2, 1.2, 2001)[:, None]
    y = tile.mvm(x)[:, 0].astype(np.float64)
    v = 10.0 * x[:, 0]
    want = np.clip(r * np.tanh(a * v / r) / np.tanh(a), -r, r)
    step, _ = steps(r, levels_per_side(24))
    assert np.abs(y - want).max() <= step * 0.5 + 4 * np.finfo(np.float32).eps * r
    assert float(tile.mvm(np.array([[1.0]]))[0, 0]) == pytest.approx(r, abs=step)  # full scale maps to itself
    assert np.all(np.diff(y) >= 0)


def test_each_error_draws_from_its_own_stream(rng):
    g_plus, g_minus = random_pair(rng, 30, 20)
    base = presets.pcm(rows=32, cols=32, dac_bits=8, adc_bits=8)
    only_offset = Tile(errors(base, offset_sigma=1.0)).program(g_plus, g_minus, seed=9)
    both = Tile(errors(base, offset_sigma=1.0, gain_sigma=0.1)).program(g_plus, g_minus, seed=9)
    plain = Tile(base).program(g_plus, g_minus, seed=9)
    assert np.array_equal(only_offset.grid.adc_offset.numpy(), both.grid.adc_offset.numpy())
    assert np.array_equal(plain.conductances(), both.conductances())


@pytest.mark.gpu
def test_torch_engine_applies_the_same_adc_errors():
    from tests.crossbar.test_torch_engine import both_engines
    cfg = errors(presets.pcm(rows=32, cols=16, dac_bits=7, adc_bits=6), offset_sigma=1.0, gain_sigma=0.05,
                 noise_sigma=0.8, nonlinearity=1.0)
    x = np.random.default_rng(6).uniform(-1, 1, (150, 70)).astype(np.float32)
    results, _ = both_engines(cfg, 70, 40, x)
    (y_n, c_n), (y_t, c_t) = results["numba"], results["torch"]
    assert (y_n != y_t).mean() <= 1e-3  # tanh and variance sums may differ in the last bit
    assert abs(c_n["adc_saturated"] - c_t["adc_saturated"]) <= int((y_n != y_t).sum())


def test_adc_errors_need_a_finite_converter():
    with pytest.raises(ValueError, match=r"ADCConfig.bits = None is invalid"):
        ADCConfig(bits=None, offset_sigma=1.0)
    with pytest.raises(ValueError, match=r"ADCConfig.gain_sigma = -0.1 is invalid"):
        ADCConfig(bits=8, gain_sigma=-0.1)
    with pytest.raises(ValueError, match=r"ADCConfig.nonlinearity = 50.0 is invalid"):
        ADCConfig(bits=8, nonlinearity=50.0)
