import csv
import queue
from types import SimpleNamespace

import matplotlib.image as mpimg
import pytest
import torch

import eval.sweep as sweep_module
from eval.cli import main
from eval.sweep import run_sweep
from eval.sweep_plot import plot_sweep
from eval.sweep_spec import SpecError, load_spec, parse_spec

SPEC = '''
dataset = "digits"
model = "mlp"
repeats = 2
seed = 0
epochs = 3
eval_samples = 120
[base]
preset = "pcm"
[grid]
"tile.rows" = [64, 128]
"tile.adc.bits" = [4, 8]
"time" = [86400]
'''


@pytest.fixture
def spec_file(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / "spec.toml"
    path.write_text(SPEC)
    return path


def rows_of(directory):
    with open(directory / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    # elapsed time is the only column that may differ between runs
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]


def fail_at_point(monkeypatch, n: int, error: BaseException):
    """Make the sweep's n-th point evaluation raise ``error``; returns the real evaluation."""
    real = sweep_module.evaluate_point
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep_module, "evaluate_point", failing)
    return real


@pytest.mark.slow
def test_small_spec_runs_and_resumes_after_injected_failure(spec_file, tmp_path, monkeypatch):
    spec = load_spec(str(spec_file))
    assert len(spec.points) == 4
    reference = tmp_path / "uninterrupted"
    run_sweep(spec, reference, progress=False, cache_dir=tmp_path / "cache")
    expected = rows_of(reference)
    assert len(expected) == 4 and {r["tile.rows"] for r in expected} == {"64", "128"}
    for r in expected:  # an empty CI cell means n/a: the repeats did not differ
        if r["ci95_low"] == "":
            assert r["ci95_high"] == "" and float(r["accuracy_std"]) == 0.0
        else:
            assert 0 <= float(r["ci95_low"]) <= float(r["accuracy_mean"]) <= float(r["ci95_high"]) <= 1

    out = tmp_path / "interrupted"
    real = fail_at_point(monkeypatch, 3, RuntimeError("injected failure"))
    with pytest.raises(RuntimeError, match="injected"):
        run_sweep(spec, out, progress=False, cache_dir=tmp_path / "cache")
    assert len(rows_of(out)) == 2  # the finished points survived
    # a crash in the middle of writing a row leaves a partial line: it is dropped
    with open(out / "results.csv", "a") as f:
        f.write("2,128,4,86400,ml")
    monkeypatch.setattr(sweep_module, "evaluate_point", real)
    summary = run_sweep(spec, out, progress=False, cache_dir=tmp_path / "cache")
    assert summary == {"points": 4, "already_done": 2, "evaluated": 2}
    assert rows_of(out) == expected  # exactly the uninterrupted rows, none twice


@pytest.mark.slow
def test_two_workers_give_the_same_rows(spec_file, tmp_path):
    spec = load_spec(str(spec_file))
    run_sweep(spec, tmp_path / "one", workers=1, progress=False, cache_dir=tmp_path / "cache")
    run_sweep(spec, tmp_path / "two", workers=2, progress=False, cache_dir=tmp_path / "cache")
    assert rows_of(tmp_path / "one") == rows_of(tmp_path / "two")


