"""Network benchmark: a CIFAR-style CNN on 256 x 256 PCM tiles against float torch.

conv 3->32, conv 32->64, maxpool, conv 64->128, maxpool, linear 8192->256, linear 256->10
(3x3 convolutions, padding 1, ReLUs), default torch initialisation, a batch of 256
inputs uniform in [0, 1]; pcm devices at t = 1 day with drift, 1/f and per-read noise,
drift compensation, 8-bit DAC and ADC. The float and the analog runs each happen in
their own process, so that each peak RSS is that run's alone. The last line is JSON
with analog_s, float_s, ratio (target <= 3.0), convert_s and peak_rss_mb (target: at
most twice float_peak_rss_mb).

    python benchmarks/bench_network.py
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import median_time, peak_rss_mb  # noqa: E402

T_DAY = 86400.0


def cifar_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8192, 256), nn.ReLU(), nn.Linear(256, 10),
    ).eval()


def inputs(batch: int) -> torch.Tensor:
    return torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def run_float(batch: int, repeats: int) -> dict:
    model, x = cifar_cnn(), inputs(batch)
    with torch.no_grad():
        float_s = median_time(lambda: model(x), repeats=repeats)
    return {"float_s": float_s, "float_peak_rss_mb": peak_rss_mb()}


def run_analog(batch: int, repeats: int) -> dict:
    import mapping
    from crossbar import presets

    model, x = cifar_cnn(), inputs(batch)
    config = presets.pcm(rows=256, cols=256, dac_bits=8, adc_bits=8)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the benchmark model has no digital layers anyway
        analog = mapping.convert(model, config, seed=0)
    convert_s = time.perf_counter() - start
    start = time.perf_counter()
    analog.calibrate([x])
    calibrate_s = time.perf_counter() - start
    at_s = median_time(lambda: analog.at(T_DAY), repeats=3, warmup=0)
    analog(x[:8])  # compile the kernels before timing
    analog_s = median_time(lambda: analog(x), repeats=repeats)
    with torch.no_grad():
        reference = model(x)
        agree = (analog(x).argmax(1) == reference.argmax(1)).float().mean().item()
    return {"analog_s": analog_s, "convert_s": convert_s, "calibrate_s": calibrate_s, "at_s": at_s,
            "top1_agreement_with_float": agree, "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--part", choices=["float", "analog"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:
        fn = run_float if args.part == "float" else run_analog
        print(json.dumps(fn(args.batch, args.repeats)))
        return
    result = {"batch": args.batch, "torch_threads": torch.get_num_threads()}
    for part in ("float", "analog"):
        out = subprocess.run([sys.executable, __file__, "--part", part, "--batch", str(args.batch),
                              "--repeats", str(args.repeats)], capture_output=True, text=True, check=True)
        result.update(json.loads(out.stdout.strip().splitlines()[-1]))
    result["ratio"] = result["analog_s"] / result["float_s"]
    result["memory_ratio"] = result["peak_rss_mb"] / result["float_peak_rss_mb"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
