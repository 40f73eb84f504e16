"""The tile-grid engine against independent float64 reference tiles: several grid shapes,
edge tiles and per-tile ranges; noise off equal, noise on by its statistics."""
import numpy as np
import pytest
import torch

from crossbar import ReferenceTile, Tile, presets
from crossbar import grid_programming
from crossbar.grid import TileGrid
from crossbar.grid_programming import time_bits
from crossbar.host_threads import map_tiles
from crossbar.seeding import derive


def programmed_grid(config, n_in, n_out, seed=0, g_max=25.0):
    rng = np.random.default_rng(seed)
    g_plus, g_minus = rng.uniform(0, g_max, (n_in, n_out)), rng.uniform(0, g_max, (n_in, n_out))
    grid = TileGrid(config, n_in, n_out)
    seeds = [derive(seed, k) for k in range(grid.grid_shape[0] * grid.grid_shape[1])]
    return grid.program(g_plus, g_minus, seeds), g_plus, g_minus, seeds


def reference_tiles(grid, g_plus, g_minus, seeds):
    """Tile (r, c) as an independent float64 ReferenceTile with the grid's ranges."""
    tiles = {}
    for k, (r, c, rs, cs) in enumerate(grid.tiles()):
        ref = ReferenceTile(grid.config, read_seed=k).program(g_plus[rs, cs], g_minus[rs, cs], seed=seeds[k])
        ref.at(grid.time)
        if grid.config.dac.range_mode != "per_vector" and grid.input_range is not None:
            ref.input_range = grid.input_range
        ranges = grid.output_ranges()
        if grid.config.adc.range_mode != "worst_case" and ranges is not None:
            ref.output_range = float(ranges[r, c])
        tiles[r, c] = (ref, rs, cs)
    return tiles


def reference_product(tiles, x, n_out):
    y = np.zeros((x.shape[0], n_out))
    for (ref, rs, cs) in tiles.values():
        y[:, cs] += ref.mvm(x[:, rs])
    return y


GRIDS = [(70, 50, 32, 16), (300, 40, 64, 64), (128, 200, 128, 64), (17, 9, 256, 256)]
CONVERTERS = [(8, 8, "calibrated", "calibrated"), (6, 4, "fixed", "calibrated"), (5, 7, "per_vector", "calibrated"),
              (4, 6, "calibrated", "worst_case"), (None, None, "calibrated", "calibrated")]


@pytest.mark.parametrize("n_in,n_out,rows,cols", GRIDS)
@pytest.mark.parametrize("dac_bits,adc_bits,dac_mode,adc_mode", CONVERTERS)
def test_grid_equals_reference_tiles_noise_off(n_in, n_out, rows, cols, dac_bits, adc_bits, dac_mode, adc_mode):
    config = presets.ideal(rows=rows, cols=cols, dac_bits=dac_bits, adc_bits=adc_bits, dac_range_mode=dac_mode,
                           adc_range_mode=adc_mode)
    grid, g_plus, g_minus, seeds = programmed_grid(config, n_in, n_out)
    x = np.random.default_rng(1).uniform(-1.2, 1.2, (90, n_in))
    grid.calibrate(x[:60])
    ranges = grid.output_ranges()
    if adc_mode == "calibrated" and adc_bits is not None and grid.grid_shape[0] * grid.grid_shape[1] > 1:
        assert len(np.unique(ranges)) > 1  # per-tile ranges really differ
    tiles = reference_tiles(grid, g_plus, g_minus, seeds)
    got = grid.product(x).astype(np.float64)
    want = reference_product(tiles, x, n_out)
    # float32 products may put a value on the other side of an ADC step: at most one step
    # per tile of the column's row, on few outputs
    step = np.zeros(n_out)
    if adc_bits is not None:
        half = 2 ** (adc_bits - 1) - 1 if adc_bits > 1 else 1
        for (r, c), (_, rs, cs) in tiles.items():
            step[cs] += ranges[r, c] / half
    tol = 1e-4 * (np.abs(x) @ np.abs(g_plus - g_minus)).max() + 1e-9
    off = np.abs(got - want) > tol
    assert np.all(np.abs(got - want) <= step + tol)
    assert off.mean() < 0.01
    counts = grid.count_totals()
    reference_counts = {k: sum(getattr(ref.counts, k) for ref, _, _ in tiles.values())
                        for k in ("dac_converted", "dac_clipped", "adc_converted")}
    assert {k: counts[k] for k in reference_counts} == reference_counts


