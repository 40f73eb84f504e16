"""Analog products in IEEE float32, whatever the process's reduced-precision settings.

cuDNN convolutions run in TF32 by default on Ampere and later GPUs (and matrix
products do after ``torch.set_float32_matmul_precision("high")``, common in training
scripts; on the CPU, oneDNN can be asked for bfloat16). TF32 keeps 10 bits of each
input's mantissa: a relative error of up to 2^-11 on every conductance and DAC value,
which moves column sums across ADC steps on a few percent of outputs and breaks the
promise that a seed names the same chip on the CPU and the GPU (equal outputs within
float32 product rounding). A converted model's whole pass runs so (its digital layers
too, for the same reason); the float model outside it keeps the precision its user chose.
Autocast (``torch.autocast``, common around GPU inference) would do worse, running the
products in float16 or bfloat16: it is off within the same blocks, and on again after.

A chip's state keeps its precision too: ``model.half()`` or ``model.to(torch.float64)``
casts a converted model's float weights and biases, as torch does, but only moves its
conductances, drift exponents, converter ranges and digital scales
(:func:`moves_only`): a cast to float16 would round the programmed conductances to
11 bits, a chip that was never programmed, and casting back would not undo it.
"""
from __future__ import annotations

import functools
import threading
from contextlib import ExitStack, contextmanager
from typing import Callable, Iterator

import torch


_lock = threading.Lock()
_depth = 0      # blocks open, in all threads
_saved: list = []  # the settings before the first of them


@functools.lru_cache(maxsize=None)
def _switches() -> tuple:
    """(name, settings object, attribute, its IEEE float32 value) of the float32 matrix
    products and convolutions on CUDA and on the CPU: the per-operation
    ``fp32_precision`` settings where this torch has them, else CUDA's older
    ``allow_tf32`` flags. Mixing the two kinds is an error in recent torch, so only one
    kind is ever touched."""
    backends = torch.backends
    conv = getattr(backends.cudnn, "conv", None)
    if hasattr(conv, "fp32_precision") and hasattr(backends.cuda.matmul, "fp32_precision"):
        found = [("cuda.matmul.fp32_precision", backends.cuda.matmul, "fp32_precision", "ieee"),
                 ("cudnn.conv.fp32_precision", conv, "fp32_precision", "ieee")]
    else:
        found = [("cuda.matmul.allow_tf32", backends.cuda.matmul, "allow_tf32", False),
                 ("cudnn.allow_tf32", backends.cudnn, "allow_tf32", False)]
    for op in ("matmul", "conv"):  # oneDNN, on the CPU
        owner = getattr(backends.mkldnn, op, None)
        if hasattr(owner, "fp32_precision"):
            found.append((f"mkldnn.{op}.fp32_precision", owner, "fp32_precision", "ieee"))
    return tuple(found)


def settings() -> dict:
    """The float32 precision settings of matrix products and convolutions now, by name
    under ``torch.backends`` (for example ``{"cudnn.conv.fp32_precision": "tf32", ...}``):
    what a float run was timed or evaluated under, for its record."""
    return {name: getattr(owner, attribute) for name, owner, attribute, _ in _switches()}


_AUTOCAST_DEVICES = ("cpu", "cuda")


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch before 2.4: one function per device
        return torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()


@contextmanager
def ieee_float32() -> Iterator[None]:
    """Within the block, float32 matrix products and convolutions round as IEEE
    float32 on every device (no TF32, no bfloat16, no autocast). The settings are the
    process's: the first block to enter sets them, and the last to leave, in any thread,
    restores them; a block inside another costs next to nothing. Autocast is the
    thread's own, off in the block where it was on."""
    with ExitStack() as stack:
        for device_type in _AUTOCAST_DEVICES:
            if _autocast_on(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        with _process_ieee_float32():
            yield


@contextmanager
def _process_ieee_float32() -> Iterator[None]:
    global _depth, _saved
    with _lock:
        if _depth == 0:
            switches = _switches()
            _saved = [getattr(owner, attribute) for _, owner, attribute, _ in switches]
            for _, owner, attribute, ieee in switches:
                setattr(owner, attribute, ieee)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for (_, owner, attribute, _), value in zip(_switches(), _saved):
                    setattr(owner, attribute, value)


def moves_only(fn: Callable) -> Callable:
    """``fn`` of ``nn.Module._apply`` (what ``.to()``, ``.cuda()``, ``.half()`` apply to
    each tensor) for a chip's state: where fn changes a tensor's dtype, the tensor is
    only moved to the device fn gave (see the module docstring)."""

    def apply(t: torch.Tensor) -> torch.Tensor:
        out = fn(t)
        return out if out.dtype == t.dtype else t.to(out.device)

    return apply
