"""Network benchmark: CIFAR-shaped networks on 256 x 256 PCM tiles against float torch.

Models: the W2 CNN (conv 3->32, conv 32->64, maxpool, conv 64->128, maxpool, linear
8192->256, linear 256->10), and the built-in vgg, resnet20 and resnet56 (batch norm
folded into the weights, as hardware holds it), a batch of 256 inputs uniform in [0, 1];
and a small transformer encoder (4 layers, d_model 256, 8 heads, feed-forward 1024,
sequence 128, a mean-pooled linear head to 10 classes; its attention scores and
softmax digital), a batch of 32 standard normal sequences. Default torch
initialisation; pcm devices at t = 1 day with drift, 1/f and per-read
noise, drift compensation, 8-bit DAC and ADC, through the public API (convert,
calibrate, at, forward). Each model's float and analog runs happen in processes of
their own, so that each peak RSS is that run's alone; times are medians of --repeats
forward passes after a warm-up, the float model's timed in the analog run's process,
its passes alternating with the analog ones (``float_alone_s_<model>``: its median
in a process of its own). The last line is JSON: ``ratio`` (the worst model),
``ratio_<model>`` and ``memory_ratio_<model>`` for each, and ``startup_s_<model>``, the
time of calibration and the first forward, in which the fused kernels of a GPU (or of
``XBARSIM_FUSED=1``) compile unless torch's compile cache of an earlier process holds
them, and ``compiled_graphs_<model>``, how many variants that compiled (0 where nothing
is compiled: the CPU's Numba engine; ``uncompiled_because_<model>`` where the fused
kernels failed to build and the stages ran eagerly) (targets: every ratio <= 2.5,
every memory ratio <= 2.0 on the CPU, the transformer's ratio <= 3.0; on a GPU at batch
1024, every ratio <= 3.0 and every memory ratio <= 3.0).

    python benchmarks/bench_network.py [--models cnn,transformer] [--batch 256] [--transformer-batch 32]
                                       [--profile] [--device cuda] [--engine torch] [--cuda-graphs]
                                       [--float-precision ieee]

With --device cuda both runs happen on the GPU and the memory ratios are of peak GPU
memory (torch's allocator) rather than of process RSS: ``memory_ratio_<model>`` that of
the timed passes, ``startup_memory_ratio_<model>`` that of calibration and the first
pass too, which compiles the fused kernels. ``--engine torch`` runs the GPU's torch
engine on the CPU: with ``XBARSIM_FUSED=1`` and ``--batch 1``, where the
kernels' work is negligible, the analog time is the host's cost of issuing a forward
pass (Python, torch dispatch, compiled-call wrappers), which bounds a GPU forward from
below whatever the GPU's speed. ``--cuda-graphs`` (with --device cuda) replays each
analog pass as a CUDA graph (``AnalogModel.use_cuda_graphs``), which removes most of
that host cost.

The analog products always round as IEEE float32 (``crossbar.precision``). The float
model runs under torch's defaults unless ``--float-precision ieee``: on Ampere and
later GPUs those make cuDNN convolutions TF32, faster than the analog model's IEEE
products, so a ratio against them includes the cost of the precision. The summary's
``float_settings`` records the settings the float runs were timed under.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import time
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import (at_seconds, gpu_peak_mb, interleaved_median_times, median_time, peak_rss_mb,  # noqa: E402
                     steady_allocator)

T_DAY = 86400.0
MODELS = ("cnn", "vgg", "resnet20", "resnet56", "transformer")
SEQUENCE, D_MODEL = 128, 256


def w2_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8192, 256), nn.ReLU(), nn.Linear(256, 10),
    )


class SmallTransformer(nn.Module):
    """A transformer encoder classifying sequences by their mean token."""

    def __init__(self, layers: int = 4, heads: int = 8, feedforward: int = 1024, classes: int = 10) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(D_MODEL, heads, feedforward, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(D_MODEL, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(1))


def build(name: str) -> nn.Module:
    from eval.models import build_model

    torch.manual_seed(0)
    if name == "cnn":
        model = w2_cnn()
    elif name == "transformer":
        model = SmallTransformer()
    else:
        model = build_model(name, (3, 32, 32), 10, batchnorm=name.startswith("resnet"))
    return model.eval()


def inputs(name: str, batch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    if name == "transformer":
        return torch.randn(batch, SEQUENCE, D_MODEL, generator=generator)
    return torch.rand(batch, 3, 32, 32, generator=generator)


def _sync(device):
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None


def _float_pass(model: nn.Module, x: torch.Tensor, float_precision: str):
    """One float forward under the float model's precision settings (``--float-precision``)."""
    from crossbar import precision

    def forward():
        ieee = precision.ieee_float32() if float_precision == "ieee" else contextlib.nullcontext()
        with torch.no_grad(), ieee:
            return model(x)

    return forward


