"""Hardware-aware (HWA) training: train with the chip's weight errors in the loop.

Noise is injected into the weights that ``mapping.convert`` puts on tiles, fresh for
every batch, for that batch's forward and backward pass; the optimizer then updates the
clean weights with the gradient taken at the noisy ones (Joshi et al., Nature
Communications 11:2473, 2020; Rasch et al., Nature Communications 14:5282, 2023).
Biases and batch-norm parameters stay clean, as they stay digital on the chip. Modes:

- ``additive``: W + sigma xi, xi ~ N(0, 1) per weight, sigma = eta std(W) or eta max|W|
  per weight tensor: exactly the baseline's noise (PHYSICS.md section 7).
- ``device``: the weights a freshly programmed chip holds (``mapping.convert``'s own
  code: the configured tiles' mapping, programming noise, drift to a time drawn per
  batch log-uniformly from [t_min, t_max], the 1/f sample at that time and global drift
  compensation), read back in weight units (``weights_held``). Per-read noise, IR drop
  and the converters are not weight errors and are not in it; quantization is below.

Independently of the mode: weights on tiles clipped to +-k std(W) of their tensor after
every optimizer step (keeps max|W|, and so the conductance scale, from being set by a few
outliers), and straight-through DAC/ADC quantization of the inputs and outputs (before
the digital bias) of Linear and convolution layers, with ranges set by each batch's
largest magnitude, as a calibrated converter with percentile 100 would set them.
"""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from torch import nn

from crossbar import ADCConfig, DACConfig, TileConfig
from crossbar.chip_draws import VERSION as CHIP_DRAWS_VERSION
from crossbar.configbase import Config, _fail, check_choice, check_int, check_number
from crossbar.grid import grids_made_on
from crossbar.presets import PRESETS
from crossbar.rng import stream_key
from crossbar.seeding import derive
from mapping import AnalogLayer, MappingConfig, mapped_modules, on_tiles, tile_parameters
from mapping.devices import module_device

from .baseline import layer_sigma
from .results import format_duration

MODES = ("off", "additive", "device")
# sub-streams of the training seed (the sample order uses the seed itself, on torch's generator)
_NOISE_STREAM, _TIME_STREAM, _CHIP_STREAM = 1, 2, 3
_MAX_BITS = 24


@dataclass(frozen=True)
class HWAConfig(Config):
    """How a model is trained for the chip; the default trains plainly.

    Attributes:
        mode: weight noise per batch: ``"off"``, ``"additive"`` or ``"device"`` (module docstring).
        normalization: additive sigma per weight tensor: ``"std"`` (eta std(W)) or ``"max"`` (eta max|W|).
        eta: additive noise level, in [0, 100].
        t_min: device mode: earliest inference time drawn, s, in (0, 1e10].
        t_max: device mode: latest inference time drawn, s, in [t_min, 1e10]; times are
            log-uniform in [t_min, t_max] (equal: that time).
        clip_sigma: clip weights on tiles to +-clip_sigma std(W) of their tensor after every
            step, in [0, 100]; 0: no clipping.
        dac_bits: straight-through input quantization in training, bits in [2, 24], or None (off).
        adc_bits: straight-through output quantization in training, bits in [2, 24], or None (off).
        tile: device mode: the tiles whose weight errors are injected (any preset; its
            converters are not used, see dac_bits/adc_bits).
        mapping: device mode: the weight mapping (scale, clip, drift compensation).
    """

    mode: str = "off"
    normalization: str = "std"
    eta: float = 0.1
    t_min: float = 1.0
    t_max: float = 31536000.0
    clip_sigma: float = 0.0
    dac_bits: Optional[int] = None
    adc_bits: Optional[int] = None
    tile: TileConfig = field(default_factory=lambda: PRESETS["pcm"]())
    mapping: MappingConfig = field(default_factory=MappingConfig)

    def validate(self) -> None:
        o = "HWAConfig"
        check_choice(o, "mode", self.mode, MODES)
        check_choice(o, "normalization", self.normalization, ("std", "max"))
        check_number(o, "eta", self.eta, 0.0, 100.0)
        check_number(o, "t_min", self.t_min, 0.0, 1e10, lo_open=True, unit="s")
        check_number(o, "t_max", self.t_max, self.t_min, 1e10, unit="s")
        check_number(o, "clip_sigma", self.clip_sigma, 0.0, 100.0)
        check_int(o, "dac_bits", self.dac_bits, 2, _MAX_BITS, optional=True)
        check_int(o, "adc_bits", self.adc_bits, 2, _MAX_BITS, optional=True)
        for name, kind in (("tile", TileConfig), ("mapping", MappingConfig)):
            if not isinstance(getattr(self, name), kind):
                _fail(o, name, getattr(self, name), f"expected a {kind.__name__}")

    @property
    def plain(self) -> bool:
        """Nothing of the chip in training: plain training, bitwise."""
        return self.mode == "off" and self.clip_sigma == 0 and self.dac_bits is None and self.adc_bits is None

    def record(self) -> Optional[dict]:
        """What of this config decides the trained weights (None: plain training), for
        checkpoints and the model cache's key."""
        if self.plain:
            return None
        out = {"mode": self.mode, "clip_sigma": self.clip_sigma, "dac_bits": self.dac_bits, "adc_bits": self.adc_bits}
        if self.mode == "additive":
            out.update(normalization=self.normalization, eta=self.eta)
        if self.mode == "device":
            # the chips' draws decide the noise it trains with: models trained on other draws are not reused
            out.update(t_min=self.t_min, t_max=self.t_max, tile=self.tile.to_dict(), mapping=self.mapping.to_dict(),
                       chip_draws=CHIP_DRAWS_VERSION)
        return out


