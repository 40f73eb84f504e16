"""Fused stages: the XBARSIM_FUSED setting, the eager fallback where torch cannot build
the kernels, and the compiled variants a stage makes."""
import numpy as np
import pytest
import torch

from crossbar import fused, presets
from tests.crossbar.test_grid import programmed_grid

pytestmark = pytest.mark.gpu


def test_fused_setting_is_checked(monkeypatch):
    monkeypatch.setenv(fused.FUSED_ENV, "yes")
    with pytest.raises(ValueError, match="XBARSIM_FUSED = 'yes' is invalid: expected 'auto', '0' or '1'"):
        fused.use_fused(torch.device("cpu"))
    monkeypatch.setenv(fused.FUSED_ENV, "auto")
    assert not fused.use_fused(torch.device("cpu")) and fused.use_fused(torch.device("cuda"))


@pytest.fixture
def compiling_fails(monkeypatch):
    """Fused stages by default on the CPU, as on a GPU, whose kernels torch.compile
    fails to build (as on a GPU too old for Triton); yields the list of the stages
    whose compiled version was called, and the exception those calls raise (settable)."""
    too_old = RuntimeError("Found Tesla P100 which is too old to be supported by the triton GPU compiler\n(and more)")
    # as torch raises it: dynamo wraps the backend's error
    attempts = {"names": [], "error": torch._dynamo.exc.BackendCompilerFailed(torch.compile, too_old, None)}

    def failing_compile(fn, **options):
        def compiled(*args):
            attempts["names"].append(fn.__name__)
            raise attempts["error"]
        return compiled

    monkeypatch.setattr(torch, "compile", failing_compile)
    monkeypatch.setattr(fused, "FUSED_BY_DEFAULT", ("cpu",))
    monkeypatch.setattr(fused, "_COMPILE_FAILED", {})
    monkeypatch.delenv(fused.FUSED_ENV, raising=False)
    fused.fused_version.cache_clear()
    yield attempts
    fused.fused_version.cache_clear()


def _noisy_products(config, x: torch.Tensor) -> tuple:
    """Two products of a fresh torch-engine grid, and its counts."""
    grid, *_ = programmed_grid(config, 100, 90, seed=6)
    grid.calibrate(x[:64].numpy())
    grid.engine = "torch"
    grid.at(3600.0)
    return grid.product(x), grid.product(x), grid.count_totals()


def test_where_compiling_fails_by_default_the_stages_run_eagerly_after_one_warning(compiling_fails, monkeypatch):
    config = presets.pcm(rows=48, cols=40)
    x = torch.from_numpy(np.random.default_rng(10).uniform(-1.2, 1.2, (300, 100)).astype(np.float32))
    with pytest.warns(RuntimeWarning) as caught:
        fallen_back = _noisy_products(config, x)
    assert [str(w.message) for w in caught] == [
        "torch.compile could not build xbarsim's fused kernels for cpu (RuntimeError: Found Tesla P100 which is too "
        "old to be supported by the triton GPU compiler); they run uncompiled there for the rest of this process: "
        "the same chip and noise, more slowly and with more memory. XBARSIM_FUSED=0 skips the attempt; "
        "XBARSIM_FUSED=1 makes it an error, with torch's whole message"]
    assert len(compiling_fails["names"]) == 1  # the first stage to compile; no later one tried
    assert not fused.use_fused(torch.device("cpu"))
    monkeypatch.setenv(fused.FUSED_ENV, "0")
    eager = _noisy_products(config, x)
    assert torch.equal(fallen_back[0], eager[0]) and torch.equal(fallen_back[1], eager[1])
    assert fallen_back[2] == eager[2] and eager[2]["dac_clipped"] > 0


