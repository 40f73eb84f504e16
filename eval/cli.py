"""The ``xbarsim`` command line: run, train, sweep, plot, version."""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

_UNITS = {"s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0, "y": 31536000.0}


def parse_time(text: str) -> float:
    """'3600', '1h', '30d', '1y' -> seconds."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*(s|min|h|d|y)?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(
            f"invalid time {text!r}: expected seconds or a number with s, min, h, d or y (e.g. 1h, 30d)")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def parse_times(text: str) -> tuple:
    return tuple(parse_time(part) for part in text.split(",") if part.strip())


def _package_version() -> str:
    from crossbar import __version__

    return __version__


def _add_data_model_options(p: argparse.ArgumentParser) -> None:
    from .datasets import DATASETS
    from .models import MODELS

    p.add_argument("--dataset", default="digits", choices=DATASETS, help="data set (default: digits, bundled)")
    p.add_argument("--data-dir", help="directory with the MNIST idx or CIFAR pickle files")
    p.add_argument("--model", choices=MODELS, help="model architecture (default: cnn)")
    p.add_argument("--batchnorm", action=argparse.BooleanOptionalAction,
                   help="the model with batch norm layers (default: without)")
    p.add_argument("--epochs", type=int, help="training epochs (default depends on the data set)")
    p.add_argument("--seed", type=int, help="root seed (default 0)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (they are shown only when stderr is a terminal)")


def _add_cuda_graphs_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cuda-graphs", action="store_true",
                   help="with --device cuda: replay each chip's passes as CUDA graphs, which cuts the host's "
                        "share of a pass; the same results (not yet checked bitwise on a GPU, so opt-in)")


def _progress(args) -> bool:
    # bars are for people watching a terminal; in a log file they are carriage-return noise
    return not args.no_progress and sys.stderr.isatty()


def _version(args) -> int:
    from .results import versions

    v = versions()
    print(f"xbarsim {v['xbarsim']} (python {v['python']}, numpy {v['numpy']}, numba {v['numba']}, "
          f"torch {v['torch']})")
    return 0


def _train(args) -> int:
    from mapping.devices import resolve_device
    from .datasets import load_dataset
    from .hwa import describe
    from .train import (DEFAULT_EPOCHS, accuracy, check_checkpoint_path, save_checkpoint, seeded_model, train,
                        training_record)

    hwa = _hwa_config(args)
    model_name, batchnorm = args.model or "cnn", bool(args.batchnorm)
    suffix = "" if hwa.plain else f"-hwa-{hwa.mode}"
    out = check_checkpoint_path(args.out or f"checkpoints/{args.dataset}-{model_name}-"
                                            f"{'bn' if batchnorm else 'nobn'}{suffix}.pt")
    device = resolve_device(args.device)  # before the data is read: a bad --device fails at once
    data = load_dataset(args.dataset, args.data_dir)
    epochs = args.epochs if args.epochs is not None else DEFAULT_EPOCHS[data.name]
    seed = args.seed if args.seed is not None else 0
    record = training_record(data, model_name, batchnorm, epochs, seed, hwa)
    model = seeded_model(model_name, data, batchnorm, seed, device)
    losses = train(model, data, epochs, seed=seed, progress=_progress(args), hwa=hwa)
    acc = accuracy(model, data.batches("test"))
    save_checkpoint(out, model, record, acc)
    print(f"trained {model_name} on {data.name} for {epochs} epochs (seed {seed}), {describe(record.get('hwa'))}: "
          f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, test accuracy {100 * acc:.2f}%\ncheckpoint: {out}")
    return 0


def _hwa_config(args):
    """The [hwa] of --config, with --hwa, --hwa-eta and --hwa-clip on top."""
    from .hwa import HWAConfig, load_hwa_config

    hwa = load_hwa_config(args.config) if args.config else HWAConfig()
    for option, key in (("hwa", "mode"), ("hwa_eta", "eta"), ("hwa_clip", "clip_sigma")):
        value = getattr(args, option)
        if value is not None:  # an option given on the command line wins over --config
            try:
                hwa = hwa.replace(**{key: value})
            except ValueError as err:
                raise ValueError(f"--{option.replace('_', '-')} {value}: {err}") from None
    if args.hwa_eta is not None and hwa.mode != "additive":
        raise ValueError(f"--hwa-eta {args.hwa_eta} is the additive mode's noise level; training mode is "
                         f"{hwa.mode!r}: add --hwa additive")
    return hwa


def _note_compiling(device_name: Optional[str]) -> None:
    """Say, on stderr, that a job on a GPU compiles its fused kernels first: minutes
    with no output otherwise look like a hang (resnet56 took 172 s on an H100 with an
    empty compile cache)."""
    import torch

    from crossbar.fused import use_fused

    if device_name is None or not str(device_name).startswith("cuda"):
        return  # (a bad name is refused, by name, where the job resolves it)
    if use_fused(torch.device("cuda")):
        print("note: on a GPU, the first analog passes compile xbarsim's fused kernels (torch.compile), which can "
              "take minutes unless torch's compile cache holds them from an earlier run on this machine "
              "(XBARSIM_FUSED=0 runs them uncompiled, more slowly)", file=sys.stderr)


def _note_shared_gpus(args) -> None:
    """Say, on stderr, how a sweep's local workers (or local Dask cluster's) share the
    machine's GPUs when --device cuda spreads them over several."""
    from .sweep import worker_device

    if args.workers < 2 or args.scheduler not in (None, "local") or not str(args.device).startswith("cuda"):
        return
    try:
        gpus = sorted({str(worker_device(args.device, n)) for n in range(args.workers)})
    except RuntimeError:
        return  # a bad name is refused, by name, where the sweep resolves it
    if len(gpus) > 1:
        print(f"note: the {args.workers} workers share {len(gpus)} GPUs, worker n on cuda:(n mod {len(gpus)}) "
              f"(--device cuda:N puts them all on one)", file=sys.stderr)


