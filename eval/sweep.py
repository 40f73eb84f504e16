"""Running sweeps: each point's row is appended to DIR/results.csv and fsynced as soon as
the point finishes, so an interruption loses at most the points in flight; running the
same command again skips finished points. Results do not depend on the number of
workers: each point's seed comes from the spec's seed and the point."""
from __future__ import annotations

import csv
import io
import json
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Iterator, Optional

import torch
from tqdm import tqdm

from mapping.devices import resolve_device

from .datasets import Dataset, default_cache_dir, load_dataset
from .experiment import check_cuda_graphs, evaluate_analog, evaluate_baseline, float_accuracy
from .results import atomic_write
from .stats import ci_bounds
from .sweep_spec import POINT_FIELDS, SpecError, SweepSpec
from .train import load_checkpoint, train_or_load

METRICS = ["ideal_accuracy", "accuracy_mean", "accuracy_std", "ci95_low", "ci95_high", "n",
           "dac_clip_rate", "adc_saturation_rate", "weight_clip_rate", "prog_clamp_rate", "effective_eta",
           "baseline_level", "baseline_accuracy_mean", "baseline_ci95_low", "baseline_ci95_high"]


def columns(spec: SweepSpec) -> list:
    context = [f for f in POINT_FIELDS if f not in spec.swept]
    return ["point", *spec.swept, *context, *METRICS, "seed", "elapsed_s", "point_key"]


@dataclass
class SweepContext:
    """What every point needs: the data and the trained models with their ideal accuracy."""
    data: Dataset
    models: dict      # (name, batchnorm) -> nn.Module
    ideal: dict       # (name, batchnorm) -> accuracy
    device: Optional[str] = None  # where the chips and the float models compute (None: the CPU)
    cuda_graphs: bool = False  # the chips' passes replay as CUDA graphs (device on CUDA)


def prepare_models(spec: SweepSpec, cache_dir: Path, progress: bool, device=None) -> dict:
    """Train (on ``device``; None: the CPU) or load from the cache every model the sweep
    needs, once, before any point: (name, batchnorm) -> checkpoint path."""
    data = load_dataset(spec.dataset, spec.data_dir)
    paths = {}
    for name, bn in spec.models():
        *_, path = train_or_load(data, name, bn, cache_dir, spec.epochs, seed=spec.seed, progress=progress,
                                 device=device)
        paths[(name, bn)] = str(path)
    return paths


def load_context(spec: SweepSpec, checkpoints: dict, device: Optional[str] = None,
                 ideal_on_device: bool = True, cuda_graphs: bool = False) -> SweepContext:
    """The data, the models and their ideal accuracy, computed on ``device`` (a local
    worker), or on this process's CPU with ``ideal_on_device=False`` (a Dask client,
    which may have no GPU of its own, makes the context and sends it to the workers);
    ``cuda_graphs``: the points' chips replay their passes as CUDA graphs."""
    data = load_dataset(spec.dataset, spec.data_dir)
    models, ideal = {}, {}
    test = data.batches("test", limit=spec.eval_samples or None)
    for key, path in checkpoints.items():
        models[key], _ = load_checkpoint(path)
        ideal[key] = float_accuracy(models[key], test, resolve_device(device) if ideal_on_device else None)
    return SweepContext(data, models, ideal, device, cuda_graphs)