def describe(record: Optional[dict]) -> str:
    """How a checkpoint was trained, from its ``hwa`` record: "plainly" or "for the chip: ..."."""
    if not record:
        return "plainly"
    parts = []
    if record["mode"] == "additive":
        parts.append(f"additive weight noise, eta {record['eta']:g} x {record['normalization']}(W)")
    elif record["mode"] == "device":
        device = record["tile"]["device"]["model"]
        times = f"{format_duration(record['t_min'])} to {format_duration(record['t_max'])}"
        parts.append(f"device weight noise ({device} tiles, times {times})")
    if record["clip_sigma"]:
        parts.append(f"weights clipped to {record['clip_sigma']:g} std")
    for kind in ("dac", "adc"):
        if record[f"{kind}_bits"]:
            parts.append(f"{record[f'{kind}_bits']}-bit {kind.upper()} (straight-through)")
    return "for the chip: " + ", ".join(parts)


def load_hwa_config(path: str) -> HWAConfig:
    """An HWAConfig from a TOML file: its ``[hwa]`` table, with ``preset``, ``[tile]`` and
    ``[mapping]`` at the top level as in a run configuration (the same file may drive
    ``xbarsim run``: its other run settings are validated, and used by run only)."""
    from .config import read_toml, run_config_from_dict

    data = read_toml(path, f"--config {path}")
    table = data.pop("hwa", {})
    try:
        return hwa_config_from(table, run_config_from_dict(data))
    except ValueError as err:
        raise ValueError(f"--config {path}: {err}") from None


def hwa_config_from(table, run) -> HWAConfig:
    """An HWAConfig from a file's ``[hwa]`` table and the file's run configuration (its
    tiles and mapping)."""
    if not isinstance(table, dict):
        raise ValueError(f"hwa = {table!r} is invalid: expected a table of fields")
    misplaced = sorted({"tile", "mapping", "preset"} & set(table))
    if misplaced:
        raise ValueError(f"hwa.{misplaced[0]}: give preset, [tile] and [mapping] at the top level of the file, "
                         f"not inside [hwa]")
    return HWAConfig.from_dict({**table, "tile": run.tile, "mapping": run.mapping})