def _check_checkpoint_options(args, meta: dict) -> None:
    """Options that describe the trained model must agree with the checkpoint's record."""
    given = {"--model": (args.model, meta.get("model")),
             "--batchnorm/--no-batchnorm": (args.batchnorm, meta.get("batchnorm")),
             "--epochs": (args.epochs, meta.get("epochs"))}
    for option, (value, held) in given.items():
        if value is not None and value != held:
            raise ValueError(f"{option} {value} conflicts with --checkpoint {args.checkpoint}, which holds a model "
                             f"trained with {held!r}; drop the option (the checkpoint decides) or train another")


def _run(args) -> int:
    from .config import RunConfig, load_run_config
    from .datasets import default_cache_dir, load_dataset
    from mapping.devices import resolve_device
    from .experiment import check_cuda_graphs, run_experiment
    from .hwa import describe
    from .outputs import check_writable_dir
    from .plots import plot_accuracy_vs_time, plot_histograms
    from .results import table, versions, write_results
    from .train import load_checkpoint, train_or_load

    start = time.perf_counter()
    config = load_run_config(args.config) if args.config else RunConfig()
    for key in ("repeats", "times", "seed"):
        value = getattr(args, key)
        if value is not None:  # an option given on the command line wins over --config
            config = config.with_path(key, value)
    device = resolve_device(args.device)  # before any training: a bad --device fails at once
    check_cuda_graphs(args.cuda_graphs, device, ("--cuda-graphs", "--device"))
    _note_compiling(device)
    out = check_writable_dir(args.out, "--out")
    data = load_dataset(args.dataset, args.data_dir)
    progress = _progress(args)
    if args.checkpoint:
        model, meta = load_checkpoint(args.checkpoint, data)
        _check_checkpoint_options(args, meta)
        checkpoint = Path(args.checkpoint)
        if meta.get("data_fingerprint") not in (None, data.fingerprint()):
            print(f"note: {checkpoint} was trained on other {data.name} files than these (data fingerprints "
                  f"differ); evaluating it on these", file=sys.stderr)
    else:
        model, meta, checkpoint = train_or_load(data, args.model or "cnn", bool(args.batchnorm),
                                                default_cache_dir(), args.epochs, seed=config.seed,
                                                progress=progress, device=device)
    training = {k: meta.get(k) for k in ("epochs", "seed", "recipe", "data_fingerprint", "test_accuracy", "hwa",
                                         "trained_on")}
    if args.checkpoint:
        print(f"checkpoint {checkpoint}: {meta['model']} trained {describe(meta.get('hwa'))}")
    results = {"dataset": data.name, "data_fingerprint": data.fingerprint(), "model": meta["model"],
               "batchnorm": meta["batchnorm"], "checkpoint": str(checkpoint), "training": training,
               "seed": config.seed, "fold_batchnorm": args.fold_batchnorm, "config": config.to_dict(),
               "versions": versions()}
    results.update(run_experiment(model, data.batches("test"), data.batches("train"), config,
                                  fold_batchnorm=args.fold_batchnorm, progress=progress, device=args.device,
                                  cuda_graphs=args.cuda_graphs))
    paths = write_results(results, out)
    plot_accuracy_vs_time(results, out / "accuracy_vs_time.png")
    plot_histograms(results["histograms"], out / "histograms.png")
    print(table(results))
    print(f"\nwrote {paths['json']}, {paths['csv']}, {out / 'accuracy_vs_time.png'}, {out / 'histograms.png'} "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


def _sweep(args) -> int:
    from mapping.devices import resolve_device

    from .experiment import check_cuda_graphs
    from .outputs import check_writable_dir
    from .results import counted
    from .sweep import check_workers, run_sweep
    from .sweep_plot import plot_sweep
    from .sweep_spec import load_spec

    spec = load_spec(args.spec)  # every point validated before any work starts
    check_workers(args.workers)  # these before --out is made
    if args.scheduler is None:  # (a cluster's workers check their own --device)
        resolve_device(args.device)
    check_cuda_graphs(args.cuda_graphs, args.device, ("--cuda-graphs", "--device"))
    check_writable_dir(args.out, "--out")
    print(f"sweep {args.spec}: {counted(len(spec.points), 'point')} x {counted(spec.repeats, 'repeat')} on "
          f"{spec.dataset} -> {args.out}")
    _note_compiling(args.device)  # (on a Dask cluster, the workers' GPUs compile)
    _note_shared_gpus(args)
    try:
        summary = run_sweep(spec, args.out, workers=args.workers, progress=_progress(args),
                            scheduler=args.scheduler, scheduler_timeout=args.scheduler_timeout,
                            device=args.device, cuda_graphs=args.cuda_graphs)
    except KeyboardInterrupt:
        print(f"xbarsim sweep: interrupted; finished points are in {args.out}/results.csv. "
              f"Run the same command again to complete the rest.", file=sys.stderr)
        return 130
    print(f"{counted(summary['evaluated'], 'point')} evaluated, {summary['already_done']} already done: "
          f"{args.out}/results.csv")
    for path in plot_sweep(args.out):
        print(f"plot: {path}")
    return 0


def _plot(args) -> int:
    from .sweep_plot import plot_sweep

    for path in plot_sweep(args.dir):
        print(f"plot: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xbarsim",
        description="Simulate deep-learning inference on analog memristive crossbars and "
                    "measure the accuracy lost to device and converter non-idealities.")
    parser.add_argument("--version", action="version", version=f"xbarsim {_package_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("run", help="accuracy of a network on simulated crossbars over time, against "
                                   "the ideal model and the additive-noise baseline")
    _add_data_model_options(p)
    p.add_argument("--checkpoint", help="a checkpoint from 'xbarsim train' (default: train or load a cached one)")
    p.add_argument("--config", help="TOML file with any tile, device, DAC, ADC, mapping, baseline setting")
    p.add_argument("--repeats", type=int, help="Monte Carlo repeats, each a freshly programmed chip (default 10)")
    p.add_argument("--times", type=parse_times,
                   help="inference times, comma separated, in s or with a unit (default 1s,1h,1d,30d,1y)")
    p.add_argument("--fold-batchnorm", action="store_true", help="fold batch norm into the weights before mapping")
    p.add_argument("--out", default="xbarsim-results", help="output directory (default ./xbarsim-results)")
    p.add_argument("--device", help="where the job computes: cpu (default), cuda or cuda:N: the analog chips, "
                                    "the float model and the baselines, and training if the model is not "
                                    "cached; the same chips for a seed on any device")
    _add_cuda_graphs_option(p)
    p.set_defaults(func=_run)

    p = sub.add_parser("train", help="train a model (plainly or for the chip) and save a checkpoint")
    _add_data_model_options(p)
    p.add_argument("--out", help="checkpoint path (default ./checkpoints/DATASET-MODEL-bn|nobn[-hwa-MODE].pt)")
    p.add_argument("--hwa", choices=["off", "additive", "device"],
                   help="hardware-aware training: weight noise per batch, additive (eta x std(W)) or the "
                        "configured tiles' device errors (default off, or the --config file's [hwa] mode)")
    p.add_argument("--hwa-eta", type=float, help="additive noise level eta (default 0.1)")
    p.add_argument("--hwa-clip", type=float, metavar="K",
                   help="clip weights on tiles to +-K std after every step (default 0: off)")
    p.add_argument("--config", help="TOML file: an [hwa] table with every setting (eval/hwa.py), and the "
                                    "preset, [tile] and [mapping] the device mode draws from")
    p.add_argument("--device", help="where to train: cpu (default), cuda or cuda:N")
    p.set_defaults(func=_train)

    p = sub.add_parser("sweep", help="evaluate a grid of configurations (resumable), then plot it")
    p.add_argument("spec", help="sweep specification, TOML (see eval/sweep_spec.py)")
    p.add_argument("--out", required=True, help="results directory; rerunning resumes it")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes (default 1)")
    p.add_argument("--device", help="where the points compute: cpu (default), cuda or cuda:N (cuda spreads "
                                    "--workers over the machine's GPUs, worker n on cuda:(n mod GPUs); on a "
                                    "Dask cluster started elsewhere, cuda is the GPU each worker was given; "
                                    "a local sweep also trains models not yet cached there)")
    p.add_argument("--scheduler", help="a Dask scheduler address (tcp://host:8786), or 'local' for a local "
                                       "Dask cluster of --workers processes; needs the 'distributed' extra")
    p.add_argument("--scheduler-timeout", type=float, default=10.0,
                   help="seconds to wait for the Dask scheduler (default 10)")
    _add_cuda_graphs_option(p)
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (they are shown only when stderr is a terminal)")
    p.set_defaults(func=_sweep)

    p = sub.add_parser("plot", help="plot a sweep directory's results.csv")
    p.add_argument("dir", help="a directory written by 'xbarsim sweep'")
    p.set_defaults(func=_plot)

    p = sub.add_parser("version", help="print the versions of xbarsim and its numeric stack")
    p.set_defaults(func=_version)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.func(args)
    except ValueError as err:  # bad options, config files, data or checkpoints
        print(f"xbarsim {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the disk filled up or went away mid-run
        print(f"xbarsim {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"xbarsim {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
