"""How weights become conductances: scale reference, clipping, drift compensation."""
from __future__ import annotations

from dataclasses import dataclass

from crossbar.configbase import Config, check_bool, check_choice, check_int, check_number


@dataclass(frozen=True)
class MappingConfig(Config):
    """Weight-to-conductance mapping of a layer (PHYSICS.md sections 1 and 5).

    Attributes:
        scale: where w_ref (the weight mapped to g_max - g_min) is taken: ``"layer"``
            (one per layer), ``"tile"`` (one per tile) or ``"column"`` (one per tile column).
        clip: how w_ref is chosen: ``"max"`` (max|W|, nothing clipped), ``"std"``
            (``clip_value`` standard deviations of W) or ``"percentile"`` (the
            ``clip_value`` percentile of |W|); weights beyond it are clipped and counted.
        clip_value: k for ``std`` (> 0) or the percentile for ``percentile`` (0, 100].
        drift_compensation: scale each layer's output by r0 / r(t), the mean |output| for
            a fixed calibration input right after programming and at time t.
        compensation_input: that input: ``"calibration"`` (the first 128 calibration
            input vectors, kept from ``calibrate``; one-hot until calibration has run),
            ``"one_hot"`` (each input line alone at full scale, as aihwkit's
            GlobalDriftCompensation) or ``"ones"`` (all lines at once). One-hot reads a
            single device pair per column, which a coarse ADC calibrated for real sums
            rounds towards zero (alpha then overcompensates), hence the default.
        calibration_rows: input vectors per layer kept for DAC/ADC range calibration, >= 16:
            for a layer called once per pass the first ones the calibration batches
            provide (a seeded random subset of the batch that overfills them; the layer
            calibrates as soon as its sample is full), for one called several times per
            pass a uniform sample of all its calls (``mapping.calibration_sample``).
        max_rows_per_chunk: input vectors per tiled product on the CPU, >= 1; bounds
            memory: a convolution that unrolls holds this many unrolled vectors at a
            time, and one that convolves per row block spends the same memory on its
            products, counted as if it had at least 1024 inputs (32 MiB at the default:
            narrow layers' chunks of a few images cost more time than they saved
            memory). Outputs do not depend on it.
        gpu_chunk_mb: on a GPU, the memory (MiB, >= 1) that one product's read-out may
            hold; products are formed in as few chunks as keep within it. Outputs do
            not depend on it.
    """

    scale: str = "layer"
    clip: str = "max"
    clip_value: float = 3.0
    drift_compensation: bool = True
    compensation_input: str = "calibration"
    calibration_rows: int = 4096
    max_rows_per_chunk: int = 8192
    gpu_chunk_mb: int = 1024

    def validate(self) -> None:
        o = "MappingConfig"
        check_choice(o, "scale", self.scale, ("layer", "tile", "column"))
        check_choice(o, "clip", self.clip, ("max", "std", "percentile"))
        hi = 100.0 if self.clip == "percentile" else 1e6
        check_number(o, "clip_value", self.clip_value, 0.0, hi, lo_open=True)
        check_bool(o, "drift_compensation", self.drift_compensation)
        check_choice(o, "compensation_input", self.compensation_input, ("calibration", "one_hot", "ones"))
        check_int(o, "calibration_rows", self.calibration_rows, 16, 10 ** 8)
        check_int(o, "max_rows_per_chunk", self.max_rows_per_chunk, 1, 10 ** 9)
        check_int(o, "gpu_chunk_mb", self.gpu_chunk_mb, 1, 10 ** 7)
