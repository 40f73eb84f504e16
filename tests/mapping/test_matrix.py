"""AnalogMatrix: mapping scales, drift-compensation inputs, chunking, the weight-level
form of PHYSICS.md section 7, calibration without signal, errors that name the tile,
and bitwise determinism under any thread count."""
import numpy as np
import pytest
import torch

from crossbar import presets
from mapping import AnalogMatrix, MappingConfig
from tests.conftest import needs_cuda, under_thread_counts


def blocks(n, size):
    return [(s, min(s + size, n)) for s in range(0, n, size)]


@pytest.mark.parametrize("scale", ["tile", "column"])
def test_tile_and_column_scales_map_their_own_max_to_the_full_range(rng, scale):
    w = rng.normal(size=(50, 70)) * rng.uniform(0.1, 3.0, size=(50, 1))  # columns of very different size
    cfg = presets.ideal(rows=32, cols=16, g_min=0.0, g_max=20.0)
    a = AnalogMatrix(w, cfg, seed=0, mapping=MappingConfig(scale=scale))
    wt = w.T
    g_plus, g_minus = a.grid.g_prog.numpy().astype(np.float64)
    assert a.grid.grid_shape == (3, 4)
    for (r0, r1) in blocks(70, 32):
        for (c0, c1) in blocks(50, 16):
            span = np.abs(g_plus[r0:r1, c0:c1] - g_minus[r0:r1, c0:c1])
            block = np.abs(wt[r0:r1, c0:c1])
            if scale == "tile":  # the block's largest weight takes the whole range
                assert span.max() == pytest.approx(20.0, rel=1e-6)
                assert np.allclose(span, 20.0 * block / block.max(), atol=1e-4)
            else:  # every column's largest weight does
                assert np.allclose(span.max(axis=0), 20.0, rtol=1e-6)
                assert np.allclose(span, 20.0 * block / block.max(axis=0), atol=1e-4)
    x = rng.uniform(-1, 1, (9, 70)).astype(np.float32)
    assert np.allclose(a.calibrate(x).matmul(x), x @ w.T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("compensation_input", ["calibration", "ones", "one_hot"])
def test_every_compensation_input_restores_the_scale(rng, compensation_input):
    w = rng.normal(0, 1, (64, 128))
    x = rng.uniform(0, 1, (200, 128)).astype(np.float32)
    cfg = presets.pcm(rows=64, cols=64, read_noise_1f=False, read_sigma_abs=0.0, prog_noise_scale=0.0)
    exact = x @ w.T
    a = AnalogMatrix(w, cfg, seed=3, mapping=MappingConfig(compensation_input=compensation_input)).calibrate(x)
    y = a.at(3.15e7).matmul(x)
    gain = np.sum(y * exact) / np.sum(exact * exact)
    assert abs(gain - 1) < 0.1
    assert a.alpha > 1.5  # a year of drift halves the conductances; alpha undoes it


def test_ones_input_reads_every_line_at_full_scale(rng):
    w = rng.normal(0, 1, (8, 20))
    x = rng.uniform(0, 2, (50, 20)).astype(np.float32)
    cfg = presets.ideal(rows=8, cols=8)  # three row blocks, one column block
    a = AnalogMatrix(w, cfg, seed=0, mapping=MappingConfig(compensation_input="ones")).calibrate(x)
    r_in = a.grid.input_range
    expected = np.abs(np.full(20, r_in) @ w.T).mean()
    assert float(a.r0) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("config", [presets.pcm(rows=32, cols=32), presets.ideal(rows=32, cols=32, adc_bits=6)])
def test_chunked_products_equal_one_product_bitwise(rng, config):
    w = rng.normal(size=(40, 75))
    x = rng.normal(size=(101, 75)).astype(np.float32)
    outs, counts = [], []
    for chunk in (7, 10 ** 6):
        a = AnalogMatrix(w, config, seed=5, mapping=MappingConfig(max_rows_per_chunk=chunk))
        a.calibrate(x[:64]).at(3600.0)
        outs.append(a.matmul(x))
        counts.append(a.counts())
    # per-read noise is numbered by output element, so chunks continue one stream
    assert np.array_equal(outs[0], outs[1])
    assert counts[0] == counts[1] and counts[0]["dac_converted"] == 101 * 75 * 2


@pytest.mark.gpu
@needs_cuda
def test_on_cuda_chunks_sized_by_memory_equal_one_product_bitwise(rng):
    w = rng.normal(size=(300, 600))
    x = torch.from_numpy(rng.normal(size=(5000, 600)).astype(np.float32)).cuda()
    outs = []
    for mb in (1, 1024):  # about 1,100 vectors a chunk, then one chunk
        a = AnalogMatrix(w, presets.pcm(rows=256, cols=256), seed=5, mapping=MappingConfig(gpu_chunk_mb=mb))
        a.to("cuda").calibrate(x[:256]).at(3600.0)
        outs.append(a.matmul(x))
    assert a.vectors_per_chunk() >= 5000
    assert torch.equal(outs[0], outs[1])


def test_weight_error_is_the_baselines_sigma(rng):
    """PHYSICS.md 7: Gaussian programming noise sigma_abs, all else ideal, layer max scaling:
    W_read - W has std sqrt(2) sigma_abs / s with s = (g_max - g_min) / max|W|."""
    w = rng.normal(size=(200, 300))
    sigma_abs, g_min, g_max = 1.0, 10.0, 35.0  # g_min 10 sigma above 0: the clamp never acts
    cfg = presets.ideal(rows=128, cols=128).with_path("device", presets.gaussian().device.replace(
        prog_sigma_abs=sigma_abs, g_min=g_min, g_max=g_max))
    a = AnalogMatrix(w, cfg, seed=1, mapping=MappingConfig(drift_compensation=False))
    err = (a.weight_read() - w).ravel()
    expected = np.sqrt(2) * sigma_abs * np.abs(w).max() / (g_max - g_min)
    n = err.size
    assert abs(err.std(ddof=1) / expected - 1) < 5 / np.sqrt(2 * (n - 1))
    assert abs(err.mean()) < 5 * expected / np.sqrt(n)
    assert a.counts()["prog_clamped"] == 0


def test_tiles_without_signal_get_a_range_from_their_conductances(rng):
    w = rng.normal(size=(16, 256))
    x = rng.uniform(0, 1, (300, 256)).astype(np.float32)
    x[:, 64:128] = 0.0  # the second row of tiles never sees a signal (ReLU and pooling do this)
    cfg = presets.pcm(rows=64, cols=64)
    a = AnalogMatrix(w, cfg, seed=2).calibrate(x)
    assert a.grid.counts["adc_range_fallback"].tolist() == [[0], [1], [0], [0]]
    a.at(0.0)  # calibration reads at t = 0
    g_plus, g_minus = a.grid.conductances()[:, 64:128].astype(np.float64)
    expected = a.grid.input_range * np.abs(g_plus - g_minus).sum(axis=0).max()
    assert a.grid.output_ranges()[1, 0] == pytest.approx(expected, rel=1e-6)
    counts = a.counts()
    assert counts["adc_range_fallback"] == 1 and counts["dac_range_fallback"] == 0
    y = a.at(86400.0).matmul(x)
    assert np.all(np.isfinite(y))
    # a layer whose whole sample is zero keeps going too, and says so
    b = AnalogMatrix(w, cfg, seed=2).calibrate(np.zeros((10, 256), np.float32))
    assert b.counts()["dac_range_fallback"] == 1 and b.counts()["adc_range_fallback"] == 4
    assert np.all(np.isfinite(b.at(3600.0).matmul(x)))


def test_sparse_samples_take_their_maximum(rng):
    w = rng.normal(size=(8, 16))
    x = np.zeros((20000, 16), np.float32)
    x[0, 3] = 2.5  # one value in 320000: the 99.99th percentile of |x| is 0
    a = AnalogMatrix(w, presets.ideal(rows=16, cols=8, dac_bits=8, adc_bits=8), seed=0).calibrate(x)
    assert a.grid.input_range == pytest.approx(2.5)
    assert a.counts()["adc_range_fallback"] == 0


def test_errors_inside_a_layer_name_the_layer_and_the_tile(rng):
    a = AnalogMatrix(rng.normal(size=(10, 40)), presets.ideal(rows=16, cols=16), seed=0, name="fc1")
    x = rng.normal(size=(3, 40)).astype(np.float32)
    x[1, 20] = np.nan
    with pytest.raises(ValueError, match=r"layer 'fc1': x contains 1 NaN or Inf values \(the first at input 20, "
                                         r"tile row 1 of 3\)"):
        a.matmul(x)


def test_bitwise_equal_under_any_torch_and_numba_thread_count(rng):
    w = rng.normal(size=(300, 700))
    x = rng.normal(size=(257, 700)).astype(np.float32)
    outs = under_thread_counts(
        lambda: AnalogMatrix(w, presets.pcm(rows=256, cols=256), seed=3).calibrate(x).at(86400.0).matmul(x))
    assert all(np.array_equal(outs[0], o) for o in outs[1:])
