"""Shared plumbing of the studies: options, data, cached models, output files."""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from eval.datasets import default_cache_dir, load_dataset
from eval.experiment import check_cuda_graphs
from eval.stats import ci_bounds
from eval.train import train_or_load
from mapping.devices import resolve_device


def parser(description: str, out: str, chips: bool = True) -> argparse.ArgumentParser:
    """The studies' common options; ``chips``: the study evaluates crossbar chips (and
    takes --cuda-graphs), not the additive baseline alone."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--dataset", default="digits", choices=["digits", "mnist", "cifar10", "cifar100"])
    p.add_argument("--data-dir", help="MNIST idx or CIFAR pickle directory")
    p.add_argument("--repeats", type=int, default=5, help="Monte Carlo repeats per point (default 5)")
    p.add_argument("--epochs", type=int, help="training epochs (default depends on the data set)")
    p.add_argument("--eval-samples", type=int, default=0, help="evaluate on the first n test samples (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=out, help=f"output directory (default {out})")
    p.add_argument("--device", help="where models train (when not cached) and evaluate, chips included: cpu "
                                    "(default), cuda or cuda:N")
    if chips:
        p.add_argument("--cuda-graphs", action="store_true",
                       help="with --device cuda: the chips' passes replay as CUDA graphs (xbarsim run --cuda-graphs)")
    return p


def device_of(args):
    """The torch device of --device (None: the CPU engine); a bad one, or --cuda-graphs
    off a GPU, fails before any work."""
    device = resolve_device(args.device)
    check_cuda_graphs(getattr(args, "cuda_graphs", False), device, ("--cuda-graphs", "--device"))
    return device


def data_and_models(args, pairs):
    """The data set and {(model, batchnorm): trained model}, trained once (on --device)
    and cached."""
    device = device_of(args)
    data = load_dataset(args.dataset, args.data_dir)
    models = {}
    for name, bn in pairs:
        models[(name, bn)], _, _ = train_or_load(data, name, bn, default_cache_dir(), args.epochs, seed=args.seed,
                                               progress=sys.stderr.isatty(), device=device)
    return data, models


def write_csv(path: Path, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def loss_points(ideal: float, accuracy: float) -> float:
    return 100.0 * (ideal - accuracy)


def summary(row: dict) -> dict:
    """The mean and 95% CI columns of an evaluated row (CI bounds None where n/a)."""
    low, high = ci_bounds(row["ci95"])
    return {"accuracy_mean": row["accuracy_mean"], "ci95_low": low, "ci95_high": high}


def plot_band(ax, rows: list, label: str, color: str, style: str = "o-") -> None:
    """Mean accuracy (%) against ``level`` with its 95% CI as a band (none where n/a)."""
    levels = [r["level"] for r in rows]
    mean = [100 * r["accuracy_mean"] for r in rows]
    ax.plot(levels, mean, style, color=color, label=label)
    low = [100 * r["ci95_low"] if r["ci95_low"] is not None else m for r, m in zip(rows, mean)]
    high = [100 * r["ci95_high"] if r["ci95_high"] is not None else m for r, m in zip(rows, mean)]
    ax.fill_between(levels, low, high, color=color, alpha=0.12)


def write_findings(path: Path, lines: list) -> None:
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
