"""``np.percentile(a, q)`` (its default, linear method) of a numpy array or of a torch
tensor on any device, to the same bits.

The linear percentile of n values is the interpolation between two order statistics,
a_(k) and a_(k+1), at the fraction gamma of the virtual index (n - 1) q / 100. Only those
two values depend on the data: the host finds them with ``np.partition``, a device with
``torch.topk``, and the interpolation is done here on the host in the array's
precision, as numpy 2 does it for a Python-number q (``_lerp``: a + (b - a) gamma, or
b - (b - a) (1 - gamma) where gamma >= 0.5). The tests hold it to ``np.percentile``.
"""
from __future__ import annotations

import numpy as np
import torch


def percentile(a, q: float):
    """The q-th percentile (0 <= q <= 100) of all the values of ``a`` (a non-empty numpy
    array or torch tensor, NaN-free), as a numpy scalar of a's precision."""
    n = a.numel() if isinstance(a, torch.Tensor) else a.size
    if n == 0:
        raise ValueError("the percentile of an empty sample is undefined: give at least one value")
    index = (n - 1) * np.true_divide(float(q), 100)
    if index >= n - 1:
        lo = hi = n - 1
        gamma = 0.0
    else:
        lo = int(np.floor(index))
        hi = lo + 1
        gamma = float(index - np.floor(index))
    low, high = _order_statistics(a, lo, hi)
    diff = high - low
    return high - diff * (1 - gamma) if gamma >= 0.5 else low + diff * gamma


def _order_statistics(a, lo: int, hi: int) -> tuple:
    """The lo-th and hi-th smallest values of a (0-based), as numpy scalars of its dtype."""
    if isinstance(a, torch.Tensor):
        flat = a.reshape(-1)
        n = flat.numel()
        # topk from the nearer end, not kthvalue: CUDA's kthvalue refuses to run under
        # torch.use_deterministic_algorithms(True) (its indices are not deterministic;
        # the values are), and a calibration's high percentile is near the top, where
        # topk keeps few values (2.4x faster than two kthvalues on the CPU at 99.99)
        if hi >= n // 2:
            top = torch.topk(flat, n - lo, largest=True, sorted=True).values  # descending, a_(lo) last
            values = top[[-1, -1 - (hi - lo)]]
        else:
            values = torch.topk(flat, hi + 1, largest=False, sorted=True).values[[lo, hi]]
        values = values.cpu().numpy()
    else:
        flat = np.asarray(a).reshape(-1)
        values = np.partition(flat, (lo, hi))[[lo, hi]]
    return values[0], values[1]
