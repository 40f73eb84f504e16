"""The input rows a layer's DAC and ADC ranges are calibrated on.

A layer keeps at most ``calibration_rows`` of the input vectors it is given during
calibration, per weight group, drawn with the layer's seeded generator. Two policies:

- :class:`FirstRows`, for a layer called once per pass: the first rows it is given (a
  random subset of the call that overfills the sample). A full sample is final, so the
  group calibrates at once and frees it: a deep network never holds every layer's
  sample together.
- :class:`Reservoir`, for a layer called several times per pass (a recurrent layer's
  hidden-to-hidden matrix at every time step, a cell stepped by a loop, a module under
  several names): a uniform sample of every row of every call (Vitter's algorithm R).
  The first rows would be the first time steps only, whose hidden state is still near
  its zero start, and ranges calibrated on them clip the later steps.

Both fetch only the rows they keep (``fetch(rows)``), so a convolution unrolls only those,
and keep them as float32 tensors where the layer's inputs are (a GPU's sample never
visits the host). Which rows are kept is drawn on the host with the layer's numpy
generator, so a seed names the same sample on every device.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch


class FirstRows:
    """The first ``keep`` rows offered (of ``width`` values each)."""

    def __init__(self, keep: int, width: int, rng: np.random.Generator) -> None:
        self.keep, self.width, self.rng = keep, width, rng
        self.calls = 0          # offers, empty ones included: a layer never called has none
        self._parts: list = []
        self._have = 0

    def offer(self, n: int, fetch: Callable[[Optional[np.ndarray]], torch.Tensor]) -> bool:
        """Take the first of ``n`` rows that fit; True once the sample is full (final).
        ``fetch(rows)`` returns the rows chosen (None: all) as a tensor or array."""
        self.calls += 1
        if n == 0:
            return False
        rows = None
        if n > self.keep - self._have:
            rows = np.sort(self.rng.choice(n, self.keep - self._have, replace=False))
        x = _float32(fetch(rows), copy=True)  # a copy: the layer may reuse its input's memory
        self._parts.append(x)
        self._have += len(x)
        return self._have >= self.keep

    def rows(self) -> torch.Tensor:
        """The sample, (rows, width) float32 on the device its rows came from."""
        if not self._parts:
            return torch.zeros((0, self.width), dtype=torch.float32)
        return torch.cat(self._parts) if len(self._parts) > 1 else self._parts[0].contiguous()


class Reservoir(FirstRows):
    """A uniform random sample of at most ``keep`` of all rows offered, in no particular
    order; never final before the calibration ends."""

    def __init__(self, keep: int, width: int, rng: np.random.Generator) -> None:
        super().__init__(keep, width, rng)
        self.seen = 0           # rows offered so far
        self._rows: Optional[np.ndarray] = None

    def offer(self, n: int, fetch: Callable[[Optional[np.ndarray]], torch.Tensor]) -> bool:
        self.calls += 1
        if n == 0:
            return False
        index = self.seen + np.arange(n)          # each row's position among all rows offered
        slot = np.where(index < self.keep, index, -1)
        late = index >= self.keep
        if late.any():                            # row k replaces a uniform slot with probability keep / (k + 1)
            drawn = self.rng.integers(0, index[late] + 1)
            slot[late] = np.where(drawn < self.keep, drawn, -1)
        chosen = np.flatnonzero(slot >= 0)
        # of the rows that land in one slot, the last offered stays
        _, first_from_end = np.unique(slot[chosen][::-1], return_index=True)
        chosen = np.sort(chosen[len(chosen) - 1 - first_from_end])
        if len(chosen):
            x = _float32(fetch(chosen))
            if self._rows is None:
                self._rows = torch.empty((self.keep, self.width), dtype=torch.float32, device=x.device)
            self._rows[torch.from_numpy(slot[chosen]).to(x.device)] = x
        self.seen += n
        return False

    def rows(self) -> torch.Tensor:
        if self._rows is None:
            return torch.zeros((0, self.width), dtype=torch.float32)
        return self._rows[:min(self.seen, self.keep)].clone()


class Unsampled(FirstRows):
    """No sample (calibration's counting pass: the layers compute their float products)."""

    def offer(self, n: int, fetch) -> bool:
        return False


def _float32(rows, copy: bool = False) -> torch.Tensor:
    """Fetched rows (a tensor on any device, or a numpy array) as a float32 tensor there."""
    return torch.as_tensor(rows).detach().to(torch.float32, copy=copy)