def test_where_compiling_is_asked_for_or_runs_out_of_memory_its_error_is_raised(compiling_fails, monkeypatch):
    x = torch.from_numpy(np.random.default_rng(10).uniform(-1, 1, (300, 100)).astype(np.float32))
    monkeypatch.setenv(fused.FUSED_ENV, "1")
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="too old to be supported"):
        _noisy_products(presets.pcm(rows=48, cols=40), x)
    monkeypatch.setenv(fused.FUSED_ENV, "auto")
    compiling_fails["error"] = torch.cuda.OutOfMemoryError("CUDA out of memory")
    with pytest.raises(torch.cuda.OutOfMemoryError):
        _noisy_products(presets.pcm(rows=48, cols=40), x)
    assert fused._COMPILE_FAILED == {} and fused.use_fused(torch.device("cpu"))


def test_where_torch_refuses_to_compile_at_all_the_stages_run_eagerly(compiling_fails, monkeypatch):
    def refusing_compile(fn, **options):
        raise RuntimeError("Dynamo is not supported on Python 3.99+")

    monkeypatch.setattr(torch, "compile", refusing_compile)
    x, table = torch.ones(3, 4, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match=r"for cpu \(RuntimeError: Dynamo is not supported on Python 3.99\+\)"):
        assert torch.equal(fused.fused_version(_scaled_sum)(x, table, 0.5), _scaled_sum(x, table, 0.5))


def test_an_error_of_the_inputs_own_is_the_uncompiled_stages_error(compiling_fails):
    compiled = fused.fused_version(_scaled_sum)
    with pytest.raises(RuntimeError, match="size of tensor a"):  # torch's own error for the mismatched shapes
        compiled(torch.ones(3, 4, dtype=torch.float64), torch.ones(2, dtype=torch.float64), torch.ones(5))
    assert compiling_fails["names"] == ["_scaled_sum"] and fused._COMPILE_FAILED == {}
    x, table = torch.ones(3, 4, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="could not build"):  # a good call still tries to compile
        assert torch.equal(compiled(x, table, 0.5), _scaled_sum(x, table, 0.5))
    assert torch.equal(compiled(x, table, 0.5), _scaled_sum(x, table, 0.5))  # then runs it uncompiled: no warning
    assert compiling_fails["names"] == ["_scaled_sum"] * 2 and "cpu" in fused._COMPILE_FAILED


def _scaled_sum(x: torch.Tensor, table: torch.Tensor, factor: float) -> torch.Tensor:
    """A stand-in for a fused stage: a product with a fixed-size table and a reduction."""
    return (x * factor).sum(dim=1) + table.sum()


def test_a_fused_stage_compiles_once_whatever_grad_mode_views_and_coinciding_sizes():
    """What the compiled variants are guarded on but the arithmetic does not depend on
    (autograd's mode, whether an input is a view, sizes that happen to be equal in the
    first call, a size of 1) compiles no second variant (resnet20's calibration and
    first pass: 16 variants before the first three were cut, 11 before sizes of 1 were,
    now 6). Without torch's compile caches: a graph cached by a process that
    specialized sizes of 1 brings its guards along. The caches are turned off with the
    config modules' own patch(), not monkeypatch: pytest 9.2's monkeypatch deletes an
    attribute that is not in the module's __dict__ on undo, which hides a torch config
    entry, and every later compile of the process then failed on it."""
    from torch._dynamo.utils import counters

    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        compiled = fused.fused_version(_scaled_sum)
        table = torch.arange(8, dtype=torch.float64)
        before = counters["stats"]["unique_graphs"]
        base = torch.rand(8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        outputs = [compiled(base, table, 0.5)]  # autograd on; 8 rows like the table's 8 entries
        with torch.no_grad():
            outputs.append(compiled(base, table, 0.5))
        longer = torch.rand(6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        outputs.append(compiled(longer[1:], table, 0.5))  # a view, 5 rows
        outputs.append(compiled(longer[:1], table, 0.5))  # one row (a size of 1 is not specialized on)
    assert counters["stats"]["unique_graphs"] - before == 1
    for out, x in zip(outputs, (base, base, longer[1:], longer[:1])):
        assert torch.allclose(out, _scaled_sum(x, table, 0.5), rtol=1e-12, atol=0)  # (sums in another order)
