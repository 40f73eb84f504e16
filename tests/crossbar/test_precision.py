"""Analog products round as IEEE float32 whatever the process's TF32 / bfloat16 settings
(crossbar.precision): the settings are switched for the products and restored after,
also when blocks nest or overlap across threads. This CPU ignores those settings, so
the tests record what the products ran under; on a GPU the CUDA test compares outputs."""
import threading
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from crossbar import precision, presets
from crossbar.precision import _switches, ieee_float32
from mapping import convert
from tests.conftest import REDUCED, ieee, needs_cuda
from tests.crossbar.test_grid import programmed_grid

def settings() -> list:
    return list(precision.settings().values())


def test_switches_cover_cuda_matrix_products_and_convolutions():
    owners = [owner for _, owner, _, _ in _switches()]
    assert torch.backends.cuda.matmul in owners
    assert any(owner in (torch.backends.cudnn, getattr(torch.backends.cudnn, "conv", None)) for owner in owners)


def test_settings_name_each_switch_and_read_its_value_now(reduced_precision):
    names = list(precision.settings())
    assert names == [name for name, *_ in _switches()]
    assert any(name.startswith("cudnn.") for name in names) and any(name.startswith("cuda.matmul.") for name in names)
    for name, value in precision.settings().items():
        assert value == REDUCED[name.rsplit(".", 1)[1]]
    with ieee_float32():
        assert settings() == ieee()


def test_blocks_set_ieee_and_restore_when_nested_and_across_threads(reduced_precision):
    before = settings()
    assert before != ieee()
    entered, release = threading.Event(), threading.Event()
    seen = {}

    def other_thread():
        with ieee_float32():
            entered.set()
            release.wait(10)
            seen["late"] = settings()

    with ieee_float32():
        assert settings() == ieee()
        with ieee_float32():
            assert settings() == ieee()
        assert settings() == ieee()
        worker = threading.Thread(target=other_thread)
        worker.start()
        entered.wait(10)
    # the other thread's block is still open: its products must stay IEEE
    assert settings() == ieee()
    release.set()
    worker.join()
    assert seen["late"] == ieee()
    assert settings() == before


def test_settings_are_restored_when_the_block_raises(reduced_precision):
    before = settings()
    with pytest.raises(ZeroDivisionError):
        with ieee_float32():
            1 / 0
    assert settings() == before


def recorder(monkeypatch, owner, name):
    """Replace owner.name by a wrapper that records the settings at each call."""
    calls = []
    original = getattr(owner, name)

    def recording(*args, **kwargs):
        calls.append(settings())
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, recording)
    return calls


@pytest.mark.parametrize("engine", ["numba", "torch"])
def test_grid_products_run_in_ieee_float32(monkeypatch, reduced_precision, engine):
    grid, *_ = programmed_grid(presets.pcm(rows=16, cols=8, adc_bits=None, dac_bits=None), 40, 12, seed=1)
    grid.engine = engine
    x = np.random.default_rng(0).uniform(-1, 1, (5, 40)).astype(np.float32)
    calls = recorder(monkeypatch, torch, "mm")
    grid.product(torch.from_numpy(x) if engine == "torch" else x)
    assert len(calls) >= grid.grid_shape[0] and all(c == ieee() for c in calls)


@pytest.mark.parametrize("engine", ["numba", "torch"])
def test_a_converted_models_pass_runs_in_ieee_float32_and_restores(monkeypatch, reduced_precision, engine):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analog = convert(model, presets.pcm(rows=16, cols=8), seed=0)
    analog.set_engine(engine)
    x = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    analog.calibrate([x])
    before = settings()
    convolutions = recorder(monkeypatch, F, "conv2d")
    products = recorder(monkeypatch, torch, "mm")
    analog(x)
    assert convolutions and products
    assert all(c == ieee() for c in convolutions + products)
    assert settings() == before


@pytest.mark.parametrize("engine", ["numba", "torch"])
def test_autocast_is_off_in_an_analog_pass_and_on_after_it(engine):
    """torch.autocast (common around GPU inference) would run the products in bfloat16
    (float16 on CUDA): an analog pass under it equals one without it, bitwise, and the
    block's own products are autocast again after the pass."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()
    x = torch.rand(4, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    outputs = []
    for autocast in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            analog = convert(model, presets.pcm(rows=16, cols=8), seed=0)
        analog.set_engine(engine).calibrate([x])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            outputs.append(analog.at(3600.0)(x))
            assert (x[0, 0] @ x[0, 0]).dtype == (torch.bfloat16 if autocast else torch.float32)
    assert outputs[1].dtype == torch.float32
    assert torch.equal(outputs[1], outputs[0])
    grid, *_ = programmed_grid(presets.pcm(rows=16, cols=8, adc_bits=None, dac_bits=None), 40, 12, seed=1)
    grid.engine = engine
    v = np.random.default_rng(0).uniform(-1, 1, (5, 40)).astype(np.float32)
    v = torch.from_numpy(v) if engine == "torch" else v
    plain = grid.product(v)
    grid.at(0.0)  # the same reads again
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = grid.product(v)
    assert np.array_equal(np.asarray(autocast), np.asarray(plain))


@pytest.mark.gpu
@needs_cuda
def test_on_cuda_a_convolution_under_tf32_settings_equals_the_cpu_engine(reduced_precision):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1)).eval()
    config = presets.pcm(rows=64, cols=16, read_sigma_abs=0.0, adc_bits=8, dac_bits=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analog = convert(model, config, seed=0)
    x = torch.rand(8, 16, 12, 12, generator=torch.Generator().manual_seed(1))
    analog.calibrate([x])
    analog.set_engine("torch")
    cpu = analog.at(3600.0)(x)
    on_gpu = analog.to("cuda").at(3600.0)(x.cuda()).cpu()
    step = float(analog.module[0].matrices[0].grid.output_ranges().max()) / 127
    scale = float(analog.module[0].matrices[0].divisor.min())
    differ = (on_gpu - cpu).abs() > 1e-4 * cpu.abs().max()
    # float32 product rounding alone moves a column sum across an ADC step rarely; TF32 would on percents
    assert differ.float().mean().item() < 0.005
    assert (on_gpu - cpu).abs().max().item() <= 1.01 * step / scale * float(analog.module[0].matrices[0].alpha)
