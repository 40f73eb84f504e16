"""The torch engine (what runs on GPUs) against the Numba engine on the CPU device: the
same outputs and counts bitwise with noise off, and with per-read noise on equal but
for values on an ADC step edge (float64 variance sums in another order), which are
counted; the exact re-read of the outputs whose normals the fast path rejected. Tests
that need CUDA skip without it."""
import numpy as np
import pytest
import torch

from crossbar import deferred, fused, presets, rng, torch_engine, torch_normals
from tests.conftest import needs_cuda
from tests.crossbar.test_grid import programmed_grid

pytestmark = pytest.mark.gpu


def both_engines(config, n_in, n_out, x, t=3600.0, calibrate=True):
    grid, *_ = programmed_grid(config, n_in, n_out, seed=2)
    if calibrate:
        grid.calibrate(x[:40])
    results = {}
    for engine in ("numba", "torch"):
        grid.engine = engine
        grid.at(t)
        grid.reset_counts()
        y = grid.product(torch.from_numpy(x) if engine == "torch" else x)
        y = y.numpy() if isinstance(y, torch.Tensor) else y
        results[engine] = (y, grid.count_totals())
    return results, grid


CONFIGS = [
    presets.ideal(rows=32, cols=16, dac_bits=8, adc_bits=8),
    presets.ideal(rows=24, cols=20, dac_bits=5, adc_bits=6, dac_range_mode="per_vector"),
    presets.ideal(rows=64, cols=64, dac_bits=1, adc_bits=1),
    presets.ideal(rows=40, cols=8, dac_bits=None, adc_bits=None),
    presets.pcm(rows=32, cols=32, read_sigma_abs=0.0),   # drift and 1/f, no per-read noise
]


@pytest.mark.parametrize("config", CONFIGS)
def test_noise_off_the_engines_agree_bitwise(config):
    x = np.random.default_rng(5).uniform(-1, 1, (70, 90)).astype(np.float32)
    results, grid = both_engines(config, 90, 50, x)
    assert grid.grid_shape[0] > 1 and grid.grid_shape[1] > 1 or config.rows == 64
    (y_n, c_n), (y_t, c_t) = results["numba"], results["torch"]
    assert np.array_equal(y_n, y_t)
    assert c_n == c_t


@pytest.mark.parametrize("config", [presets.pcm(rows=32, cols=16),  # uniform per-read noise: row sums
                                    presets.gaussian(rows=48, cols=24, read_sigma_rel=0.05),  # per-pair variance
                                    presets.pcm(rows=32, cols=16, dac_range_mode="per_vector")])
def test_noise_on_the_engines_agree_but_for_step_edges(config):
    x = np.random.default_rng(6).uniform(-1, 1, (200, 100)).astype(np.float32)
    results, grid = both_engines(config, 100, 40, x)
    (y_n, c_n), (y_t, c_t) = results["numba"], results["torch"]
    differ = y_n != y_t
    # a variance summed in another order moves a value by ~1e-16 relative: it changes
    # the ADC's rounding only within that distance of a step edge, a tiny fraction
    assert differ.mean() <= 1e-3
    assert np.allclose(y_n, y_t, rtol=0, atol=float(np.abs(y_n).max()) * 0.05)
    assert abs(c_n["adc_saturated"] - c_t["adc_saturated"]) <= int(differ.sum())
    assert c_n["dac_clipped"] == c_t["dac_clipped"]


def test_consecutive_products_continue_each_tiles_stream_on_both_engines():
    config = presets.pcm(rows=32, cols=16)
    x = np.random.default_rng(7).uniform(-1, 1, (60, 50)).astype(np.float32)
    grid, *_ = programmed_grid(config, 50, 30, seed=3)
    grid.calibrate(x)
    grid.at(10.0)
    whole = grid.product(x)
    grid.engine = "torch"
    grid.at(10.0)
    parts = torch.cat([grid.product(torch.from_numpy(x[:25])), grid.product(torch.from_numpy(x[25:]))]).numpy()
    assert (parts != whole).mean() <= 1e-3


