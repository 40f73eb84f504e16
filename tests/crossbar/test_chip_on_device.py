"""Programming and at(t) with torch on the grid's device (``crossbar.chip_on_device``)
against the host path (numpy device models, Numba draws): a seed names the same chip.
On the CPU device the two agree bitwise; on CUDA the float64 logarithms and powers may
differ in their last bit, which the float32 chip rounds away but for a counted few."""
import copy
import warnings

import numpy as np
import pytest
import torch

import mapping
from crossbar import DeviceConfig, presets
from crossbar.chip_draws import row_block_hashes, tile_draws
from crossbar.torch_normals import normals_from_hash, uniforms_from_hash
from crossbar.devices import DEVICE_MODELS
from crossbar.devices.table import table_csv
from crossbar.grid import TileGrid, grids_made_on
from crossbar.rng import stream_key
from crossbar.seeding import derive
from tests.conftest import needs_cuda
from eval.models import build_model
from tests.mapping.test_calibration_sample import ramp_lstm

pytestmark = pytest.mark.gpu

_TABLE = table_csv(np.array([0.0, 5.0, 12.0, 25.0]), prog_mean=np.array([0.2, 5.1, 11.8, 24.0]),
                   prog_std=np.array([0.3, 0.6, 0.9, 1.1]), nu_mean=np.array([0.1, 0.07, 0.05, 0.04]),
                   nu_std=np.array([0.02, 0.015, 0.01, 0.01]), read_std=np.array([0.05, 0.1, 0.2, 0.25]))
FAULTS = dict(stuck_min_fraction=0.03, stuck_max_fraction=0.02)
CONFIGS = {
    "pcm": presets.pcm(rows=32, cols=16),
    "pcm_levels_faults": presets.pcm(rows=32, cols=16, levels=9, g_min=0.5, **FAULTS),
    "pcm_scaled": presets.pcm(rows=32, cols=16, prog_noise_scale=3.0, read_noise_1f_scale=8.0, drift_scale=2.0),
    "reram_faults": presets.reram(rows=24, cols=20, **FAULTS),
    "reram_crosssim": presets.reram(rows=24, cols=20, model="reram_crosssim", g_max=39.0, drift=False),
    "hermes": presets.hermes(rows=32, cols=16, read_sigma_rel=0.01),
    "gaussian": presets.gaussian(rows=16, cols=16, prog_sigma_abs=2.0, prog_sigma_rel=0.05, read_sigma_rel=0.02),
    "ideal": presets.ideal(rows=16, cols=8),
    "table": presets.ideal(rows=32, cols=16).replace(device=DeviceConfig(
        model="table", table_csv=_TABLE, drift=True, g_max=25.0, **FAULTS)),
}
TIMES = (0.0, 1.0, 3600.0, 86400.0, 1.5e5)  # within every fit (reram: 2 days)


def programmed(config, engine, n_in=70, n_out=45, seed=4):
    """A grid programmed by ``engine``'s path (torch: on its device, here the CPU)."""
    g_max = config.device.g_max
    rng = np.random.default_rng(seed)
    g_plus = rng.uniform(config.device.g_min, g_max, (n_in, n_out))
    g_minus = rng.uniform(config.device.g_min, g_max, (n_in, n_out))
    grid = TileGrid(config, n_in, n_out)
    grid.engine = engine
    seeds = [derive(seed, k) for k in range(grid.grid_shape[0] * grid.grid_shape[1])]
    return grid.program(g_plus, g_minus, seeds)


def test_every_device_model_is_held_to_the_host_below():
    assert {config.device.model for config in CONFIGS.values()} == set(DEVICE_MODELS)


