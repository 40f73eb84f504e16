"""Forward passes as CUDA graphs (``mapping.graphs``).

Without a GPU the graph itself is emulated: recording runs the pass and undoes what a
capture would not do (advance the device's vector counters), a replay runs the pass
again and copies its results into the recorded outputs while undoing its host effects
(a replay runs nothing on the host). What is tested here is everything around the
graph: that a pass is replayable (the same operations with the same host values at
every pass, one read of the device), that a pass changes nothing on the host but the
bookkeeping a replay redoes, and that replays with that bookkeeping equal eager passes
bitwise, outputs, noise and counts. The test on a real GPU skips without one."""
import copy
import pickle
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_flatten
from torch.utils._python_dispatch import TorchDispatchMode

from crossbar import deferred, fused, presets
from crossbar.grid import TileGrid
from mapping import convert
from mapping.graphs import CapturedPass, PassGraphs, state_fingerprint
from mapping.layers import AnalogLayer
from tests.conftest import needs_cuda
from tests.mapping.test_attention_recurrent import Decoder
from tests.mapping.test_convert import SharedBlocks
from tests.mapping.test_torch_engine_models import X, converted

pytestmark = pytest.mark.gpu

CONFIG = presets.pcm(rows=32, cols=16).with_path("adc.noise_sigma", 0.5)


class EmulatedPass(CapturedPass):
    """A captured pass whose graph is the pass itself, run again at each replay."""

    def _record(self, device_pass, device):
        self._device_pass = device_pass
        self.replays = 0
        held = [c.clone() for c in self.counters]
        result = device_pass()
        for counter, value in zip(self.counters, held):  # a capture runs nothing on the device
            counter.copy_(value)
        return result

    def _replay(self):
        self.replays += 1
        host = [(grid.read_state(), grid._counter_holds) for grid in self.grids]
        called = [layer.called for layer in self.layers]
        for grid, (state, _) in zip(self.grids, host):
            grid.restore_read_state((state[0], state[1], {}))  # a graph's counts start from none
        fresh = tree_flatten(self._device_pass())[0]
        with torch.inference_mode():  # a replay's kernels write its outputs whatever tensors they are
            for recorded, value in zip(tree_flatten((self.outputs, self.failed, [r[2] for r in self.reads]))[0],
                                       fresh):
                recorded.copy_(value)
        for grid, (state, holds) in zip(self.grids, host):  # a replay runs nothing on the host
            grid.restore_read_state(state)
            grid._counter_holds = holds
        for layer, was in zip(self.layers, called):
            layer.called = was


class EmulatedGraphs(PassGraphs):
    pass_type = EmulatedPass

    @staticmethod
    def check_device(model):
        pass

    def _eager_pass(self, model, args, kwargs):  # (no side stream)
        return deferred.run_deferred(lambda: model.module(*args, **kwargs))


def torch_model(seed=0):
    analog = converted(CONFIG, seed=seed)
    analog.calibrate([X])
    return analog.set_engine("torch").at(86400.0)


def emulating(analog):
    analog._graphs = EmulatedGraphs()
    return analog


def inputs(n, batch=4):
    g = torch.Generator().manual_seed(5)
    return [torch.rand(batch, 3, 16, 16, generator=g) for _ in range(n)]


def test_replays_equal_eager_passes_bitwise_with_their_counts():
    eager, graphed = torch_model(), emulating(torch_model())
    for i, x in enumerate(inputs(4)):
        want, got = eager(x), graphed(x)
        assert torch.equal(got, want), i
        assert graphed.counts() == eager.counts(), i
    assert graphed._graphs.captures == 1  # the first pass ran eagerly and was captured; three replays
    grids = [m for m in graphed.modules() if isinstance(m, TileGrid)]
    assert [g._vectors_read for g in grids] == [g._vectors_read for m in [eager] for g in m.modules()
                                                if isinstance(g, TileGrid)]


def test_a_replay_returns_its_own_output_not_the_graphs_buffer():
    graphed = emulating(torch_model())
    xs = inputs(3)
    graphed(xs[0])
    first = graphed(xs[1])
    kept = first.clone()
    graphed(xs[2])
    assert torch.equal(first, kept)


def test_a_new_state_or_signature_captures_again():
    eager, graphed = torch_model(), emulating(torch_model())
    xs = inputs(3)
    for x in xs[:2]:
        eager(x), graphed(x)
    for analog in (eager, graphed):
        analog.at(3600.0)
    assert torch.equal(graphed(xs[2]), eager(xs[2]))
    assert graphed._graphs.captures == 2
    small = inputs(1, batch=2)[0]
    for _ in range(2):
        assert torch.equal(graphed(small), eager(small))
    assert graphed._graphs.captures == 3 and len(graphed._graphs) == 2
    layer = graphed.analog_layers()[0][1]
    layer.bias.add_(1.0)  # a change in place that a capture would not see on the host: captured again
    graphed(small)
    assert graphed._graphs.captures == 4
    graphed.analog_layers()[1][1].at(7200.0)  # one layer's new time, not the model's: captured again
    graphed(small)
    assert graphed._graphs.captures == 5


