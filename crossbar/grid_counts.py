"""A tile grid's counts: per tile (R, C), what programming and calibration did
(``PROGRAM_COUNTS``) and what the converters converted and clipped
(``CONVERSION_COUNTS``). The torch engine's conversion counts add up on its device
until they are read, so that a product on a GPU never waits for the host.
"""
from __future__ import annotations

import numpy as np
import torch

PROGRAM_COUNTS = ("devices", "prog_clamped", "stuck_min", "stuck_max", "read_clamped", "adc_range_fallback")
CONVERSION_COUNTS = ("dac_converted", "dac_clipped", "adc_converted", "adc_saturated")


class Counts:
    """Mixed into :class:`~crossbar.grid.TileGrid`: ``counts`` {name: (R, C) int64 on
    the host} and ``_device_counts`` {name: running tensor on the device}, and what a
    read changes (``read_state``) for a pass that is rewound or replayed."""

    def _count_conversions(self, batch: int, clipped_per_block, saturated) -> None:
        """Conversion counts of one product. The torch engine's (device tensors) add up
        on the device until the counts are read, so a product on a GPU never waits for
        the host."""
        rows = np.diff(self.row_starts)[:, None]
        cols = np.diff(self.col_starts)[None, :]
        self.counts["dac_converted"] += rows * batch
        self.counts["adc_converted"] += cols * batch
        for name, value in (("dac_clipped", clipped_per_block), ("adc_saturated", saturated)):
            if isinstance(value, torch.Tensor):
                # a new tensor, never an in-place sum: a deferred pass's rewind keeps the old one
                running = self._device_counts.get(name)
                self._device_counts[name] = value if running is None else running + value
            else:
                self._add_count(name, np.asarray(value, np.int64))

    def _add_count(self, name: str, value: np.ndarray) -> None:
        """Add (R,) clipped-input counts (every tile of a row block) or (R, C) counts."""
        self.counts[name] += value[:, None] if name == "dac_clipped" else value

    def read_state(self) -> tuple:
        """What a read changes: (vectors read, conversion counts on the host (copies),
        running counts on the device (their tensors, which no read changes in place))."""
        return (self._vectors_read, {name: self.counts[name].copy() for name in CONVERSION_COUNTS},
                dict(self._device_counts))

    def restore_read_state(self, state: tuple) -> None:
        """Put the grid back as ``read_state`` found it: the next read draws the same noise."""
        self._vectors_read, host, device = state
        for name, value in host.items():
            self.counts[name][...] = value
        self._device_counts = dict(device)

    def collect_device_counts(self) -> None:
        """Add the torch engine's running device counts into the host counts (one wait
        for the device); none are left running."""
        running, self._device_counts = self._device_counts, {}
        for name, value in running.items():
            self._add_count(name, value.cpu().numpy().astype(np.int64))

    def running_device_counts(self) -> dict:
        """{count name: the running device tensor} of reads since the counts were last
        collected: what a CUDA graph of a pass that starts with none produces."""
        return dict(self._device_counts)

    def add_device_reads(self, vectors: int, host_counts: dict, device_counts: dict) -> None:
        """Account for reads that ran on the device alone (a CUDA graph's replay of the
        reads a captured pass made): ``vectors`` more vectors read, which advanced the
        device's vector counter by as much; ``host_counts`` {name: array} added to the
        counts; ``device_counts`` {name: tensor} that the replay wrote (copied here,
        since the next replay writes them again)."""
        self._vectors_read += vectors
        if self._counter_holds is not None:
            self._counter_holds += vectors
        for name, value in host_counts.items():
            self.counts[name] += value
        for name, value in device_counts.items():
            running = self._device_counts.get(name)
            self._device_counts[name] = value.clone() if running is None else running + value

    def reset_counts(self) -> None:
        """Zero the conversion counts (programming and calibration counts are kept)."""
        self._device_counts = {}
        for name in CONVERSION_COUNTS:
            self.counts[name][:] = 0

    def count_totals(self) -> dict:
        self.collect_device_counts()
        return {name: int(v.sum()) for name, v in self.counts.items()}
