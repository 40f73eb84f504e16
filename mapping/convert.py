"""Whole torch models on crossbar tiles."""
from __future__ import annotations

import collections
import contextlib
import fnmatch
import itertools
import warnings
from contextlib import contextmanager
from typing import Iterable, Optional

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from crossbar import TileConfig, deferred
from crossbar.precision import ieee_float32
from crossbar.grid import grids_made_on
from crossbar.grid_programming import inference_time
from crossbar.seeding import SeedLike, as_seed_sequence, derive
from crossbar.tensor_mode import normal_tensors

from .batchnorm import fold_batchnorm as _fold_batchnorm
from .calibration_sample import FirstRows, Reservoir, Unsampled
from .config import MappingConfig
from .copying import plain_copy
from .inputs import batch_inputs, call_model
from .attention import AnalogMultiheadAttention
from .conv import AnalogConv2d
from .conv3d import AnalogConv3d
from .conv_transpose import AnalogConvTranspose2d
from .layers import NOT_CALLED_WHY, AnalogLayer, AnalogLinear
from .matrix import AnalogMatrix
from .recurrent import AnalogRNNBase, AnalogRNNCellBase
from .devices import module_device, resolve_device
from .graphs import PassGraphs
from .memory import release_free_memory

# torch layer type -> analog counterpart (a class with from_torch(layer, tile_config, seed,
# mapping, name)); subclasses of these types map too (see analog_type_for); everything
# else stays digital
ANALOG_LAYERS = {nn.Linear: AnalogLinear, nn.Conv2d: AnalogConv2d, nn.Conv1d: AnalogConv2d,
                 nn.Conv3d: AnalogConv3d, nn.ConvTranspose2d: AnalogConvTranspose2d,
                 nn.ConvTranspose1d: AnalogConvTranspose2d,
                 nn.MultiheadAttention: AnalogMultiheadAttention,
                 nn.RNN: AnalogRNNBase, nn.LSTM: AnalogRNNBase, nn.GRU: AnalogRNNBase,
                 nn.RNNCell: AnalogRNNCellBase, nn.LSTMCell: AnalogRNNCellBase, nn.GRUCell: AnalogRNNCellBase}
_NOTHING = object()  # (what an exhausted iterator gives next())


def register_layer(torch_type: type, analog_type: type) -> None:
    """Map modules of ``torch_type`` (and its subclasses) with ``analog_type`` in every later
    ``convert``: a class with ``from_torch(layer, tile_config, seed, mapping, name)``
    returning a module whose matrix products run in analog layers (``AnalogLayer``),
    such as the built-in ``AnalogLinear`` for a Linear subclass that computes its own way."""
    if not (isinstance(torch_type, type) and issubclass(torch_type, nn.Module)):
        raise ValueError(f"torch_type = {torch_type!r} is invalid: expected a torch.nn.Module subclass")
    if not (isinstance(analog_type, type) and callable(getattr(analog_type, "from_torch", None))):
        raise ValueError(f"analog_type = {analog_type!r} is invalid: expected a class with a "
                         f"from_torch(layer, tile_config, seed, mapping, name) classmethod")
    ANALOG_LAYERS[torch_type] = analog_type


def analog_type_for(module: nn.Module) -> tuple:
    """(the analog counterpart of module, or None; why it has none). A subclass of a
    mapped type maps as its base does unless it overrides ``forward``: its computation
    would then not be the one the tiles run (register it to map it anyway)."""
    kind = type(module)
    if kind in ANALOG_LAYERS:
        return ANALOG_LAYERS[kind], ""
    for base in kind.__mro__[1:]:
        if base in ANALOG_LAYERS:
            if kind.forward is not base.forward:
                return None, (f"{kind.__name__} subclasses {base.__name__} with a forward of its own; "
                              f"mapping.register_layer({kind.__name__}, ...) maps it")
            return ANALOG_LAYERS[base], ""
    return None, ""


@contextmanager
def fused_fast_paths_off():
    """torch's fused transformer and attention kernels (the 'fast path' that
    nn.TransformerEncoderLayer and nn.MultiheadAttention take in eval mode) read layer
    weights directly and never call the analog layers, so converted models run with
    them off. The switch is torch's own and is restored on exit."""
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


