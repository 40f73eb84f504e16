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
pass's peak.

    python benchmarks/bench_memory.py [--models transformer,resnet56] [--batch 1024]
                                      [--transformer-batch 256] [--gpu-chunk-mb 1024]

Checked against an H100 (bench_network --device cuda, the code of 1925e74) for the
transformer at batch 256: the float peaks agree (300 MB here, 301 MB there); the
analog peak was 1071 MB there (3.55x) and 893 MB here (2.98x). What the GPU held
beyond this estimate is not known (that run's peak included the first pass, which
compiles and tunes the fused kernels). A tool for finding what holds memory without
a GPU, not a substitute for measuring one.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import os
import sys
import warnings

os.environ.setdefault("XBARSIM_FUSED", "1")  # before crossbar is imported: a GPU's fused kernels

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_network  # noqa: E402

MIB = 2 ** 20
# the torch engine's stages, by module, named in the profile where they run (in the operations at a peak)
_MARKED = (("crossbar.torch_dac", ("dac_convert", "pixel_dac_convert", "row_sum_squares")),
           ("crossbar.torch_engine", ("readout",)))


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


def transient_peak(fn) -> tuple:
    """(the most bytes that ``fn()`` held at once beyond what was live before it, the
    names of the operations under way then, innermost first)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # frees of blocks made before profiling are not seen
        with torch.profiler.profile(activities=activities, profile_memory=True) as profile:
            fn()
    events = list(profile.profiler.kineto_results.events())
    memory = sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns())
    live = peak = 0
    at = None
    for event in memory:
        live += event.nbytes()
        if live > peak:
            peak, at = live, event.start_ns()
    under_way = sorted((e for e in events if e.name() != "[memory]" and at is not None
                        and e.start_ns() <= at <= e.end_ns()), key=lambda e: e.duration_ns())
    return peak, [e.name() for e in under_way]


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
        float_pass, _ = transient_peak(lambda: model(x))
    float_total = resident_bytes(model, x) + float_pass
    config = presets.pcm(rows=256, cols=256, dac_bits=8, adc_bits=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # batch norm folded; pooling has no weights
        analog = mapping.convert(model, config, seed=0, fold_batchnorm=True,
                                 mapping=mapping.MappingConfig(gpu_chunk_mb=chunk_mb))
    analog.set_engine("torch")
    with as_on_a_gpu(), marked_functions():
        calibration, _ = transient_peak(lambda: analog.calibrate([x]))
        analog.at(bench_network.T_DAY)
        analog(x)  # compiles what calibration did not
        analog_pass, under_way = transient_peak(lambda: analog(x))
    resident = resident_bytes(analog, model, x)
    return {"float_mb": float_total / MIB, "resident_mb": resident / MIB, "calibration_mb": calibration / MIB,
            "pass_mb": analog_pass / MIB, "memory_ratio": (resident + max(calibration, analog_pass)) / float_total,
            "under_way_at_peak": under_way[:6]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(bench_network.MODELS))
    parser.add_argument("--batch", type=int, default=1024, help="images per batch of the convolutional models")
    parser.add_argument("--transformer-batch", type=int, default=256, help="sequences per batch of the transformer")
    parser.add_argument("--gpu-chunk-mb", type=int, default=1024, help="mapping.gpu_chunk_mb")
    args = parser.parse_args()
    models = args.models.split(",")
    unknown = sorted(set(models) - set(bench_network.MODELS))
    if unknown:
        parser.error(f"--models: unknown {', '.join(unknown)}; choose from {', '.join(bench_network.MODELS)}")
    for option in ("batch", "transformer_batch", "gpu_chunk_mb"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} {getattr(args, option)}: expected an integer >= 1")
    torch.manual_seed(0)
    summary = {"batch": args.batch, "transformer_batch": args.transformer_batch, "gpu_chunk_mb": args.gpu_chunk_mb}
    for name in models:
        batch = args.transformer_batch if name == "transformer" else args.batch
        result = measure(name, batch, args.gpu_chunk_mb)
        print(f"{name:11s} float {result['float_mb']:7.1f} MB  analog: chip and float model "
              f"{result['resident_mb']:6.1f} MB, calibration {result['calibration_mb']:7.1f} MB, pass "
              f"{result['pass_mb']:7.1f} MB  memory ratio {result['memory_ratio']:.2f}", flush=True)
        print(f"{'':11s} at the pass's peak: {' < '.join(result['under_way_at_peak'])}", flush=True)
        for key in ("memory_ratio", "float_mb", "pass_mb", "calibration_mb", "resident_mb"):
            summary[f"{key}_{name}"] = result[key]
    summary["memory_ratio"] = max(summary[f"memory_ratio_{name}"] for name in models)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