def test_changed_spec_is_refused(spec_file, tmp_path):
    out = tmp_path / "out"
    spec = load_spec(str(spec_file))
    run_sweep(spec, out, progress=False, cache_dir=tmp_path / "cache")
    changed = parse_spec({**{"dataset": "digits", "model": "mlp", "repeats": 3, "epochs": 3},
                          "grid": {"tile.rows": [64]}})
    with pytest.raises(SpecError, match="different sweep spec"):
        run_sweep(changed, out, progress=False, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("data,message", [
    ({"grid": {"tile.rowz": [64]}}, "unknown field path 'tile.rowz'"),
    ({"grid": {"tile.adc.bits": []}}, "grid 'tile.adc.bits'.*non-empty list"),
    ({"grid": {"tile.adc.bits": [0]}}, "tile.adc.bits = 0"),
    ({"grid": {"model": ["alexnet"]}}, "model = 'alexnet' is unknown"),
    ({"grid": {"temperature": [300]}}, "unknown field path 'temperature'"),
    ({"repeats": 0, "grid": {"time": [1]}}, "repeats = 0"),
    ({"points": [{"tile.rows": 64}], "colour": "red"}, "unknown key 'colour'"),
    ({}, "nothing to sweep"),
    ({"base": {"tile": {"adc": {"bits": 99}}}, "grid": {"time": [1]}}, r"\[base\].*ADCConfig.bits = 99"),
    # duplicates would count one experiment twice and narrow its CI
    ({"grid": {"tile.rows": [64, 128, 64]}}, r"point 2 .* is the same experiment as point 0"),
    ({"grid": {"time": [86400, 86400.0]}}, r"point 1 .* same experiment as point 0"),
    ({"grid": {"tile.rows": [64]}, "points": [{"tile.rows": 64, "model": "cnn"}]}, "same experiment as point 0"),
    ([1, 2], "spec: expected a table"),
    ({"dataset": "imagenet", "grid": {"time": [1]}}, "dataset = 'imagenet' is invalid: expected one of digits"),
    ({"grid": [64, 128]}, r"\[grid\] must be a table of lists and \[\[points\]\] a list of tables"),
    ({"points": [{}]}, r"points\[0\] must be a non-empty table of dotted paths"),
    ({"grid": {"batchnorm": [True, "yes"]}}, r"point 1 .*batchnorm = 'yes' is invalid: expected true or false"),
    ({"grid": {"time": [1, -5]}}, r"point 1 .*time = -5 is invalid: expected seconds in \[0, 1e10\]"),
    ({"time": True, "grid": {"tile.rows": [64]}}, r"spec: time = True is invalid"),
    ({"epochs": 0, "grid": {"time": [1]}}, "epochs = 0 is invalid: expected an integer >= 1"),
    ({"epochs": True, "grid": {"time": [1]}}, "epochs = True is invalid: expected an integer >= 1"),
    ({"baseline": "yes", "grid": {"time": [1]}}, "baseline = 'yes' is invalid: expected true or false"),
])
def test_spec_errors_before_any_work(data, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(data)


def test_explicit_points_and_paths():
    spec = parse_spec({"grid": {"time": [1, 3600]}, "points": [{"tile.device.prog_noise_scale": 2.0, "model": "mlp"}],
                       "baseline": True})
    assert len(spec.points) == 3
    assert spec.swept == ("time", "tile.device.prog_noise_scale", "model")
    cfg = spec.point_config(spec.points[2])
    assert cfg.tile.device.prog_noise_scale == 2.0 and cfg.times == (86400.0,)
    # a time series follows the same chips: the seed ignores the time
    assert spec.point_seed(spec.points[0]) == spec.point_seed(spec.points[1]) != spec.point_seed(spec.points[2])
    assert parse_spec({"grid": {"baseline.eta": [0.1]}}).point_config({"baseline.eta": 0.1}).baseline.eta == (0.1,)


@pytest.mark.slow
def test_ctrl_c_keeps_the_finished_points_and_the_same_command_completes_the_rest(spec_file, tmp_path, capsys,
                                                                                   monkeypatch):
    out = tmp_path / "stopped"
    real = fail_at_point(monkeypatch, 2, KeyboardInterrupt())
    command = ["sweep", str(spec_file), "--out", str(out), "--no-progress"]
    assert main(command) == 130
    err = capsys.readouterr().err
    assert f"interrupted; finished points are in {out}/results.csv. Run the same command again" in err
    assert len(rows_of(out)) == 1
    monkeypatch.setattr(sweep_module, "evaluate_point", real)
    assert main(command) == 0
    assert "3 points evaluated, 1 already done" in capsys.readouterr().out
    assert len(rows_of(out)) == 4 and len({r["point"] for r in rows_of(out)}) == 4


@pytest.mark.slow
def test_cli_sweep_and_plot(spec_file, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["sweep", str(spec_file), "--out", str(out), "--no-progress"]) == 0
    pngs = sorted(out.glob("*.png"))
    assert {p.name for p in pngs} == {"accuracy_vs_tile.rows.png", "loss_tile.adc.bits_vs_tile.rows.png"}
    for p in pngs:
        p.unlink()
    assert main(["plot", str(out)]) == 0
    for p in sorted(out.glob("*.png")):
        image = mpimg.imread(p)
        assert image.ndim == 3 and image.shape[0] > 200 and image.std() > 0.01
    bad = tmp_path / "bad.toml"
    bad.write_text('[grid]\n"tile.adc.bitz" = [3]\n')
    assert main(["sweep", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "tile.adc.bitz" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # nothing started


def test_plot_three_fields(tmp_path):
    rows = []
    for i, (a, b, c) in enumerate([(a, b, c) for a in (64, 128) for b in (4, 8) for c in ("mlp", "cnn")]):
        rows.append({"point": i, "tile.rows": a, "tile.adc.bits": b, "model": c, "ideal_accuracy": 0.98,
                     "accuracy_mean": 0.9 + 0.01 * i, "ci95_low": 0.88, "ci95_high": 0.99})
    (tmp_path / "spec.json").write_text('{"points": [{"tile.rows": 64, "tile.adc.bits": 4, "model": "mlp"}]}')
    with open(tmp_path / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    written = plot_sweep(tmp_path)
    assert len(written) == 2
    assert all(mpimg.imread(p).shape[1] > 800 for p in written)  # two panels, split by model


def test_a_device_model_axis_starts_each_point_from_that_devices_preset(tmp_path):
    table = tmp_path / "dev.csv"
    table.write_text("g_target,prog_mean,prog_std\n0,0,0.2\n25,25,0.5\n")
    spec = parse_spec({"base": {"preset": "pcm", "tile": {"adc": {"bits": 6}}},
                       "grid": {"tile.device.model": ["pcm", "reram", "hermes"]},
                       "points": [{"tile.device.model": "table", "tile.device.table": str(table),
                                   "tile.device.drift": False, "tile.device.read_noise_1f": False}]})
    devices = [spec.point_config(p).tile for p in spec.points]
    assert [d.device.model for d in devices] == ["pcm", "reram", "hermes", "table"]
    assert [d.device.g_max for d in devices] == [25.0, 40.0, 20.7, 25.0]
    assert devices[2].device.t0 == 300.0 and devices[1].device.drift and not devices[1].device.read_noise_1f
    assert all(d.adc.bits == 6 for d in devices)  # [base]'s own overrides stay
    assert devices[3].device.table_csv == table.read_text()  # recorded with the point's configuration


@pytest.fixture
def three_gpus(monkeypatch):
    """torch reports three CUDA GPUs; the GPUs made current are recorded."""
    current = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: current.append(str(device)))
    return current


def test_a_bare_cuda_spreads_workers_over_the_gpus_and_any_other_device_is_everyones(three_gpus):
    assert [sweep_module.worker_device("cuda", n) for n in range(5)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:0",
                                                                         "cuda:1"]
    assert sweep_module.worker_device(torch.device("cuda"), 4) == "cuda:1"
    for device in (None, "cpu", "cuda:2", torch.device("cuda:0")):
        assert [sweep_module.worker_device(device, n) for n in range(3)] == [device] * 3


def test_one_gpu_keeps_every_worker_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert [sweep_module.worker_device("cuda", n) for n in range(3)] == ["cuda"] * 3


def test_each_local_worker_takes_its_own_gpu_and_makes_it_current(three_gpus, monkeypatch):
    loaded = []
    monkeypatch.setattr(sweep_module, "load_context", lambda spec, checkpoints, device, cuda_graphs: loaded.append(
        (device, cuda_graphs)))
    devices = queue.Queue()
    for n in range(2):
        devices.put(sweep_module.worker_device("cuda", n))
    for _ in range(2):
        sweep_module._init_worker(None, {}, 1, devices, True)
    assert loaded == [("cuda:0", True), ("cuda:1", True)]
    assert three_gpus == ["cuda:0", "cuda:1"]


def test_a_local_dask_workers_point_runs_on_the_gpu_its_number_gives(three_gpus, monkeypatch):
    """Only the cluster this client started (threads set) spreads its workers; a cluster
    started elsewhere keeps "cuda", the GPU each worker was given."""
    import distributed

    from eval import distributed as runner_module

    seen = []
    monkeypatch.setattr(sweep_module, "evaluate_point", lambda ctx, spec, index, point: seen.append(ctx.device))
    monkeypatch.setattr(distributed, "get_worker", lambda: SimpleNamespace(name=4))
    ctx = sweep_module.SweepContext(None, {}, {}, "cuda")
    runner_module._point_task(ctx, None, 0, {}, threads=1)
    runner_module._point_task(ctx, None, 0, {}, threads=None)
    assert seen == ["cuda:1", "cuda"] and ctx.device == "cuda"
    assert three_gpus == ["cuda:1"]


@pytest.mark.parametrize("device,workers,scheduler,noted", [
    ("cuda", 4, None, True), ("cuda", 4, "local", True), ("cuda", 4, "tcp://host:8786", False),
    ("cuda:1", 4, None, False), ("cuda", 1, None, False), (None, 4, None, False), ("gpu", 4, None, False)])
def test_a_sweep_says_when_its_workers_share_several_gpus(three_gpus, capsys, device, workers, scheduler, noted):
    from eval.cli import _note_shared_gpus

    _note_shared_gpus(SimpleNamespace(device=device, workers=workers, scheduler=scheduler))
    expected = "note: the 4 workers share 3 GPUs, worker n on cuda:(n mod 3) (--device cuda:N puts them all on one)\n"
    assert capsys.readouterr().err == (expected if noted else "")


@pytest.mark.parametrize("device,workers,message", [
    ("gpu", "2", "--device = 'gpu' is invalid: expected 'cpu', 'cuda' or 'cuda:N'"),
    ("cuda:7", "2", "--device = 'cuda:7' is invalid"),
    ("cpu", "0", "--workers = 0 is invalid: expected an integer >= 1")])
def test_a_sweep_refuses_a_bad_device_or_workers_by_name_before_it_makes_its_directory(spec_file, tmp_path, capsys,
                                                                                       device, workers, message):
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    assert main(["sweep", str(spec_file), "--out", str(tmp_path / "out"), "--device", device,
                 "--workers", workers]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option,value,message", [
    ("workers", True, "--workers = True is invalid: expected an integer >= 1"),
    ("workers", 2.0, "--workers = 2.0 is invalid"),
    ("scheduler_timeout", True, r"--scheduler-timeout = True is invalid: expected seconds in \(0, 3600\]"),
    ("scheduler_timeout", 0, "--scheduler-timeout = 0 is invalid")])
def test_run_sweep_refuses_bad_options_from_python_by_name(tmp_path, option, value, message):
    spec = parse_spec({"grid": {"time": [1]}})
    with pytest.raises(ValueError, match=message):
        run_sweep(spec, tmp_path / "out", **{option: value})
    assert not (tmp_path / "out").exists()
