"""A device given as a table of measured statistics (PHYSICS.md section 11).

The table is CSV with a header row: ``g_target, prog_mean, prog_std`` and optionally
``nu_mean, nu_std`` (both or neither) and ``read_std``; conductances and sigmas in uS, nu
dimensionless. Every column is interpolated linearly in g_target between rows, and the
end rows hold outside the table. Programming draws N(prog_mean(g_T), prog_std(g_T));
drift takes nu = |N(nu_mean(g_T), nu_std(g_T))| in the law of section 3; read_std is the
per-read (white) sigma at the conductance read. The CSV text itself is kept in the
device configuration (``DeviceConfig.table_csv``), so results record what was used.
"""
from __future__ import annotations

import csv
import functools
import io
from typing import Dict

import numpy as np

from .arrays import float64, interp, namespace
from .base import Device

REQUIRED = ("g_target", "prog_mean", "prog_std")
OPTIONAL = ("nu_mean", "nu_std", "read_std")
SIGMAS = ("prog_std", "nu_std", "read_std")


def parse_table(text: str, source: str) -> Dict[str, np.ndarray]:
    """The columns of a device table (CSV text from ``source``), validated: known and
    required columns, a number in every cell, g_target strictly increasing, sigmas and
    conductances >= 0. Errors name the source, the row (line number) and the column."""
    rows = list(csv.reader(io.StringIO(text)))
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if not rows:
        raise ValueError(f"device table {source}: empty; expected a header row "
                         f"{', '.join(REQUIRED)} [, {', '.join(OPTIONAL)}] and one row per g_target")
    header = [cell.strip() for cell in rows[0]]
    for name in header:
        if name not in REQUIRED + OPTIONAL:
            raise ValueError(f"device table {source}: row 1: unknown column {name!r}; "
                             f"allowed: {', '.join(REQUIRED + OPTIONAL)}")
    if len(set(header)) != len(header):
        raise ValueError(f"device table {source}: row 1: a column appears twice: {header}")
    for name in REQUIRED:
        if name not in header:
            raise ValueError(f"device table {source}: row 1: missing column {name!r} "
                             f"(required: {', '.join(REQUIRED)})")
    if ("nu_mean" in header) != ("nu_std" in header):
        raise ValueError(f"device table {source}: row 1: columns 'nu_mean' and 'nu_std' go together")
    if len(rows) < 2:
        raise ValueError(f"device table {source}: no data rows after the header")
    values = np.empty((len(rows) - 1, len(header)))
    for i, row in enumerate(rows[1:]):
        line = i + 2
        if len(row) != len(header):
            raise ValueError(f"device table {source}: row {line}: {len(row)} cells for {len(header)} columns")
        for j, cell in enumerate(row):
            try:
                v = float(cell)
            except ValueError:
                v = float("nan")
            if not np.isfinite(v):
                raise ValueError(f"device table {source}: row {line}: column {header[j]!r} = {cell.strip()!r} "
                                 f"is not a finite number")
            if v < 0 and header[j] in SIGMAS + ("g_target", "prog_mean"):
                raise ValueError(f"device table {source}: row {line}: column {header[j]!r} = {v:g} is negative; "
                                 f"conductances and sigmas are >= 0")
            values[i, j] = v
    columns = {name: values[:, j] for j, name in enumerate(header)}
    g = columns["g_target"]
    for i in range(1, len(g)):
        if not g[i] > g[i - 1]:
            raise ValueError(f"device table {source}: row {i + 2}: column 'g_target' = {g[i]:g} does not "
                             f"increase (previous row: {g[i - 1]:g}); rows must be in increasing g_target")
    return columns


@functools.lru_cache(maxsize=32)
def _parsed(text: str, source: str) -> Dict[str, np.ndarray]:
    columns = parse_table(text, source)
    for values in columns.values():
        values.flags.writeable = False  # shared by every device made from this text
    return columns


def _columns(config) -> Dict[str, np.ndarray]:
    """The validated columns of a config's table, parsed once per text (the config's
    validation and every grid's device read the same one)."""
    return _parsed(config.table_csv, config.table or "given as DeviceConfig.table_csv")


def table_csv(g_target: np.ndarray, **columns: np.ndarray) -> str:
    """CSV text of a device table: g_target and the named columns (see module doc)."""
    names = ["g_target"] + [n for n in REQUIRED[1:] + OPTIONAL if n in columns]
    unknown = sorted(set(columns) - set(names))
    if unknown:
        raise ValueError(f"unknown device table column {unknown[0]!r}; allowed: {', '.join(REQUIRED + OPTIONAL)}")
    data = [np.asarray(g_target, dtype=np.float64)] + [np.asarray(columns[n], dtype=np.float64) for n in names[1:]]
    lines = [",".join(names)] + [",".join(repr(float(c[i])) for c in data) for i in range(len(data[0]))]
    return "\n".join(lines) + "\n"


class TableDevice(Device):
    name = "table"
    has_drift = True  # where the table has drift columns (check_config)

    def __init__(self, config) -> None:
        super().__init__(config)
        self.columns = _columns(config)

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        if cfg.table_csv is None:
            raise ValueError("DeviceConfig.table = None is invalid for model 'table': give the CSV file of the "
                             "device's measured statistics (PHYSICS.md section 11)")
        header = _columns(cfg)
        if cfg.drift and "nu_mean" not in header:
            raise ValueError(f"DeviceConfig.drift = True is invalid for device table {cfg.table}: it has no "
                             f"nu_mean/nu_std columns")
        if "read_std" in header and (cfg.read_sigma_abs or cfg.read_sigma_rel):
            raise ValueError(f"DeviceConfig.read_sigma_abs/read_sigma_rel = {cfg.read_sigma_abs!r}/"
                             f"{cfg.read_sigma_rel!r} is invalid with device table {cfg.table}: its read_std "
                             f"column gives the read noise")

    def _at(self, name: str, g: np.ndarray) -> np.ndarray:
        return interp(float64(g), self.columns["g_target"], self.columns[name])

    def programming_mean(self, g_target: np.ndarray) -> np.ndarray:
        return self._at("prog_mean", g_target)

    def programming_sigma(self, g_target: np.ndarray) -> np.ndarray:
        return self._at("prog_std", g_target)

    def drift_exponents(self, g_target: np.ndarray, normals) -> np.ndarray:
        xp = namespace(g_target)
        if not self.config.drift:
            return xp.zeros_like(g_target)
        mu, sigma = self._at("nu_mean", g_target), self._at("nu_std", g_target)
        return xp.abs(mu + sigma * normals()) * self.config.drift_scale

    def read_variance(self, g: np.ndarray) -> np.ndarray:
        if "read_std" in self.columns:
            return self._at("read_std", g) ** 2
        return super().read_variance(g)

    @property
    def has_fast_noise(self) -> bool:
        return "read_std" in self.columns and bool(np.any(self.columns["read_std"] > 0)) or super().has_fast_noise