def test_a_graph_captured_in_inference_mode_replays_outside_it_and_back():
    """torch.inference_mode() around the capture, then replays outside it and inside
    again: the graph's input buffers and the grids' vector counters stay tensors that
    passes outside the block can fill and advance; every pass equals the eager one."""
    eager, graphed = torch_model(), emulating(torch_model())
    for i, x in enumerate(inputs(4)):
        with torch.inference_mode(i % 2 == 0):  # the capture inside, then outside, inside, outside
            got = graphed(x)
        assert torch.equal(got, eager(x)), i
    assert graphed._graphs.captures == 1


def test_a_copy_of_a_model_captures_its_own_graphs():
    eager, graphed = torch_model(), emulating(torch_model())
    xs = inputs(3)
    for x in xs[:2]:
        eager(x), graphed(x)
    copied = copy.deepcopy(graphed)
    assert len(copied._graphs) == 0 and len(graphed._graphs) == 1
    assert torch.equal(copied(xs[2]), eager(xs[2]))  # the copy goes on from the original's noise
    assert len(pickle.loads(pickle.dumps(graphed._graphs))) == 0


@pytest.mark.parametrize("where", ["layer", "every module"])
def test_forward_hooks_run_at_every_pass_without_graphs_while_registered(where):
    """A replay runs no Python: while a forward hook is registered (here one that keeps
    the first analog layer's outputs), passes run eagerly, the hook called at each, with
    one warning; once it is removed, passes are replayed again."""
    eager, graphed = torch_model(), emulating(torch_model())

    def replays():  # (an emulated replay runs the pass's Python, hooks included; a real one runs none)
        return sum(captured.replays for captured in graphed._graphs._passes.values())

    first = [next(m for m in analog.module.modules() if isinstance(m, AnalogLayer)) for analog in (eager, graphed)]
    kept = {id(layer): [] for layer in first}

    def keep(module, args, out):
        if id(module) in kept:
            kept[id(module)].append(out.clone())

    xs = inputs(6)
    for x in xs[:2]:
        assert torch.equal(graphed(x), eager(x))  # captured, then replayed
    handles = ([layer.register_forward_hook(keep) for layer in first] if where == "layer"
               else [nn.modules.module.register_module_forward_hook(keep)])
    try:
        with pytest.warns(RuntimeWarning, match="passes run without graphs") as caught:
            for x in xs[2:5]:
                assert torch.equal(graphed(x), eager(x))
    finally:
        for handle in handles:
            handle.remove()
    assert len(caught) == 1 and graphed._graphs.hooked_passes == 3 and replays() == 1
    want, got = kept[id(first[0])], kept[id(first[1])]
    assert len(got) == len(want) == 3 and all(torch.equal(a, b) for a, b in zip(got, want))
    assert torch.equal(graphed(xs[5]), eager(xs[5]))  # hooks gone: a replay again
    assert replays() == 2 and graphed._graphs.captures == 1 and graphed.counts() == eager.counts()


def test_a_replay_that_fails_a_check_runs_the_pass_checked_and_keeps_nothing():
    eager, graphed = torch_model(), emulating(torch_model())
    xs = inputs(3)
    for x in xs[:2]:
        eager(x), graphed(x)
    bad = xs[2].clone()
    bad[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="contains 1 NaN or Inf values"):
        graphed(bad)
    assert graphed.counts() == eager.counts()
    assert torch.equal(graphed(xs[2]), eager(xs[2]))  # the next replay draws the next pass's noise
    assert graphed._graphs.captures == 1


def test_graphs_refuse_a_model_off_cuda():
    analog = torch_model()
    with pytest.raises(ValueError, match="the model is on cpu: CUDA graphs need it on a CUDA device"):
        analog.use_cuda_graphs()
    with pytest.raises(ValueError, match="keep = 0 is invalid"):
        PassGraphs(keep=0)
    assert analog.use_cuda_graphs(False)._graphs is None
    with pytest.raises(ValueError, match="an input of type ndarray cannot key a CUDA graph"):
        EmulatedGraphs().run(analog, (np.zeros(3),), {})


class OperationLog(TorchDispatchMode):
    """Every operation a pass issues, with its host arguments (tensors by layout)."""

    def __init__(self):
        super().__init__()
        self.operations = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.operations.append((str(func), self._describe(args), self._describe(kwargs)))
        return func(*args, **kwargs)

    def _describe(self, value):
        if isinstance(value, torch.Tensor):
            return ("tensor", tuple(value.shape), value.dtype)
        if isinstance(value, (list, tuple)):
            return tuple(self._describe(v) for v in value)
        if isinstance(value, dict):
            return tuple((k, self._describe(v)) for k, v in value.items())
        return repr(value)


