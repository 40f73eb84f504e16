"""Whole torch models on crossbar tiles."""
from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager
from typing import Iterable, Optional

import torch
from torch import nn

from crossbar import TileConfig
from crossbar.seeding import SeedLike, as_seed_sequence, derive

from .batchnorm import fold_batchnorm as _fold_batchnorm
from .config import MappingConfig
from .inputs import batch_inputs, call_model
from .conv import AnalogConv2d
from .layers import NOT_CALLED_WHY, AnalogLayer, AnalogLinear
from .devices import resolve_device
from .memory import release_free_memory

# torch layer type -> analog wrapper; everything else stays digital
ANALOG_LAYERS = {nn.Linear: AnalogLinear, nn.Conv2d: AnalogConv2d, nn.Conv1d: AnalogConv2d}


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
        self.time = 0.0

    def forward(self, *args, **kwargs):
        return self._run(lambda: self.module(*args, **kwargs), "forward pass")

    def _run(self, fn, what: str):
        """fn() with fast paths off, then the check that every analog layer ran."""
        layers = self.analog_layers()
        for _, layer in layers:
            layer.called = False
        with torch.no_grad(), fused_fast_paths_off():
            out = fn()
        skipped = [name or type(layer).__name__ for name, layer in layers if not layer.called]
        if skipped:
            raise RuntimeError(f"analog layer{'s' if len(skipped) > 1 else ''} {', '.join(map(repr, skipped))} "
                               f"{'were' if len(skipped) > 1 else 'was'} not called during the {what}: "
                               f"{NOT_CALLED_WHY}")
        return out

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
        """Where the chip's state lives (and inputs must be)."""
        _, layer = self.analog_layers()[0]
        return layer.matrices[0].grid.torch_device

    def analog_layers(self) -> list:
        return [(name, m) for name, m in self.module.named_modules() if isinstance(m, AnalogLayer)]

    def at(self, t: float) -> "AnalogModel":
        """Set the inference time (s since programming) of every analog layer."""
        for _, layer in self.analog_layers():
            layer.at(t)
        self.time = float(t)
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
        for i, (_, layer) in enumerate(layers):
            layer.begin_calibration(seed + i)
        seen = 0
        try:
            for batch in batches:
                inputs = batch_inputs(batch)
                self._run(lambda: call_model(self.module, inputs), "calibration")
                seen += 1
        except BaseException:
            for _, layer in layers:
                layer._calibration = None
            raise
        if seen == 0:
            for _, layer in layers:
                layer._calibration = None
            raise ValueError("calibrate(batches): batches yielded nothing")
        for _, layer in layers:
            layer.end_calibration()
        self._report_calibration()
        release_free_memory()
        return self

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


def convert(model: nn.Module, tile_config: TileConfig, seed: SeedLike = None,
            fold_batchnorm: bool = False, mapping: Optional[MappingConfig] = None,
            device=None) -> AnalogModel:
    """A new module in which every Linear, Conv1d and Conv2d runs on programmed tiles.

    The original model is untouched. Layers that cannot be mapped stay digital and are
    named in a warning and in ``report``. Each layer's tiles draw from their own
    sub-stream of ``seed``, so results are reproducible layer by layer. ``device`` (a
    torch device or its name, e.g. "cuda") moves the converted model there, as
    ``.to(device)`` would: the chip is programmed on the host and is the same on every
    device for the same seed.
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
    root_seed = as_seed_sequence(seed)
    module = copy.deepcopy(model).cpu().float().eval()
    if fold_batchnorm:
        module = _fold_batchnorm(module)
    report, digital = [], []
    targets = [(name, m) for name, m in module.named_modules() if type(m) in ANALOG_LAYERS and name]
    if type(module) in ANALOG_LAYERS:
        targets = [("", module)]
    for index, (name, layer) in enumerate(targets):
        layer_seed = derive(root_seed, index)
        label = name or type(layer).__name__
        analog = ANALOG_LAYERS[type(layer)].from_torch(layer, tile_config, layer_seed, mapping, label)
        if name:
            parent_name, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent_name) if parent_name else module, child, analog)
        else:
            module = analog
        tiles = sum(m.n_tiles for m in analog.matrices)
        report.append({
            "layer": label, "type": type(layer).__name__, "where": "analog",
            "matrix": [len(analog.matrices)] + list(analog.matrices[0].shape),
            "tiles": tiles, "devices": 2 * sum(m.shape[0] * m.shape[1] for m in analog.matrices),
            "clipped_weights": sum(m.clipped_weights for m in analog.matrices),
        })
    analog_names = {name for name, _ in targets}
    for m in module.modules():
        if isinstance(m, nn.TransformerEncoder):
            m.use_nested_tensor = False  # its nested-tensor fast path would bypass the analog layers
    for name, m in module.named_modules():
        if isinstance(m, AnalogLayer) or any(name == a or name.startswith(a + ".") for a in analog_names if a):
            continue
        own = list(m.parameters(recurse=False))
        if own:
            digital.append(name)
            report.append({"layer": name, "type": type(m).__name__, "where": "digital",
                           "parameters": sum(p.numel() for p in own)})
    if digital:
        warnings.warn(f"layers kept digital (not mapped to tiles): {', '.join(digital)}", stacklevel=2)
    analog_model = AnalogModel(module, report, digital)
    return analog_model if device is None else analog_model.to(device)
