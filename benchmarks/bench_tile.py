"""Tile benchmark: a 512 x 512 nn.Linear on four 256 x 256 PCM tiles against float torch.

Prints a scaling table, then as its last line one JSON object with analog_s, float_s,
ratio (target <= 3.0 on the 2-core machine) and peak_rss_mb. Run from the repo root:

    python benchmarks/bench_tile.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import median_time, peak_rss_mb  # noqa: E402

from crossbar import Tile, presets  # noqa: E402

T_DAY = 86400.0


def block_tiles(weight: np.ndarray, tile_size: int, config) -> list:
    """Program ``weight`` (out, in) as a grid of tiles: a plain loop, per-matrix max scaling."""
    dev = config.device
    scale = (dev.g_max - dev.g_min) / np.abs(weight).max()
    wt = weight.T  # rows = inputs, cols = outputs
    tiles = []
    for r in range(0, wt.shape[0], tile_size):
        for c in range(0, wt.shape[1], tile_size):
            w = wt[r:r + tile_size, c:c + tile_size]
            g_plus = dev.g_min + scale * np.maximum(w, 0)
            g_minus = dev.g_min + scale * np.maximum(-w, 0)
            tiles.append((r, c, Tile(config).program(g_plus, g_minus, seed=len(tiles))))
    return tiles, scale


def tiled_mvm(tiles, x: np.ndarray, n_out: int, scale: float) -> np.ndarray:
    y = np.zeros((x.shape[0], n_out), dtype=np.float32)
    for r, c, tile in tiles:
        rows, cols = tile.shape_used
        y[:, c:c + cols] += tile.mvm(x[:, r:r + rows])
    return y / scale


def measure(n_in: int, n_out: int, batch: int, tile_size: int, repeats: int) -> dict:
    torch.manual_seed(0)
    layer = torch.nn.Linear(n_in, n_out)
    weight = layer.weight.detach().numpy().astype(np.float64)
    x = np.random.default_rng(0).uniform(-1, 1, (batch, n_in)).astype(np.float32)
    config = presets.pcm(rows=tile_size, cols=tile_size, dac_bits=8, adc_bits=8)

    def program():
        return block_tiles(weight, tile_size, config)

    program_s = median_time(program, repeats=max(3, repeats // 2), warmup=0)
    tiles, scale = program()
    for r, c, tile in tiles:
        rows, cols = tile.shape_used
        tile.calibrate(x[:256, r:r + rows])
    at_s = median_time(lambda: [t.at(T_DAY) for _, _, t in tiles], repeats=max(3, repeats // 2))
    analog_s = median_time(lambda: tiled_mvm(tiles, x, n_out, scale), repeats=repeats)
    xt, wt = torch.from_numpy(x), layer.weight.detach()
    float_s = median_time(lambda: xt @ wt.T, repeats=repeats)
    y = tiled_mvm(tiles, x, n_out, scale)
    ref = x @ weight.T.astype(np.float32)
    rel_err = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
    return dict(n_in=n_in, n_out=n_out, batch=batch, tile=tile_size, program_s=program_s, at_s=at_s,
                analog_s=analog_s, float_s=float_s, ratio=analog_s / float_s, rel_error=rel_err)


def scaling_table(quick: bool) -> None:
    cases = [(512, 512, b, 256) for b in (64, 256, 1024, 4096)]
    cases += [(n, n, 1024, 256) for n in (128, 256, 1024, 2048)]
    cases += [(512, 512, 1024, t) for t in (64, 128, 512, 1024)]
    if quick:
        cases = cases[:2]
    print(f"{'in':>5} {'out':>5} {'batch':>6} {'tile':>5} {'analog_ms':>10} {'ns/(batch*w)':>13} "
          f"{'float_ms':>9} {'ratio':>6} {'rss_mb':>7}")
    for n_in, n_out, batch, tile in cases:
        m = measure(n_in, n_out, batch, tile, repeats=3)
        per = m["analog_s"] / (batch * n_in * n_out) * 1e9
        print(f"{n_in:5d} {n_out:5d} {batch:6d} {tile:5d} {m['analog_s']*1e3:10.2f} {per:13.4f} "
              f"{m['float_s']*1e3:9.2f} {m['ratio']:6.2f} {peak_rss_mb():7.0f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short scaling table")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    print(f"torch threads {torch.get_num_threads()}")
    # the headline first, in a fresh process: after the table's 2048 x 2048 cases the
    # same measurement reads up to a third slower (allocator and cache state)
    m = measure(512, 512, 1024, 256, repeats=args.repeats)
    m["peak_rss_mb"] = peak_rss_mb()
    scaling_table(args.quick)
    print(json.dumps(m))


if __name__ == "__main__":
    main()
