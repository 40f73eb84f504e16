"""Study 1 (arXiv 2205.07372): does batch norm make models less robust to weight noise?

The same architectures trained with and without batch norm, evaluated (a) under the
additive-noise baseline (eta x std(W) per layer; batch-norm parameters not noised) and
(b) on PCM crossbars with the programming noise scaled 1x to 8x (batch norm folded into
the weights, as hardware would hold it; 1 day after programming). Writes
batchnorm_robustness.csv, .png and .txt under --out.

    python benchmarks/studies/batchnorm_robustness.py [--dataset mnist --data-dir DIR]
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from matplotlib.figure import Figure

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (data_and_models, device_of, loss_points, parser, plot_band, summary,  # noqa: E402
                     write_csv, write_findings)

from crossbar import presets  # noqa: E402
from eval.config import BaselineConfig  # noqa: E402
from eval.experiment import evaluate_analog, evaluate_baseline, float_accuracy  # noqa: E402
from mapping import MappingConfig  # noqa: E402

MODELS = ("mlp", "cnn", "lenet5", "vgg")
ETAS = (0.05, 0.1, 0.2, 0.3, 0.5)
NOISE_SCALES = (1.0, 2.0, 4.0, 8.0)


def main() -> None:
    args = parser(__doc__.splitlines()[0], "study-results").parse_args()
    out = Path(args.out)
    data, models = data_and_models(args, [(m, bn) for m in MODELS for bn in (False, True)])
    test = data.batches("test", limit=args.eval_samples or None)
    calibration = data.batches("train", limit=256)
    rows, device = [], device_of(args)
    for (name, bn), model in models.items():
        ideal = float_accuracy(model, test, device)
        for b in evaluate_baseline(model, test, BaselineConfig(eta=ETAS), args.repeats, args.seed, progress=False,
                                   device=device):
            rows.append(dict(model=name, batchnorm=bn, kind="baseline", level=b["sigma"], ideal=ideal,
                             **summary(b)))
        for scale in NOISE_SCALES:
            tile = presets.pcm(prog_noise_scale=scale)
            a = evaluate_analog(model, tile, MappingConfig(), test, calibration, (86400.0,), args.repeats,
                                args.seed, fold_batchnorm=bn, progress=False, device=device,
                                cuda_graphs=args.cuda_graphs)["rows"][0]
            rows.append(dict(model=name, batchnorm=bn, kind="crossbar", level=scale, ideal=ideal,
                             **summary(a)))
        print(f"{name} batchnorm={bn}: done", flush=True)
    write_csv(out / "batchnorm_robustness.csv", rows)

    fig = Figure(figsize=(12, 4.5), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, kind, xlabel in ((axes[0], "baseline", "additive noise eta (sigma / std(W) per layer)"),
                             (axes[1], "crossbar", "PCM programming-noise scale (x the fit)")):
        for i, name in enumerate(MODELS):
            for bn in (False, True):
                sub = [r for r in rows if r["model"] == name and r["batchnorm"] == bn and r["kind"] == kind]
                plot_band(ax, sub, f"{name}{' + BN' if bn else ''}", f"C{i}", "s--" if bn else "o-")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(kind)
        ax.grid(alpha=0.3)
    axes[1].set_xscale("log", base=2)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"batch norm and noise robustness ({data.name}, {args.repeats} repeats, 95% CI)")
    fig.savefig(out / "batchnorm_robustness.png", dpi=110)

    lines = [f"Batch norm and noise robustness on {data.name} ({args.repeats} repeats per point).",
             "Accuracy loss in percentage points (ideal - mean) at the strongest noise level:", ""]
    less_robust = 0
    for name in MODELS:
        loss = {}
        for bn in (False, True):
            for kind, level in (("baseline", ETAS[-1]), ("crossbar", NOISE_SCALES[-1])):
                r = next(r for r in rows if r["model"] == name and r["batchnorm"] == bn and r["kind"] == kind
                         and r["level"] == level)
                loss[(bn, kind)] = loss_points(r["ideal"], r["accuracy_mean"])
        worse = loss[(True, "baseline")] > loss[(False, "baseline")]
        less_robust += worse
        lines.append(f"  {name:7s} baseline eta {ETAS[-1]}: {loss[(False, 'baseline')]:5.1f} without BN, "
                     f"{loss[(True, 'baseline')]:5.1f} with BN; crossbar x{NOISE_SCALES[-1]:g}: "
                     f"{loss[(False, 'crossbar')]:5.1f} without, {loss[(True, 'crossbar')]:5.1f} with")
    lines += ["", f"Under the additive baseline, batch norm made {less_robust} of {len(MODELS)} models lose more "
                  f"accuracy (arXiv 2205.07372 reports that batch norm reduces robustness)."]
    write_findings(out / "batchnorm_robustness.txt", lines)


if __name__ == "__main__":
    main()
