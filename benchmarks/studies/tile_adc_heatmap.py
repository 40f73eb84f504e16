"""Study 3: tile size x ADC bits for a CNN, the heatmap a designer uses to pick both.

A resumable sweep (PCM devices, 8-bit DAC, 1 day after programming) over tile rows and
ADC bits; writes the sweep's results.csv and plots plus tile_adc.txt under --out.

    python benchmarks/studies/tile_adc_heatmap.py [--model lenet5] [--dataset mnist --data-dir DIR]
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import parser, write_findings  # noqa: E402

from eval.sweep import run_sweep  # noqa: E402
from eval.sweep_plot import plot_sweep, read_sweep  # noqa: E402
from eval.sweep_spec import parse_spec  # noqa: E402

ROWS = [32, 64, 128, 256, 512]
ADC_BITS = [3, 4, 5, 6, 8]
TOLERATED_LOSS = 1.0  # percentage points


def main() -> None:
    p = parser(__doc__.splitlines()[0], "study-results/tile_adc")
    p.add_argument("--model", default="cnn")
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args()
    spec = parse_spec({"dataset": args.dataset, "data_dir": args.data_dir, "model": args.model,
                       "repeats": args.repeats, "seed": args.seed, "epochs": args.epochs,
                       "eval_samples": args.eval_samples, "time": 86400,
                       "base": {"preset": "pcm", "tile": {"cols": 256}},
                       "grid": {"tile.rows": ROWS, "tile.adc.bits": ADC_BITS}})
    out = Path(args.out)
    run_sweep(spec, out, workers=args.workers, progress=sys.stderr.isatty(), device=args.device,
              cuda_graphs=args.cuda_graphs)
    plots = plot_sweep(out)
    rows, _, _ = read_sweep(out)
    lines = [f"Tile rows x ADC bits for {args.model} on {args.dataset} (PCM, 8-bit DAC, 1 day, {args.repeats} repeats).",
             "Accuracy loss in percentage points (rows: tile rows; columns: ADC bits):", "",
             "rows  " + "".join(f"{b:>8d}" for b in ADC_BITS)]
    for n in ROWS:
        cells = {r["tile.adc.bits"]: 100 * (r["ideal_accuracy"] - r["accuracy_mean"]) for r in rows if r["tile.rows"] == n}
        lines.append(f"{n:4d}  " + "".join(f"{cells[b]:8.2f}" for b in ADC_BITS))
    lines.append("")
    for n in ROWS:
        ok = [r["tile.adc.bits"] for r in rows if r["tile.rows"] == n
              and 100 * (r["ideal_accuracy"] - r["accuracy_mean"]) <= TOLERATED_LOSS]
        lines.append(f"{n:4d} rows: fewest ADC bits within {TOLERATED_LOSS:g} point of ideal: "
                     f"{min(ok) if ok else 'none of ' + str(ADC_BITS)}")
    write_findings(out / "tile_adc.txt", lines)
    print("plots:", ", ".join(str(p) for p in plots))


if __name__ == "__main__":
    main()
