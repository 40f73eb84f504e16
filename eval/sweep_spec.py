"""Sweep specifications: parse, validate and expand a SPEC.toml before any work starts.

    dataset = "digits"        # data set (data_dir = "..." for files)
    model = "mlp"             # default model; sweep it with "model" in [grid]
    batchnorm = false
    repeats = 2               # Monte Carlo repeats per point
    seed = 0
    time = 86400              # inference time, s, unless "time" is swept
    baseline = false          # also evaluate the additive-noise baseline at each point
    [base]                    # an xbarsim run --config file: preset, tile, mapping, baseline...
    preset = "pcm"
    [grid]                    # the Cartesian product of these dotted paths
    "tile.rows" = [64, 128]
    "tile.adc.bits" = [4, 8]
    [[points]]                # and/or explicit points
    "tile.rows" = 256

Paths: any ``tile.*``, ``mapping.*`` or ``baseline.*`` field, and ``time``, ``model``,
``batchnorm``. ``baseline.eta`` (or ``baseline.snr_db``) takes one level per point.
"""
from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from typing import Any, Optional

from crossbar.presets import PRESETS

from .config import RunConfig, read_toml, run_config_from_dict
from .datasets import DATASETS
from .models import MODELS

TOP_LEVEL = {"dataset", "data_dir", "model", "batchnorm", "repeats", "seed", "time", "baseline", "epochs",
             "eval_samples", "fold_batchnorm", "base", "grid", "points"}
POINT_FIELDS = ("time", "model", "batchnorm")
CONFIG_ROOTS = ("tile", "mapping", "baseline")


class SpecError(ValueError):
    """A sweep specification that cannot run; raised before any work starts."""


DEVICE_MODEL_PATH = "tile.device.model"


@dataclass(frozen=True)
class SweepSpec:
    dataset: str
    data_dir: Optional[str]
    model: str
    batchnorm: bool
    repeats: int
    seed: int
    time: float
    baseline: bool
    epochs: Optional[int]
    eval_samples: int
    fold_batchnorm: bool
    base: RunConfig
    base_data: dict = field(compare=False)  # [base] as written: a device-model axis rebuilds on that model's preset
    points: tuple          # of dicts: dotted path -> value
    swept: tuple           # the dotted paths that vary, in spec order
    canonical: str         # JSON of everything above: a changed spec changes it

    def point_key(self, point: dict) -> str:
        return json.dumps(point, sort_keys=True)

    def setting(self, point: dict, name: str):
        return point.get(name, getattr(self, name))

    def point_config(self, point: dict) -> RunConfig:
        """The RunConfig of one point: the base with the point's paths applied. A point
        that sets ``tile.device.model`` to a model with a preset of its name starts
        from that preset (its g_max, t0, noise and drift settings), with [base]'s own
        overrides on top: devices differ in more than their name."""
        base = self.base
        model = point.get(DEVICE_MODEL_PATH)
        if model in PRESETS:
            base = run_config_from_dict({**self.base_data, "preset": model})
        cfg = base.with_path("times", (float(self.setting(point, "time")),)).with_path("repeats", self.repeats)
        # the fields of one configuration change together (a device model and the
        # settings it needs cannot be valid one at a time)
        groups: dict = {}
        for path, value in point.items():
            if path == DEVICE_MODEL_PATH and model in PRESETS:
                continue
            if path.split(".")[0] in CONFIG_ROOTS:
                if path in ("baseline.eta", "baseline.snr_db") and not isinstance(value, (list, tuple)):
                    value = (value,)
                parent, _, leaf = path.rpartition(".")
                groups.setdefault(parent, {})[leaf] = value
        for parent, changes in groups.items():
            try:
                cfg = cfg.with_path(parent, cfg.get_path(parent).replace(**changes))
            except ValueError as err:
                paths = ", ".join(f"{parent}.{leaf} = {value!r}" for leaf, value in changes.items())
                raise ValueError(f"{paths}: {err}") from None
        return cfg

    def point_seed(self, point: dict) -> int:
        """Derived from the spec's seed and the point without its time, so that a time
        series follows the same chips and any worker gets the same numbers."""
        key = json.dumps({k: v for k, v in point.items() if k != "time"}, sort_keys=True)
        return int(hashlib.sha256(f"{self.seed}:{key}".encode()).hexdigest()[:15], 16)

    def models(self) -> list:
        """The (model, batchnorm) pairs the points need."""
        return sorted({(self.setting(p, "model"), bool(self.setting(p, "batchnorm"))) for p in self.points})


def _fail(msg: str):
    raise SpecError(msg)


