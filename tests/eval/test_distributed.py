"""Sweeps on a local Dask cluster over loopback (2 worker processes)."""
import csv
import os
import signal
import threading
import time

import pytest

distributed = pytest.importorskip("distributed")
pytestmark = pytest.mark.slow  # a cluster of worker processes per test

from eval.sweep import run_sweep  # noqa: E402
from eval.sweep_spec import SpecError, parse_spec  # noqa: E402

SPEC = {"dataset": "digits", "model": "mlp", "repeats": 3, "seed": 1, "epochs": 3,
        "base": {"preset": "pcm"}, "grid": {"tile.rows": [32, 64, 128], "tile.adc.bits": [5, 8]}}


def rows_of(directory):
    with open(directory / "results.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serial")
    spec = parse_spec(SPEC)
    run_sweep(spec, tmp / "out", progress=False, cache_dir=tmp / "cache")
    return spec, rows_of(tmp / "out"), tmp / "cache"


@pytest.fixture
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  host="127.0.0.1") as c:
        yield c


def test_local_dask_cluster_gives_the_serial_rows(serial, cluster, tmp_path):
    spec, expected, cache = serial
    summary = run_sweep(spec, tmp_path / "dask", progress=False, cache_dir=cache, scheduler=cluster.scheduler_address)
    assert summary["evaluated"] == len(expected) == 6
    assert rows_of(tmp_path / "dask") == expected


def test_worker_killed_mid_sweep_every_row_exactly_once(serial, cluster, tmp_path):
    spec, expected, cache = serial
    out = tmp_path / "killed"
    with distributed.Client(cluster) as client:
        pids = list(client.run(os.getpid).values())
    state = {"killed_with_rows": None}

    def kill_after_first_row():
        deadline = time.time() + 120
        while time.time() < deadline:
            if (out / "results.csv").exists():
                n = len(rows_of(out))
                if n >= 1:
                    os.kill(pids[0], signal.SIGKILL)
                    state["killed_with_rows"] = n
                    return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_after_first_row, daemon=True)
    killer.start()
    run_sweep(spec, out, progress=False, cache_dir=cache, scheduler=cluster.scheduler_address)
    killer.join(timeout=5)
    assert state["killed_with_rows"] is not None and state["killed_with_rows"] < len(expected)
    rows = rows_of(out)
    assert [r["point"] for r in rows] == [str(i) for i in range(6)]  # each exactly once
    assert rows == expected


def test_unreachable_scheduler_fails_fast_and_keeps_results(serial, tmp_path):
    spec, expected, cache = serial
    out = tmp_path / "partial"
    run_sweep(parse_spec({**SPEC, "grid": {"tile.rows": [32], "tile.adc.bits": [5, 8]}}), out, progress=False,
              cache_dir=cache)
    before = (out / "results.csv").read_text()
    start = time.perf_counter()
    with pytest.raises(ValueError, match="cannot reach a Dask scheduler within 2 s"):
        run_sweep(parse_spec({**SPEC, "grid": {"tile.rows": [32], "tile.adc.bits": [5, 8, 6]}}), tmp_path / "other",
                  progress=False, cache_dir=cache, scheduler="tcp://127.0.0.1:9", scheduler_timeout=2)
    assert time.perf_counter() - start < 15
    with pytest.raises(SpecError):  # and a changed spec in a finished dir is still refused
        run_sweep(spec, out, progress=False, cache_dir=cache, scheduler="tcp://127.0.0.1:9")
    assert (out / "results.csv").read_text() == before