@pytest.mark.parametrize("sigma_rel", [0.0, 0.03])
def test_grid_read_noise_statistics_match_reference_tiles(sigma_rel):
    """Per-read noise over a 3 x 2 grid: mean and variance of each output against the
    formula, for the grid and for the reference tiles, with bounds from the sample size."""
    n_in, n_out, n = 90, 30, 4000
    config = presets.gaussian(rows=32, cols=16, dac_bits=None, adc_bits=None, prog_sigma_abs=0.0,
                              read_sigma_abs=0.4, read_sigma_rel=sigma_rel)
    grid, g_plus, g_minus, seeds = programmed_grid(config, n_in, n_out, seed=3)
    assert grid.grid_shape == (3, 2)
    x = np.repeat(np.random.default_rng(4).uniform(-1, 1, (1, n_in)), n, axis=0)
    mean = x[0] @ (g_plus - g_minus)
    var = (x[0] ** 2) @ ((0.4 + sigma_rel * g_plus) ** 2 + (0.4 + sigma_rel * g_minus) ** 2)
    tiles = reference_tiles(grid, g_plus, g_minus, seeds)
    for y in (grid.product(x), reference_product(tiles, x, n_out)):
        assert np.all(np.abs(y.mean(0) - mean) < 5 * np.sqrt(var / n))
        assert np.all(np.abs(y.var(0, ddof=1) - var) < 5 * var * np.sqrt(2 / (n - 1)))
    # every tile draws its own stream: columns of different tiles are uncorrelated
    y = grid.product(x)
    assert abs(np.corrcoef(y[:, 0], y[:, 20])[0, 1]) < 5 / np.sqrt(n)


def test_each_tile_of_a_grid_is_the_lone_tile_of_its_seed():
    config = presets.pcm(rows=32, cols=16, stuck_min_fraction=0.02)
    grid, g_plus, g_minus, seeds = programmed_grid(config, 70, 40, seed=9)
    grid.at(86400.0)
    x = np.random.default_rng(2).uniform(-1, 1, (50, 70))
    grid.calibrate(x)
    for k, (r, c, rs, cs) in enumerate(grid.tiles()):
        tile = Tile(config).program(g_plus[rs, cs], g_minus[rs, cs], seed=seeds[k]).at(86400.0)
        assert np.array_equal(tile.programmed_conductances()[0], grid.g_prog.numpy()[0, rs, cs])
        assert np.array_equal(tile.conductances()[1], grid.conductances()[1, rs, cs])  # drift and 1/f too
        assert tile.counts.stuck_min == grid.counts["stuck_min"][r, c]


def _threads(monkeypatch, n):
    """Grids work their tiles on n host threads."""
    monkeypatch.setattr(grid_programming, "map_tiles",
                        lambda work, items, threads=None: map_tiles(work, items, n if threads is None else threads))


@pytest.mark.parametrize("config,t", [
    (presets.hermes(rows=32, cols=16, read_sigma_rel=0.01), 86400.0),  # 1/f, drift, per-device read variance
    (presets.pcm(rows=32, cols=16, stuck_min_fraction=0.02, stuck_max_fraction=0.01, levels=9), 3600.0),
    (presets.reram(rows=32, cols=16), 7200.0),
])
def test_tiles_worked_on_host_threads_equal_the_device_model_over_the_whole_matrix(config, t, monkeypatch):
    _threads(monkeypatch, 1)
    alone, *_ = programmed_grid(config, 70, 40, seed=3, g_max=config.device.g_max)
    alone.at(t)
    _threads(monkeypatch, 4)
    grid, *_ = programmed_grid(config, 70, 40, seed=3, g_max=config.device.g_max)
    grid.at(t)
    for name in ("g_prog", "nu"):
        assert np.array_equal(getattr(grid, name).numpy(), getattr(alone, name).numpy())
    assert all(np.array_equal(grid.counts[name], alone.counts[name]) for name in grid.counts)
    # the slow, obvious way: the device model on the whole matrix, each tile's 1/f normals in place
    bits = time_bits(t)
    z = np.empty((2, *grid.shape))
    for k, (_, _, rs, cs) in enumerate(grid.tiles()):
        z[:, rs, cs] = grid._slow_normals(k, bits, z[:, rs, cs].shape)
    g, below = grid.device.conductance_at(grid.g_prog.numpy(), grid.nu.numpy(), t, lambda: z)
    assert np.array_equal(grid.conductances(), g.astype(np.float32))
    assert np.array_equal(grid._gdiff_host, (g[0] - g[1]).astype(np.float32))
    var = grid.device.read_variance(g[0]) + grid.device.read_variance(g[1])
    if np.all(var == var.flat[0]):  # a row sum, not a second product
        assert grid._var_host is None and grid._var_uniform == var.flat[0]
    else:
        assert np.array_equal(grid._var_host, var.astype(np.float32))
    clamped = [int(below[:, rs, cs].sum()) if below is not None else 0 for _, _, rs, cs in grid.tiles()]
    assert grid.counts["read_clamped"].ravel().tolist() == clamped
    for name in ("_g_read", "_gdiff_host", "_var_host", "_var_uniform"):
        assert np.array_equal(getattr(grid, name), getattr(alone, name))