def test_worst_case_ranges_are_uploaded_when_they_change_not_at_every_read():
    """Worst-case ADC ranges follow the DAC range: a copy from the host (which waits
    for a GPU) when that range changes, never per read; the engines agree on both."""
    config = presets.ideal(rows=24, cols=16, dac_bits=6, adc_bits=6, adc_range_mode="worst_case")
    x = np.random.default_rng(5).uniform(-1, 1, (40, 50)).astype(np.float32)
    grid, *_ = programmed_grid(config, 50, 30, seed=1)
    grid.calibrate(x)
    uploads = []
    for input_range in (grid.input_range, 0.5 * grid.input_range):
        grid.set_input_range(input_range)
        grid.engine = "numba"
        want = grid.product(x)
        grid.engine = "torch"
        for _ in range(2):
            assert np.array_equal(grid.product(torch.from_numpy(x)).numpy(), want)
            uploads.append(grid._uploaded_ranges[1])
        assert np.array_equal(uploads[-1].numpy(), grid.output_ranges())
    assert uploads[0] is uploads[1] and uploads[2] is uploads[3]  # not per read
    assert uploads[1] is not uploads[2]                           # but after the change


def test_torch_engine_refuses_inputs_it_cannot_take():
    config = presets.ideal(rows=16, cols=16)
    x = np.random.default_rng(8).uniform(-1, 1, (10, 20)).astype(np.float32)
    grid, *_ = programmed_grid(config, 20, 10)
    grid.calibrate(x)
    grid.engine = "torch"
    with pytest.raises(ValueError, match="torch.Tensor"):
        grid.product(x)
    bad = torch.from_numpy(x.copy())
    bad[3, 17] = float("nan")
    with pytest.raises(ValueError, match="input 17, tile row 1 of 2"):
        grid.product(bad)
    with pytest.raises(ValueError, match="engine = 'cuda' is invalid"):
        grid.engine = "cuda"


def test_walks_longer_than_one_call_are_finished_and_read_again(monkeypatch):
    """Outputs that drew a rejected normal are read again with exact normals, their
    walks stepped _EXACT_STEPS times in one call; the rare longer walks are finished
    after it. With two steps, and then one step per round, many walks outlast the
    call: the outputs and counts must not change."""
    config = presets.pcm(rows=32, cols=24).with_path("adc.noise_sigma", 0.5)  # both noise streams
    x = np.random.default_rng(11).uniform(-1, 1, (120, 70)).astype(np.float32)
    grid, *_ = programmed_grid(config, 70, 50, seed=8)
    grid.calibrate(x[:40])
    grid.engine = "torch"
    finished = []
    original = torch_normals.finish_walks
    monkeypatch.setattr(torch_engine, "finish_walks", lambda *a: finished.append(1) or original(*a))
    results = []
    for exact_steps, rounds in ((torch_engine._EXACT_STEPS, torch_normals.ROUNDS), (2, 1)):
        monkeypatch.setattr(torch_engine, "_EXACT_STEPS", exact_steps)
        monkeypatch.setattr(torch_normals, "ROUNDS", rounds)
        grid.at(60.0)
        grid.reset_counts()
        results.append((grid.product(torch.from_numpy(x)), grid.count_totals(), len(finished)))
    (y0, c0, n0), (y1, c1, n1) = results
    assert n1 > n0  # the short walks ran out, and were finished
    assert torch.equal(y0, y1) and c0 == c1


