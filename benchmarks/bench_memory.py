"""GPU memory of bench_network's models, estimated on the CPU.

The torch engine runs on the CPU as it runs on a GPU: fused kernels (``XBARSIM_FUSED=1``),
a GPU's chunk sizes (``mapping.gpu_chunk_mb``) and its convolution layouts (NCHW). Every
allocation and free in a float pass, in calibration and in an analog pass is tracked by
torch's profiler, so the live bytes at each moment are known: a float model's peak is
its weights, its input and the peak of the pass; an analog model's is the chip (with
the float model, as bench_network keeps it) plus the larger peak of calibration and
the pass. The last line is JSON: ``memory_ratio_<model>`` (analog peak over float
peak) and ``float_mb_<model>``, ``pass_mb_<model>``, ``calibration_mb_<model>``,
``resident_mb_<model>``; each model also prints the operations under way at its
pass's peak and the largest blocks live then, each with the operations under way when
it was allocated (``--blocks``).

    python benchmarks/bench_memory.py [--models transformer,resnet56] [--batch 1024]
                                      [--transformer-batch 256] [--gpu-chunk-mb 1024] [--blocks 5]

Checked against an H100 (bench_network --device cuda, the code of 1925e74) for the
transformer at batch 256: the float peaks agree (300 MB here, 301 MB there); the
analog peak was 1071 MB there (3.55x) and 893 MB here (2.98x). What the GPU held
beyond this estimate is not known (that run's peak included the first pass, which
compiles and tunes the fused kernels). A tool for finding what holds memory without
a GPU, not a substitute for measuring one.

The CPU's compiler can hold what a GPU's does not. Inductor's C++ backend runs the
read-out in two loops and writes the noisy values between them, before the ADC, in
float64: 8 bytes per tile output that Triton's one kernel keeps in registers (read
from the Triton code inductor generates for the same read-out). For the W2 CNN at
batch 64 that block is 64 MB of the pass's 154 MB peak (the second convolution: two
row blocks of 65,536 pixels x 64 outputs), so the ratio printed, 4.22, is about 2.9
without it; at batch 1024 the read-out's chunks bound it.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import os
import sys
import tempfile
import warnings
from typing import NamedTuple

os.environ.setdefault("XBARSIM_FUSED", "1")  # before crossbar is imported: a GPU's fused kernels

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_network  # noqa: E402

MIB = 2 ** 20
# the torch engine's stages, by module, named in the profile where they run (in the operations at a peak)
_MARKED = (("crossbar.torch_dac", ("dac_convert", "pixel_dac_convert", "row_sum_squares")),
           ("crossbar.torch_engine", ("readout",)), ("mapping.conv", ("_block_outputs",)))


@contextlib.contextmanager
def as_on_a_gpu():
    """The torch engine's GPU choices taken on the CPU: the read-out's chunk sizes and
    NCHW convolution inputs and kernels (``mapping.conv._cudnn_layout``)."""
    from mapping import conv, matrix

    saved = matrix.AnalogMatrix.vectors_per_chunk, conv._cudnn_layout, conv._kernel_format
    matrix.AnalogMatrix.vectors_per_chunk = matrix.AnalogMatrix.gpu_vectors_per_chunk
    conv._cudnn_layout = lambda t: t.contiguous()
    conv._kernel_format = lambda device: torch.contiguous_format
    try:
        yield
    finally:
        matrix.AnalogMatrix.vectors_per_chunk, conv._cudnn_layout, conv._kernel_format = saved


def _marked(module, name: str):
    fn = getattr(module, name)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with torch.profiler.record_function(f"{module.__name__}.{name}"):
            return fn(*args, **kwargs)

    return run


@contextlib.contextmanager
def marked_functions():
    modules = [(importlib.import_module(module), names) for module, names in _MARKED]
    saved = [(module, name, getattr(module, name)) for module, names in modules for name in names]
    for module, name, _ in saved:
        setattr(module, name, _marked(module, name))
    try:
        yield
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)


class Peak(NamedTuple):
    """What a function held at its peak, beyond what was live before it."""

    bytes: int
    under_way: list  # the operations under way at the peak, innermost first
    blocks: list     # (bytes, the operations under way at its allocation) of each block live then, largest first


def transient_peak(fn) -> Peak:
    """The most bytes that ``fn()`` held at once beyond what was live before it, what
    ran then and the blocks that made it up. Read from the profile's Chrome trace, whose
    memory events carry each block's address (the profiler's event objects do not), so
    a free is matched to its allocation."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # frees of blocks made before profiling are not seen
        with torch.profiler.profile(activities=activities, profile_memory=True) as profile:
            fn()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        profile.export_chrome_trace(path)
        with open(path) as trace:
            events = json.load(trace)["traceEvents"]
    memory = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    spans = [e for e in events if e.get("ph") == "X"]
    live, held, peak, at_peak, peak_ts = {}, 0, 0, {}, None
    for event in memory:
        size, address = event["args"]["Bytes"], event["args"]["Addr"]
        held += size
        if size > 0:
            live[address] = (size, event["ts"])
        else:
            live.pop(address, None)  # a block made before profiling is not in the map
        if held > peak:
            peak, at_peak, peak_ts = held, dict(live), event["ts"]

    def under_way(ts) -> list:
        found = sorted((s for s in spans if s["ts"] <= ts <= s["ts"] + s["dur"]), key=lambda s: s["dur"])
        return [s["name"] for s in found]

    blocks = sorted(((size, under_way(ts)) for size, ts in at_peak.values()), key=lambda b: -b[0])
    return Peak(peak, under_way(peak_ts) if peak_ts is not None else [], blocks)