class AnalogModel(nn.Module):
    """A converted model: the copy of the original with its matrix layers on tiles.

    ``report`` lists what went where; ``digital_layers`` the layers with parameters that
    stayed digital. Every forward pass checks that each analog layer was called: a layer
    reported as analog that the model bypassed is an error, never a silent digital result.
    Call the AnalogModel (not ``.module``) to get these guarantees."""

    def __init__(self, module: nn.Module, report: list, digital_layers: list) -> None:
        super().__init__()
        self.module = module
        self.report = report
        self.digital_layers = digital_layers
        self._time = 0.0  # the time of a model with no analog layer (see time)
        self._graphs: Optional[PassGraphs] = None  # see use_cuda_graphs
        self._skippable: tuple = ()  # see allow_skipping

    def forward(self, *args, **kwargs):
        if torch.is_grad_enabled() and not self.__dict__.get("_warned_grad") and _any_requires_grad((args, kwargs)):
            warnings.warn("an input requires grad, but an analog model computes no gradients (its passes run "
                          "under torch.no_grad: a chip's reads have none), so its outputs do not require grad; "
                          "train the float model for the chip instead (eval.hwa)", RuntimeWarning, stacklevel=2)
            self._warned_grad = True  # (once per model)
        graphs = self.__dict__.get("_graphs")  # (absent from a model pickled before graphs existed)
        if graphs is not None:
            return self._run(lambda: graphs.run(self, args, kwargs), "forward pass")
        # the torch engine reads the device once per pass (crossbar.deferred)
        return self._run(lambda: deferred.deferred_pass(lambda: self.module(*args, **kwargs)), "forward pass")

    @normal_tensors
    def _apply(self, fn, recurse=True):
        # moved in a torch.inference_mode() block, the whole model stays normal tensors
        # (crossbar.tensor_mode): its parameters and buffers are kept by version
        return super()._apply(fn, recurse)

    def use_cuda_graphs(self, on: bool = True, keep: int = 4) -> "AnalogModel":
        """Run forward passes on a CUDA device as captured CUDA graphs
        (:mod:`mapping.graphs`), which cuts the host's cost of issuing a pass: the first
        pass of each input signature runs eagerly and is captured, later ones replay.
        Outputs, noise and counts are those of eager passes. A change of the model's
        state (``at``, calibration, a move, a changed tensor) captures again; ``keep``
        signatures are held at once, each with its pass's working memory."""
        if not isinstance(on, bool):
            raise ValueError(f"on = {on!r} is invalid: expected True or False")
        graphs = PassGraphs(keep)  # (keep is checked either way)
        if on:
            graphs.check_device(self)
        self._graphs = graphs if on else None
        return self

    def _run(self, fn, what: str):
        """fn() with fast paths off and products in IEEE float32 (``crossbar.precision``:
        a seed names the same outputs on every device), then the check that every analog
        layer ran."""
        layers = self.analog_layers()
        for _, layer in layers:
            layer.called = False
        try:
            with torch.no_grad(), fused_fast_paths_off(), ieee_float32():
                out = fn()
        except torch.cuda.OutOfMemoryError as error:
            raise torch.cuda.OutOfMemoryError(f"{error}\n{self._memory_hint()}") from error
        uncalled = [(name, layer) for name, layer in layers if not layer.called]
        allowed = self._skippable_layers() if uncalled else set()
        skipped = [name or type(layer).__name__ for name, layer in uncalled if id(layer) not in allowed]
        if skipped:
            raise RuntimeError(f"analog layer{'s' if len(skipped) > 1 else ''} {', '.join(map(repr, skipped))} "
                               f"{'were' if len(skipped) > 1 else 'was'} not called during the {what}: "
                               f"{NOT_CALLED_WHY}")
        return out

    def _memory_hint(self) -> str:
        """What an analog pass that ran out of GPU memory can hold less of."""
        budget = next((m.mapping.gpu_chunk_mb for m in self.modules() if isinstance(m, AnalogMatrix)), None)
        held = "" if budget is None else f" (here {budget} MiB)"
        return (f"xbarsim: an analog layer's read-out holds up to mapping.gpu_chunk_mb{held} on the GPU besides "
                f"the model's own activations: lower it (convert(..., mapping=MappingConfig(gpu_chunk_mb=...)), or "
                f"gpu_chunk_mb under [mapping] in a --config file) or the batch; outputs do not depend on it")

    def allow_skipping(self, *layers: str) -> "AnalogModel":
        """Let the analog layers named (module paths, or patterns such as ``"heads.*"``
        as :mod:`fnmatch` reads them; ``"*"``: every one) go uncalled in a forward pass or
        a calibration batch, for models that choose their layers per call: a head per
        task, an early exit, a mixture of experts. By default every analog layer must run
        in every pass, so that a fused path computing without the tiles is an error, not a
        silently digital result. Calibration still needs each layer called by some batch
        (its ranges come from what it saw). ``allow_skipping()`` is strict again."""
        names = [name for name, _ in self._layer_names()]
        for pattern in layers:
            if not isinstance(pattern, str) or not fnmatch.filter(names, pattern):
                raise ValueError(f"layers: {pattern!r} is invalid: expected the name or a pattern of an analog "
                                 f"layer; they are {', '.join(map(repr, names[:8]))}"
                                 f"{f' and {len(names) - 8} more' if len(names) > 8 else ''}")
        self._skippable = tuple(layers)
        return self

    def _layer_names(self) -> list:
        """(module path, analog layer) for every path of every analog layer (a shared
        layer has several)."""
        return [(name, m) for name, m in self.module.named_modules(remove_duplicate=False)
                if isinstance(m, AnalogLayer)]

    def _skippable_layers(self) -> set:
        """ids of the analog layers ``allow_skipping`` named (by any of their names)."""
        patterns = self.__dict__.get("_skippable", ())  # (absent from a model pickled before it existed)
        return {id(m) for name, m in self._layer_names() if any(fnmatch.fnmatchcase(name, p) for p in patterns)}

    def set_engine(self, engine: str) -> "AnalogModel":
        """Run every tile grid's products with ``engine``: "numba" (the CPU's), "torch"
        (what runs on GPUs; on the CPU it is the GPU path's test double) or "auto" (the
        device decides)."""
        for _, layer in self.analog_layers():
            for m in layer.matrices:
                m.grid.engine = engine
        return self

    @property
    def device(self) -> torch.device:
        """Where the chip's state lives (and inputs must be); for a model with no analog
        layer, where its float module's first parameter or buffer is (the CPU if none)."""
        layers = self.analog_layers()
        return layers[0][1].matrices[0].grid.torch_device if layers else module_device(self.module)

    @property
    def time(self) -> float:
        """The inference time (s since programming) the chip is at: its analog layers'
        (the first one's, where single layers were set apart), so a loaded state dict
        or a deep copy tells the time its chip was saved at."""
        layers = self.analog_layers()
        return layers[0][1].matrices[0].time if layers else self.__dict__.get("_time", 0.0)

    def analog_layers(self) -> list:
        return [(name, m) for name, m in self.module.named_modules() if isinstance(m, AnalogLayer)]

    def at(self, t: float) -> "AnalogModel":
        """Set the inference time (s since programming) of every analog layer."""
        t = inference_time(t)
        for _, layer in self.analog_layers():
            layer.at(t)
        self._time = t
        return self

    def calibrate(self, batches: Iterable, seed: int = 0) -> "AnalogModel":
        """Calibrate DAC/ADC ranges on sample inputs, layer by layer, right after programming.

        ``batches`` yields model inputs or (inputs, labels) pairs, by the convention of
        :mod:`mapping.inputs`: a tensor, a tuple of positional inputs or a dict of keyword
        inputs (a model of two inputs takes ``((x1, x2), y)`` or ``{"src": ..., "mask": ...}``).
        Float activations are propagated to collect each layer's inputs; each layer then
        calibrates at t = 0, and the model returns to its current time. The report gains
        each layer's calibration fallbacks (tiles that saw no signal)."""
        layers = self.analog_layers()
        batches = iter(batches)
        first = next(batches, _NOTHING)
        if first is _NOTHING:
            raise ValueError("calibrate(batches): batches yielded nothing")
        try:
            repeated = self._called_repeatedly(batch_inputs(first))
            for i, (_, layer) in enumerate(layers):
                layer.begin_calibration(seed + i, Reservoir if id(layer) in repeated else FirstRows)
            for batch in itertools.chain([first], batches):
                inputs = batch_inputs(batch)
                self._run(lambda: call_model(self.module, inputs), "calibration")
        except BaseException:
            for _, layer in layers:
                layer._calibration = None
            raise
        for _, layer in layers:
            layer.end_calibration()
        self._report_calibration()
        release_free_memory()
        return self

    def _called_repeatedly(self, inputs) -> set:
        """ids of the analog layers called more than once in a float pass on ``inputs``
        (the first calibration batch): their samples are drawn from every call
        (``mapping.calibration_sample``), as the first calls alone would be the first
        time steps of a recurrence, or the first use of a shared layer."""
        layers = [layer for _, layer in self.analog_layers()]
        calls = collections.Counter()  # calls of each layer module (a layer may offer a pass in chunks)
        handles = [layer.register_forward_pre_hook(lambda module, args: calls.update([id(module)]))
                   for layer in layers]
        for layer in layers:
            layer.begin_calibration(0, Unsampled)  # float products, nothing kept
        try:
            self._run(lambda: call_model(self.module, inputs), "calibration")
            return {key for key, n in calls.items() if n > 1}
        finally:
            for handle in handles:
                handle.remove()
            for layer in layers:
                layer._calibration = None

    def _report_calibration(self) -> None:
        """Per analog layer in ``report``: tiles whose ADC range came from their
        conductances, and whether the DAC range did, because the sample gave no signal."""
        entries = {entry["layer"]: entry for entry in self.report if entry["where"] == "analog"}
        for name, layer in self.analog_layers():
            counts = layer.counts()
            entry = entries.get(name or layer.layer_name)
            if entry is not None:
                entry["adc_range_fallback_tiles"] = counts["adc_range_fallback"]
                entry["dac_range_fallback"] = counts["dac_range_fallback"]

    def calibration_fallbacks(self) -> dict:
        """{layer: (tiles calibrated without signal, tiles)} for layers that had any, from
        the report that calibration fills."""
        return {e["layer"]: (e["adc_range_fallback_tiles"], e["tiles"]) for e in self.report
                if e.get("adc_range_fallback_tiles") or e.get("dac_range_fallback")}

    def counts(self) -> dict:
        """Per analog layer: clipped weights and inputs, saturated outputs, clamped devices."""
        return {name: layer.counts() for name, layer in self.analog_layers()}

    def reset_counts(self) -> None:
        for _, layer in self.analog_layers():
            layer.reset_counts()


