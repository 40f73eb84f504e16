"""Study 2 (arXiv 2011.11840): model family and depth against additive weight noise.

MLP, LeNet-5, the small VGG and ResNet-20/32/44/56, each with batch norm (the standard
architectures), under the additive-noise baseline (eta x std(W) per layer). Writes
model_depth.csv, .png and .txt under --out.

    python benchmarks/studies/model_depth.py [--no-batchnorm] [--dataset mnist --data-dir DIR]
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from matplotlib.figure import Figure

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (data_and_models, device_of, loss_points, parser, plot_band, summary,  # noqa: E402
                     write_csv, write_findings)

from eval.config import BaselineConfig  # noqa: E402
from eval.experiment import evaluate_baseline, float_accuracy  # noqa: E402

MODELS = ("mlp", "lenet5", "vgg", "resnet20", "resnet32", "resnet44", "resnet56")
ETAS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7)


def main() -> None:
    p = parser(__doc__.splitlines()[0], "study-results", chips=False)
    p.add_argument("--batchnorm", action="store_true", default=True)
    p.add_argument("--no-batchnorm", dest="batchnorm", action="store_false")
    args = p.parse_args()
    out = Path(args.out)
    data, models = data_and_models(args, [(m, args.batchnorm) for m in MODELS])
    test = data.batches("test", limit=args.eval_samples or None)
    rows, device = [], device_of(args)
    for (name, _), model in models.items():
        ideal = float_accuracy(model, test, device)
        params = sum(p.numel() for p in model.parameters())
        for b in evaluate_baseline(model, test, BaselineConfig(eta=ETAS), args.repeats, args.seed, progress=False,
                                   device=device):
            rows.append(dict(model=name, parameters=params, level=b["sigma"], ideal=ideal,
                             **summary(b)))
        print(f"{name}: done", flush=True)
    write_csv(out / "model_depth.csv", rows)

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for i, name in enumerate(MODELS):
        plot_band(ax, [r for r in rows if r["model"] == name], name, f"C{i}")
    ax.set_xlabel("additive noise eta (sigma / std(W) per layer)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"model family and depth ({data.name}, batch norm {'on' if args.batchnorm else 'off'})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(out / "model_depth.png", dpi=110)

    worst = ETAS[-2]
    ranking = sorted(MODELS, key=lambda m: next(loss_points(r["ideal"], r["accuracy_mean"]) for r in rows
                                                 if r["model"] == m and r["level"] == worst))
    lines = [f"Model family and depth on {data.name} ({args.repeats} repeats), additive noise eta = {worst}:", ""]
    for name in ranking:
        r = next(r for r in rows if r["model"] == name and r["level"] == worst)
        lines.append(f"  {name:9s} {r['parameters']:>8d} parameters: ideal {100 * r['ideal']:.1f}%, "
                     f"loss {loss_points(r['ideal'], r['accuracy_mean']):5.1f} points")
    lines += ["", f"Most robust: {ranking[0]}; least robust: {ranking[-1]} (arXiv 2011.11840 reports deeper, more "
                  f"redundant models such as VGG as more robust)."]
    write_findings(out / "model_depth.txt", lines)


if __name__ == "__main__":
    main()
