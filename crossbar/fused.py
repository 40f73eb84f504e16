"""The torch engine's stages compiled into fused kernels (``torch.compile``).

On CUDA each elementwise stage (the normals' fast path and rejections, the read-out and
ADC, the convolutions' DAC) runs as one compiled kernel instead of dozens of eager
passes over float64 and int64 temporaries; ``XBARSIM_FUSED`` chooses where. A stage
that cannot be built runs eagerly, with one warning, computing the same values.
"""
from __future__ import annotations

import functools
import os
import warnings

import torch


FUSED_ENV = "XBARSIM_FUSED"
_VARIANTS = 64  # compiled variants allowed per fused function
# device types whose stages are compiled unless XBARSIM_FUSED says otherwise
FUSED_BY_DEFAULT = ("cuda",)
# device type -> why torch.compile failed there in this process; by default the stages
# then run eagerly there (see fused_version)
_COMPILE_FAILED: dict = {}


def fused_setting() -> str:
    """XBARSIM_FUSED: 'auto' (the default), '0' or '1'."""
    setting = os.environ.get(FUSED_ENV, "auto")
    if setting not in ("auto", "0", "1"):
        raise ValueError(f"{FUSED_ENV} = {setting!r} is invalid: expected 'auto', '0' or '1'")
    return setting


def use_fused(device: torch.device) -> bool:
    """Whether the elementwise stages run as fused kernels (torch.compile): on CUDA
    devices by default, where one kernel per stage instead of dozens of elementwise
    passes over float64 and int64 temporaries is most of the speed, unless compiling
    failed there earlier in the process. The environment variable XBARSIM_FUSED = 0
    runs them eagerly everywhere, 1 compiles them on any device (the CPU included: the
    tests compare the two), a failure to compile being an error then."""
    setting = fused_setting()
    if setting == "auto":
        return device.type in FUSED_BY_DEFAULT and device.type not in _COMPILE_FAILED
    return setting == "1"


@functools.lru_cache(maxsize=None)
def fused_version(fn):
    """``fn`` compiled into fused kernels, once per process (shapes are dynamic, so
    layers of other sizes reuse it). The arithmetic is fn's: integer hashing wraps as
    in eager torch, and float64 stays float64. Each combination of the stages that are
    on (noise, ADC errors, scales) is a variant of its own: dynamo's default limit of 8
    per function is raised so that none of them falls back to eager.

    Compiling dominates a GPU run's start (resnet56: over two minutes on an H100), so
    calls avoid what would compile a variant again for nothing: they run without
    autograd (no gradient flows through a chip; a grad mode is part of a compiled
    variant's guards, so calibration, run with autograd on, compiled every variant a
    second time), with views passed as tensors of their own (a view's base is guarded
    on too), and with two of torch's symbolic-shape settings (:data:`_SHAPE_SETTINGS`):
    duck shaping off, which would otherwise tie sizes that happen to be equal in the
    first call (a 128-entry ziggurat table and 128 vectors, say) and compile again when
    they differ, and sizes of 1 not specialized (``backed_size_oblivious``): otherwise
    a grid of one row block, a layer of one pixel and the rest each compile a variant
    (resnet56 on the CPU: 11 compiled graphs, now 6, and 80 s of compiling, now 66 s).
    A size-1 operand that a graph would need to broadcast is still told apart: torch
    then checks, or specializes, rather than assume.

    Where the kernels cannot be built (an old GPU, no Triton, no C compiler), the stages
    run uncompiled instead, with a warning, unless XBARSIM_FUSED = 1 asked for them
    compiled (:func:`_uncompiled_after`)."""
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), _VARIANTS))
    compiled = _compiled(fn)

    @functools.wraps(fn)
    def call(*args):
        # (use_fused is false there by now, but a caller's loop may hold on to this call)
        if _COMPILE_FAILED and _device_type(args) in _COMPILE_FAILED and fused_setting() == "auto":
            return fn(*args)
        # views as tensors of their own (a view is guarded on its base's sizes and strides
        # too); only views: a detach costs 0.6 us, the test 0.1 us, and a read-out takes ~15 tensors
        args = tuple(a.detach() if isinstance(a, torch.Tensor) and a._is_view() else a for a in args)
        with torch.no_grad():
            # set and restored by hand: the config's patch() cost 35 us a call, this 3 us a setting
            saved = [getattr(_SHAPE_CONFIG, name) for name, _ in _SHAPE_SETTINGS]
            for name, value in _SHAPE_SETTINGS:
                setattr(_SHAPE_CONFIG, name, value)
            try:
                return compiled(*args)
            except Exception as error:
                if isinstance(error, torch.cuda.OutOfMemoryError) or fused_setting() != "auto":
                    raise
                return _uncompiled_after(error, fn, args)
            finally:
                for (name, _), value in zip(_SHAPE_SETTINGS, saved):
                    setattr(_SHAPE_CONFIG, name, value)

    return call


def _compiled(fn):
    """torch.compile of ``fn``, or a function raising why torch refuses to compile here
    (its dynamo does not run on every Python version), which a call then handles as it
    handles a failure to build the kernels."""
    try:
        return torch.compile(fn, dynamic=True, fullgraph=True)
    except Exception as error:
        refusal = error  # (the except clause unbinds its own name)

        def refused(*args):
            raise refusal
        return refused


def _device_type(args: tuple) -> str:
    """The device type of a fused call's first tensor argument."""
    return next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")


def _uncompiled_after(error: Exception, fn, args: tuple):
    """``fn(*args)`` run eagerly after its compiled version failed with ``error``, and
    eager stages on that device type for the rest of the process, with one warning.

    Building the kernels fails on machines the default cannot know about: a GPU too old
    for Triton (compute capability below 7.0), no Triton, no C compiler for Triton's
    launcher. The eager stages compute the same chip and noise (the tests hold the two
    equal), more slowly and with more memory. An error of the inputs' own is raised by
    the eager call itself, as it would be without compiling."""
    result = fn(*args)
    device_type = _device_type(args)
    while isinstance(getattr(error, "inner_exception", None), Exception):
        error = error.inner_exception  # what dynamo's BackendCompilerFailed wraps: the cause
    lines = [line for line in str(error).splitlines() if line.strip()]
    cause = f"{type(error).__name__}: {lines[0][:300] if lines else ''}"
    warnings.warn(f"torch.compile could not build xbarsim's fused kernels for {device_type} ({cause}); they run "
                  f"uncompiled there for the rest of this process: the same chip and noise, more slowly and "
                  f"with more memory. {FUSED_ENV}=0 skips the attempt; {FUSED_ENV}=1 makes it an error, "
                  f"with torch's whole message", RuntimeWarning)
    _COMPILE_FAILED[device_type] = cause  # (after the warning, which an error filter raises)
    return result


def _shape_settings() -> tuple:
    """torch's symbolic-shape settings module and the (name, value) pairs a fused call
    runs under, those of them this torch has (older ones duck-shape and specialize
    sizes of 1 always)."""
    try:
        from torch.fx.experimental import _config
    except ImportError:
        return None, ()
    wanted = (("use_duck_shape", False), ("backed_size_oblivious", True))
    return _config, tuple((name, value) for name, value in wanted if hasattr(_config, name))


_SHAPE_CONFIG, _SHAPE_SETTINGS = _shape_settings()
