import numba
import numpy as np
import pytest
import torch

from crossbar import ReferenceTile, Tile, presets
from crossbar.tile import TileCounts
from crossbar.kernels import grid_dac_convert, levels_per_side, pixel_dac_convert, steps
from crossbar.reference import quantize_reference


def random_pair(rng, rows, cols, g_max=25.0):
    return rng.uniform(0, g_max, (rows, cols)), rng.uniform(0, g_max, (rows, cols))


def tile_and_reference(cfg, g_plus, g_minus, seed, calibration=None):
    """A programmed Tile (calibrated on ``calibration`` where given) and a ReferenceTile
    holding the same chip."""
    tile = Tile(cfg).program(g_plus, g_minus, seed=seed)
    if calibration is not None:
        tile.calibrate(calibration)
    ref = ReferenceTile(cfg)
    ref.load_state_dict(tile.state_dict())
    return tile, ref


@pytest.mark.parametrize("rows,cols,used", [(256, 256, (256, 256)), (128, 64, (100, 33)), (64, 512, (1, 512))])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ideal_tile_is_the_matrix_product(rng, rows, cols, used, dtype):
    g_plus, g_minus = random_pair(rng, *used)
    tile = Tile(presets.ideal(rows=rows, cols=cols)).program(g_plus, g_minus, seed=0)
    x = rng.uniform(-3, 3, (50, used[0])).astype(dtype)
    y = tile.mvm(x)
    exact = x.astype(np.float64) @ (g_plus - g_minus)
    assert y.shape == (50, used[1]) and y.dtype == np.float32
    # float32 products of rows terms: error bounded by rows * eps32 * sum|x||g|
    bound = used[0] * np.finfo(np.float32).eps * (np.abs(x) @ (g_plus + g_minus))
    assert np.all(np.abs(y - exact) <= bound + 1e-6)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6, 8, 10, 12])
@pytest.mark.parametrize("full_scale", [0.5, 1.0, 3.0])
def test_dac_kernel_equals_reference_exactly(rng, bits, full_scale):
    x = rng.uniform(-2, 2, (64, 97))
    # exact ties of the rounding rule and the range ends
    half = levels_per_side(bits)
    step, _ = steps(full_scale, half)
    x[0, :5] = [0.0, full_scale, -full_scale, 0.5 * step, -1.5 * step]
    out = np.empty(x.shape, np.float32)
    starts = np.array([0, 40, 80, 97])  # three row blocks of a grid, the last partly used
    clip = np.empty((64, 3), np.int64)
    grid_dac_convert(x, out, full_scale, half, False, starts, np.empty((0, 0)), clip, np.empty(64, np.int64))
    expected, clipped = quantize_reference(x, full_scale, bits)
    assert np.array_equal(out, expected.astype(np.float32))
    assert clip.sum() == clipped == np.count_nonzero(np.abs(x) > full_scale)
    for r in range(3):
        assert clip[:, r].sum() == np.count_nonzero(np.abs(x[:, starts[r]:starts[r + 1]]) > full_scale)
    # per-vector: each block of each row scaled by its own abs-max, as each tile row sees it
    scales = np.empty((3, 64))
    grid_dac_convert(x, out, full_scale, half, True, starts, scales, clip, np.empty(64, np.int64))
    for r in range(3):
        block = x[:, starts[r]:starts[r + 1]]
        assert np.array_equal(scales[r], np.abs(block).max(axis=1))
        want, _ = quantize_reference(block / scales[r][:, None], full_scale, bits)
        assert np.array_equal(out[:, starts[r]:starts[r + 1]], want.astype(np.float32))


@pytest.mark.parametrize("bits", [None, 1, 8])
@pytest.mark.parametrize("channels, bounds", [(16, [0, 16]), (32, [0, 28, 29, 32]), (7, [0, 1, 2, 7])])
def test_convolution_dac_kernel_equals_an_obvious_loop(rng, bits, channels, bounds):
    """``pixel_dac_convert`` (a flat conversion per run of pixels, then the per-pixel
    sums) against the reference quantizer and plain per-pixel, per-segment sums: the
    converted values, the squares summed in channel order (float64 sums round by their
    order), the values beyond the range and the non-finite ones."""
    pixels = 5000  # several work items, the last partly full
    x = rng.uniform(-1.3, 1.3, (pixels, channels)).astype(np.float32)
    x[3, 0], x[4000, channels - 1], x[17, 1] = np.nan, np.inf, -np.inf
    bounds = np.array(bounds)
    n_segments = len(bounds) - 1
    out = np.empty_like(x)
    squares = np.empty((pixels, n_segments), np.float32)
    clipped = np.empty((pixels, n_segments), np.float32)
    n_bad = pixel_dac_convert(x, out, 1.0, levels_per_side(bits), bounds, squares, clipped)
    finite = np.isfinite(x)
    expected = x.astype(np.float64) if bits is None else quantize_reference(x, 1.0, bits)[0]
    assert np.array_equal(out[finite], expected[finite].astype(np.float32))
    assert n_bad == 3  # (a layer refuses such an input)
    for s in range(n_segments):
        part = x[:, bounds[s]:bounds[s + 1]]
        beyond = np.count_nonzero(np.abs(part) > 1.0, axis=1) if bits is not None else 0
        assert np.array_equal(clipped[:, s], np.broadcast_to(beyond, pixels).astype(np.float32))
        in_order = np.add.accumulate(out[:, bounds[s]:bounds[s + 1]].astype(np.float64) ** 2, axis=1)[:, -1]
        assert np.array_equal(squares[:, s], in_order.astype(np.float32), equal_nan=True)
    assert bits is None or clipped.sum() > 0.05 * x.size