def evaluate_point(ctx: SweepContext, spec: SweepSpec, index: int, point: dict) -> dict:
    """One point: Monte Carlo analog accuracy at its time (and the baseline when asked)."""
    start = time.perf_counter()
    cfg = spec.point_config(point)
    key = (spec.setting(point, "model"), bool(spec.setting(point, "batchnorm")))
    model, seed = ctx.models[key], spec.point_seed(point)
    test = ctx.data.batches("test", limit=spec.eval_samples or None)
    calibration = ctx.data.batches("train", limit=cfg.calibration_samples)
    a = evaluate_analog(model, cfg.tile, cfg.mapping, test, calibration, cfg.times, cfg.repeats, seed,
                        spec.fold_batchnorm, progress=False, device=resolve_device(ctx.device),
                        cuda_graphs=ctx.cuda_graphs)["rows"][0]
    row = {"point": index, **{p: point[p] for p in spec.swept if p in point},
           **{f: spec.setting(point, f) for f in POINT_FIELDS if f not in spec.swept},
           "ideal_accuracy": ctx.ideal[key], "accuracy_mean": a["accuracy_mean"], "accuracy_std": a["accuracy_std"],
           "ci95_low": ci_bounds(a["ci95"])[0], "ci95_high": ci_bounds(a["ci95"])[1], "n": a["n"],
           "dac_clip_rate": a["dac_clip_rate"], "adc_saturation_rate": a["adc_saturation_rate"],
           "weight_clip_rate": a["weight_clip_rate"], "prog_clamp_rate": a["prog_clamp_rate"],
           "effective_eta": a["effective_eta"], "seed": seed, "point_key": spec.point_key(point)}
    if spec.baseline or any(p.startswith("baseline.") for p in point):
        b = evaluate_baseline(model, test, cfg.baseline.first_level(), cfg.repeats, seed, progress=False,
                              device=resolve_device(ctx.device))[0]
        row.update(baseline_level=b["sigma"], baseline_accuracy_mean=b["accuracy_mean"],
                   baseline_ci95_low=ci_bounds(b["ci95"])[0], baseline_ci95_high=ci_bounds(b["ci95"])[1])
    row["elapsed_s"] = time.perf_counter() - start
    return row


# -- durable storage ----------------------------------------------------------------------------
class ResultsFile:
    """DIR/results.csv, appended one fsynced row at a time, and DIR/spec.json."""

    def __init__(self, out_dir, spec: SweepSpec) -> None:
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "results.csv"
        self.columns = columns(spec)
        spec_path = self.dir / "spec.json"
        if spec_path.exists():
            if json.loads(spec_path.read_text()) != json.loads(spec.canonical):
                raise SpecError(f"{self.dir} holds results of a different sweep spec (see {spec_path}); "
                                f"use another --out directory or remove {self.dir}")
        else:
            atomic_write(spec_path, json.dumps(json.loads(spec.canonical), indent=2))
        self.done = self._read_done(spec)

    def _read_done(self, spec: SweepSpec) -> dict:
        if not self.path.exists():
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerow(self.columns)
                f.flush()
                os.fsync(f.fileno())
            return {}
        text = self.path.read_text()
        if text and not text.endswith("\n"):  # a row cut short by a crash: drop it
            text = text[:text.rfind("\n") + 1]
            atomic_write(self.path, text)
        reader = csv.DictReader(io.StringIO(text))
        if reader.fieldnames != self.columns:
            raise SpecError(f"{self.path}: columns differ from this spec's; use another --out directory")
        valid = {spec.point_key(p) for p in spec.points}
        done = {}
        for row in reader:
            if row["point_key"] in valid:
                done[row["point_key"]] = row
        return done

    def append(self, row: dict) -> None:
        buffer = io.StringIO()
        csv.DictWriter(buffer, fieldnames=self.columns, extrasaction="raise").writerow(
            {c: row.get(c, "") for c in self.columns})
        with open(self.path, "a", newline="") as f:
            f.write(buffer.getvalue())  # one write of the whole line
            f.flush()
            os.fsync(f.fileno())
        self.done[row["point_key"]] = row

    def sort(self) -> None:
        """Rewrite the finished file in point order (atomically)."""
        with open(self.path, newline="") as f:
            rows = list(csv.DictReader(f))
        rows.sort(key=lambda r: int(r["point"]))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.columns)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(self.path, buffer.getvalue())


# -- execution ---------------------------------------------------------------------------------
_WORKER_CONTEXT: Optional[SweepContext] = None  # per worker process, loaded once by the initializer


def worker_device(device, number: int):
    """Where worker ``number`` (0, 1, ...) of a sweep's local workers or local Dask
    cluster computes: with a bare "cuda" on a machine with several GPUs, the workers
    take the GPUs in turn (worker n on cuda:(n mod GPUs)), so that they share all of
    them rather than all crowd the first; any other device is every worker's."""
    if device is None or torch.device(device) != torch.device("cuda"):
        return device
    gpus = torch.cuda.device_count()
    return f"cuda:{number % gpus}" if gpus > 1 else device


def use_worker_device(device) -> None:
    """Make a worker's GPU (cuda:N) its current one, where CUDA's defaults (a stream, a
    capture's memory pool) are made."""
    device = None if device is None else torch.device(device)
    if device is not None and device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