class WeightNoise:
    """The noise of one training run: ``draw()`` gives the next batch's (noisy weights,
    time), one tensor per weight on tiles (``mapping.tile_parameters`` order), and
    ``applied()`` puts them in place for a forward and backward pass and restores the
    clean weights bitwise."""

    def __init__(self, model: nn.Module, config: HWAConfig, seed: int) -> None:
        self.model, self.config, self.seed = model, config, seed
        self.keys = [f"{name}.{p}" if name else p for name, p in tile_parameters(model)]
        self.generator = torch.Generator().manual_seed(stream_key(derive(seed, _NOISE_STREAM)))
        self.time_rng = np.random.default_rng(derive(seed, _TIME_STREAM))
        self.step = 0
        if config.mode == "device":  # the converters are not weight errors; ideal ones need no ranges
            self.tile = config.tile.replace(dac=DACConfig(), adc=ADCConfig())

    def chip_seed(self, step: int) -> np.random.SeedSequence:
        """The seed of the chip drawn at ``step`` (as ``mapping.convert(model, tile, seed)``)."""
        return derive(self.seed, _CHIP_STREAM, step)

    def draw(self) -> tuple:
        """(noisy weights, time): the next batch's weights, and its inference time (device
        mode; None otherwise)."""
        step, self.step = self.step, self.step + 1
        params = [self.model.get_parameter(key) for key in self.keys]
        if self.config.mode == "additive":
            sigmas = [layer_sigma(p, self.config.normalization, self.config.eta) for p in params]
            # drawn on the host: the same noise whichever device trains
            return [p.detach() + (torch.randn(p.shape, generator=self.generator, dtype=p.dtype) * sigma).to(p.device)
                    for p, sigma in zip(params, sigmas)], None
        t_min, t_max = self.config.t_min, self.config.t_max
        t = t_min if t_min == t_max else math.exp(self.time_rng.uniform(math.log(t_min), math.log(t_max)))
        held = {}
        # the weights are mapped to conductances on the host, from host copies of layers
        # trained on a GPU; the chip is programmed and drifted where the model trains
        # (the same chip either way, crossbar.chip_on_device)
        device = module_device(self.model)
        targets = [(name, layer if module_device(layer).type == "cpu" else copy.deepcopy(layer).cpu(), kind)
                   for name, layer, kind in mapped_modules(self.model)[0]]
        with grids_made_on(None if device.type == "cpu" else device):
            for name, _, analog in on_tiles(targets, self.tile, self.chip_seed(step), self.config.mapping):
                for layer in analog.modules():  # the module itself, or an attention's projections
                    if isinstance(layer, AnalogLayer):
                        layer.at(t)
                held.update({f"{name}.{p}" if name else p: w for p, w in analog.weights_held().items()})
        return [held[key].to(p.device, p.dtype) for key, p in zip(self.keys, params)], t

    @contextmanager
    def applied(self):
        """The next batch's noise on the weights while the block runs."""
        noisy, _ = self.draw()
        params = [self.model.get_parameter(key) for key in self.keys]
        clean = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, w in zip(params, noisy):
                p.copy_(w)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, c in zip(params, clean):
                    p.copy_(c)


def clip_weights(model: nn.Module, k: float) -> None:
    """Clip every weight on tiles to +-k std of its tensor (taken before clipping)."""
    with torch.no_grad():
        for name, p in tile_parameters(model):
            w = model.get_parameter(f"{name}.{p}" if name else p)
            if w.numel() > 1:
                bound = k * float(w.std())
                w.clamp_(-bound, bound)


def _quantized(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x quantized to 2^(bits-1) - 1 steps per sign over +-max|x|, gradient passed
    straight through."""
    full_scale = x.detach().abs().max()
    if not full_scale > 0:
        return x
    step = full_scale / (2 ** (bits - 1) - 1)
    return x + (torch.round(x.detach() / step) * step - x.detach())


@contextmanager
def straight_through_converters(model: nn.Module, dac_bits: Optional[int], adc_bits: Optional[int]):
    """DAC quantization of each Linear/convolution layer's input and ADC quantization of
    its output before the bias, straight through, while the block runs."""
    handles = []
    if dac_bits is None and adc_bits is None:
        yield
        return
    targets, _ = mapped_modules(model)
    for name, m, _ in targets:
        if not isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            raise ValueError(f"HWAConfig.dac_bits/adc_bits: straight-through converters act on the inputs and "
                             f"outputs of Linear and convolution layers; {name or 'the model'!r} is a "
                             f"{type(m).__name__} (its products are inside its forward): train it without them")
    try:
        for _, m, _ in targets:
            if dac_bits is not None:
                handles.append(m.register_forward_pre_hook(
                    lambda module, args, bits=dac_bits: (_quantized(args[0], bits),) + tuple(args[1:])))
            if adc_bits is not None:
                handles.append(m.register_forward_hook(
                    lambda module, args, out, bits=adc_bits: _adc(module, out, bits)))
        yield
    finally:
        for h in handles:
            h.remove()


def _adc(module: nn.Module, out: torch.Tensor, bits: int) -> torch.Tensor:
    if module.bias is None:
        return _quantized(out, bits)
    shape = [1] * out.dim()
    # Linear: features last; a convolution: channels before its spatial dimensions
    shape[-1 if isinstance(module, nn.Linear) else out.dim() - len(module.kernel_size) - 1] = -1
    bias = module.bias.view(shape)
    return _quantized(out - bias, bits) + bias