def test_a_pass_issues_the_same_operations_and_host_values_every_time(monkeypatch):
    """What a graph needs of a pass: a second pass issues exactly the first's operations
    with the same host arguments (a vector counter passed from the host would differ),
    and the only read of the device is the checks' one at the end. The stages run
    eagerly, whatever XBARSIM_FUSED says: the operations are logged by a dispatch mode,
    under which torch.compile does not run."""
    monkeypatch.setenv(fused.FUSED_ENV, "0")
    analog = torch_model()
    xs = inputs(3)
    analog(xs[0])
    logs = []
    for x in xs[1:]:
        with OperationLog() as log:
            analog(x)
        logs.append(log.operations)
    assert logs[0] == logs[1]
    reads = [op for op, _, _ in logs[0] if op in ("aten._local_scalar_dense.default", "aten.nonzero.default",
                                                  "aten.item.default")]
    assert reads == ["aten._local_scalar_dense.default"]


def host_state(model):
    """Every module's attributes other than submodules, parameters and buffers, by value
    (tensors by identity and version)."""
    state = {}
    for name, module in model.named_modules():
        for key, value in vars(module).items():
            if key in ("_modules", "_parameters", "_buffers"):
                continue
            if isinstance(value, torch.Tensor):
                value = (id(value), value._version)
            elif isinstance(value, np.ndarray):
                value = value.tobytes()
            elif isinstance(value, dict):
                value = {k: (id(v), v._version) if isinstance(v, torch.Tensor) else
                         v.tobytes() if isinstance(v, np.ndarray) else repr(v) for k, v in value.items()}
            elif not isinstance(value, (bool, int, float, str, tuple, type(None))):
                value = id(value)
            state[(name, key)] = value
    return state


def transformer():
    torch.manual_seed(1)
    return nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), nn.Flatten(),
                         nn.Linear(8 * 5, 3)).eval()


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.lstm, self.head = nn.LSTM(6, 8, batch_first=True), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


@pytest.mark.parametrize("make, x", [(None, X), (transformer, torch.randn(3, 5, 8)),
                                     (Recurrent, torch.randn(3, 4, 6))], ids=["cnn", "transformer", "lstm"])
def test_a_pass_changes_on_the_host_only_the_bookkeeping_a_replay_redoes(make, x):
    if make is None:
        analog = torch_model()
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            analog = convert(make(), CONFIG, seed=0)
        analog.calibrate([x])
        analog.set_engine("torch").at(60.0)
    analog(x)
    before, fingerprint = host_state(analog), state_fingerprint(analog)
    analog(x)
    after = host_state(analog)
    changed = {key for key in before if before[key] != after[key]}
    # the vector counters advance in place on the device, and what else changes a replay redoes
    assert changed and {key for _, key in changed} <= TileGrid.bookkeeping | AnalogLayer.bookkeeping | {
        "counts", "_vector_counter"}
    assert state_fingerprint(analog) == fingerprint


@needs_cuda
def test_on_cuda_graph_replays_equal_eager_passes_bitwise():
    eager, graphed = torch_model().to("cuda"), torch_model().to("cuda").use_cuda_graphs()
    for analog in (eager, graphed):
        analog.at(86400.0)
    for i, x in enumerate(inputs(4)):
        x = x.cuda()
        assert torch.equal(graphed(x), eager(x)), i
    assert graphed.counts() == eager.counts()
    assert graphed._graphs.captures == 1


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason=f"needs two CUDA GPUs ({torch.cuda.device_count()} here)")
def test_a_model_on_a_gpu_that_is_not_the_current_one_replays_its_own_passes():
    """The capture stream is the model's GPU's: with cuda:0 current, a model on cuda:1
    replays what its eager passes compute."""
    eager, graphed = torch_model().to("cuda:1"), torch_model().to("cuda:1").use_cuda_graphs()
    assert torch.cuda.current_device() == 0
    for i, x in enumerate(inputs(3)):
        x = x.to("cuda:1")
        assert torch.equal(graphed(x), eager(x)), i
    assert graphed._graphs.captures == 1


@pytest.mark.parametrize("which", ["shared modules", "cell decoder"])
def test_shared_modules_and_cells_run_alike_on_both_engines_and_in_replays(which):
    """A layer read several times per pass (one module under several names; a cell
    stepped by the model's loop): the torch engine, eagerly and replayed, equals the
    Numba engine bitwise, noise and counts included."""
    make, x = ((lambda: SharedBlocks().eval(), torch.rand(5, 16)) if which == "shared modules"
               else (lambda: Decoder(nn.GRUCell(9, 20)).eval(), torch.rand(3, 9)))
    model, results = make(), {}
    for mode in ("numba", "torch", "graphs"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            analog = convert(model, CONFIG, seed=0)
        analog.calibrate([x]).set_engine("numba" if mode == "numba" else "torch").at(86400.0)
        if mode == "graphs":
            emulating(analog)
        results[mode] = [analog(x) for _ in range(3)], analog.counts()
    for mode in ("torch", "graphs"):
        assert all(torch.equal(a, b) for a, b in zip(results[mode][0], results["numba"][0])), mode
        assert results[mode][1] == results["numba"][1], mode
