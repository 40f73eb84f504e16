"""Figures of a sweep directory: line plots with 95% confidence bands for one swept
field, heatmaps of accuracy loss for two, series (and panels) split by a third; any
further fields get one figure per combination of their values.

When a ``baseline.*`` field is swept the figures show the baseline's columns (the
crossbar does not depend on it). Every figure is titled with the data set, model,
time and repeats; times read in units (1 h, 30 d); heatmap panels share one colour
scale; legends sit beside the axes, never over the data."""
from __future__ import annotations

import csv
import itertools
import json
import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from .plots import save_figure
from .results import counted, format_duration

UNITS = {"time": "after programming", "tile.rows": "rows per tile", "tile.cols": "columns per tile",
         "tile.adc.bits": "bits", "tile.dac.bits": "bits", "tile.device.g_min": "uS", "tile.device.g_max": "uS",
         "tile.device.prog_sigma_abs": "uS", "tile.device.read_sigma_abs": "uS", "tile.device.t0": "s",
         "tile.device.prog_noise_scale": "x fit", "tile.device.drift_scale": "x fit",
         "tile.device.read_noise_1f_scale": "x fit", "tile.device.levels": "levels",
         "baseline.eta": "sigma / std(W)", "baseline.snr_db": "dB"}
ANALOG = {"mean": "accuracy_mean", "low": "ci95_low", "high": "ci95_high", "label": "analog crossbar"}
BASELINE = {"mean": "baseline_accuracy_mean", "low": "baseline_ci95_low", "high": "baseline_ci95_high",
            "label": "additive-noise baseline"}


def _label(path: str) -> str:
    return f"{path} ({UNITS[path]})" if path in UNITS else path


def _show(field: str, value) -> str:
    return format_duration(float(value)) if field == "time" and value is not None else str(value)


def _value(text: str):
    try:
        v = float(text)
        return int(v) if v.is_integer() and "." not in text and "e" not in text.lower() else v
    except ValueError:
        return text


def read_sweep(directory) -> tuple:
    """(rows with parsed values, the swept fields whose value varies, spec settings)."""
    d = Path(directory)
    path = d / "results.csv"
    if not path.is_file():
        raise ValueError(f"{d}: no results.csv (run 'xbarsim sweep SPEC.toml --out {d}' first)")
    if not (d / "spec.json").is_file():
        hint = " (it looks like an 'xbarsim run' output, whose plots are already in it)" \
            if (d / "results.json").is_file() else ""
        raise ValueError(f"{d}: not a sweep directory: no spec.json{hint}")
    try:
        spec = json.loads((d / "spec.json").read_text())
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = [{k: _value(v) if v != "" else None for k, v in row.items()} for row in reader]
            columns = reader.fieldnames or []
    except (OSError, ValueError, csv.Error) as err:
        raise ValueError(f"{d}: cannot read the sweep's files: {err}") from None
    missing = [c for c in ("point", "ideal_accuracy", *ANALOG.values()) if c != ANALOG["label"] and c not in columns]
    if missing:
        raise ValueError(f"{path}: not a sweep's results (missing columns {', '.join(missing)})")
    if not rows:
        raise ValueError(f"{path}: no finished points yet")
    swept = list(spec.get("swept", []))
    for p in spec.get("points", [{}]):
        swept += [k for k in p if k not in swept]
    varying = [k for k in swept if len({str(r.get(k)) for r in rows}) > 1]
    return rows, varying, spec


def _sorted_values(rows, field):
    values = {r[field] for r in rows}
    return sorted(values, key=lambda v: (isinstance(v, str), v))


def _log_axis(values) -> bool:
    nums = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return len(nums) == len(values) and min(nums) > 0 and max(nums) / min(nums) > 20


def _columns(fields) -> dict:
    """Baseline columns when any plotted field is a baseline setting."""
    return BASELINE if any(f.startswith("baseline.") for f in fields if f) else ANALOG


