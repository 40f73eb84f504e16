"""IR drop (PHYSICS.md section 8): the effective conductance matrix against a node-by-node
sparse solve of the same network, tiles with wires against the reference tile, and the
per-read noise approximation against per-read sampling through the wires."""
import numpy as np
import pytest
import torch

from crossbar import ReferenceTile, Tile, presets
from crossbar.config import IRDropConfig
from crossbar.reference import ir_drop_reference
from crossbar.wires import effective_conductance, effective_conductance_torch
from tests.crossbar.test_tile import tile_and_reference


def wired(cfg, r_row, r_col):
    return cfg.with_path("ir_drop.r_row", r_row).with_path("ir_drop.r_col", r_col)


@pytest.mark.parametrize("rows,n,m", [(8, 8, 6), (12, 9, 7), (16, 16, 1), (6, 1, 5), (20, 13, 11)])
@pytest.mark.parametrize("r_row,r_col", [(1.0, 1.0), (50.0, 20.0), (0.0, 30.0), (30.0, 0.0), (400.0, 400.0),
                                         (5000.0, 1000.0)])
def test_effective_matrix_equals_the_nodal_solve(rng, rows, n, m, r_row, r_col):
    g = rng.uniform(0, 25, (n, m))
    g_eff = effective_conductance(g, r_row, r_col, rows)
    padded = np.zeros((rows, m))
    padded[:n] = g
    for _ in range(3):
        x = np.zeros(rows)
        x[:n] = rng.uniform(-1, 1, n)
        want = ir_drop_reference(x, padded, r_row, r_col)
        assert np.allclose(x[:n] @ g_eff, want, rtol=0, atol=1e-6 * np.abs(want).max())


@pytest.mark.gpu
@pytest.mark.parametrize("rows,n,m", [(8, 8, 6), (12, 9, 7), (16, 16, 1), (6, 1, 5), (20, 13, 11)])
@pytest.mark.parametrize("r_row,r_col", [(1.0, 1.0), (0.0, 30.0), (30.0, 0.0), (5000.0, 1000.0), (0.0, 0.0)])
def test_the_torch_solve_of_a_batch_equals_lapacks_array_by_array(rng, rows, n, m, r_row, r_col):
    g = rng.uniform(0, 25, (3, n, m))
    g[0, 0, 0] = 0.0  # an empty cross point
    want = np.stack([effective_conductance(a, r_row, r_col, rows) for a in g])
    got = effective_conductance_torch(torch.from_numpy(g), r_row, r_col, rows).numpy()
    # the same elimination, dense Cholesky factors in place of tridiagonal ones: float64 rounding apart
    assert np.allclose(got, want, rtol=1e-11, atol=1e-12 * np.abs(want).max())


def test_large_wire_resistances_drop_tens_of_percent_and_stay_exact(rng):
    g = rng.uniform(0, 25, (16, 12))
    for r, lowest in ((400.0, 0.1), (5000.0, 0.5)):
        g_eff = effective_conductance(g, r, r, 16)
        drop = 1 - g_eff.sum() / g.sum()
        assert drop > lowest
        x = rng.uniform(0, 1, 16)
        want = ir_drop_reference(x, g, r, r)
        assert np.allclose(x @ g_eff, want, rtol=1e-6)


def test_no_wires_is_the_plain_product_and_wires_only_attenuate(rng):
    g = rng.uniform(0, 25, (10, 7))
    assert np.array_equal(effective_conductance(g, 0.0, 0.0, 10), g)
    g_eff = effective_conductance(g, 10.0, 10.0, 10)
    assert np.all(g_eff.sum(axis=0) < g.sum(axis=0))
    # the farther from driver and sense amplifier, the more is lost (row 0 sits farthest)
    assert effective_conductance(np.full((10, 7), 20.0), 10.0, 10.0, 10)[0, -1] < \
        effective_conductance(np.full((10, 7), 20.0), 10.0, 10.0, 10)[-1, 0]


def test_empty_rows_below_a_partly_used_tile_add_series_resistance(rng):
    g = rng.uniform(0, 25, (8, 5))
    assert np.all(effective_conductance(g, 5.0, 5.0, 64) < effective_conductance(g, 5.0, 5.0, 8))


