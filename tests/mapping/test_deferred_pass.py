"""A converted model's forward pass on the torch engine reads the device once, at its
end (``crossbar.deferred``): its outputs and counts equal the checked layers'
bitwise; a failed check runs the pass again, checked, counting once; a non-finite
input is refused with the checked path's message and leaves the chip as it was."""
import warnings

import pytest
import torch

from crossbar import deferred, presets, torch_engine
from tests.conftest import needs_cuda
from tests.mapping.test_torch_engine_models import X, converted

pytestmark = pytest.mark.gpu

CONFIG = presets.pcm(rows=32, cols=16).with_path("adc.noise_sigma", 0.5)
DEVICE_READS = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist", "nonzero", "cpu", "numpy")


def torch_model(config=CONFIG):
    analog = converted(config)
    analog.calibrate([X])
    analog.set_engine("torch")
    return analog


def checked(analog, x):
    """The pass with every layer checking at once: the inner module, called directly."""
    analog.at(86400.0)
    analog.reset_counts()
    with torch.no_grad():
        return analog.module(x), analog.counts()


def deferring(analog, x):
    analog.at(86400.0)
    analog.reset_counts()
    return analog(x), analog.counts()


def test_a_pass_reads_the_device_once_and_equals_the_checked_layers(monkeypatch):
    analog = torch_model()
    want = checked(analog, X)
    analog.at(86400.0)
    analog.reset_counts()
    reads = []
    for name in DEVICE_READS:
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda *a, _f=original, _n=name, **k: reads.append(_n) or _f(*a, **k))
    y = analog(X)
    monkeypatch.undo()
    assert reads == ["__bool__"], reads  # DeferredChecks.failed: every layer's checks at once
    assert torch.equal(y, want[0]) and analog.counts() == want[1]


def test_a_failed_check_runs_the_pass_again_checked_and_counts_once(monkeypatch):
    analog = torch_model()
    want = checked(analog, X)
    rewinds = []
    original = deferred.DeferredChecks.rewind
    monkeypatch.setattr(deferred.DeferredChecks, "rewind", lambda self: rewinds.append(1) or original(self))
    monkeypatch.setattr(torch_engine, "rejected_bound", lambda outputs, draws: min(outputs, 2))
    got = deferring(analog, X)
    assert rewinds == [1]
    assert torch.equal(got[0], want[0]) and got[1] == want[1]


def test_a_non_finite_input_is_refused_and_leaves_the_chip_as_it_was():
    analog = torch_model()
    analog.at(86400.0)
    analog.reset_counts()
    grids = [m.grid for _, layer in analog.analog_layers() for m in layer.matrices]
    before = [g._vectors_read for g in grids]  # after drift compensation's reference read
    bad = X.clone()
    bad[1, 2, 3, 4] = float("inf")
    with pytest.raises(ValueError, match="contains 1 NaN or Inf values"):
        analog(bad)
    assert [g._vectors_read for g in grids] == before
    assert all(c["dac_converted"] == 0 for c in analog.counts().values())
    assert torch.equal(analog(X), deferring(torch_model(), X)[0])  # the next pass draws the first noise


@needs_cuda
def test_on_cuda_a_pass_waits_for_the_gpu_only_at_its_end():
    """torch's sync debug mode raises on any operation that waits for the GPU (a copy
    to the host, nonzero, a value read) within the deferred pass; the end's check is
    the one read."""
    analog = torch_model().to("cuda")
    x = X.cuda()
    analog(x)  # compiles the fused kernels first
    analog.at(86400.0)
    analog.reset_counts()
    want = analog(x)
    analog.at(86400.0)
    analog.reset_counts()
    with torch.no_grad(), deferred.deferred_checks() as checks, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that the debug mode is a prototype
        try:
            torch.cuda.set_sync_debug_mode("error")
            y = analog.module(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert not checks.failed()
    assert torch.equal(y, want)
