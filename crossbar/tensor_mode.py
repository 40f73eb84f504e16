"""A chip's tensors are normal tensors, whatever the caller's ``torch.inference_mode()``.

Evaluation code often runs inside ``torch.inference_mode()``. Tensors made there are
inference tensors: they cannot be changed in place outside such a block, and they carry
no version counter. A chip's state is changed in place later (calibration writes its ADC
ranges, a pass advances its vector counter), and its host copies and CUDA graphs are
kept by tensor version, so a chip made, calibrated, set to a time or moved inside such a
block could not be used after it (``mapping.convert`` failed outright). What makes or
moves that state runs with inference mode off (:func:`normal_tensors`); a pass's outputs
are still inference tensors inside such a block, as torch makes them.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch


def normal_tensors(fn: Callable) -> Callable:
    """``fn`` run with inference mode off: the tensors it makes are normal tensors."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with torch.inference_mode(False):
            return fn(*args, **kwargs)

    return run