def test_a_tiles_draws_are_the_same_computed_per_tile_on_the_host_and_per_row_of_tiles_in_torch():
    grid = programmed(presets.pcm(rows=32, cols=16), "numba")
    columns = grid.column_map()
    keys = np.array([[stream_key(derive(s, 7)) for s in grid.seeds]], np.uint64).reshape(grid.grid_shape)
    keys_t = torch.from_numpy(keys.view(np.int64))[:, columns.tile]
    for uniform, of in ((False, normals_from_hash), (True, uniforms_from_hash)):
        for r, (lo, hi) in enumerate(zip(grid.row_starts[:-1], grid.row_starts[1:])):
            on_device = of(row_block_hashes(keys_t[r], columns, 2, int(hi - lo), (32, 16))).numpy()
            for c, (a, b) in enumerate(zip(grid.col_starts[:-1], grid.col_starts[1:])):
                host = tile_draws(int(keys[r, c]), (2, int(hi - lo), int(b - a)), (32, 16), uniform)
                assert np.array_equal(on_device[:, :, a:b], host)
    # a device keeps its draw whatever part of its tile a matrix uses
    full = tile_draws(int(keys[0, 0]), (2, 32, 16), (32, 16))
    assert np.array_equal(tile_draws(int(keys[0, 0]), (2, 5, 3), (32, 16)), full[:, :5, :3])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_programming_and_every_time_are_bitwise_the_host_chip(name):
    config = CONFIGS[name]
    host, device = programmed(config, "numba"), programmed(config, "torch")
    assert host.grid_shape[0] > 1 and host.grid_shape[1] > 1
    assert torch.equal(host.g_prog, device.g_prog)
    # (reram keeps its targets as the drift state, NaN where a device is stuck)
    assert np.array_equal(host.nu.numpy(), device.nu.numpy(), equal_nan=True)
    for t in TIMES:
        host.at(t)
        device.at(t)
        assert isinstance(device._derived[0], torch.Tensor) and isinstance(host._derived[0], np.ndarray)
        assert np.array_equal(host.conductances(), device.conductances())
        assert np.array_equal(host._gdiff_host, device._gdiff_host)
        assert host._var_uniform == device._var_uniform
        assert (host._var_host is None) == (device._var_host is None)
        if host._var_host is not None:
            assert np.array_equal(host._var_host, device._var_host)
        for count, value in host.counts.items():
            assert np.array_equal(value, device.counts[count]), count
    if config.device.stuck_min_fraction:
        assert host.counts["stuck_min"].sum() > 0 and host.counts["stuck_max"].sum() > 0
    if name == "gaussian":
        assert host.counts["prog_clamped"].sum() > 0  # sigma 2 uS at 0 uS clamps


def _float32_steps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """How many float32 values lie between a and b (0: equal)."""
    ia, ib = (np.asarray(v, np.float32).view(np.int32).astype(np.int64) for v in (a, b))
    return np.abs(ia - ib)