def run_float(name: str, batch: int, repeats: int, device: torch.device, float_precision: str = "default") -> dict:
    """The float model alone in its process: its peak memory, and the settings it runs
    under (its time for the ratio is taken in the analog run's process, interleaved)."""
    from crossbar import precision

    model, x = build(name).to(device), inputs(name, batch).to(device)
    ieee = precision.ieee_float32() if float_precision == "ieee" else contextlib.nullcontext()
    with ieee:
        settings = precision.settings()
    float_alone_s = median_time(_float_pass(model, x, float_precision), repeats=repeats, sync=_sync(device))
    peak = gpu_peak_mb(device) if device.type == "cuda" else peak_rss_mb()
    return {"float_alone_s": float_alone_s, "float_peak_rss_mb": peak, "float_settings": settings}


def run_analog(name: str, batch: int, repeats: int, profile: bool, device: torch.device,
               engine: str = "auto", cuda_graphs: bool = False, float_precision: str = "default") -> dict:
    import mapping
    from crossbar import fused, presets

    model, x = build(name), inputs(name, batch)
    config = presets.pcm(rows=256, cols=256, dac_bits=8, adc_bits=8)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # batch norm folded; pooling has no weights
        analog = mapping.convert(model, config, seed=0, fold_batchnorm=True,
                                 device=None if device.type == "cpu" else device)
    analog.set_engine(engine)
    model, x = model.to(device), x.to(device)
    convert_s = time.perf_counter() - start
    start = time.perf_counter()
    analog.calibrate([x])
    calibrate_s = time.perf_counter() - start
    at_s = at_seconds(analog, T_DAY)
    if cuda_graphs:
        analog.use_cuda_graphs()  # the first pass captures the graph
    sync = _sync(device)
    start = time.perf_counter()
    analog(x)  # what calibration did not compile (fused kernels, on a GPU) compiles now
    if sync:
        sync()
    first_s = time.perf_counter() - start
    compiled_graphs = _compiled_graphs()  # all compiling is done by now: the passes below reuse it
    startup_peak = gpu_peak_mb(device)
    if device.type == "cuda":
        # the timed passes' own peak, apart from calibration and the first pass's compiling
        torch.cuda.reset_peak_memory_stats(device)
    # the float model's passes alternate with the analog ones, so that the ratio holds
    # whatever the machine's speed does meanwhile (float passes allocate less than
    # analog ones, so the peaks below are the analog passes')
    float_s, analog_s = interleaved_median_times([_float_pass(model, x, float_precision), lambda: analog(x)],
                                                 repeats=repeats, sync=sync)
    with torch.no_grad():
        agree = (analog(x).argmax(1) == model(x).argmax(1)).float().mean().item()
    peak = gpu_peak_mb(device) if device.type == "cuda" else peak_rss_mb()
    result = {"analog_s": analog_s, "float_s": float_s, "convert_s": convert_s, "calibrate_s": calibrate_s, "at_s": at_s,
              "first_forward_s": first_s, "compiled_graphs": compiled_graphs,
              "top1_agreement_with_float": agree, "peak_rss_mb": peak,
              "images_per_s": batch / analog_s}
    if device.type == "cuda":
        result["startup_peak_mb"] = max(startup_peak, peak)
    uncompiled = fused._COMPILE_FAILED.get(device.type)
    if uncompiled is not None:  # the fused kernels failed to build: these are the eager stages' times
        result["uncompiled_because"] = uncompiled
    if profile:
        print(_profiles(lambda: analog(x), device, sync), file=sys.stderr)
    return result