def test_at_the_same_time_on_the_same_chip_reuses_what_it_derived_and_reads_from_the_start(monkeypatch):
    config = presets.pcm(rows=32, cols=16)
    grid, *_ = programmed_grid(config, 70, 40, seed=2)
    calls = []
    conductance_at = grid.device.conductance_at
    monkeypatch.setattr(grid.device, "conductance_at", lambda *a: calls.append(1) or conductance_at(*a))
    x = np.random.default_rng(4).uniform(-1, 1, (30, 70)).astype(np.float32)
    grid.calibrate(x).at(3600.0)
    first, read = grid.product(x), grid.conductances().copy()
    derived = len(calls)
    grid.at(3600.0)  # the same chip and time: nothing derived again, the reads start over
    assert len(calls) == derived and np.array_equal(grid.product(x), first)
    with pytest.raises(ValueError, match="read-only"):
        grid.conductances()[0, 0, 0] = 0.0  # what is reused cannot be changed from outside
    grid.at(60.0)
    grid.at(3600.0)  # another time came between: derived again, the same
    assert len(calls) == derived + 2 * grid.grid_shape[0] * grid.grid_shape[1]
    assert np.array_equal(grid.conductances(), read) and np.array_equal(grid.product(x), first)
    other, *_ = programmed_grid(config, 70, 40, seed=5)
    grid.load_state_dict(other.state_dict())  # another chip
    grid.at(3600.0)
    assert np.array_equal(grid.conductances(), other.at(3600.0).conductances())
    grid.g_prog.mul_(0.5)  # the programmed state changed in place
    grid.at(3600.0)
    assert np.array_equal(grid.conductances(), grid._conductances_at(3600.0, time_bits(3600.0))[0])


def test_grid_state_round_trips_through_state_dict():
    config = presets.pcm(rows=32, cols=16)
    grid, *_ = programmed_grid(config, 70, 40, seed=5)
    x = np.random.default_rng(6).uniform(-1, 1, (40, 70)).astype(np.float32)
    grid.calibrate(x).at(3600.0)
    first = grid.product(x)
    copy = TileGrid(config, 70, 40)
    copy.load_state_dict(grid.state_dict())
    assert copy.time == 3600.0 and np.array_equal(copy.output_ranges(), grid.output_ranges())
    assert np.array_equal(copy.product(x), first)
    assert set(grid.state_dict()) >= {"g_prog", "nu", "dac_range", "adc_ranges"}


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), True, "3600", None, 3600j,
                                 torch.tensor([1.0, 2.0]), torch.tensor(True), torch.tensor(-1.0)])
def test_a_bad_time_is_refused_by_name_and_changes_nothing(bad):
    grid, *_ = programmed_grid(presets.pcm(rows=32, cols=16), 40, 20, seed=3)
    grid.at(60.0)
    before = grid.conductances().copy()
    with pytest.raises(ValueError, match=r"^t = .* is invalid: expected a finite time >= 0 s"):
        grid.at(bad)
    assert grid.time == 60.0 and np.array_equal(grid.conductances(), before)


@pytest.mark.parametrize("t", [np.float32(3600.0), np.int64(3600), 3600, torch.tensor(3600.0),
                               torch.tensor([3600], dtype=torch.int32), torch.logspace(0, 6, 4)[2]])
def test_a_time_given_as_any_real_number_or_one_element_tensor_is_that_float(t):
    grid, *_ = programmed_grid(presets.pcm(rows=32, cols=16), 40, 20, seed=3)
    want = programmed_grid(presets.pcm(rows=32, cols=16), 40, 20, seed=3)[0].at(float(t))
    grid.at(t)
    assert type(grid.time) is float and grid.time == float(t)
    assert np.array_equal(grid.conductances(), want.conductances())


def test_grid_errors_name_the_problem():
    config = presets.ideal(rows=16, cols=16)
    with pytest.raises(ValueError, match="n_in = 0"):
        TileGrid(config, 0, 4)
    grid = TileGrid(config, 20, 4)
    with pytest.raises(RuntimeError, match="programmed grid"):
        grid.product(np.zeros((1, 20)))
    with pytest.raises(ValueError, match="1 seeds for 2 tiles"):
        grid.program(np.ones((20, 4)), np.ones((20, 4)), [0])
    with pytest.raises(ValueError, match=r"g_plus has shape \(20, 5\)"):
        grid.program(np.ones((20, 5)), np.ones((20, 4)), [0, 1])
