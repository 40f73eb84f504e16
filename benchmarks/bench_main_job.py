"""The default ``xbarsim run`` end to end, timed in fresh processes (target: under 90 s on
the 2-core machine, Numba compilation included).

Everything it writes (outputs, model cache, Numba cache) lives in its own temporary
directory, removed at the end; nothing outside it is touched. Three runs: cold (empty
model cache and Numba's compiled-kernel cache, so training and compilation are
included), warm (both caches filled), and the float forward passes the job makes,
timed in the same run for the ratio. The last line is JSON.

    python benchmarks/bench_main_job.py
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path


def timed_run(env: dict, out: str) -> float:
    start = time.perf_counter()
    subprocess.run(["xbarsim", "run", "--no-progress", "--out", out], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, XDG_CACHE_HOME=os.path.join(tmp, "cache"), NUMBA_CACHE_DIR=os.path.join(tmp, "numba"))
        cold_s = timed_run(env, os.path.join(tmp, "cold"))
        warm_s = timed_run(env, os.path.join(tmp, "warm"))
        results = json.loads(Path(tmp, "warm", "results.json").read_text())
    # the ideal model's forward passes over the same evaluations, for scale
    import torch

    from eval.datasets import load_digits
    from eval.models import build_model

    data = load_digits()
    model = build_model("cnn", data.input_shape, 10, False).eval()
    n_evals = results["config"]["repeats"] * (len(results["config"]["times"]) + len(results["baseline"]) + 2) + 1
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(n_evals):
            model(data.test_x)
    float_s = time.perf_counter() - start
    print(json.dumps({"cold_s": cold_s, "warm_s": warm_s, "float_forward_s": float_s, "evaluations": n_evals,
                      "experiment_s": results["elapsed_s"], "target_s": 90.0, "passed": cold_s < 90.0}))


if __name__ == "__main__":
    main()
