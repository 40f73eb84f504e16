"""Study 4: the circuits around the devices: wire resistance against tile size, and ADC bits
against weight slices, for a CNN.

Two resumable sweeps on PCM devices read one day after programming (8-bit DAC):

- IR drop: square tiles of 64 to 1024 rows and columns, word- and bit-line segments of
  0, 0.5, 1 and 2 ohms (8-bit ADC);
- slicing: ADC bits 3 to 8 with 1, 2 and 4 slices of an 8-bit weight (8, 4 and 2 bits
  per slice).

Writes each sweep's results.csv and plots and circuits.txt (the findings) under --out.

    python benchmarks/studies/circuits.py [--model cnn] [--repeats 3]
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

TILE_SIZES = [64, 128, 256, 512, 1024]
WIRE_OHMS = [0.0, 0.5, 1.0, 2.0]
ADC_BITS = [3, 4, 5, 6, 8]
SLICES = [1, 2, 4]
WEIGHT_BITS = 8


def _spec(args, points: list) -> dict:
    return {"dataset": args.dataset, "data_dir": args.data_dir, "model": args.model, "repeats": args.repeats,
            "seed": args.seed, "epochs": args.epochs, "eval_samples": args.eval_samples, "time": 86400,
            "base": {"preset": "pcm", "tile": {"dac": {"bits": 8}, "adc": {"bits": 8}}}, "points": points}


def _loss(row: dict) -> float:
    return 100 * (row["ideal_accuracy"] - row["accuracy_mean"])


def ir_drop_points() -> list:
    return [{"tile.rows": n, "tile.cols": n, "tile.ir_drop.r_row": r, "tile.ir_drop.r_col": r}
            for n in TILE_SIZES for r in WIRE_OHMS]


def slicing_points() -> list:
    # bits_per_slice first: weight_slices > 1 is only valid once the slices have bits
    return [{"tile.slicing.bits_per_slice": WEIGHT_BITS // k, "tile.slicing.weight_slices": k, "tile.adc.bits": b}
            for k in SLICES for b in ADC_BITS]


def main() -> None:
    p = parser(__doc__.splitlines()[0], "study-results/circuits")
    p.add_argument("--model", default="cnn")
    p.add_argument("--workers", type=int, default=1)
    p.set_defaults(repeats=3)
    args = p.parse_args()
    out = Path(args.out)
    lines = [f"Circuits for {args.model} on {args.dataset} (PCM, 8-bit DAC, 1 day, {args.repeats} repeats); "
             f"accuracy loss in percentage points.", ""]
    ir_out = out / "ir_drop"
    run_sweep(parse_spec(_spec(args, ir_drop_points())), ir_out, workers=args.workers, progress=sys.stderr.isatty(),
              device=args.device, cuda_graphs=args.cuda_graphs)
    rows, _, _ = read_sweep(ir_out)
    lines += ["IR drop (rows: tile size; columns: ohms per wire segment):",
              "size  " + "".join(f"{r:>8g}" for r in WIRE_OHMS)]
    for n in TILE_SIZES:
        cells = {r["tile.ir_drop.r_row"]: _loss(r) for r in rows if r["tile.rows"] == n}
        lines.append(f"{n:4d}  " + "".join(f"{cells[r]:8.2f}" for r in WIRE_OHMS))
    slice_out = out / "slicing"
    run_sweep(parse_spec(_spec(args, slicing_points())), slice_out, workers=args.workers,
              progress=sys.stderr.isatty(), device=args.device, cuda_graphs=args.cuda_graphs)
    rows, _, _ = read_sweep(slice_out)
    lines += ["", f"ADC bits x weight slices ({WEIGHT_BITS}-bit weights; rows: slices; columns: ADC bits):",
              "slices" + "".join(f"{b:>8d}" for b in ADC_BITS)]
    for k in SLICES:
        cells = {r["tile.adc.bits"]: _loss(r) for r in rows if r["tile.slicing.weight_slices"] == k}
        lines.append(f"{k:6d}" + "".join(f"{cells[b]:8.2f}" for b in ADC_BITS))
    write_findings(out / "circuits.txt", lines)
    plots = plot_sweep(ir_out) + plot_sweep(slice_out)
    print("plots:", ", ".join(str(p) for p in plots))


if __name__ == "__main__":
    main()
