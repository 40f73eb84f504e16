"""The torch device a run's analog chips compute on (``--device``)."""
from __future__ import annotations

from typing import Optional

import torch


def resolve_device(name: Optional[str], option: str = "--device") -> Optional[torch.device]:
    """None (the CPU engine) for None or "cpu"; otherwise a torch device that exists here,
    or a clear error. "cuda" in a Dask or multi-GPU worker means the GPU the worker was
    given (its CUDA_VISIBLE_DEVICES)."""
    if name is None:
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"{option} = {name!r} is invalid: expected 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        raise ValueError(f"{option} = {name!r} is invalid: expected 'cpu', 'cuda' or 'cuda:N'")
    if not torch.cuda.is_available():
        raise ValueError(f"{option} = {name!r} is invalid: torch sees no CUDA GPU on this machine")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"{option} = {name!r} is invalid: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return device


def to_device(batches: list, device: Optional[torch.device]) -> list:
    """(inputs, labels) batches with the inputs on ``device`` (labels stay: they are
    compared on the host)."""
    if device is None:
        return batches
    return [(_move(x, device), y) for x, y in batches]


def _move(inputs, device):
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_move(v, device) for v in inputs)
    if isinstance(inputs, dict):
        return {k: _move(v, device) for k, v in inputs.items()}
    return inputs