@pytest.mark.parametrize("config", [
    presets.pcm(rows=32, cols=16, read_sigma_rel=0.01).with_path("ir_drop.r_row", 2.0).with_path("ir_drop.r_col", 1.0),
    presets.gaussian(rows=24, cols=20, prog_sigma_abs=3.0, read_sigma_abs=0.1).with_path("ir_drop.r_col", 5.0),
], ids=["both_wires_per_pair_variance", "bit_lines_only_clamps"])
def test_with_wires_at_t_on_the_device_is_the_host_chip_but_for_float64_rounding(config):
    host, device = programmed(config, "numba"), programmed(config, "torch")
    for t in (0.0, 86400.0):
        host.at(t)
        device.at(t)
        assert np.array_equal(host.conductances(), device.conductances())  # the devices themselves: bitwise
        for a, b in ((host._gdiff_host, device._gdiff_host), (host.read_variance(), device.read_variance())):
            # through the wires: LAPACK's tridiagonal factors against dense ones, 1e-12 apart in float64
            steps = _float32_steps(a, b)
            assert steps.max() <= 1 and np.count_nonzero(steps) <= max(1, a.size // 1000)
        assert np.array_equal(host.counts["read_clamped"], device.counts["read_clamped"])
    assert host.counts["prog_clamped"].sum() > 0 or config.device.model == "pcm"  # devices at 0: attenuation 1


def test_the_chip_moves_with_the_grid_and_reads_the_same_on_either_engine():
    device = programmed(presets.pcm(rows=32, cols=16), "torch").at(3600.0)
    host = programmed(presets.pcm(rows=32, cols=16), "numba").at(3600.0)
    device.engine = "auto"  # the Numba engine: it reads what torch derived, through host copies
    x = np.random.default_rng(1).uniform(-1, 1, (30, 70)).astype(np.float32)
    for grid in (device, host):
        grid.calibrate(x)
    assert np.array_equal(device.output_ranges(), host.output_ranges())
    assert np.array_equal(device.product(x), host.product(x))
    device.double()  # a cast moves nothing (crossbar.precision): what at(t) derived is kept
    assert device._derived is not None and device._read_at_time is None
    assert np.array_equal(device.at(3600.0).product(x), host.at(3600.0).product(x))


def test_convert_programs_on_the_device_grids_are_made_on():
    torch.manual_seed(0)
    net = build_model("cnn", (1, 12, 12), 10).eval()
    config = presets.pcm(rows=32, cols=32)
    host = mapping.convert(net, config, seed=5)
    with grids_made_on("cpu", engine="torch"):
        on_device = mapping.convert(net, config, seed=5)
    pairs = [(la, lb) for (_, la), (_, lb) in zip(host.analog_layers(), on_device.analog_layers())]
    grids = [(a.grid, b.grid) for la, lb in pairs for a, b in zip(la.matrices, lb.matrices)]
    assert grids and all(b.engine == "torch" and isinstance(b._derived[0], torch.Tensor) for _, b in grids)
    assert all(torch.equal(a.g_prog, b.g_prog) and torch.equal(a.nu, b.nu) for a, b in grids)
    x = torch.randn(8, 1, 12, 12)
    for model in (host, on_device):
        model.calibrate([x])
        model.at(86400.0)
    assert all(np.array_equal(a.conductances(), b.conductances()) for a, b in grids)
    assert all(np.array_equal(a.output_ranges(), b.output_ranges()) for a, b in grids)


def test_grids_made_on_refuses_an_unknown_engine_or_device_and_restores_the_outer_setting():
    with pytest.raises(ValueError, match="engine = 'cuda' is invalid"):
        with grids_made_on("cpu", engine="cuda"):
            pass
    with pytest.raises(ValueError, match="device = 'gpu' is invalid: expected None or a torch device"):
        with grids_made_on("gpu"):
            pass
    with pytest.raises(ValueError, match="device = 'gpu' is invalid: expected None or a torch device"):
        TileGrid(presets.ideal(rows=8, cols=8), 4, 4, device="gpu")
    with grids_made_on("cpu", engine="torch"):
        with grids_made_on(None):
            assert TileGrid(presets.ideal(rows=8, cols=8), 4, 4).engine == "numba"
        assert TileGrid(presets.ideal(rows=8, cols=8), 4, 4).engine == "torch"
    assert TileGrid(presets.ideal(rows=8, cols=8), 4, 4).engine == "numba"


@needs_cuda
@pytest.mark.parametrize("name", ["pcm_levels_faults", "reram_faults", "hermes", "table"])
def test_on_cuda_the_chip_is_the_host_chip_but_for_a_counted_last_bit(name):
    config = CONFIGS[name]
    host = programmed(config, "numba", n_in=300, n_out=200)
    with grids_made_on("cuda"):
        device = programmed(config, "torch", n_in=300, n_out=200)
    assert device.g_prog.is_cuda
    for t in (0.0, 86400.0):
        host.at(t)
        device.at(t)
        for a, b in ((host.g_prog.numpy(), device.g_prog.cpu().numpy()), (host.conductances(), device.conductances())):
            steps = _float32_steps(a, b)
            assert steps.max() <= 1 and np.count_nonzero(steps) <= max(1, a.size // 10 ** 6)
        assert np.array_equal(host.counts["stuck_min"], device.counts["stuck_min"])


@needs_cuda
def test_convert_to_cuda_programs_there_and_runs_the_host_chip():
    torch.manual_seed(0)
    net = build_model("cnn", (1, 12, 12), 10).eval()
    config = presets.pcm(rows=32, cols=32)
    host = mapping.convert(net, config, seed=5)
    on_cuda = mapping.convert(net, config, seed=5, device="cuda")
    x = torch.randn(16, 1, 12, 12)
    host.calibrate([x])
    on_cuda.calibrate([x.cuda()])
    for (_, la), (_, lb) in zip(host.analog_layers(), on_cuda.analog_layers()):
        for a, b in zip(la.matrices, lb.matrices):
            assert b.grid.g_prog.is_cuda and isinstance(b.grid._derived[0], torch.Tensor)
            steps = _float32_steps(a.grid.g_prog.numpy(), b.grid.g_prog.cpu().numpy())
            assert steps.max() <= 1
            # calibrated on the GPU: its products round in cuBLAS's order, a percentile moves by as little
            assert np.allclose(a.grid.output_ranges(), b.grid.output_ranges(), rtol=1e-5, atol=0)



@pytest.mark.parametrize("config", [
    presets.pcm(rows=32, cols=16),  # per-read noise: uniform variance
    presets.hermes(rows=32, cols=16, read_sigma_rel=0.02, dac_range_mode="per_vector"),  # per-pair variance
    presets.pcm(rows=32, cols=16, dac_bits=7).replace(dac=presets.pcm().dac.replace(bits=7, bits_per_cycle=2)),
], ids=["uniform_variance", "per_pair_variance_per_vector", "bit_serial"])
def test_calibration_on_the_device_sets_the_host_ranges(config):
    host, device = programmed(config, "numba"), programmed(config, "torch")
    x = np.random.default_rng(3).uniform(-1, 1, (50, 70)).astype(np.float32)
    x[:, 32:64] = 0.0  # the second row of tiles sees no signal: its ranges fall back
    for grid in (host, device):
        grid.calibrate(x)
    assert np.array_equal(host.output_ranges(), device.output_ranges())
    assert host.input_range == device.input_range
    assert np.array_equal(host.counts["adc_range_fallback"], device.counts["adc_range_fallback"])
    assert host.counts["adc_range_fallback"][1].all() and not host.counts["adc_range_fallback"][0].any()


def test_a_chip_derived_on_the_device_saves_loads_and_copies_as_it_reads():
    torch.manual_seed(0)
    net = build_model("cnn", (1, 12, 12), 10).eval()
    config = presets.pcm(rows=32, cols=32)
    with grids_made_on("cpu", engine="torch"):
        on_device = mapping.convert(net, config, seed=5)
    x = torch.randn(8, 1, 12, 12)
    on_device.calibrate([x])
    on_device.at(3600.0)
    loaded = mapping.convert(net, config, seed=9)  # another chip, made on the host
    loaded.load_state_dict(on_device.state_dict())
    copied = copy.deepcopy(on_device)
    grids = [layer.matrices[0].grid for _, layer in on_device.analog_layers()]
    for other in (loaded, copied):
        others = [layer.matrices[0].grid for _, layer in other.analog_layers()]
        assert all(np.array_equal(a.conductances(), b.conductances()) for a, b in zip(grids, others))
    y = on_device(x)
    assert torch.equal(copied(x), y) and torch.equal(loaded(x), y)


def _cnn_and_input():
    torch.manual_seed(0)
    return build_model("cnn", (1, 12, 12), 10).eval(), torch.randn(8, 1, 12, 12)


@pytest.mark.parametrize("model", [_cnn_and_input, lambda: (ramp_lstm()[0], ramp_lstm()[1][:16])],
                         ids=["cnn_first_rows", "lstm_reservoir"])
def test_a_model_calibrates_on_the_grids_device_to_the_host_ranges_without_fetching_its_sample(model, monkeypatch):
    """The layers keep their samples as tensors where their inputs are and the torch
    engine takes the DAC percentile there: on the CPU device nothing bigger than a
    percentile's two order statistics or the per-tile ranges becomes a numpy array (a
    sample did, before), and the ranges, the drift
    compensation reference and r0 are the host's bitwise."""
    net, x = model()
    config = presets.pcm(rows=32, cols=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        host = mapping.convert(net, config, seed=5)
        with grids_made_on("cpu", engine="torch"):
            device = mapping.convert(net, config, seed=5)
    host.calibrate([x])
    fetched = []
    to_numpy = torch.Tensor.numpy
    monkeypatch.setattr(torch.Tensor, "numpy", lambda t, **kw: fetched.append(t.numel()) or to_numpy(t, **kw))
    device.calibrate([x])
    monkeypatch.undo()
    # what does reach the host: two order statistics, and each grid's (R, C) ranges
    matrices = [m for _, layer in device.analog_layers() for m in layer.matrices]
    smallest_sample = min(m.compensation_x.shape[0] * m.shape[1] for m in matrices)
    assert max(fetched) <= max(2, max(m.n_tiles for m in matrices)) < smallest_sample
    for (_, a), (_, b) in zip(host.analog_layers(), device.analog_layers()):
        for m, n in zip(a.matrices, b.matrices):
            assert n.grid.engine == "torch" and m.grid.engine == "numba"
            assert m.grid.input_range == n.grid.input_range
            assert np.array_equal(m.grid.output_ranges(), n.grid.output_ranges())
            assert torch.equal(m.compensation_x, n.compensation_x) and torch.equal(m.r0, n.r0)


@pytest.mark.parametrize("engine", ["numba", "torch"])
def test_a_calibration_sample_with_nan_or_inf_is_refused_naming_the_layer(engine):
    with grids_made_on("cpu", engine=engine):
        matrix = mapping.AnalogMatrix(np.ones((4, 6)), presets.pcm(rows=8, cols=8), seed=0, name="fc")
    x = torch.ones(5, 6)
    x[1, 2], x[3, 0] = float("nan"), float("inf")
    with pytest.raises(ValueError, match=r"layer 'fc': calibration input has 2 NaN or Inf values"):
        matrix.calibrate(x)