def _any_requires_grad(inputs) -> bool:
    return any(isinstance(leaf, torch.Tensor) and leaf.requires_grad for leaf in tree_flatten(inputs)[0])


@normal_tensors
def convert(model: nn.Module, tile_config: TileConfig, seed: SeedLike = None,
            fold_batchnorm: bool = False, mapping: Optional[MappingConfig] = None,
            device=None) -> AnalogModel:
    """A new module in which every matrix layer of a mapped type (``ANALOG_LAYERS``: Linear,
    Conv1d/2d/3d, ConvTranspose1d/2d, MultiheadAttention, RNN, LSTM, GRU and their cells,
    their subclasses that keep the base's forward, and registered types) runs on
    programmed tiles.

    The original model is untouched: a copy (``plain_copy``: pruned, normed and
    parametrized weights as its forward computes them) is converted. A module held under
    several names is one analog layer under each. Layers that cannot be mapped stay
    digital and are named in a warning and in ``report``. Each layer's tiles draw from
    their own sub-stream of ``seed``, so results are reproducible layer by layer.
    ``device`` (a torch device or its name, e.g. "cuda") puts the converted model there,
    as ``.to(device)`` would, and programs its chip there: the same chip as on the host
    for the same seed (``crossbar.chip_on_device``).
    """
    device = resolve_device(device, "device")
    if not isinstance(model, nn.Module):
        raise ValueError(f"model = {type(model).__name__} is invalid: expected a torch.nn.Module")
    if not isinstance(tile_config, TileConfig):
        raise ValueError(f"tile_config = {tile_config!r} is invalid: expected a crossbar.TileConfig")
    if not isinstance(fold_batchnorm, bool):
        raise ValueError(f"fold_batchnorm = {fold_batchnorm!r} is invalid: expected True or False")
    mapping = mapping if mapping is not None else MappingConfig()
    if not isinstance(mapping, MappingConfig):
        raise ValueError(f"mapping = {mapping!r} is invalid: expected a mapping.MappingConfig")
    root_seed = as_seed_sequence(seed)  # a bad seed fails before any copying
    _check_convertible(model)
    module = plain_copy(model).cpu().float()
    if fold_batchnorm:
        module = _fold_batchnorm(module)
    report, digital = [], {}  # digital: {module path: type name}
    targets, refused = mapped_modules(module)
    paths = shared_paths(module, [name for name, _, _ in targets])
    analog_names = set()
    # programmed where they will run (without a device: where grids_made_on says, the host by default)
    with grids_made_on(device) if device is not None else contextlib.nullcontext():
        analog_layers = list(on_tiles(targets, tile_config, root_seed, mapping))
    for name, layer, analog in analog_layers:
        label = name or type(layer).__name__
        if not name:
            module = analog
        # a module under several paths (shared weights) runs on the same tiles under each
        for path in paths[name] if name else ():
            parent_name, _, child = path.rpartition(".")
            setattr(module.get_submodule(parent_name) if parent_name else module, child, analog)
        analog_names.update(paths[name])
        entries = _analog_entries(name, label, layer, analog)
        if len(paths[name]) > 1:
            entries[0]["shared_with"] = paths[name][1:]
        report.extend(entries)
    for m in module.modules():
        if isinstance(m, nn.TransformerEncoder):
            m.use_nested_tensor = False  # its nested-tensor fast path would bypass the analog layers
    reported = set()
    # every path (a float module shared with one inside a mapped module is still called here), each module once
    for name, m in module.named_modules(remove_duplicate=False):
        if (isinstance(m, AnalogLayer) or id(m) in reported
                or any(name == a or name.startswith(a + ".") for a in analog_names if a)):
            continue
        reported.add(id(m))
        own = list(m.parameters(recurse=False))
        if own:
            digital[name] = type(m).__name__
            report.append({"layer": name, "type": type(m).__name__, "where": "digital",
                           "parameters": sum(p.numel() for p in own)})
    if digital:
        # the reason a subclass stays digital names its type; the model itself has no name of its own
        named = [f"{name or 'the model'} ({refused.get(name, kind)})" for name, kind in digital.items()]
        # stacklevel 3: the caller of convert, past normal_tensors' wrapper
        warnings.warn(f"layers kept digital (not mapped to tiles): {', '.join(named)}", stacklevel=3)
    # in eval mode as a whole, as the copy was put: the analog layers are new modules
    # (torch makes them in training mode), and an attention's or a recurrent layer's
    # dropout acts in training mode
    analog_model = AnalogModel(module, report, list(digital)).eval()
    return analog_model if device is None else analog_model.to(device)


