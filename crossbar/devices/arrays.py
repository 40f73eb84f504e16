"""numpy or torch: the device models' arithmetic on either kind of array.

A device model is elementwise float64 arithmetic. The grid runs it with numpy on the
host, or with torch on the device where the grid's conductances live, so the models
write it once, with the functions that both libraries spell alike (``xp.log``,
``xp.clip``, ``xp.where``, ``xp.round``, ...: both round half to even, and ``clip``
with one bound None serves for ``maximum``/``minimum`` with a number) and these few
helpers where they differ. Scalars (a time, a coefficient) stay numpy or Python floats.
"""
from __future__ import annotations

import numpy as np
import torch


def namespace(a):
    """The library of array ``a``: torch for a tensor, else numpy."""
    return torch if isinstance(a, torch.Tensor) else np


def float64(a):
    """``a`` as a float64 array of its own kind (no copy where it is one already)."""
    if isinstance(a, torch.Tensor):
        return a.double()
    return np.asarray(a, dtype=np.float64)


def float64_copy(a):
    """A float64 copy of ``a``, of its own kind."""
    if isinstance(a, torch.Tensor):
        return a.double().clone()
    return np.array(a, dtype=np.float64)


def interp(x, xs: np.ndarray, fs: np.ndarray):
    """``np.interp(x, xs, fs)`` for an array x of either kind (xs increasing): linear
    between the table's points, its end values beyond them. The torch version takes the
    interval and slope as numpy does, (fs[j+1] - fs[j]) / (xs[j+1] - xs[j]) times
    (x - xs[j]) plus fs[j], to the same bits."""
    if not isinstance(x, torch.Tensor):
        return np.interp(x, xs, fs)
    xs_t = torch.tensor(xs, dtype=torch.float64, device=x.device)  # a copy: the table's columns are read-only
    fs_t = torch.tensor(fs, dtype=torch.float64, device=x.device)
    if len(xs) == 1:
        return torch.full_like(x, float(fs[0]))
    j = (torch.searchsorted(xs_t, x, right=True) - 1).clamp(0, len(xs) - 2)
    slope = (fs_t[1:] - fs_t[:-1]) / (xs_t[1:] - xs_t[:-1])
    inside = slope[j] * (x - xs_t[j]) + fs_t[j]
    return torch.where(x < xs_t[0], fs_t[0], torch.where(x >= xs_t[-1], fs_t[-1], inside))