def noiseless(rows, cols, dac_bits, adc_bits, dac_mode, adc_mode):
    return presets.ideal(rows=rows, cols=cols, dac_bits=dac_bits, adc_bits=adc_bits,
                         dac_range_mode=dac_mode, adc_range_mode=adc_mode)


CASES = [(b, b, "fixed", "calibrated") for b in range(1, 13)] + [
    (8, 8, "per_vector", "calibrated"), (4, 6, "calibrated", "worst_case"), (None, 5, "fixed", "fixed"),
    (7, None, "per_vector", "worst_case"), (3, 2, "fixed", "worst_case"),
]


@pytest.mark.parametrize("dac_bits,adc_bits,dac_mode,adc_mode", CASES)
@pytest.mark.parametrize("rows,cols", [(32, 16), (256, 128)])
def test_kernel_equals_reference_noise_off(rng, dac_bits, adc_bits, dac_mode, adc_mode, rows, cols):
    cfg = noiseless(rows, cols, dac_bits, adc_bits, dac_mode, adc_mode)
    if adc_mode == "fixed":
        cfg = cfg.with_path("adc.range", 40.0 * np.sqrt(rows))
    g_plus, g_minus = random_pair(rng, rows - 3, cols)
    x = rng.uniform(-1.3, 1.3, (200, rows - 3))
    tile = Tile(cfg).program(g_plus, g_minus, seed=1)
    tile.calibrate(x[:100])
    if adc_mode == "calibrated":
        tile.output_range = tile.output_range * 0.8  # force some saturation
    ref = ReferenceTile(cfg)
    ref.load_state_dict(tile.state_dict())
    y, y_ref = tile.mvm(x), ref.mvm(x)
    # Products differ by float32 rounding, so a value within that of an ADC decision
    # boundary may round the other way: by exactly one step, and only there.
    if adc_bits is None:
        assert np.allclose(y, y_ref, rtol=1e-5, atol=1e-3)
    else:
        differ = y != y_ref.astype(np.float32)
        half = levels_per_side(adc_bits)
        step, _ = steps(tile.output_range, half)
        if half > 0:
            # per-vector scaling multiplies each row's output step by the row's abs-max
            row_scale = np.abs(x).max(axis=1, keepdims=True) if dac_mode == "per_vector" else np.ones((len(x), 1))
            expected = np.broadcast_to(step * row_scale, y.shape)[differ]
            ulps = 4 * np.finfo(np.float32).eps * np.abs(y_ref).max()
            assert np.allclose(np.abs(y[differ] - y_ref[differ]), expected, rtol=0, atol=ulps)
        assert differ.mean() < 0.01
    assert tile.counts.dac_clipped == ref.counts.dac_clipped
    assert abs(tile.counts.adc_saturated - ref.counts.adc_saturated) <= max(2, 0.01 * y.size)
    if dac_bits is not None and dac_mode == "fixed":
        assert tile.counts.dac_clipped == np.count_nonzero(np.abs(x) > 1.0)


@pytest.mark.parametrize("sigma_rel", [0.0, 0.03])
def test_variance_method_matches_per_device_sampling(rng, sigma_rel):
    """Output mean and variance of the fast path against the reference's sampling."""
    rows, cols, n = 64, 8, 4000
    cfg = presets.gaussian(rows=rows, cols=cols, dac_bits=None, adc_bits=None,
                           prog_sigma_abs=0.0, read_sigma_abs=0.4, read_sigma_rel=sigma_rel)
    g_plus, g_minus = random_pair(rng, rows, cols)
    x = np.repeat(rng.uniform(-1, 1, (1, rows)), n, axis=0)
    tile = Tile(cfg).program(g_plus, g_minus, seed=2)
    ref = ReferenceTile(cfg, read_seed=3)
    ref.load_state_dict(tile.state_dict())
    mean = x[0] @ (g_plus - g_minus)
    var = (x[0] ** 2) @ ((0.4 + sigma_rel * g_plus) ** 2 + (0.4 + sigma_rel * g_minus) ** 2)
    for y in (tile.mvm(x), ref.mvm(x)):
        assert np.all(np.abs(y.mean(0) - mean) < 5 * np.sqrt(var / n))
        assert np.all(np.abs(y.var(0, ddof=1) - var) < 5 * var * np.sqrt(2 / (n - 1)))


