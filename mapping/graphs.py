"""A converted model's forward pass captured as a CUDA graph and replayed.

On a GPU, issuing a forward pass costs the host more than the GPU takes to run it:
every analog layer launches tens of kernels and a few compiled calls, each with its own
host overhead. A CUDA graph records the pass's kernels once, and a replay launches them
all at once. Replaying a pass is exact only if the pass meets four conditions, and this
module provides them:

- **No reads of the device during the pass.** The torch engine's checks are deferred
  (:mod:`crossbar.deferred`). Their one flag is read after the replay.
- **No per-pass host value baked into a kernel.** Each grid's vector counter, the
  position of its noise streams, lives on the device and advances there
  (``TileGrid.vector_counter``). A replay therefore draws new noise, the same noise an
  eager pass would draw.
- **The host's bookkeeping replayed on the host.** A pass's bookkeeping is the vectors
  each grid read, the conversion counts, and which analog layers ran. The differences a
  pass makes to it are recorded at capture and applied after each replay that passes
  its checks.
- **The same tensors and settings at every replay.** The graph is captured again
  whenever the model's state changes: a new time, calibration, a move, an analog
  module's setting, any parameter or buffer replaced or changed in place. A
  fingerprint of every module's state (:func:`state_fingerprint`) is compared before
  each replay to detect this.

Inputs are copied into the graph's buffers before a replay, and outputs are cloned out.
A replay runs no Python, so forward hooks inside the model would not run: while any
is registered (:func:`hooked_modules`), passes run eagerly and call them, with a warning.
A replay that fails its checks is not kept: a non-finite input, or one of the rare
events of :mod:`crossbar.deferred`. The pass then runs again eagerly, checked, exactly
as without graphs.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Callable, Optional

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from crossbar import deferred
from crossbar.grid import TileGrid


def state_fingerprint(model: torch.nn.Module) -> tuple:
    """What a captured pass depends on in its modules, as a comparable value: per
    module, its count of state changes (``crossbar.state_changes``: the analog
    modules count every assignment to their attributes but a pass's own bookkeeping),
    its mode, and each parameter and buffer by identity and version (a change in
    place counts too). Settings of digital torch modules changed by assignment are
    not seen: ``use_cuda_graphs`` again drops every capture."""
    # run before every replay: lists, not generators, and empty dicts skipped (half the time)
    fingerprint = []
    for module in model.modules():
        attributes = module.__dict__
        parameters, buffers = attributes["_parameters"], attributes["_buffers"]
        fingerprint.append((id(module), attributes.get("state_changes"), attributes["training"],
                            _tensor_tokens(parameters) if parameters else (),
                            _tensor_tokens(buffers) if buffers else ()))
    return tuple(fingerprint)


def hooked_modules(model: torch.nn.Module) -> list:
    """Names of the modules inside ``model.module`` (what a captured pass runs) with
    forward hooks or forward pre-hooks, "*" first for hooks registered on every module."""
    hooked = ["*"] if (torch.nn.modules.module._global_forward_hooks
                       or torch.nn.modules.module._global_forward_pre_hooks) else []
    if any(m._forward_hooks or m._forward_pre_hooks for m in model.module.modules()):  # (run at every pass)
        hooked += [name or type(m).__name__ for name, m in model.module.named_modules()
                   if m._forward_hooks or m._forward_pre_hooks]
    return hooked


def _tensor_tokens(tensors: dict) -> tuple:
    return tuple([None if t is None else (id(t), t._version) for t in tensors.values()])


def _signature(leaf):
    """What a capture depends on in one input: a tensor's layout, any other value."""
    if isinstance(leaf, torch.Tensor):
        return ("tensor", tuple(leaf.shape), leaf.stride(), leaf.dtype, leaf.device)
    try:
        hash(leaf)
    except TypeError:
        raise ValueError(f"an input of type {type(leaf).__name__} cannot key a CUDA graph: its inputs are "
                         f"tensors and hashable values (use_cuda_graphs(False) takes any)") from None
    return ("value", type(leaf).__name__, leaf)


class CapturedPass:
    """One forward pass of ``model`` recorded for the signature of ``leaves`` (its
    inputs, flattened by ``spec``): the graph, its input and output buffers, and the
    host bookkeeping of a pass. Recording a pass leaves the model's bookkeeping as it
    was: a capture runs nothing."""

    def __init__(self, model, leaves: list, spec) -> None:
        self.grids = [m for m in model.modules() if isinstance(m, TileGrid)]
        self.layers = [layer for _, layer in model.analog_layers()]
        with torch.inference_mode(False):  # buffers that replays outside an inference_mode block can fill
            self.inputs = [x.clone() if isinstance(x, torch.Tensor) else x for x in leaves]  # the graph's buffers
        self.graph = None
        for grid in self.grids:
            grid.collect_device_counts()  # the graph's counts then start from none
        self.counters = [grid.vector_counter() for grid in self.grids]  # in step with the host: no fill in the graph
        before = [grid.read_state() for grid in self.grids]
        called_before = [layer.called for layer in self.layers]
        for layer in self.layers:
            layer.called = False
        args, kwargs = tree_unflatten(self.inputs, spec)

        def device_pass():
            with deferred.deferred_checks() as checks:
                out = model.module(*args, **kwargs)
            return out, checks.pending(), [grid.running_device_counts() for grid in self.grids]

        try:
            # the module's result, the pass's deferred flags (None: none), per grid its device counts
            self.outputs, self.failed, device_counts = self._record(device_pass, model.device)
            self.reads = []  # per grid: (vectors, host counts, device counts) of a pass
            for grid, state, counts in zip(self.grids, before, device_counts):
                vectors, host, _ = grid.read_state()
                self.reads.append((vectors - state[0], {name: host[name] - state[1][name] for name in host},
                                   counts))
            self.called = [layer for layer in self.layers if layer.called]
        finally:  # the recorded pass is not a pass: its bookkeeping is undone
            for grid, state in zip(self.grids, before):
                grid.restore_read_state(state)
                grid.forget_vector_counter()
            for layer, was in zip(self.layers, called_before):
                layer.called = was

    def _record(self, device_pass: Callable, device: torch.device) -> tuple:
        """Capture device_pass() into a CUDA graph (nothing runs on the device yet): its
        outputs, which each replay writes. The capture stream is the model's device's:
        torch.cuda.graph's default stream is made once, on whichever GPU was current,
        and a pass of a model on another GPU (cuda:1 in a process whose current GPU is
        cuda:0) would launch its kernels outside the capture."""
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(device), torch.cuda.graph(self.graph, stream=torch.cuda.Stream(device)):
            return device_pass()

    def _replay(self) -> None:
        self.graph.replay()

    def replay(self, leaves: list):
        """The pass on ``leaves`` (of this pass's signature) by a replay, with its host
        bookkeeping; None if the replay failed a check (the caller runs the pass
        checked: nothing of the replay is kept)."""
        for buffer, leaf in zip(self.inputs, leaves):
            if isinstance(buffer, torch.Tensor):
                buffer.copy_(leaf)
        for grid, counter in zip(self.grids, self.counters):
            if grid.vector_counter() is not counter:  # set from the host if it moved without the device
                raise RuntimeError(f"{grid.name}: its vector counter was replaced since the capture")
        self._replay()
        if self.failed is not None and bool(self.failed):  # the pass's one read of the device
            for grid in self.grids:
                grid.forget_vector_counter()  # the replay advanced it; the host did not
            return None
        for grid, (vectors, host, device) in zip(self.grids, self.reads):
            grid.add_device_reads(vectors, host, device)
        for layer in self.called:
            layer.called = True
        return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, self.outputs)


