"""Bit-serial inputs (PHYSICS.md section 9): with an ideal ADC the cycles add up to the
one-cycle product; with a finite one each cycle is converted on its own, as the
reference does it."""
import numpy as np
import pytest

from crossbar import Tile, presets
from crossbar.config import DACConfig
from crossbar.kernels import levels_per_side, steps
from tests.crossbar.test_tile import random_pair, tile_and_reference


def serial(cfg, p):
    return cfg.with_path("dac.bits_per_cycle", p)


@pytest.mark.parametrize("bits,p", [(8, 1), (8, 3), (6, 5), (4, 2)])
@pytest.mark.parametrize("mode", ["fixed", "per_vector"])
def test_ideal_adc_cycles_add_up_to_one_cycle(rng, bits, p, mode):
    cfg = presets.ideal(rows=32, cols=16, dac_bits=bits, adc_bits=None, dac_range_mode=mode)
    g_plus, g_minus = random_pair(rng, 30, 16)
    x = rng.uniform(-1, 1, (50, 30))
    one = Tile(cfg).program(g_plus, g_minus, seed=1).mvm(x)
    tile = Tile(serial(cfg, p)).program(g_plus, g_minus, seed=1)
    cycles = -(-(bits - 1) // p)
    assert np.allclose(tile.mvm(x), one, rtol=1e-5, atol=1e-5 * np.abs(one).max())
    assert tile.counts.adc_converted == cycles * one.size
    assert tile.counts.dac_converted == cycles * x.size


@pytest.mark.parametrize("p", [1, 2, 4])
def test_finite_adc_converts_every_cycle_as_the_reference_does(rng, p):
    cfg = serial(presets.ideal(rows=32, cols=16, dac_bits=8, adc_bits=5, dac_range_mode="fixed",
                               adc_range_mode="calibrated"), p)
    g_plus, g_minus = random_pair(rng, 32, 16)
    x = rng.uniform(-1, 1, (200, 32))
    tile, ref = tile_and_reference(cfg, g_plus, g_minus, seed=2, calibration=x[:100])
    y, y_ref = tile.mvm(x), ref.mvm(x)
    step, _ = steps(tile.output_range, levels_per_side(5))
    differ = np.abs(y - y_ref) > 0.5 * step  # beyond float32 rounding of the digital sum
    assert differ.mean() < 0.01
    # a cycle's value on a decision edge moves by one step times that cycle's weight
    moved = np.abs(y - y_ref)[differ] / step
    assert np.allclose(moved, np.round(moved), atol=1e-3)
    one_cycle = Tile(cfg.with_path("dac.bits_per_cycle", None)).program(g_plus, g_minus, seed=2)
    one_cycle.calibrate(x[:100])
    exact = x @ (g_plus - g_minus)
    # a 5-bit ADC on each cycle: a different error from one conversion of the whole sum
    assert not np.allclose(one_cycle.mvm(x), y, atol=0.01 * np.abs(exact).max())


@pytest.mark.gpu
def test_torch_engine_runs_the_same_cycles(rng):
    from tests.crossbar.test_torch_engine import both_engines
    cfg = serial(presets.pcm(rows=32, cols=16, dac_bits=6, adc_bits=6), 2)
    x = rng.uniform(-1, 1, (80, 70)).astype(np.float32)
    results, _ = both_engines(cfg, 70, 30, x)
    (y_n, c_n), (y_t, c_t) = results["numba"], results["torch"]
    assert (y_n != y_t).mean() <= 1e-3
    assert c_n["adc_converted"] == c_t["adc_converted"]


def test_bits_per_cycle_is_validated():
    with pytest.raises(ValueError, match=r"DACConfig.bits_per_cycle = 2 is invalid: bit-serial inputs need"):
        DACConfig(bits=None, bits_per_cycle=2)
    with pytest.raises(ValueError, match=r"DACConfig.bits_per_cycle = 8 is invalid: expected an integer in \[1, 7\]"):
        DACConfig(bits=8, bits_per_cycle=8)
    assert DACConfig(bits=8, bits_per_cycle=3).cycles == 3


@pytest.mark.parametrize("p", [2, 3, 7])
def test_worst_case_adc_range_is_one_cycles_largest_input_on_a_full_column(p):
    """PHYSICS.md section 6's worst case, rows x (g_max - g_min) x the largest input, is
    for bit-serial inputs that of one cycle: the ADC converts each cycle, whose largest
    input is its largest digit, min(2^p - 1, 2^(B-1) - 1) steps. Every G+ at g_max and
    every G- at g_min, read at the full DAC range: no cycle saturates, and with p = 7
    (one cycle) the range is the whole input's. A DAC range of 127 makes the steps 1, so
    that a cycle at the range's edge reads it exactly (a float32 rounding above it would
    count as saturated)."""
    rows, bits = 16, 8
    cfg = serial(presets.ideal(rows=rows, cols=4, dac_bits=bits, adc_bits=6, dac_range_mode="fixed",
                               adc_range_mode="worst_case").with_path("dac.range", 127.0), p)
    device = cfg.device
    tile = Tile(cfg).program(np.full((rows, 4), device.g_max), np.full((rows, 4), device.g_min), seed=0)
    half = levels_per_side(bits)
    largest_input = min(2 ** p - 1, half) * tile.input_range / half
    assert tile.output_range == pytest.approx(rows * (device.g_max - device.g_min) * largest_input, rel=1e-12)
    tile.mvm(np.full((3, rows), tile.input_range))
    assert tile.counts.adc_saturated == 0 and tile.counts.adc_converted == cfg.dac.cycles * 3 * 4