def test_an_exact_re_read_of_one_output_equals_its_re_read_among_others_and_its_fast_read():
    """A re-read of a single tile output gives the value it gets among others, and, for
    an output whose normal took the fast path, the fast read's value: the flat index
    finds the same row block, vector and column as the fast read's layout."""
    generator = torch.Generator().manual_seed(4)
    blocks, vectors, n_out = 2, 5, 3
    args = torch_engine._ReadArgs(
        torch.randn(blocks, vectors, n_out, generator=generator), None,
        torch.rand(blocks, vectors, generator=generator, dtype=torch.float64),
        torch.full((blocks, n_out), 2.0, dtype=torch.float64), 127, None, None, 0.0, None,
        torch.rand(blocks, n_out, generator=generator) + 0.5)
    keys = (torch.arange(blocks * n_out, dtype=torch.int64).view(blocks, n_out) * 7919 + 3,)
    columns = torch_engine.column_map([0, 2, 3], "cpu")
    first = torch.tensor(4, dtype=torch.int64)
    fast, _, rejected = torch_engine._read_fast(*args, keys, (1.0,), first + torch.arange(vectors),
                                                columns.width, columns.offset,
                                                *torch_normals.tables(torch.device("cpu"))[:2])
    width = vectors * n_out + 1
    taken = [f for f in range(width, 2 * width - 1) if not rejected[f]]  # row block 1, fast path taken
    one = torch.tensor([taken[len(taken) // 2]])
    alone, _ = torch_engine._read_exact(args, keys, (1.0,), one, first, columns, fused=False)
    among, _ = torch_engine._read_exact(args, keys, (1.0,), torch.tensor([2, int(one), 9]), first, columns,
                                        fused=False)
    assert alone.shape == (1,) and torch.equal(alone, among[1:2])
    assert torch.equal(alone[0], fast.view(-1)[one[0]])


@pytest.mark.parametrize("half,errors,scaled,read_noise", [
    (127, False, False, True), (0, False, False, True), (-1, False, False, True), (7, True, True, True),
    (0, True, False, False), (127, True, False, True)])
def test_the_outputs_read_again_are_those_whose_normals_the_hashes_reject(half, errors, scaled, read_noise):
    """The fast read-out marks an output that drew a rejected normal by a NaN carried to
    its value, and finds the outputs to read again by their NaNs: for every ADC setting
    (a 1-bit ADC's sign, errors, nonlinearity, per-vector scales, none at all) they are
    exactly the outputs whose hashes the ziggurat rejects, and no value is NaN else."""
    generator = torch.Generator().manual_seed(9)
    blocks, vectors, n_out = 2, 60, 7

    def uniform(*shape):
        return torch.rand(*shape, generator=generator, dtype=torch.float64)

    args = torch_engine._ReadArgs(
        torch.randn(blocks, vectors, n_out, generator=generator) * 3, None,
        uniform(blocks, vectors) if read_noise else None, uniform(blocks, n_out) + 1.0, half,
        1.0 + 0.05 * uniform(blocks, n_out) if errors else None, 0.3 * uniform(blocks, n_out) if errors else None,
        0.4 if errors else 0.0, uniform(blocks, vectors) + 0.5 if scaled else None,
        torch.rand(blocks, n_out, generator=generator) + 0.5)
    streams = [torch.arange(blocks * n_out, dtype=torch.int64).view(blocks, n_out) * 7919 + s for s in (3, 11)]
    keys, factors = (streams, (1.0, 0.5)) if read_noise else (streams[1:], (0.5,))
    if not errors:
        keys, factors = keys[:1], factors[:1]
    columns = torch_engine.column_map([0, 3, 7], "cpu")
    numbers = 10 ** 9 + torch.arange(vectors)
    kn, wn, _ = torch_normals.tables(torch.device("cpu"))
    values, _, rejected = torch_engine._read_fast(*args, tuple(keys), factors, numbers, columns.width,
                                                  columns.offset, kn, wn)
    counters = numbers[:, None] * columns.width + columns.offset
    want = torch.zeros(blocks, vectors, n_out, dtype=torch.bool)
    for key in keys:
        want |= ~torch_normals.fast_path(torch_normals.counter_hash(key[:, None, :], counters), kn, wn)[1]
    want = torch.cat([want.view(blocks, -1), torch.zeros(blocks, 1, dtype=torch.bool)], dim=1).view(-1)
    assert want.sum() >= 10  # about 2.7% of each stream's 840 normals
    assert torch.equal(rejected, want) and torch.equal(values.isnan().view(-1), want)


def _step_differences(got, want, grid):
    """(fraction of outputs that differ, largest difference in ADC steps of the widest
    tile range times the row blocks that sum into an output)."""
    step = float(grid.output_ranges().max()) / 127
    return float((got != want).mean()), float(np.abs(got - want).max()) / (step * grid.grid_shape[0])


@needs_cuda
@pytest.mark.parametrize("read_sigma_abs", [0.0, 1.0])  # noise off, then on
def test_on_cuda_the_grid_equals_the_cpu_engine(read_sigma_abs):
    config = presets.pcm(rows=64, cols=32, read_sigma_abs=read_sigma_abs)
    x = np.random.default_rng(9).uniform(-1, 1, (4096, 100)).astype(np.float32)
    grid, *_ = programmed_grid(config, 100, 70, seed=4)
    grid.calibrate(x[:256])
    grid.at(86400.0)
    want = grid.product(x)
    cpu_conductances = grid.conductances().copy()
    grid.to("cuda")
    assert grid.engine == "torch"
    grid.at(86400.0)  # the same chip, and per-read noise numbered from the first vector again
    assert np.array_equal(grid.conductances(), cpu_conductances)
    got = grid.product(torch.from_numpy(x).cuda()).cpu().numpy()
    differ, steps = _step_differences(got, want, grid)
    # cuBLAS sums the products in another order (and fused kernels may contract a
    # multiply-add): an output on an ADC step edge can round the other way, one step
    assert differ <= 0.01, differ
    assert steps <= 1.0 + 1e-6, steps


@pytest.mark.slow
def test_fused_kernels_equal_the_eager_engine_bitwise(monkeypatch):
    """The GPU's fused kernels (torch.compile), compiled here for the CPU, against the
    eager torch engine: the same normals (rejections and tail included), DAC (values
    beyond the range clipped), read-outs with per-read noise and every ADC error, and
    counts."""
    config = presets.pcm(rows=48, cols=40).with_path("adc.offset_sigma", 0.4).with_path(
        "adc.gain_sigma", 0.02).with_path("adc.noise_sigma", 0.5).with_path("adc.nonlinearity", 0.3)
    x = np.random.default_rng(10).uniform(-1, 1, (300, 100)).astype(np.float32)
    grid, *_ = programmed_grid(config, 100, 90, seed=6)
    grid.calibrate(x[:64])
    grid.engine = "torch"
    results, clipped = [], []
    for setting in ("0", "1"):
        monkeypatch.setenv(fused.FUSED_ENV, setting)
        grid.at(3600.0)
        grid.reset_counts()
        results.append((grid.product(torch.from_numpy(x)), grid.count_totals(),
                        torch_normals.counter_normals(77, 2 ** 40, 100_000)))
        clipped.append(grid.counts["dac_clipped"][:, 0].copy())  # per row block
    grid.at(3600.0)  # and compiled, with the checks deferred (the bounded exact re-read)
    grid.reset_counts()
    with deferred.deferred_checks() as checks:
        y2 = grid.product(torch.from_numpy(x))
    assert not checks.failed()
    (y0, c0, z0), (y1, c1, z1) = results
    assert torch.equal(y0, y1) and c0 == c1
    assert np.array_equal(clipped[0], clipped[1]) and len(set(clipped[0])) == 3 and 0 < c0["dac_clipped"]
    assert torch.equal(y0, y2) and grid.count_totals() == c0
    assert torch.equal(z0, z1) and np.array_equal(z1.numpy(), rng.counter_normals(np.uint64(77), np.uint64(2 ** 40),
                                                                                   100_000))


def test_the_exact_re_reads_walks_compile_once_whatever_the_read_settings_and_row_blocks(monkeypatch):
    """The walks of an exact re-read, compiled apart from its read: one variant for
    grids of one row block and of several, ADC errors on and off, checked and deferred
    reads, where the read itself compiles a variant per setting (resnet20: the walks,
    unrolled in each read variant, were 265 s of a 291 s cold start on 2 CPU cores);
    and one row block or several compile no variant of their own (a size of 1 is not
    specialized on). Traced by dynamo with an eager backend that counts the variants
    (no kernels built)."""
    variants = {}
    real_compile = torch.compile

    def counting_compile(fn, **options):
        def backend(graph, example_inputs):
            variants[fn.__name__] = variants.get(fn.__name__, 0) + 1
            return graph.forward
        return real_compile(fn, backend=backend, **options)

    monkeypatch.setattr(torch, "compile", counting_compile)
    monkeypatch.setenv(fused.FUSED_ENV, "1")
    fused.fused_version.cache_clear()
    torch._dynamo.reset()  # no variant compiled by an earlier test is reused
    try:
        x = np.random.default_rng(12).uniform(-1, 1, (200, 90)).astype(np.float32)
        for rows, errors in ((96, False), (32, False), (32, True)):
            config = presets.pcm(rows=rows, cols=40)
            if errors:
                config = config.with_path("adc.gain_sigma", 0.02).with_path("adc.nonlinearity", 0.3)
            grid, *_ = programmed_grid(config, 90, 50, seed=3)
            grid.calibrate(x[:40])
            grid.engine = "torch"
            grid.at(60.0)
            grid.product(torch.from_numpy(x))
            with deferred.deferred_checks() as checks:
                grid.product(torch.from_numpy(x))
            assert not checks.failed()
    finally:
        fused.fused_version.cache_clear()
        torch._dynamo.reset()
    # a read compiles a variant with ADC errors and one without, each for one row block and several
    assert variants["_read_fast"] == variants["_read_at"] == 2
    assert variants["_walked_normals"] == variants["column_counts"] == 1
