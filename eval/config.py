"""Configuration of an experiment: tiles, mapping, baseline, validation, times, repeats.

A TOML file (``xbarsim run --config FILE.toml``) names a preset and overrides any field:

    preset = "pcm"          # ideal | gaussian | pcm | reram | hermes: the base tile configuration
    repeats = 10
    times = [1, 3600, 86400]
    [tile]                  # any TileConfig field
    rows = 128
    [tile.adc]
    bits = 6
    [tile.device]
    drift_scale = 2.0
    [mapping]               # any MappingConfig field
    scale = "column"
    [baseline]
    normalization = "snr_db"
    snr_db = [10, 20, 30]
    [hwa]                   # hardware-aware training (xbarsim train --config; see eval/hwa.py)
    mode = "device"
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from crossbar import TileConfig
from crossbar.configbase import Config, _fail, check_bool, check_choice, check_int, check_number
from crossbar.presets import PRESETS
from mapping import MappingConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_TIMES = (1.0, 3600.0, 86400.0, 2592000.0, 31536000.0)  # 1 s, 1 h, 1 day, 30 days, 365 days


def _float_tuple(owner: str, name: str, value, lo: float, hi: float, unit: str = "") -> tuple:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, (list, tuple)) or len(value) == 0:
        _fail(owner, name, value, "expected a non-empty list of numbers")
    return tuple(check_number(owner, f"{name}[{i}]", v, lo, hi, unit=unit) for i, v in enumerate(value))


@dataclass(frozen=True)
class BaselineConfig(Config):
    """The additive-noise baseline W' = W + sigma xi (PHYSICS.md section 7).

    Attributes:
        enabled: evaluate the baseline at all.
        normalization: how sigma is set per layer: ``"std"`` (eta * std(W)), ``"max"``
            (eta * max|W|) or ``"snr_db"`` (sigma^2 = mean(W^2) / 10^(SNR/10); every
            layer gets the same SNR).
        eta: noise levels for ``std`` and ``max``, each in [0, 100].
        snr_db: noise levels for ``snr_db``, dB, each in [-100, 200].
        noise_bias: also noise biases (same rule, per layer).
        noise_batchnorm: also noise batch-norm weights and biases.
    """

    enabled: bool = True
    normalization: str = "std"
    eta: tuple = (0.02, 0.05, 0.1, 0.2)
    snr_db: tuple = (30.0, 20.0, 10.0)
    noise_bias: bool = False
    noise_batchnorm: bool = False

    def validate(self) -> None:
        o = "BaselineConfig"
        check_bool(o, "enabled", self.enabled)
        check_choice(o, "normalization", self.normalization, ("std", "max", "snr_db"))
        object.__setattr__(self, "eta", _float_tuple(o, "eta", self.eta, 0.0, 100.0))
        object.__setattr__(self, "snr_db", _float_tuple(o, "snr_db", self.snr_db, -100.0, 200.0, "dB"))
        check_bool(o, "noise_bias", self.noise_bias)
        check_bool(o, "noise_batchnorm", self.noise_batchnorm)

    @property
    def levels(self) -> tuple:
        return self.snr_db if self.normalization == "snr_db" else self.eta

    def first_level(self) -> "BaselineConfig":
        """This baseline at its first noise level only (one level per sweep point)."""
        field = "snr_db" if self.normalization == "snr_db" else "eta"
        return self.replace(**{field: self.levels[:1]})


@dataclass(frozen=True)
class ValidationConfig(Config):
    """The check of PHYSICS.md section 7: a crossbar with Gaussian programming noise only
    against the baseline at the equivalent sigma = sqrt(2) sigma_abs max|W| / (g_max - g_min).

    Attributes:
        enabled: run the check.
        prog_sigma_abs: programming sigma of each device, uS, > 0.
        g_min: g_min of the check's devices, uS: far enough above 0 that the clamp never acts.
        g_max: g_max of the check's devices, uS, > g_min.
        tolerance: the check passes when the 95% CI of the difference of mean accuracies
            contains 0 or lies within +-tolerance (a fraction of accuracy), in [0, 1].
    """

    enabled: bool = True
    prog_sigma_abs: float = 1.0
    g_min: float = 10.0
    g_max: float = 35.0
    tolerance: float = 0.01

    def validate(self) -> None:
        o = "ValidationConfig"
        check_bool(o, "enabled", self.enabled)
        check_number(o, "prog_sigma_abs", self.prog_sigma_abs, 0.0, 1e6, lo_open=True, unit="uS")
        check_number(o, "g_min", self.g_min, 0.0, 1e6, unit="uS")
        check_number(o, "g_max", self.g_max, self.g_min, 1e6, lo_open=True, unit="uS")
        check_number(o, "tolerance", self.tolerance, 0.0, 1.0)


@dataclass(frozen=True)
class RunConfig(Config):
    """Everything that decides an experiment's numbers (data and model aside).

    Attributes:
        preset: the preset the tile configuration started from (recorded for reference).
        tile: the tile configuration.
        mapping: the weight mapping.
        baseline: the additive-noise baseline.
        validation: the crossbar-versus-baseline check.
        times: inference times, s since programming, each in [0, 1e10].
        repeats: Monte Carlo repeats (freshly programmed chips), in [1, 100000].
        seed: root seed of everything random, >= 0.
        calibration_samples: training samples used to calibrate DAC/ADC ranges, >= 1.
        eval_samples: test samples evaluated (the first n), or 0 for all.
    """

    preset: str = "pcm"
    tile: TileConfig = field(default_factory=lambda: PRESETS["pcm"]())
    mapping: MappingConfig = field(default_factory=MappingConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    times: tuple = DEFAULT_TIMES
    repeats: int = 10
    seed: int = 0
    calibration_samples: int = 256
    eval_samples: int = 0

    def validate(self) -> None:
        o = "RunConfig"
        check_choice(o, "preset", self.preset, sorted(PRESETS))
        object.__setattr__(self, "times", _float_tuple(o, "times", self.times, 0.0, 1e10, "s"))
        repeated = sorted({t for t in self.times if self.times.count(t) > 1})
        if repeated:  # counted twice, a time would narrow its own CI and appear twice in tables
            _fail(o, "times", self.times, f"{repeated[0]:g} s is listed more than once (e.g. 1d and 24h are "
                                          f"the same time); list each time once")
        check_int(o, "repeats", self.repeats, 1, 100000)
        check_int(o, "seed", self.seed, 0, 2 ** 63 - 1)
        check_int(o, "calibration_samples", self.calibration_samples, 1, 10 ** 7)
        check_int(o, "eval_samples", self.eval_samples, 0, 10 ** 8)


def run_config_from_dict(data: dict) -> RunConfig:
    """A RunConfig from nested plain data: ``tile`` overrides the named preset's fields."""
    data = dict(data)
    preset = data.get("preset", "pcm")
    if preset not in PRESETS:
        raise ValueError(f"preset = {preset!r} is invalid: expected one of {', '.join(sorted(PRESETS))}")
    tile = PRESETS[preset]().to_dict()
    overrides = data.pop("tile", {})
    if not isinstance(overrides, dict):
        raise ValueError(f"tile = {overrides!r} is invalid: expected a table of fields")
    data["tile"] = _merge(tile, overrides, "tile")
    return RunConfig.from_dict(data)


def _merge(base: dict, overrides: dict, path: str) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        if key not in base:
            raise ValueError(f"unknown field {path}.{key}; allowed: {', '.join(base)}")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ValueError(f"{path}.{key} = {value!r} is invalid: expected a table of fields")
            out[key] = _merge(base[key], value, f"{path}.{key}")
        else:
            out[key] = value
    return out


def read_toml(path: str, label: str, error: type = ValueError) -> dict:
    """A TOML file as a dict; unreadable or invalid files raise ``error`` naming ``label``."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as err:
        raise error(f"{label}: cannot read: {err}") from None
    except tomllib.TOMLDecodeError as err:
        raise error(f"{label}: not valid TOML: {err}") from None


def load_run_config(path: str) -> RunConfig:
    """A RunConfig from a TOML file. An ``[hwa]`` table (the training settings of
    ``xbarsim train --config``, so that one file describes the chip for both) is
    validated and left to training."""
    data = read_toml(path, f"--config {path}")
    table = data.pop("hwa", None)
    try:
        config = run_config_from_dict(data)
        if table is not None:
            from .hwa import hwa_config_from

            hwa_config_from(table, config)
        return config
    except ValueError as err:
        raise ValueError(f"--config {path}: {err}") from None