def _check_convertible(model: nn.Module) -> None:
    """Refuse a model holding analog layers (their chips would be kept as they are,
    whatever this conversion's configuration) or lazy layers not yet run."""
    programmed = [name or type(m).__name__ for name, m in model.named_modules() if isinstance(m, AnalogLayer)]
    if programmed:
        raise ValueError(f"model = {type(model).__name__} is invalid: it holds analog layers already "
                         f"({', '.join(map(repr, programmed[:3]))}{', ...' if len(programmed) > 3 else ''}): "
                         f"convert the float model")
    for name, m in model.named_modules():
        lazy = [n for n, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False))
                if nn.parameter.is_lazy(t)]
        if lazy:
            raise ValueError(f"model = {type(model).__name__} is invalid: layer {name or type(m).__name__!r} "
                             f"({type(m).__name__}) has uninitialized {', '.join(lazy)}: run the model once on "
                             f"a sample input before converting it, which sets their shapes")


def mapped_modules(model: nn.Module) -> tuple:
    """What ``convert`` puts on tiles: ([(module path, module, analog type)] in the model's
    order, {module path: why a subclass of a mapped type stays digital}). Modules inside
    a mapped one (an attention's out_proj) belong to it."""
    targets, refused = [], {}
    for name, m in model.named_modules():
        if any(name.startswith(t + ".") for t, _, _ in targets if t):
            continue
        analog_type, why = analog_type_for(m)
        if analog_type is not None:
            targets.append((name, m, analog_type))
            if not name:
                break  # the model itself is one mapped layer
        elif why:
            refused[name] = why
    return targets, refused