def _line(ax, rows, x_field, series_field=None):
    cols = _columns([x_field, series_field])
    series = _sorted_values(rows, series_field) if series_field else [None]
    for i, s in enumerate(series):
        sub = [r for r in rows if series_field is None or r[series_field] == s]
        xs = _sorted_values(sub, x_field)
        pick = {r[x_field]: r for r in sub}
        numeric = all(isinstance(x, (int, float)) for x in xs)
        pos = xs if numeric else list(range(len(xs)))
        mean = [100 * pick[x][cols["mean"]] for x in xs]
        # where a point's CI is n/a (one repeat, or every repeat equal) the band is its mean
        lo = [100 * (pick[x][cols["low"]] if pick[x][cols["low"]] is not None else pick[x][cols["mean"]]) for x in xs]
        hi = [100 * (pick[x][cols["high"]] if pick[x][cols["high"]] is not None else pick[x][cols["mean"]]) for x in xs]
        label = f"{series_field} = {_show(series_field, s)}" if series_field else f"{cols['label']} (95% CI)"
        ax.plot(pos, mean, "o-", color=f"C{i}", label=label)
        ax.fill_between(pos, lo, hi, color=f"C{i}", alpha=0.2)
        if not numeric:
            ax.set_xticks(pos)
            ax.set_xticklabels([str(x) for x in xs])
    values = _sorted_values(rows, x_field)
    if _log_axis(values):
        ax.set_xscale("log")
    if x_field == "time":
        ax.set_xticks(values)
        ax.set_xticklabels([_show("time", v) for v in values])
        ax.minorticks_off()
    ideal = max(100 * r["ideal_accuracy"] for r in rows)
    ax.axhline(ideal, color="k", linestyle="--", label="ideal (float)")
    ax.set_xlabel(_label(x_field))
    ax.set_ylabel(f"test accuracy (%), {cols['label']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))


def _loss_grid(rows, x_field, y_field) -> tuple:
    cols = _columns([x_field, y_field])
    xs, ys = _sorted_values(rows, x_field), _sorted_values(rows, y_field)
    loss = np.full((len(ys), len(xs)), np.nan)
    for r in rows:
        loss[ys.index(r[y_field]), xs.index(r[x_field])] = 100 * (r["ideal_accuracy"] - r[cols["mean"]])
    return xs, ys, loss, cols


def _heatmap(ax, grid, x_field, y_field, vmin: float, vmax: float):
    xs, ys, loss, _ = grid
    im = ax.imshow(loss, origin="lower", cmap="viridis_r", aspect="auto", vmin=vmin, vmax=vmax)
    middle = (vmin + vmax) / 2
    for (j, i), v in np.ndenumerate(loss):
        if not math.isnan(v):
            ax.text(i, j, f"{v:.1f}", ha="center", va="center", fontsize=8, color="white" if v > middle else "black")
    ax.set_xticks(range(len(xs)))
    ax.set_xticklabels([_show(x_field, x) for x in xs])
    ax.set_yticks(range(len(ys)))
    ax.set_yticklabels([_show(y_field, y) for y in ys])
    ax.set_xlabel(_label(x_field))
    ax.set_ylabel(_label(y_field))
    return im


def _title(spec: dict, fields: list, extra: str) -> str:
    """Data set, model, time and repeats (those not swept), then the figure's fixed values."""
    parts = [str(spec.get("dataset", "?"))]
    if "model" not in fields:
        parts.append(f"{spec.get('model')}{' (batch norm)' if spec.get('batchnorm') else ''}")
    if "time" not in fields and spec.get("time") is not None:
        parts.append(f"t = {format_duration(float(spec['time']))}")
    parts.append(f"{counted(spec.get('repeats'), 'repeat')} per point")
    return ", ".join(parts) + (f"\n{extra}" if extra else "")


def plot_sweep(directory) -> list:
    """Write the sweep's PNGs into ``directory``; returns their paths."""
    d = Path(directory)
    return [save_figure(fig, d / name, dpi=110) for name, fig in sweep_figures(d)]


def sweep_figures(directory) -> list:
    """(file name, Figure) for each figure of a sweep directory."""
    rows, fields, spec = read_sweep(directory)
    main, extra = fields[:3], fields[3:]
    groups = itertools.product(*[_sorted_values(rows, f) for f in extra]) if extra else [()]
    figures = []
    for combo in groups:
        sub = [r for r in rows if all(r[f] == v for f, v in zip(extra, combo))]
        if not sub:
            continue
        suffix = "".join(f"_{f}={v}" for f, v in zip(extra, combo)).replace("/", "-")
        title = _title(spec, fields, ", ".join(f"{f} = {_show(f, v)}" for f, v in zip(extra, combo)))
        panels = _sorted_values(sub, main[2]) if len(main) == 3 else [None]
        if not main:  # nothing varies: one point
            figures.append((f"accuracy{suffix}.png", _single_point(sub[0], title)))
            continue
        fig = Figure(figsize=(6.5 * len(panels) + 1.5, 4.8), layout="constrained")
        for ax, panel in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
            part = [r for r in sub if panel is None or r[main[2]] == panel]
            _line(ax, part, main[0], main[1] if len(main) > 1 else None)
            if panel is not None:
                ax.set_title(f"{main[2]} = {_show(main[2], panel)}")
        fig.suptitle(title)
        figures.append((f"accuracy_vs_{main[0]}{suffix}.png", fig))
        if len(main) >= 2:
            grids = [_loss_grid([r for r in sub if panel is None or r[main[2]] == panel], main[0], main[1])
                     for panel in panels]
            finite = np.concatenate([g[2][~np.isnan(g[2])] for g in grids])
            vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
            if vmax <= vmin:
                vmax = vmin + 1.0
            fig = Figure(figsize=(6 * len(panels) + 1.5, 4.8), layout="constrained")
            axes = fig.subplots(1, len(panels), squeeze=False)[0]
            for ax, panel, grid in zip(axes, panels, grids):
                im = _heatmap(ax, grid, main[0], main[1], vmin, vmax)
                if panel is not None:
                    ax.set_title(f"{main[2]} = {_show(main[2], panel)}")
            fig.colorbar(im, ax=list(axes), label=f"accuracy loss (points), {grids[0][3]['label']}")
            fig.suptitle(title)
            figures.append((f"loss_{main[1]}_vs_{main[0]}{suffix}.png", fig))
    return figures


def _single_point(r: dict, title: str) -> Figure:
    fig = Figure(figsize=(5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    below = 0.0 if r["ci95_low"] is None else 100 * (r["accuracy_mean"] - r["ci95_low"])
    above = 0.0 if r["ci95_high"] is None else 100 * (r["ci95_high"] - r["accuracy_mean"])
    ax.errorbar([0], [100 * r["accuracy_mean"]], yerr=[[below], [above]], fmt="o", label="analog crossbar (95% CI)")
    ax.axhline(100 * r["ideal_accuracy"], color="k", linestyle="--", label="ideal (float)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_xticks([])
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(title)
    return fig
