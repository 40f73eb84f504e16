"""PNG plots of a run: accuracy against inference time (analog with 95% CI bars, the
ideal model, the baseline levels), and conductance and weight-error histograms."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

from .results import format_duration  # noqa: E402


def plot_accuracy_vs_time(results: dict, path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    times = [a["time"] for a in results["analog"]]
    x = [max(t, 1e-1) for t in times]  # log axis: t = 0 drawn at 0.1 s
    means = [100 * a["accuracy_mean"] for a in results["analog"]]
    err = [[100 * (a["accuracy_mean"] - a["ci95"][0]) for a in results["analog"]],
           [100 * (a["ci95"][1] - a["accuracy_mean"]) for a in results["analog"]]]
    ax.errorbar(x, means, yerr=err, fmt="o-", capsize=4, color="C0", label="analog crossbar (95% CI)")
    ax.axhline(100 * results["ideal_accuracy"], color="k", linestyle="--", label="ideal (float)")
    for i, b in enumerate(results["baseline"]):
        label = f"baseline {b['normalization']} {b['sigma']:g}"
        ax.axhspan(100 * b["ci95"][0], 100 * b["ci95"][1], color=f"C{i + 1}", alpha=0.15)
        ax.axhline(100 * b["accuracy_mean"], color=f"C{i + 1}", linestyle=":", label=label)
    ax.set_xscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels([format_duration(t) for t in times])
    ax.set_xlabel("inference time after programming")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{results.get('dataset')} / {results.get('model')}: accuracy over time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_histograms(histograms: dict, path) -> Path:
    fig, (ax_g, ax_w) = plt.subplots(1, 2, figsize=(10, 4))
    for t, h in sorted(histograms.items()):
        label = f"t = {format_duration(float(t))}"
        ax_g.hist(h["conductance_uS"], bins=80, histtype="step", label=label)
        ax_w.hist(h["weight_error"], bins=80, histtype="step", label=label)
    ax_g.set_xlabel("conductance G+ and G- (uS)")
    ax_g.set_ylabel("devices")
    ax_g.set_yscale("log")
    ax_g.set_title("programmed conductances (first chip)")
    ax_w.set_xlabel("weight error (W_read - W) / max|W| of the layer")
    ax_w.set_ylabel("weights")
    ax_w.set_title("weight error (first chip, drift compensated)")
    for ax in (ax_g, ax_w):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
