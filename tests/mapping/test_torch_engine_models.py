"""Whole converted models on the torch engine (the GPU path, here on the CPU device)
against the Numba engine: linear, convolution (both conv paths), transposed and 3-d
convolution layers, drift
compensation, counts and state_dict round trips."""
import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from crossbar import presets
from mapping import convert
from tests.conftest import needs_cuda

pytestmark = pytest.mark.gpu


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, stride=2, groups=2),
                         nn.ReLU(), nn.ConvTranspose2d(6, 4, 3, stride=2, padding=2, output_padding=1), nn.ReLU(),
                         nn.Unflatten(1, (1, 4)), nn.Conv3d(1, 2, (2, 3, 3), stride=(1, 2, 2)), nn.ReLU(),
                         nn.Flatten(), nn.Linear(2 * 3 * 5 * 5, 10)).eval()


def converted(config, seed=0, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert(small_cnn(), config, seed=seed, **kwargs)


def run_both(config, x, per_vector_unrolled=False):
    analog = converted(config)
    analog.calibrate([x])
    outs = {}
    for engine in ("numba", "torch"):
        analog.set_engine(engine)
        analog.at(86400.0)
        analog.reset_counts()
        outs[engine] = (analog(x), analog.counts())
    return outs


X = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("config", [presets.pcm(rows=32, cols=16, read_sigma_abs=0.0),
                                    presets.ideal(rows=20, cols=8, dac_bits=6, adc_bits=5, dac_range_mode="per_vector")])
def test_noise_off_models_agree_bitwise_with_counts(config):
    outs = run_both(config, X)
    (y_n, c_n), (y_t, c_t) = outs["numba"], outs["torch"]
    assert torch.equal(y_n, y_t)
    assert c_n == c_t


def test_noise_on_models_agree_but_for_step_edges():
    outs = run_both(presets.pcm(rows=32, cols=16), X)
    (y_n, c_n), (y_t, c_t) = outs["numba"], outs["torch"]
    # the logits pass through three ADC stages: a step-edge flip upstream moves them a little
    assert (y_n != y_t).float().mean() <= 0.05
    assert torch.allclose(y_n, y_t, atol=0.02 * float(y_n.abs().max()))
    for layer in c_n:
        assert c_n[layer]["dac_converted"] == c_t[layer]["dac_converted"]
        assert abs(c_n[layer]["adc_saturated"] - c_t[layer]["adc_saturated"]) <= 0.01 * c_n[layer]["adc_converted"]


def test_a_torch_engine_chip_saves_and_loads_as_the_numba_one():
    config = presets.pcm(rows=32, cols=16, read_sigma_abs=0.0)
    a = converted(config)
    a.calibrate([X])
    a.set_engine("torch").at(3600.0)
    state = a.state_dict()
    b = converted(config, seed=99)
    b.load_state_dict(state)
    assert torch.equal(a(X), b(X))  # b on the Numba engine


@pytest.mark.parametrize("engine", ["numba", "torch"])
def test_a_chip_used_in_and_out_of_inference_mode_reads_as_one_used_without_it(engine):
    """torch.inference_mode() around calibration, at(t) and passes (as evaluation code
    often has it), then passes outside it: the state kept between passes (the torch
    engine's vector counter on the device) is still advanced, and every pass equals the
    same chip's used without inference mode, bitwise."""
    config = presets.pcm(rows=32, cols=16)
    plain, mixed = converted(config).set_engine(engine), converted(config).set_engine(engine)
    plain.calibrate([X])
    with torch.inference_mode():
        mixed.calibrate([X])
    for t, inside in ((60.0, True), (3600.0, False), (86400.0, True)):
        plain.at(t)
        with torch.inference_mode(inside):
            mixed.at(t)
        for passes_inside in (inside, not inside):
            want = plain(X)
            with torch.inference_mode(passes_inside):
                got = mixed(X)
            assert torch.equal(got, want), (t, passes_inside)


@pytest.mark.parametrize("engine", ["numba", "torch"])
def test_a_chip_made_in_inference_mode_is_the_chip_made_without_it(engine):
    """convert, calibration, at(t) and passes all inside torch.inference_mode(), then
    calibration, at(t) and passes outside it (which change the chip's tensors in place,
    as inference tensors would not allow): the chip, its outputs and its state equal
    those of the same chip made without inference mode, bitwise."""
    config = presets.pcm(rows=32, cols=16)
    plain = converted(config).set_engine(engine)
    with torch.inference_mode():
        made = converted(config).set_engine(engine)
        for analog in (plain, made):
            analog.calibrate([X])
            analog.at(3600.0)
        assert torch.equal(made(X), plain(X))
    assert not any(t.is_inference() for t in list(made.buffers()) + list(made.parameters()))
    for analog in (plain, made):
        analog.calibrate([X * 0.5])
        analog.at(86400.0)
    assert torch.equal(made(X), plain(X))
    state, want = made.state_dict(), plain.state_dict()
    assert state.keys() == want.keys()
    assert all(torch.equal(state[k], want[k]) for k in want if isinstance(want[k], torch.Tensor))


@pytest.mark.parametrize("engine", ["numba", "torch"])
def test_a_chip_reads_alike_whatever_torchs_default_dtype(engine):
    """torch.set_default_dtype(torch.float64), as some scientific code sets it: the chip
    is made and read in its own dtypes (conv paths failed on a float64 kernel before)."""
    model = small_cnn()  # (its weights drawn in float32)
    outputs = []
    for default in (torch.float32, torch.float64):
        before = torch.get_default_dtype()
        torch.set_default_dtype(default)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                analog = convert(model, presets.pcm(rows=32, cols=16), seed=0).set_engine(engine)
            analog.calibrate([X])
            outputs.append(analog.at(3600.0)(X))
        finally:
            torch.set_default_dtype(before)
    assert outputs[1].dtype == torch.float32 and torch.equal(outputs[1], outputs[0])


@pytest.mark.parametrize("engine", ["numba", "torch"])
def test_a_chip_reads_alike_under_deterministic_algorithms(engine):
    """torch.use_deterministic_algorithms(True), as reproducibility-minded code sets it:
    the engines (deterministic themselves) use no operation that refuses to run under it
    (the torch engine wrote its exact re-reads with put_, which did), and read alike."""
    outputs = []
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    for deterministic in (False, True):
        torch.use_deterministic_algorithms(deterministic)
        try:
            analog = converted(presets.pcm(rows=32, cols=16)).set_engine(engine)
            analog.calibrate([X])  # (its drift-compensation reads take the checked path)
            outputs.append(analog.at(3600.0)(X))
        finally:
            torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    assert torch.equal(outputs[1], outputs[0])


def test_counts_not_yet_collected_move_with_the_chip():
    """A pass on the torch engine leaves its counts on the device until they are read;
    a move (``.to("cuda")`` after a pass on the CPU) takes them along, or the next pass
    would add a GPU tensor to a CPU one. Here the move is a recorded copy."""
    config = presets.pcm(rows=32, cols=16, adc_bits=4)
    analog = converted(config)
    analog.calibrate([X])
    analog.set_engine("torch")
    analog.reset_counts()
    analog(X)
    grids = [m.grid for m in analog.modules() if hasattr(m, "grid")]
    running = [t for grid in grids for t in grid.running_device_counts().values()]
    assert running  # counts the pass left on the device
    want = copy.deepcopy(analog).counts()  # (reading the counts collects them)
    moved = []

    def move(t):
        moved.append(t.clone())
        return moved[-1]

    analog._apply(move)
    after = [t for grid in grids for t in grid.running_device_counts().values()]
    assert len(after) == len(running)
    assert all(any(t is m for m in moved) for t in after)
    assert analog.counts() == want


def test_convert_refuses_a_device_it_cannot_use():
    with pytest.raises(ValueError, match="device = 'gpu0' is invalid"):
        converted(presets.ideal(rows=16, cols=16), device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            converted(presets.ideal(rows=16, cols=16), device="cuda")


class _OutOfMemory(nn.Module):
    """A digital layer that runs out of GPU memory, as a pass on a small GPU can."""

    def forward(self, x):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_a_pass_out_of_gpu_memory_says_what_holds_less():
    from mapping import MappingConfig

    model = nn.Sequential(nn.Linear(8, 4), _OutOfMemory()).eval()
    analog = convert(model, presets.ideal(rows=16, cols=16), seed=0, mapping=MappingConfig(gpu_chunk_mb=512))
    with pytest.raises(torch.cuda.OutOfMemoryError) as caught:
        analog.calibrate([torch.randn(4, 8)])
    assert str(caught.value).startswith("CUDA out of memory. Tried to allocate 2.00 GiB\n")
    assert "mapping.gpu_chunk_mb (here 512 MiB)" in str(caught.value) and "or the batch" in str(caught.value)


@needs_cuda
def test_on_cuda_a_model_runs_without_leaving_the_device():
    config = presets.pcm(rows=32, cols=16, read_sigma_abs=0.0)
    cpu = converted(config)
    cpu.calibrate([X])
    gpu = converted(config, device="cuda")
    gpu.calibrate([X.cuda()])
    cpu.at(86400.0)
    gpu.at(86400.0)
    y_cpu, y_gpu = cpu(X), gpu(X.cuda())
    assert y_gpu.device.type == "cuda"
    # a step-edge flip in the drift compensation's reference read moves alpha, and with
    # it every output of the layer by a rounding: compare values, not bits
    assert np.allclose(y_cpu.numpy(), y_gpu.cpu().numpy(), atol=0.02 * float(y_cpu.abs().max()))
    assert torch.equal(y_cpu.argmax(1), y_gpu.cpu().argmax(1))


@needs_cuda
def test_on_cuda_a_chip_calibrates_and_reads_under_deterministic_algorithms(monkeypatch):
    """The CPU test above, on CUDA, where more operations refuse the mode: CUDA's kthvalue
    did (the calibration's percentiles now use topk). cuBLAS needs its workspace setting
    in this mode, which torch asks of every user."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    config = presets.pcm(rows=32, cols=16)
    models = []
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    for deterministic in (False, True):
        torch.use_deterministic_algorithms(deterministic)
        try:
            analog = converted(config, device="cuda")
            analog.calibrate([X.cuda()])
            y = analog.at(3600.0)(X.cuda())
            torch.cuda.synchronize()
        finally:
            torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        assert torch.isfinite(y).all()
        models.append(analog)
    for (_, a), (_, b) in zip(*(m.analog_layers() for m in models)):
        for m, n in zip(a.matrices, b.matrices):
            # deterministic cuDNN may pick other algorithms: sums may round otherwise
            assert np.allclose(m.grid.output_ranges(), n.grid.output_ranges(), rtol=1e-5, atol=0)