def resident_bytes(*holders) -> int:
    """Bytes of the distinct storages of modules' parameters and buffers and of tensors."""
    storages = {}
    for holder in holders:
        tensors = list(holder.parameters()) + list(holder.buffers()) if isinstance(holder, torch.nn.Module) \
            else [holder]
        for t in tensors:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def measure(name: str, batch: int, chunk_mb: int) -> dict:
    import mapping
    from crossbar import presets

    model, x = bench_network.build(name), bench_network.inputs(name, batch)
    with torch.no_grad():
        float_pass = transient_peak(lambda: model(x)).bytes
    float_total = resident_bytes(model, x) + float_pass
    config = presets.pcm(rows=256, cols=256, dac_bits=8, adc_bits=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # batch norm folded; pooling has no weights
        analog = mapping.convert(model, config, seed=0, fold_batchnorm=True,
                                 mapping=mapping.MappingConfig(gpu_chunk_mb=chunk_mb))
    analog.set_engine("torch")
    with as_on_a_gpu(), marked_functions():
        calibration = transient_peak(lambda: analog.calibrate([x])).bytes
        analog.at(bench_network.T_DAY)
        analog(x)  # compiles what calibration did not
        analog_pass = transient_peak(lambda: analog(x))
    resident = resident_bytes(analog, model, x)
    return {"float_mb": float_total / MIB, "resident_mb": resident / MIB, "calibration_mb": calibration / MIB,
            "pass_mb": analog_pass.bytes / MIB,
            "memory_ratio": (resident + max(calibration, analog_pass.bytes)) / float_total,
            "under_way_at_peak": analog_pass.under_way[:6], "blocks_at_peak": analog_pass.blocks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(bench_network.MODELS))
    parser.add_argument("--batch", type=int, default=1024, help="images per batch of the convolutional models")
    parser.add_argument("--transformer-batch", type=int, default=256, help="sequences per batch of the transformer")
    parser.add_argument("--gpu-chunk-mb", type=int, default=1024, help="mapping.gpu_chunk_mb")
    parser.add_argument("--blocks", type=int, default=5,
                        help="the largest blocks live at each pass's peak to list, with where each was allocated")
    args = parser.parse_args()
    models = args.models.split(",")
    unknown = sorted(set(models) - set(bench_network.MODELS))
    if unknown:
        parser.error(f"--models: unknown {', '.join(unknown)}; choose from {', '.join(bench_network.MODELS)}")
    for option in ("batch", "transformer_batch", "gpu_chunk_mb"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} {getattr(args, option)}: expected an integer >= 1")
    if args.blocks < 0:
        parser.error(f"--blocks {args.blocks}: expected an integer >= 0")
    torch.manual_seed(0)
    summary = {"batch": args.batch, "transformer_batch": args.transformer_batch, "gpu_chunk_mb": args.gpu_chunk_mb}
    for name in models:
        batch = args.transformer_batch if name == "transformer" else args.batch
        result = measure(name, batch, args.gpu_chunk_mb)
        print(f"{name:11s} float {result['float_mb']:7.1f} MB  analog: chip and float model "
              f"{result['resident_mb']:6.1f} MB, calibration {result['calibration_mb']:7.1f} MB, pass "
              f"{result['pass_mb']:7.1f} MB  memory ratio {result['memory_ratio']:.2f}", flush=True)
        print(f"{'':11s} at the pass's peak: {' < '.join(result['under_way_at_peak'])}", flush=True)
        for size, allocated_in in result["blocks_at_peak"][:args.blocks]:
            print(f"{'':11s} {size / MIB:8.1f} MB allocated in {' < '.join(allocated_in[:3])}", flush=True)
        for key in ("memory_ratio", "float_mb", "pass_mb", "calibration_mb", "resident_mb"):
            summary[f"{key}_{name}"] = result[key]
    summary["memory_ratio"] = max(summary[f"memory_ratio_{name}"] for name in models)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