def _compiled_graphs() -> int:
    """How many graphs torch.compile has compiled in this process (the fused kernels'
    variants: each costs start-up time, seconds to a minute, with a cold cache)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _profiles(forward, device: torch.device, sync) -> str:
    """One forward's host profile (Python functions by own time) and its torch
    operations by own time on the device (CUDA kernels on a GPU, the CPU otherwise);
    ``sync`` waits for a GPU's queued work (None on the CPU)."""
    host = cProfile.Profile()
    host.enable()
    forward()
    host.disable()
    text = io.StringIO()
    pstats.Stats(host, stream=text).sort_stats("tottime").print_stats(12)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as ops:
        forward()
        if sync:
            sync()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return text.getvalue() + ops.key_averages().table(sort_by=key, row_limit=20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batch", type=int, default=256, help="images per batch of the convolutional models")
    parser.add_argument("--transformer-batch", type=int, default=32, help="sequences per batch of the transformer")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true",
                        help="print an analog forward's profiles to stderr: Python functions, and torch operations "
                             "by device time")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--engine", default="auto", choices=["auto", "numba", "torch"],
                        help="the analog products' engine (auto: Numba on the CPU, torch elsewhere)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="run the analog passes as CUDA graphs (AnalogModel.use_cuda_graphs; --device cuda)")
    parser.add_argument("--float-precision", default="default", choices=["default", "ieee"],
                        help="the float model's float32 products: torch's defaults (TF32 convolutions on "
                             "Ampere and later GPUs) or IEEE, as the analog products always are")
    parser.add_argument("--part", choices=["float", "analog"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    models = args.models.split(",")
    for option in ("batch", "transformer_batch"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} {getattr(args, option)}: expected an integer >= 1")
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"--models: unknown {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    if args.cuda_graphs and not args.device.startswith("cuda"):
        parser.error(f"--cuda-graphs needs --device cuda (got --device {args.device})")
    if args.part:
        steady_allocator()
        device = torch.device(args.device)
        result = (run_float(models[0], args.batch, args.repeats, device, args.float_precision) if args.part == "float"
                  else run_analog(models[0], args.batch, args.repeats, args.profile, device, args.engine,
                                  args.cuda_graphs, args.float_precision))
        print(json.dumps(result))
        return
    summary = {"batch": args.batch, "transformer_batch": args.transformer_batch,
               "torch_threads": torch.get_num_threads(), "device": args.device, "engine": args.engine,
               "cuda_graphs": args.cuda_graphs, "float_precision": args.float_precision}
    for name in models:
        result = {}
        batch = args.transformer_batch if name == "transformer" else args.batch
        for part in ("float", "analog"):
            command = [sys.executable, __file__, "--part", part, "--models", name, "--batch", str(batch),
                       "--repeats", str(args.repeats), "--device", args.device, "--engine", args.engine,
                       "--float-precision", args.float_precision]
            command += (["--profile"] if args.profile else []) + (["--cuda-graphs"] if args.cuda_graphs else [])
            out = subprocess.run(command, capture_output=True, text=True, check=True)
            if args.profile and part == "analog":
                print(f"--- {name}\n{out.stderr}", file=sys.stderr)
            result.update(json.loads(out.stdout.strip().splitlines()[-1]))
        result["ratio"] = result["analog_s"] / result["float_s"]
        result["memory_ratio"] = result["peak_rss_mb"] / result["float_peak_rss_mb"]
        if "startup_peak_mb" in result:
            summary[f"startup_memory_ratio_{name}"] = result["startup_peak_mb"] / result["float_peak_rss_mb"]
        print(f"{name:9s} float {result['float_s']:.3f} s  analog {result['analog_s']:.3f} s  ratio "
              f"{result['ratio']:.2f}  memory ratio {result['memory_ratio']:.2f}  convert {result['convert_s']:.2f} s  "
              f"calibrate {result['calibrate_s']:.2f} s  first forward {result['first_forward_s']:.2f} s  "
              f"at(t) {result['at_s']:.3f} s  compiled graphs {result['compiled_graphs']}  "
              f"top-1 agreement {result['top1_agreement_with_float']:.3f}", flush=True)
        summary[f"ratio_{name}"] = result["ratio"]
        summary[f"memory_ratio_{name}"] = result["memory_ratio"]
        summary[f"analog_s_{name}"] = result["analog_s"]
        summary[f"float_s_{name}"] = result["float_s"]
        summary[f"float_alone_s_{name}"] = result["float_alone_s"]
        summary[f"images_per_s_{name}"] = result["images_per_s"]
        summary[f"startup_s_{name}"] = result["calibrate_s"] + result["first_forward_s"]
        summary[f"compiled_graphs_{name}"] = result["compiled_graphs"]
        if "uncompiled_because" in result:
            print(f"{name:9s} ran uncompiled: torch.compile failed ({result['uncompiled_because']})", flush=True)
            summary[f"uncompiled_because_{name}"] = result["uncompiled_because"]
        summary["float_settings"] = result["float_settings"]
    summary["ratio"] = max(summary[f"ratio_{name}"] for name in models)
    summary["memory_ratio"] = max(summary[f"memory_ratio_{name}"] for name in models)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