def shared_paths(model: nn.Module, targets: list) -> dict:
    """{target path: every path of that module in ``model``, the target's first}, for
    the module paths ``targets`` (``mapped_modules``' first paths, none inside another):
    a module held under several names (``nn.ModuleList([block] * n)``, an alias) is
    called under each. Paths inside another target are left to that target's own
    conversion."""
    instance = {id(model.get_submodule(t)): t for t in targets}
    paths = {t: [t] for t in targets}
    for path, m in model.named_modules(remove_duplicate=False):
        target = instance.get(id(m))
        if target is not None and path != target and not any(path.startswith(t + ".") for t in targets if t):
            paths[target].append(path)
    return paths


def on_tiles(targets: list, tile_config: TileConfig, seed: SeedLike, mapping: MappingConfig):
    """(module path, module, its analog counterpart) for each of ``mapped_modules``'
    targets, programmed: the i-th draws from sub-stream i of ``seed``."""
    root_seed = as_seed_sequence(seed)
    for index, (name, layer, analog_type) in enumerate(targets):
        label = name or type(layer).__name__
        yield name, layer, analog_type.from_torch(layer, tile_config, derive(root_seed, index), mapping, label)


def is_digital_bias(parameter_name: str) -> bool:
    """A mapped module's parameters are its tile weights and its biases, which stay
    digital (bias, in_proj_bias, out_proj.bias, bias_ih_l0, ...)."""
    return "bias" in parameter_name.rsplit(".", 1)[-1]