class PassGraphs:
    """The captured forward passes of one converted model, one per input signature (the
    ``keep`` most recently used: each holds its pass's working memory on the GPU).
    Every capture is dropped when the model's state changes."""

    pass_type = CapturedPass

    def __init__(self, keep: int = 4) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep = {keep!r} is invalid: expected an integer >= 1")
        self.keep = keep
        self.captures = 0             # graphs captured so far (a capture costs a pass's time)
        self._passes: OrderedDict = OrderedDict()
        self._state: Optional[tuple] = None
        self.hooked_passes = 0        # passes run eagerly because forward hooks were registered
        self._warned_hooks = False    # (once per spell of hooks)

    def __len__(self) -> int:
        return len(self._passes)

    def __deepcopy__(self, memo) -> "PassGraphs":
        """A copy of the model captures its own graphs: these read the original's tensors."""
        return type(self)(self.keep)

    def __getstate__(self) -> dict:
        return {"keep": self.keep}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["keep"])

    def run(self, model, args: tuple, kwargs: dict):
        """model.module(*args, **kwargs) as an AnalogModel's forward pass computes it: a
        replay where this signature was captured in the model's present state, else an
        eager pass followed by a capture for the next call."""
        hooked = hooked_modules(model)
        if hooked:
            return self._hooked_pass(model, hooked, args, kwargs)
        self._warned_hooks = False
        leaves, spec = tree_flatten((args, kwargs))
        key = (spec, tuple(_signature(leaf) for leaf in leaves))
        if state_fingerprint(model) != self._state:
            self._passes.clear()
        captured = self._passes.get(key)
        if captured is not None:
            self._passes.move_to_end(key)
            out = captured.replay(leaves)
            return model.module(*args, **kwargs) if out is None else out
        self.check_device(model)  # (a replay needs no check: a move changes the fingerprint)
        out, failed = self._eager_pass(model, args, kwargs)
        if not failed:  # a pass that failed a check is no template: capture at the next call
            try:
                self._passes[key] = self.pass_type(model, leaves, spec)
            except RuntimeError as error:
                raise RuntimeError(f"capturing the forward pass as a CUDA graph failed ({error}); "
                                   f"use_cuda_graphs(False) runs passes without graphs") from error
            self.captures += 1
            while len(self._passes) > self.keep:
                self._passes.popitem(last=False)
        self._state = state_fingerprint(model)
        return out

    def _hooked_pass(self, model, hooked: list, args: tuple, kwargs: dict):
        """An eager pass, as without graphs, which calls the hooks a replay would skip."""
        if not self._warned_hooks:
            where = "every module" if hooked[0] == "*" else repr(hooked[0])
            more = f" and {len(hooked) - 1} more" if len(hooked) > 1 else ""
            warnings.warn(f"forward hooks on {where}{more}: a CUDA graph replay would not call them, so passes "
                          f"run without graphs while they are registered", RuntimeWarning, stacklevel=2)
            self._warned_hooks = True
        self.hooked_passes += 1
        return deferred.deferred_pass(lambda: model.module(*args, **kwargs))

    @staticmethod
    def check_device(model) -> None:
        device = model.device
        if device.type != "cuda":
            raise ValueError(f"the model is on {device}: CUDA graphs need it on a CUDA device "
                             f"(use_cuda_graphs(False) runs passes without them)")

    def _eager_pass(self, model, args: tuple, kwargs: dict) -> tuple:
        """An eager pass with deferred checks, which also warms up what the capture
        records (compiled kernels, cuBLAS' workspaces), on a side stream as CUDA
        graphs ask: (output, whether a check failed and it ran again, checked)."""
        device = model.device
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            out, failed = deferred.run_deferred(lambda: model.module(*args, **kwargs))
        torch.cuda.current_stream(device).wait_stream(stream)
        return out, failed
