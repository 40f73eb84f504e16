"""Study: what hardware-aware training buys on PCM crossbars.

A CNN and LeNet-5, each trained plainly, with additive weight noise (eta x std(W) per
weight tensor) and with the PCM device's own weight errors (programming noise at the
study's training scale, drift to a time drawn per batch from 1 s to 1 year, 1/f noise,
drift compensation), all with the same seed and epochs; both HWA modes clip weights to
3 std after every step. Each model is evaluated on PCM crossbars (programming noise
scaled 1x to 4x, 1 s, 1 day and 1 year after programming, 8-bit DAC and ADC, drift
compensation on; the same chips for every model) and under the additive baseline.
Writes hwa_training.csv, .png and .txt under --out; the findings compare accuracy at
1 year and 3x programming noise with and without HWA, with Welch 95% CIs.

    python benchmarks/studies/hwa_training.py [--dataset mnist --data-dir DIR] [--repeats 5]
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from matplotlib.figure import Figure

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import device_of, loss_points, parser, plot_band, summary, write_csv, write_findings  # noqa: E402

from crossbar import presets  # noqa: E402
from eval.config import BaselineConfig  # noqa: E402
from eval.datasets import default_cache_dir, load_dataset  # noqa: E402
from eval.experiment import evaluate_analog, evaluate_baseline, float_accuracy  # noqa: E402
from eval.hwa import HWAConfig, describe  # noqa: E402
from eval.stats import difference_ci  # noqa: E402
from eval.train import train_or_load  # noqa: E402
from mapping import MappingConfig  # noqa: E402

MODELS = ("cnn", "lenet5")
TRAININGS = ("plain", "additive", "device")
NOISE_SCALES = (1.0, 2.0, 3.0, 4.0)
TIMES = (1.0, 86400.0, 31536000.0)
ETAS = (0.1, 0.2, 0.3, 0.5)
HEADLINE_SCALE, HEADLINE_TIME = 3.0, 31536000.0


def hwa_configs(args) -> dict:
    device_tile = presets.pcm(prog_noise_scale=args.train_noise_scale)
    return {"plain": HWAConfig(),
            "additive": HWAConfig(mode="additive", eta=args.train_eta, clip_sigma=3.0),
            "device": HWAConfig(mode="device", t_min=1.0, t_max=31536000.0, clip_sigma=3.0, tile=device_tile)}


def main() -> None:
    p = parser(__doc__.splitlines()[0], "study-results")
    p.add_argument("--train-eta", type=float, default=0.3, help="additive HWA noise level (default 0.3 x std(W))")
    p.add_argument("--train-noise-scale", type=float, default=HEADLINE_SCALE,
                   help="device HWA: programming-noise scale of the training chips (default 3)")
    args = p.parse_args()
    out = Path(args.out)
    device = device_of(args)
    data = load_dataset(args.dataset, args.data_dir)
    test = data.batches("test", limit=args.eval_samples or None)
    calibration = data.batches("train", limit=256)
    trainings = hwa_configs(args)
    rows, accuracies = [], {}
    for name in MODELS:
        for training, hwa in trainings.items():
            model, meta, _ = train_or_load(data, name, False, default_cache_dir(), args.epochs, seed=args.seed,
                                           progress=sys.stderr.isatty(), hwa=hwa, device=device)
            ideal = float_accuracy(model, test, device)
            common = dict(model=name, training=training, ideal=ideal)
            for scale in NOISE_SCALES:
                result = evaluate_analog(model, presets.pcm(prog_noise_scale=scale), MappingConfig(), test,
                                         calibration, TIMES, args.repeats, args.seed, progress=False, device=device,
                                         cuda_graphs=args.cuda_graphs)
                for row in result["rows"]:
                    rows.append(dict(common, kind="crossbar", noise_scale=scale, time=row["time"], level=scale,
                                     **summary(row)))
                    accuracies[(name, training, scale, row["time"])] = row["accuracies"]
            for b in evaluate_baseline(model, test, BaselineConfig(eta=ETAS), args.repeats, args.seed, progress=False,
                                       device=device):
                rows.append(dict(common, kind="baseline", noise_scale=None, time=None, level=b["sigma"],
                                 **summary(b)))
            print(f"{name} {training} ({describe(meta.get('hwa'))}): ideal {100 * ideal:.2f}%", flush=True)
    write_csv(out / "hwa_training.csv", rows)
    plot(rows, data.name, args.repeats, out / "hwa_training.png")
    write_findings(out / "hwa_training.txt", findings(rows, accuracies, data.name, args))


def plot(rows: list, dataset: str, repeats: int, path: Path) -> None:
    fig = Figure(figsize=(15, 8), layout="constrained")
    axes = fig.subplots(len(MODELS), 3, squeeze=False)
    for i, name in enumerate(MODELS):
        for j, training in enumerate(TRAININGS):
            mine = [r for r in rows if r["model"] == name and r["training"] == training]
            color = f"C{j}"
            at_year = [r for r in mine if r["kind"] == "crossbar" and r["time"] == HEADLINE_TIME]
            plot_band(axes[i][0], at_year, training, color)
            over_time = [dict(r, level=r["time"]) for r in mine
                         if r["kind"] == "crossbar" and r["noise_scale"] == HEADLINE_SCALE]
            plot_band(axes[i][1], over_time, training, color)
            plot_band(axes[i][2], [r for r in mine if r["kind"] == "baseline"], training, color)
        for ax, xlabel in zip(axes[i], ("PCM programming-noise scale (x the fit), 1 year",
                                        f"time since programming (s), noise x{HEADLINE_SCALE:g}",
                                        "additive baseline eta (sigma / std(W))")):
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"{name} test accuracy (%)")
            ax.grid(alpha=0.3)
        axes[i][1].set_xscale("log")
        axes[i][0].legend(fontsize=8)
    fig.suptitle(f"hardware-aware training on {dataset} ({repeats} repeats, 95% CI)")
    fig.savefig(path, dpi=110)


def findings(rows: list, accuracies: dict, dataset: str, args) -> list:
    lines = [f"Hardware-aware training on {dataset} ({args.repeats} repeats per point, seed {args.seed}; "
             f"additive eta {args.train_eta:g} x std(W), device mode at {args.train_noise_scale:g}x PCM noise, "
             f"both clipped to 3 std).",
             f"Accuracy at 1 year with {HEADLINE_SCALE:g}x programming noise (mean and 95% CI), and the gain "
             f"over plain training (Welch 95% CI of the difference):", ""]
    for name in MODELS:
        plain = accuracies[(name, "plain", HEADLINE_SCALE, HEADLINE_TIME)]
        for training in TRAININGS:
            row = next(r for r in rows if r["model"] == name and r["training"] == training and r["kind"] == "crossbar"
                       and r["noise_scale"] == HEADLINE_SCALE and r["time"] == HEADLINE_TIME)
            text = (f"  {name:7s} {training:8s} ideal {100 * row['ideal']:6.2f}%  crossbar "
                    f"{100 * row['accuracy_mean']:6.2f}% {_ci(row['ci95_low'], row['ci95_high'])}"
                    f"  loss {loss_points(row['ideal'], row['accuracy_mean']):5.2f} points")
            if training != "plain":
                diff, ci = difference_ci(accuracies[(name, training, HEADLINE_SCALE, HEADLINE_TIME)], plain)
                text += f"  gain {100 * diff:+.2f} points {_ci(*ci) if ci else '(CI n/a)'}"
            lines.append(text)
    return lines


def _ci(low, high) -> str:
    return "[n/a]" if low is None else f"[{100 * low:.2f}, {100 * high:.2f}]"


if __name__ == "__main__":
    main()
