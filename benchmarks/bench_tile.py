"""Tile benchmark: a 512 x 512 nn.Linear on PCM tiles, through the path users take,
against float torch in the same process (their passes alternating, the allocator
steady: ``_timing``).

``mapping.convert(nn.Linear(512, 512), presets.pcm(rows=T, cols=T), seed=0)``, calibrated,
at t = 1 day (drift, 1/f and per-read noise, 8-bit DAC and ADC, drift compensation),
batch 1024. Prints a scaling table (batch, matrix and tile sizes), then as its last
line one JSON object: ``ratio`` on 256 x 256 tiles (target <= 2.5), ``ratio_64`` on
64 x 64 tiles (target <= 4), the times, at(t) and peak RSS, and the same 256 x 256 case
with 1 ohm wire segments (IR drop, PHYSICS.md section 8): ``ratio_ir_drop`` and
``at_s_ir_drop`` (each at(t) solves both arrays of all 4 tiles: ``at_s_per_array_ir_drop``),
and the table's largest layer's ``convert_s_<n>`` and ``at_s_<n>``. Then the chip alone, an
n x n grid of 256 x 256 tiles at the largest n, warm: ``chip_program_s_<n>`` (programming
and its at(0)) and ``chip_at_s_<n>`` on the Numba engine's path (the host, tile by tile),
and ``chip_program_s_torch_<n>`` and ``chip_at_s_torch_<n>`` on the torch engine's (the
GPU's code, here on the CPU device; crossbar/chip_on_device.py). Run from the repo root:

    python benchmarks/bench_tile.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import at_seconds, interleaved_median_times, median_time, peak_rss_mb, steady_allocator  # noqa: E402

import mapping  # noqa: E402
from crossbar import presets  # noqa: E402
from crossbar.grid import TileGrid  # noqa: E402

T_DAY = 86400.0


def measure(n_in: int, n_out: int, batch: int, tile: int, repeats: int, wire_ohms: float = 0.0) -> dict:
    torch.manual_seed(0)
    layer = nn.Linear(n_in, n_out).eval()
    x = torch.rand(batch, n_in, generator=torch.Generator().manual_seed(1)) * 2 - 1
    start = time.perf_counter()
    config = presets.pcm(rows=tile, cols=tile).with_path("ir_drop.r_row", wire_ohms).with_path("ir_drop.r_col",
                                                                                              wire_ohms)
    analog = mapping.convert(layer, config, seed=0)
    convert_s = time.perf_counter() - start
    analog.calibrate([x[:256]])
    at_s = at_seconds(analog, T_DAY)
    with torch.no_grad():
        float_s, analog_s = interleaved_median_times([lambda: layer(x), lambda: analog(x)], repeats=repeats)
        error = ((analog(x) - layer(x)).norm() / layer(x).norm()).item()
    return dict(n_in=n_in, n_out=n_out, batch=batch, tile=tile, convert_s=convert_s, at_s=at_s,
                analog_s=analog_s, float_s=float_s, ratio=analog_s / float_s, relative_error=error)


def chip_seconds(n: int, engine: str, repeats: int = 3) -> dict:
    """Warm programming (with its at(0)) and at(t) of an n x n grid of 256 x 256 PCM tiles
    by ``engine``'s path: median seconds."""
    rng = np.random.default_rng(0)
    g_plus, g_minus = rng.uniform(0, 25, (n, n)), rng.uniform(0, 25, (n, n))
    grid = TileGrid(presets.pcm(rows=256, cols=256), n, n)
    grid.engine = engine
    seeds = list(range(grid.grid_shape[0] * grid.grid_shape[1]))
    program_s = median_time(lambda: grid.program(g_plus, g_minus, seeds), repeats=repeats)
    return {"program_s": program_s, "at_s": at_seconds(grid, T_DAY, repeats)}


def scaling_table(quick: bool) -> dict:
    """Print the table; return the largest layer's measurement."""
    cases = [(512, 512, b, 256) for b in (64, 256, 4096)]
    cases += [(n, n, 1024, 256) for n in (128, 1024, 2048)]
    cases += [(512, 512, 1024, t) for t in (128, 512, 1024)]
    if quick:
        cases = cases[:2]
    print(f"{'in':>5} {'out':>5} {'batch':>6} {'tile':>5} {'analog_ms':>10} {'ns/(batch*w)':>13} "
          f"{'float_ms':>9} {'ratio':>6} {'convert_s':>9} {'at_s':>6} {'rss_mb':>7}")
    measured = []
    for n_in, n_out, batch, tile in cases:
        m = measure(n_in, n_out, batch, tile, repeats=3)
        measured.append(m)
        per = m["analog_s"] / (batch * n_in * n_out) * 1e9
        print(f"{n_in:5d} {n_out:5d} {batch:6d} {tile:5d} {m['analog_s']*1e3:10.2f} {per:13.4f} "
              f"{m['float_s']*1e3:9.2f} {m['ratio']:6.2f} {m['convert_s']:9.3f} {m['at_s']:6.3f} "
              f"{peak_rss_mb():7.0f}", flush=True)
    return max(measured, key=lambda m: m["n_in"] * m["n_out"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short scaling table")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    steady_allocator()
    print(f"torch threads {torch.get_num_threads()}")
    # the headlines first: after the table's 2048 x 2048 cases the same measurement can
    # read up to a third slower (allocator and cache state)
    m = measure(512, 512, 1024, 256, repeats=args.repeats)
    m64 = measure(512, 512, 1024, 64, repeats=args.repeats)
    m.update(ratio_64=m64["ratio"], analog_s_64=m64["analog_s"], at_s_64=m64["at_s"], peak_rss_mb=peak_rss_mb())
    wired = measure(512, 512, 1024, 256, repeats=args.repeats, wire_ohms=1.0)
    m.update(ratio_ir_drop=wired["ratio"], at_s_ir_drop=wired["at_s"], at_s_per_array_ir_drop=wired["at_s"] / 8,
             relative_error_ir_drop=wired["relative_error"])
    largest = scaling_table(args.quick)
    n = largest["n_in"]
    m.update({f"{key}_{n}": largest[key] for key in ("convert_s", "at_s")})
    for engine, suffix in (("numba", ""), ("torch", "_torch")):
        m.update({f"chip_{key}{suffix}_{n}": value for key, value in chip_seconds(n, engine).items()})
    print(json.dumps(m))


if __name__ == "__main__":
    main()
