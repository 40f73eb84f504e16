"""A 16-point sweep (CNN on digits, tile rows x ADC bits, 16 repeats) run serially, with
--workers 2 and on a local Dask cluster of 2 workers. Prints points per second for each
and the speed-ups as a JSON last line. Models are trained once, beforehand, and the
cluster's start-up is timed separately from its sweep.

    python benchmarks/bench_sweep.py
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from eval.distributed import DaskRunner
from eval.sweep import load_context, prepare_models, run_sweep
from eval.sweep_spec import parse_spec

SPEC = {"dataset": "digits", "model": "cnn", "repeats": 16, "seed": 0,
        "base": {"preset": "pcm"}, "grid": {"tile.rows": [32, 64, 128, 256], "tile.adc.bits": [4, 5, 6, 8]}}


def _warm_up() -> None:
    import eval.sweep  # noqa: F401  torch, numba and the cached kernels


def main() -> None:
    spec = parse_spec(SPEC)
    n = len(spec.points)
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        checkpoints = prepare_models(spec, cache, progress=False)
        rates = {}
        for label, workers in (("serial", 1), ("workers_2", 2)):
            start = time.perf_counter()
            run_sweep(spec, Path(tmp) / label, workers=workers, progress=False, cache_dir=cache)
            rates[label] = n / (time.perf_counter() - start)
        start = time.perf_counter()
        runner = DaskRunner("local", workers=2)
        runner.client.run(_warm_up)  # imports and compiled kernels, as the process pool's initializer does
        dask_startup_s = time.perf_counter() - start
        try:
            start = time.perf_counter()
            rows = list(runner.rows(load_context(spec, checkpoints), spec, list(enumerate(spec.points))))
            rates["dask_2"] = len(rows) / (time.perf_counter() - start)
        finally:
            runner.close()
    result = {"points": n, "serial_points_per_s": rates["serial"], "workers_2_points_per_s": rates["workers_2"],
              "dask_2_points_per_s": rates["dask_2"], "speedup_workers_2": rates["workers_2"] / rates["serial"],
              "speedup_dask_2": rates["dask_2"] / rates["serial"], "dask_startup_s": dask_startup_s}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