def _check_path(path: str) -> None:
    root = path.split(".")[0]
    if path in POINT_FIELDS:
        return
    if root not in CONFIG_ROOTS or "." not in path:
        _fail(f"unknown field path {path!r}: expected tile.<field>, mapping.<field>, baseline.<field>, "
              f"time, model or batchnorm")
    try:
        RunConfig().get_path(path)
    except ValueError:
        _fail(f"unknown field path {path!r}: {path.rsplit('.', 1)[0]} has no field {path.rsplit('.', 1)[1]!r}")


def _check_point_value(spec_base: RunConfig, path: str, value: Any, where: str) -> None:
    if path == "model" and value not in MODELS:
        _fail(f"{where}: model = {value!r} is unknown; allowed: {', '.join(MODELS)}")
    if path == "batchnorm" and not isinstance(value, bool):
        _fail(f"{where}: batchnorm = {value!r} is invalid: expected true or false")
    if path == "time" and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1e10):
        _fail(f"{where}: time = {value!r} is invalid: expected seconds in [0, 1e10]")


def parse_spec(data: dict, source: str = "spec") -> SweepSpec:
    if not isinstance(data, dict):
        _fail(f"{source}: expected a table")
    unknown = sorted(set(data) - TOP_LEVEL)
    if unknown:
        _fail(f"{source}: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(TOP_LEVEL))}")
    dataset = data.get("dataset", "digits")
    if dataset not in DATASETS:
        _fail(f"{source}: dataset = {dataset!r} is invalid: expected one of {', '.join(DATASETS)}")
    try:
        base = run_config_from_dict(data.get("base", {}))
    except ValueError as err:
        _fail(f"{source}: [base]: {err}")
    grid = data.get("grid", {})
    explicit = data.get("points", [])
    if not isinstance(grid, dict) or not isinstance(explicit, list):
        _fail(f"{source}: [grid] must be a table of lists and [[points]] a list of tables")
    if not grid and not explicit:
        _fail(f"{source}: nothing to sweep: give a [grid] of dotted paths or [[points]]")
    for path, values in grid.items():
        _check_path(path)
        if not isinstance(values, list) or not values:
            _fail(f"{source}: grid {path!r} = {values!r}: expected a non-empty list of values")
    points = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())] if grid else []
    for i, p in enumerate(explicit):
        if not isinstance(p, dict) or not p:
            _fail(f"{source}: points[{i}] must be a non-empty table of dotted paths")
        for path in p:
            _check_path(path)
        points.append(dict(p))
    swept = list(grid)
    for p in explicit:
        swept += [k for k in p if k not in swept]
    settings = {
        "dataset": dataset, "data_dir": data.get("data_dir"), "model": data.get("model", "cnn"),
        "batchnorm": data.get("batchnorm", False), "repeats": data.get("repeats", base.repeats),
        "seed": data.get("seed", 0), "time": data.get("time", 86400.0), "baseline": data.get("baseline", False),
        "epochs": data.get("epochs"), "eval_samples": data.get("eval_samples", 0),
        "fold_batchnorm": data.get("fold_batchnorm", False),
    }
    for name, lowest in (("repeats", 1), ("seed", 0), ("eval_samples", 0), ("epochs", 1)):
        v = settings[name]
        if name == "epochs" and v is None:  # the data set's default
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < lowest:
            _fail(f"{source}: {name} = {v!r} is invalid: expected an integer >= {lowest}")
    for name in ("baseline", "fold_batchnorm"):
        if not isinstance(settings[name], bool):
            _fail(f"{source}: {name} = {settings[name]!r} is invalid: expected true or false")
    for name in POINT_FIELDS:
        _check_point_value(base, name, settings[name], source)
    base_data = dict(data.get("base", {}))
    spec = SweepSpec(base=base, base_data=base_data, points=tuple(points), swept=tuple(swept), canonical="",
                     **settings)
    # every point must build before any work starts, and no two may be the same
    # experiment (counted twice, one point would narrow its own CI in the plots)
    resolved = {}
    for i, p in enumerate(points):
        where = f"{source}: point {i} ({spec.point_key(p)})"
        for path, value in p.items():
            _check_point_value(base, path, value, where)
        try:
            cfg = spec.point_config(p)
        except ValueError as err:
            _fail(f"{where}: {err}")
        # the config holds the time (as a float); model and batch norm sit beside it
        same = json.dumps([cfg.to_dict(), spec.setting(p, "model"), bool(spec.setting(p, "batchnorm"))],
                          sort_keys=True)
        if same in resolved:
            j = resolved[same]
            _fail(f"{where} is the same experiment as point {j} ({spec.point_key(points[j])}); "
                  f"list each point once")
        resolved[same] = i
    canonical = json.dumps({**settings, "base": base.to_dict(), "points": points, "swept": swept}, sort_keys=True)
    return SweepSpec(base=base, base_data=base_data, points=tuple(points), swept=tuple(swept), canonical=canonical,
                     **settings)


def load_spec(path: str) -> SweepSpec:
    return parse_spec(read_toml(path, str(path), SpecError), source=str(path))
