"""PNG plots of a run: accuracy against inference time (analog with 95% CI bars, the
ideal model, the baseline levels), and conductance and weight-error histograms.

Figures are built with ``matplotlib.figure.Figure`` and its Agg canvas directly:
importing this module does not touch matplotlib's global backend or pyplot state."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from .results import format_duration
from .stats import ci_bounds


def save_figure(fig: Figure, path, dpi: int = 120) -> Path:
    fig.savefig(path, dpi=dpi)  # Figure picks the Agg canvas for PNG on its own
    return Path(path)


def error_bars(rows: list, scale: float = 100.0) -> list:
    """[below, above] distances of each row's 95% CI from its mean (0 where n/a)."""
    below, above = [], []
    for r in rows:
        low, high = ci_bounds(r["ci95"])
        below.append(0.0 if low is None else scale * (r["accuracy_mean"] - low))
        above.append(0.0 if high is None else scale * (high - r["accuracy_mean"]))
    return [below, above]


def plot_accuracy_vs_time(results: dict, path) -> Path:
    return save_figure(accuracy_figure(results), path)


def accuracy_figure(results: dict) -> Figure:
    """Accuracy against inference time: analog with CI bars, ideal, baseline levels."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    times = [a["time"] for a in results["analog"]]
    x = [max(t, 1e-1) for t in times]  # log axis: t = 0 drawn at 0.1 s
    means = [100 * a["accuracy_mean"] for a in results["analog"]]
    ax.errorbar(x, means, yerr=error_bars(results["analog"]), fmt="o-", capsize=4, color="C0",
                label="analog crossbar (95% CI)")
    ax.axhline(100 * results["ideal_accuracy"], color="k", linestyle="--", label="ideal (float)")
    for i, b in enumerate(results["baseline"]):
        low, high = ci_bounds(b["ci95"])
        if low is not None:
            ax.axhspan(100 * low, 100 * high, color=f"C{i + 1}", alpha=0.15)
        ax.axhline(100 * b["accuracy_mean"], color=f"C{i + 1}", linestyle=":",
                   label=f"baseline {b['normalization']} {b['sigma']:g}")
    ax.set_xscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels([format_duration(t) for t in times])
    ax.set_xlabel("inference time after programming")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{results.get('dataset')} / {results.get('model')}: accuracy over time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # beside the data, never over it
    return fig


def shared_edges(samples: list, bins: int = 80) -> np.ndarray:
    """Bin edges spanning every sample, so that histograms of different times compare."""
    values = np.concatenate([np.asarray(s, dtype=np.float64).ravel() for s in samples])
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, bins + 1)


def plot_histograms(histograms: dict, path) -> Path:
    return save_figure(histogram_figure(histograms), path)


def histogram_figure(histograms: dict) -> Figure:
    """Conductance and weight-error histograms per time, on bin edges shared by all times."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_g, ax_w = fig.subplots(1, 2)
    items = sorted(histograms.items(), key=lambda kv: float(kv[0]))
    if items:
        g_edges = shared_edges([h["conductance_uS"] for _, h in items])
        w_edges = shared_edges([h["weight_error"] for _, h in items])
        for t, h in items:
            label = f"t = {format_duration(float(t))}"
            ax_g.hist(h["conductance_uS"], bins=g_edges, histtype="step", label=label)
            ax_w.hist(h["weight_error"], bins=w_edges, histtype="step", label=label)
    ax_g.set_xlabel("conductance G+ and G- (uS)")
    ax_g.set_ylabel("devices")
    ax_g.set_yscale("log")
    ax_g.set_title("conductances read at each time (first chip)")
    ax_w.set_xlabel("weight error (W_read - W) / max|W| of the layer")
    ax_w.set_ylabel("weights")
    ax_w.set_title("weight error (first chip, drift compensated)")
    for ax in (ax_g, ax_w):
        if items:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return fig