def test_uniform_and_general_variance_paths_agree(rng):
    """The row-sum shortcut for uniform read noise is the general product's special case."""
    cfg = presets.gaussian(rows=32, cols=16, dac_bits=6, adc_bits=None, dac_range_mode="fixed", read_sigma_abs=0.3)
    g_plus, g_minus = random_pair(rng, 32, 16)
    tile = Tile(cfg).program(g_plus, g_minus, seed=4)
    grid = tile.grid
    assert grid._var_uniform is not None
    x = rng.uniform(-1, 1, (20, 32))
    fast = tile.at(5.0).mvm(x)
    tile.at(5.0)  # same read stream from its start
    grid._derived = grid._derived[:2] + (tile.read_variance(),)  # force the general product
    grid._var_uniform = None
    general = tile.mvm(x)
    assert not np.array_equal(fast, x @ (g_plus - g_minus))
    assert np.allclose(fast, general, rtol=1e-5, atol=1e-4)


def pcm_tile(seed, rows=128, cols=64):
    rng = np.random.default_rng(7)
    cfg = presets.pcm(rows=rows, cols=cols, stuck_min_fraction=0.01)
    tile = Tile(cfg).program(*random_pair(rng, rows, cols), seed=seed)
    x = rng.uniform(-1, 1, (300, rows))
    tile.calibrate(x)
    return tile.at(3600.0), x


def test_same_seed_same_bits_under_any_thread_count():
    outputs = []
    for threads in (1, numba.config.NUMBA_NUM_THREADS):
        numba.set_num_threads(threads)
        try:
            tile, x = pcm_tile(seed=11)
            outputs.append((tile.mvm(x), tile.mvm(x)))
        finally:
            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    (a1, a2), (b1, b2) = outputs
    assert np.array_equal(a1, b1) and np.array_equal(a2, b2)
    assert not np.array_equal(a1, a2)  # successive reads draw fresh per-read noise
    other, x = pcm_tile(seed=12)
    assert not np.array_equal(other.mvm(x), a1)


def test_at_is_reproducible_and_state_round_trips():
    tile, x = pcm_tile(seed=5)
    first = tile.at(100.0).mvm(x)
    tile.at(1e6).mvm(x)
    assert np.array_equal(tile.at(100.0).mvm(x), first)
    copy = Tile(tile.config).load_state_dict(tile.state_dict())
    assert np.array_equal(copy.at(100.0).mvm(x), first)


def test_drift_lowers_conductance_and_counts_are_kept():
    tile, x = pcm_tile(seed=3)
    g0 = tile.at(0.0).conductances()[0].mean()
    g_year = tile.at(3.15e7).conductances()[0].mean()
    assert g_year < 0.75 * g0  # mean nu > 0.049 and ((3.15e7 + 20) / 20)^-0.049 = 0.50
    c = tile.counts
    assert c.devices == 2 * 128 * 64 and c.stuck_min > 0
    tile.reset_counts()
    tile.mvm(x)
    assert tile.counts.dac_converted == x.size and tile.counts.adc_converted == 300 * 64