@pytest.mark.parametrize("adc_bits", [None, 8])
def test_tile_with_wires_equals_the_reference_tile(rng, adc_bits):
    cfg = wired(presets.ideal(rows=24, cols=12, dac_bits=8, adc_bits=adc_bits), 30.0, 20.0)
    g_plus, g_minus = rng.uniform(0, 25, (20, 12)), rng.uniform(0, 25, (20, 12))
    x = rng.uniform(-1, 1, (40, 20))
    tile, ref = tile_and_reference(cfg, g_plus, g_minus, seed=1, calibration=x)
    y, y_ref = tile.mvm(x), ref.mvm(x)
    if adc_bits is None:
        assert np.allclose(y, y_ref, rtol=1e-5, atol=1e-4 * np.abs(y_ref).max())
    else:
        assert (y != y_ref.astype(np.float32)).mean() < 0.02  # float32 rounding at step edges
    plain = Tile(presets.ideal(rows=24, cols=12, dac_bits=8, adc_bits=adc_bits)).program(g_plus, g_minus, seed=1)
    plain.calibrate(x)
    assert np.abs(plain.mvm(x) - y).max() > 0.01 * np.abs(y).max()  # the wires act


def test_zero_wire_resistance_leaves_every_bit_unchanged(rng):
    g_plus, g_minus = rng.uniform(0, 25, (30, 20)), rng.uniform(0, 25, (30, 20))
    x = rng.uniform(-1, 1, (10, 30))
    base = presets.pcm(rows=32, cols=32, dac_bits=8, adc_bits=8)
    outputs = []
    for cfg in (base, wired(base, 0.0, 0.0)):
        tile = Tile(cfg).program(g_plus, g_minus, seed=4)
        tile.calibrate(x)
        outputs.append(tile.at(100.0).mvm(x))
    assert np.array_equal(*outputs)


@pytest.mark.slow
def test_read_noise_through_the_wires_is_within_its_stated_approximation(rng):
    """Per-read noise is attenuated as each device's signal (G_eff / G): exact in the
    mean, and an overestimate of the variance where the bit lines rise (all inputs of
    one sign), by about the relative signal drop times 1 to 1.5; PHYSICS.md section 8."""
    rows, cols, n = 16, 6, 800
    cfg = wired(presets.gaussian(rows=rows, cols=cols, dac_bits=None, adc_bits=None, prog_sigma_abs=0.0,
                                 read_sigma_abs=0.3, read_sigma_rel=0.05), 40.0, 40.0)
    g_plus, g_minus = rng.uniform(5, 25, (rows, cols)), rng.uniform(0, 10, (rows, cols))
    x = np.repeat(rng.uniform(0.2, 1, (1, rows)), n, axis=0)
    tile = Tile(cfg).program(g_plus, g_minus, seed=2)
    ref = ReferenceTile(cfg, read_seed=3)
    ref.load_state_dict(tile.state_dict())
    y, y_ref = tile.mvm(x).astype(np.float64), ref.mvm(x)
    drop = 1 - y_ref.mean(0).sum() / (x[0] @ (g_plus - g_minus)).sum()
    assert 0.03 < drop < 0.3
    sd = np.sqrt(y_ref.var(0, ddof=1) / n)
    assert np.all(np.abs(y.mean(0) - y_ref.mean(0)) < 5 * np.sqrt(2) * sd)
    ratio = y.var(0, ddof=1) / y_ref.var(0, ddof=1)
    sampling = 5 * np.sqrt(2 * 2 / (n - 1))
    assert np.all(ratio > 1 - sampling) and np.all(ratio < 1 + 1.5 * drop + sampling)


def test_wire_resistances_are_validated():
    with pytest.raises(ValueError, match=r"IRDropConfig.r_row = -1.0 is invalid"):
        IRDropConfig(r_row=-1.0)
    with pytest.raises(ValueError, match=r"IRDropConfig.r_col = nan is invalid"):
        IRDropConfig(r_col=float("nan"))