def _init_worker(spec: SweepSpec, checkpoints: dict, threads: int, devices, cuda_graphs: bool) -> None:
    """A local worker's start: its share of the cores, its device (the next of the
    queue ``devices``: one per worker, :func:`worker_device`) and the sweep's context."""
    global _WORKER_CONTEXT
    import numba

    torch.set_num_threads(threads)  # workers share the cores: no oversubscription
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    device = devices.get()
    use_worker_device(device)
    _WORKER_CONTEXT = load_context(spec, checkpoints, device, cuda_graphs=cuda_graphs)


def _worker_point(spec: SweepSpec, index: int, point: dict) -> dict:
    return evaluate_point(_WORKER_CONTEXT, spec, index, point)


def _run_local(spec, todo, checkpoints, workers, device=None, cuda_graphs: bool = False) -> Iterator[dict]:
    if workers == 1:
        ctx = load_context(spec, checkpoints, device, cuda_graphs=cuda_graphs)
        for index, point in todo:
            yield evaluate_point(ctx, spec, index, point)
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    # spawn, not fork: forking a process that already runs OpenMP/TBB thread pools can hang
    spawn = get_context("spawn")
    devices = spawn.Queue()  # each worker takes one as it starts (at most `workers` of them start)
    for number in range(workers):
        devices.put(worker_device(device, number))
    with ProcessPoolExecutor(workers, mp_context=spawn, initializer=_init_worker,
                             initargs=(spec, checkpoints, threads, devices, cuda_graphs)) as pool:
        pending = {pool.submit(_worker_point, spec, i, p) for i, p in todo}
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    yield future.result()
        except BaseException:
            for future in pending:
                future.cancel()
            raise


def check_workers(workers) -> None:
    """Refuse a --workers that is not an integer >= 1, by name."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"--workers = {workers!r} is invalid: expected an integer >= 1")


def run_sweep(spec: SweepSpec, out_dir, workers: int = 1, progress: bool = True, cache_dir=None,
              scheduler: Optional[str] = None, scheduler_timeout: float = 10.0, device: Optional[str] = None,
              cuda_graphs: bool = False) -> dict:
    """Evaluate every point not yet in DIR/results.csv; returns counts of points.
    ``device``: where the chips, the float models and the baseline compute (a bare "cuda"
    spreads local workers, and a local Dask cluster's, over the machine's GPUs:
    :func:`worker_device`; on a cluster started elsewhere, the GPU each worker was
    given), and, for local runs, where models not yet cached are trained;
    ``cuda_graphs`` (device on CUDA): the chips' passes replay as CUDA graphs, with the
    same results (``AnalogModel.use_cuda_graphs``)."""
    check_workers(workers)
    if isinstance(scheduler_timeout, bool) or not (isinstance(scheduler_timeout, (int, float))
                                                   and 0 < scheduler_timeout <= 3600):
        raise ValueError(f"--scheduler-timeout = {scheduler_timeout!r} is invalid: expected seconds in (0, 3600]")
    # a bad --device fails before any work (a cluster's workers check their own, and the
    # client, which may have no GPU, trains on its CPU)
    training_device = resolve_device(device) if scheduler is None else None
    check_cuda_graphs(cuda_graphs, device, ("--cuda-graphs", "--device"))
    store = ResultsFile(out_dir, spec)
    todo = [(i, p) for i, p in enumerate(spec.points) if spec.point_key(p) not in store.done]
    summary = {"points": len(spec.points), "already_done": len(spec.points) - len(todo), "evaluated": 0}
    if not todo:
        store.sort()
        return summary
    runner = None
    if scheduler is not None:
        from .distributed import DaskRunner

        runner = DaskRunner(scheduler, workers, scheduler_timeout)  # fails fast, before any training
    bar = None
    try:
        checkpoints = prepare_models(spec, Path(cache_dir or default_cache_dir()), progress, training_device)
        if runner is None:
            rows = _run_local(spec, todo, checkpoints, workers, device, cuda_graphs)
        else:
            rows = runner.rows(load_context(spec, checkpoints, device, ideal_on_device=False, cuda_graphs=cuda_graphs),
                               spec, todo)
        bar = tqdm(total=len(spec.points), initial=summary["already_done"], desc="sweep points", unit="point",
                   disable=not progress)
        for row in rows:
            store.append(row)
            summary["evaluated"] += 1
            bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        if runner is not None:
            runner.close()
    store.sort()
    return summary