def test_bad_inputs_raise_clear_errors(rng):
    cfg = presets.pcm(rows=16, cols=8, dac_range_mode="fixed")
    tile = Tile(cfg)
    with pytest.raises(RuntimeError, match="program"):
        tile.mvm(np.zeros((2, 16)))
    good = np.full((16, 8), 5.0)
    bad = good.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="g_plus contains 1 NaN"):
        tile.program(bad, good)
    with pytest.raises(ValueError, match="g_minus.*inf|g_minus contains 1"):
        tile.program(good, np.where(bad != bad, np.inf, good))
    with pytest.raises(ValueError, match="does not fit"):
        tile.program(np.ones((17, 8)), np.ones((17, 8)))
    with pytest.raises(ValueError, match="same shape"):
        tile.program(np.ones((16, 8)), np.ones((16, 7)))
    with pytest.raises(ValueError, match=r"\[g_min, g_max\]"):
        tile.program(good + 30.0, good)
    with pytest.raises(ValueError, match="seed"):
        tile.program(good, good, seed=-1)
    tile.program(good, good, seed=0)
    with pytest.raises(RuntimeError, match="ADC range is not calibrated"):
        tile.mvm(np.zeros((2, 16), np.float32))
    tile.output_range = 100.0
    x = np.zeros((2, 16), np.float32)
    x[1, 3] = np.inf
    with pytest.raises(ValueError, match="1 NaN or Inf"):
        tile.mvm(x)
    with pytest.raises(ValueError, match=r"expected \(batch, 16\)"):
        tile.mvm(np.zeros((2, 15), np.float32))
    with pytest.raises(ValueError, match="dtype"):
        tile.mvm(np.zeros((2, 16), np.int64))
    for t in (-1.0, float("nan"), "1h"):
        with pytest.raises(ValueError, match="t = "):
            tile.at(t)
    with pytest.raises(ValueError, match="output_range"):
        tile.output_range = 0.0
    with pytest.raises(ValueError, match="config"):
        Tile({"rows": 4})
    with pytest.raises(ValueError, match="calibrate the input"):
        Tile(presets.ideal(dac_bits=4, dac_range_mode="calibrated", rows=16, cols=8)).program(
            good, good).calibrate(np.zeros((4, 16)))


def test_ranges_set_before_programming_are_the_ones_the_tile_reads_with(rng):
    """Ranges may be set on an empty tile; programming hands them to the chip, which
    then reads exactly as one given them after programming."""
    cfg = presets.pcm(rows=32, cols=16)
    g_plus, g_minus = random_pair(rng, 32, 16)
    x = rng.uniform(-1, 1, (50, 32))
    early = Tile(cfg)
    assert not early.programmed and early.time == 0.0 and early.counts == TileCounts()
    assert early.input_range is None and early.output_range is None  # calibrated: not yet
    early.input_range, early.output_range = 0.8, 40.0
    assert (early.input_range, early.output_range) == (0.8, 40.0)
    early.program(g_plus, g_minus, seed=2)
    late = Tile(cfg).program(g_plus, g_minus, seed=2)
    late.input_range, late.output_range = 0.8, 40.0
    assert early.programmed and early.shape_used == (32, 16)
    assert (early.input_range, early.output_range) == (0.8, 40.0)
    assert np.array_equal(early.at(60.0).mvm(x), late.at(60.0).mvm(x)) and early.counts == late.counts
    fixed = presets.pcm(rows=32, cols=16, dac_range_mode="fixed", adc_range_mode="fixed")
    assert (Tile(fixed).input_range, Tile(fixed).output_range) == (fixed.dac.range, fixed.adc.range)
    assert Tile(presets.pcm(rows=32, cols=16, dac_range_mode="per_vector")).input_range == 1.0


def test_calibrating_input_then_output_is_calibrating_both(rng):
    cfg = presets.pcm(rows=32, cols=16)
    g_plus, g_minus = random_pair(rng, 32, 16)
    x = rng.uniform(-1, 1, (50, 32))
    both = Tile(cfg).program(g_plus, g_minus, seed=6).calibrate(x)
    apart = Tile(cfg).program(g_plus, g_minus, seed=6).calibrate_input(x).calibrate_output(x)
    assert (apart.input_range, apart.output_range) == (both.input_range, both.output_range)
    assert np.array_equal(apart.mvm(x), both.mvm(x))


def test_a_state_saved_from_another_config_is_refused():
    rng = np.random.default_rng(0)
    tile = Tile(presets.pcm(rows=16, cols=8)).program(*random_pair(rng, 16, 8), seed=0)
    with pytest.raises(ValueError, match="different config"):
        Tile(presets.pcm(rows=16, cols=8, adc_bits=6)).load_state_dict(tile.state_dict())


def test_a_tile_made_in_inference_mode_is_the_tile_made_without_it():
    """Programmed, calibrated and set to a time inside torch.inference_mode(), then
    calibrated again outside it (its ranges written in place): the tile made without it."""
    rng = np.random.default_rng(3)
    cfg = presets.pcm(rows=32, cols=16)
    g_plus, g_minus = random_pair(rng, 32, 16)
    x = rng.uniform(-1, 1, (50, 32))
    plain = Tile(cfg).program(g_plus, g_minus, seed=4)
    with torch.inference_mode():
        made = Tile(cfg).program(g_plus, g_minus, seed=4)
        for tile in (plain, made):
            tile.calibrate(x).at(3600.0)
    for tile in (plain, made):
        tile.calibrate(x * 0.5).at(60.0)
    assert np.array_equal(made.mvm(x), plain.mvm(x)) and made.output_range == plain.output_range
