"""The torch device analog chips compute on (``convert(device=)``, ``--device``), and
where a module's tensors are."""
from __future__ import annotations

import itertools
from typing import Optional

import torch


def resolve_device(name, option: str = "--device") -> Optional[torch.device]:
    """None (the CPU engine) for None or "cpu"; otherwise the torch device (a name or a
    torch.device) if it exists here, else a clear error naming ``option``. "cuda" in a Dask or multi-GPU worker means the GPU the worker was
    given (its CUDA_VISIBLE_DEVICES)."""
    if name is None:
        return None
    if not isinstance(name, (str, torch.device)):
        raise ValueError(f"{option} = {name!r} is invalid: expected 'cpu', 'cuda' or 'cuda:N'")
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


def module_device(module: torch.nn.Module) -> torch.device:
    """Where a module computes: the device of its first parameter or buffer (a converted
    model's chip is in buffers), or the CPU for a module without tensors."""
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        return tensor.device
    return torch.device("cpu")