def tile_parameters(model: nn.Module) -> list:
    """(mapped module path, parameter name) of every weight ``convert`` puts on tiles, in
    the model's order (e.g. ("0", "weight"), ("attn", "in_proj_weight"),
    ("attn", "out_proj.weight"), ("lstm", "weight_hh_l0"))."""
    return [(name, p) for name, m, _ in mapped_modules(model)[0]
            for p, _ in m.named_parameters() if not is_digital_bias(p)]


def _analog_entries(name: str, label: str, layer: nn.Module, analog: nn.Module) -> list:
    """Report entries of one mapped module (at module path ``name``): one per analog layer
    in it (the module itself, or the projections of an attention, named by their module
    paths), and what of it stays digital."""
    parts = [(label, analog)] if isinstance(analog, AnalogLayer) else \
        [(f"{name}.{n}" if name else n, m) for n, m in analog.named_modules() if isinstance(m, AnalogLayer)]
    entries = [{
        "layer": part_label, "type": type(layer).__name__, "where": "analog",
        "matrix": [len(part.matrices)] + list(part.matrices[0].shape),
        "tiles": sum(m.n_tiles for m in part.matrices),
        "devices": 2 * sum(m.shape[0] * m.shape[1] for m in part.matrices),
        "clipped_weights": sum(m.clipped_weights for m in part.matrices),
    } for part_label, part in parts]
    digital_part = getattr(analog, "DIGITAL_PART", None)
    if digital_part:
        entries.append({"layer": label, "type": type(layer).__name__, "where": "digital", "parameters": 0,
                        "computes": digital_part})
    return entries
