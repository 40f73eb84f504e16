"""Figures of a sweep directory: line plots with 95% confidence bands for one swept
field, heatmaps of accuracy loss for two, series (and panels) split by a third; any
further fields get one figure per combination of their values."""
from __future__ import annotations

import csv
import itertools
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

UNITS = {"time": "s", "tile.rows": "rows per tile", "tile.cols": "columns per tile", "tile.adc.bits": "bits",
         "tile.dac.bits": "bits", "tile.device.g_min": "uS", "tile.device.g_max": "uS",
         "tile.device.prog_sigma_abs": "uS", "tile.device.read_sigma_abs": "uS", "tile.device.t0": "s",
         "tile.device.prog_noise_scale": "x fit", "tile.device.drift_scale": "x fit",
         "tile.device.read_noise_1f_scale": "x fit", "tile.device.levels": "levels",
         "baseline.eta": "sigma / std(W)", "baseline.snr_db": "dB"}


def _label(path: str) -> str:
    return f"{path} ({UNITS[path]})" if path in UNITS else path


def _value(text: str):
    try:
        v = float(text)
        return int(v) if v.is_integer() and "." not in text and "e" not in text.lower() else v
    except ValueError:
        return text


def read_sweep(directory) -> tuple:
    """(rows with parsed values, the swept fields whose value varies)."""
    d = Path(directory)
    path = d / "results.csv"
    if not path.is_file():
        raise ValueError(f"{d}: no results.csv (run 'xbarsim sweep SPEC.toml --out {d}' first)")
    with open(path, newline="") as f:
        rows = [{k: _value(v) if v != "" else None for k, v in row.items()} for row in csv.DictReader(f)]
    if not rows:
        raise ValueError(f"{path}: no finished points yet")
    spec = json.loads((d / "spec.json").read_text()) if (d / "spec.json").is_file() else {}
    swept = list(spec.get("swept", []))
    for p in spec.get("points", [{}]):
        swept += [k for k in p if k not in swept]
    varying = [k for k in swept if len({str(r.get(k)) for r in rows}) > 1]
    return rows, varying


def _sorted_values(rows, field):
    values = {r[field] for r in rows}
    return sorted(values, key=lambda v: (isinstance(v, str), v))


def _log_axis(values) -> bool:
    nums = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return len(nums) == len(values) and min(nums) > 0 and max(nums) / min(nums) > 20


def _line(ax, rows, x_field, series_field=None):
    series = _sorted_values(rows, series_field) if series_field else [None]
    for i, s in enumerate(series):
        sub = [r for r in rows if series_field is None or r[series_field] == s]
        xs = _sorted_values(sub, x_field)
        pick = {r[x_field]: r for r in sub}
        numeric = all(isinstance(x, (int, float)) for x in xs)
        pos = xs if numeric else list(range(len(xs)))
        mean = [100 * pick[x]["accuracy_mean"] for x in xs]
        lo = [100 * pick[x]["ci95_low"] for x in xs]
        hi = [100 * pick[x]["ci95_high"] for x in xs]
        label = f"{series_field} = {s}" if series_field else "analog (95% CI)"
        ax.plot(pos, mean, "o-", color=f"C{i}", label=label)
        ax.fill_between(pos, lo, hi, color=f"C{i}", alpha=0.2)
        if not numeric:
            ax.set_xticks(pos)
            ax.set_xticklabels([str(x) for x in xs])
    if _log_axis(_sorted_values(rows, x_field)):
        ax.set_xscale("log")
    ideal = max(100 * r["ideal_accuracy"] for r in rows)
    ax.axhline(ideal, color="k", linestyle="--", label="ideal (float)")
    ax.set_xlabel(_label(x_field))
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _heatmap(fig, ax, rows, x_field, y_field):
    xs, ys = _sorted_values(rows, x_field), _sorted_values(rows, y_field)
    loss = np.full((len(ys), len(xs)), np.nan)
    for r in rows:
        loss[ys.index(r[y_field]), xs.index(r[x_field])] = 100 * (r["ideal_accuracy"] - r["accuracy_mean"])
    im = ax.imshow(loss, origin="lower", cmap="viridis_r", aspect="auto")
    for (j, i), v in np.ndenumerate(loss):
        if not math.isnan(v):
            ax.text(i, j, f"{v:.1f}", ha="center", va="center", fontsize=8,
                    color="white" if v > np.nanmean(loss) else "black")
    ax.set_xticks(range(len(xs)))
    ax.set_xticklabels([str(x) for x in xs])
    ax.set_yticks(range(len(ys)))
    ax.set_yticklabels([str(y) for y in ys])
    ax.set_xlabel(_label(x_field))
    ax.set_ylabel(_label(y_field))
    fig.colorbar(im, ax=ax, label="accuracy loss (percentage points)")


def plot_sweep(directory) -> list:
    """Write the sweep's PNGs into ``directory``; returns their paths."""
    d = Path(directory)
    rows, fields = read_sweep(d)
    main, extra = fields[:3], fields[3:]
    groups = itertools.product(*[_sorted_values(rows, f) for f in extra]) if extra else [()]
    written = []
    for combo in groups:
        sub = [r for r in rows if all(r[f] == v for f, v in zip(extra, combo))]
        if not sub:
            continue
        suffix = "".join(f"_{f}={v}" for f, v in zip(extra, combo)).replace("/", "-")
        title = ", ".join(f"{f} = {v}" for f, v in zip(extra, combo))
        panels = _sorted_values(sub, main[2]) if len(main) == 3 else [None]
        if not main:  # nothing varies: one point
            fig, ax = plt.subplots(figsize=(4, 4))
            r = sub[0]
            ax.errorbar([0], [100 * r["accuracy_mean"]], yerr=[[100 * (r["accuracy_mean"] - r["ci95_low"])],
                                                                 [100 * (r["ci95_high"] - r["accuracy_mean"])]], fmt="o")
            ax.axhline(100 * r["ideal_accuracy"], color="k", linestyle="--", label="ideal")
            ax.set_ylabel("test accuracy (%)")
            ax.set_xticks([])
            written.append(_save(fig, d / f"accuracy{suffix}.png", title))
            continue
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
        for ax, panel in zip(axes[0], panels):
            part = [r for r in sub if panel is None or r[main[2]] == panel]
            _line(ax, part, main[0], main[1] if len(main) > 1 else None)
            if panel is not None:
                ax.set_title(f"{main[2]} = {panel}")
        written.append(_save(fig, d / f"accuracy_vs_{main[0]}{suffix}.png", title))
        if len(main) >= 2:
            fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
            for ax, panel in zip(axes[0], panels):
                part = [r for r in sub if panel is None or r[main[2]] == panel]
                _heatmap(fig, ax, part, main[0], main[1])
                if panel is not None:
                    ax.set_title(f"{main[2]} = {panel}")
            written.append(_save(fig, d / f"loss_{main[1]}_vs_{main[0]}{suffix}.png", title))
    return written


def _save(fig, path: Path, title: str) -> Path:
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
