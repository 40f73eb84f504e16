"""Named tile configurations. Each takes rows, cols, dac_bits and adc_bits, plus any
DeviceConfig field as a keyword override, and returns a :class:`TileConfig`.

Converters with bits set default to calibrated ranges (the DAC: a percentile of |input|;
the ADC: a percentile of |column output|): call ``Tile.calibrate`` (or ``calibrate`` on
a converted model) with sample data before inference. A fixed DAC range of 1 clips the
standardised inputs and ReLU activations of typical networks (13% of DAC inputs and 15
points of accuracy for the default digits CNN), so calibrated is the default.
"""
from __future__ import annotations

from typing import Optional

from .config import ADCConfig, DACConfig, DeviceConfig, TileConfig


def _tile(device: DeviceConfig, rows: int, cols: int, dac_bits: Optional[int],
          adc_bits: Optional[int], dac_range_mode: str, adc_range_mode: str) -> TileConfig:
    return TileConfig(
        rows=rows, cols=cols, device=device,
        dac=DACConfig(bits=dac_bits, range_mode=dac_range_mode),
        adc=ADCConfig(bits=adc_bits, range_mode=adc_range_mode),
    )


def ideal(rows: int = 256, cols: int = 256, dac_bits: Optional[int] = None,
          adc_bits: Optional[int] = None, dac_range_mode: str = "calibrated",
          adc_range_mode: str = "calibrated", **device) -> TileConfig:
    """Exact devices; converters ideal unless bits are given."""
    return _tile(DeviceConfig(model="ideal", **device), rows, cols, dac_bits, adc_bits,
                 dac_range_mode, adc_range_mode)


def gaussian(rows: int = 256, cols: int = 256, dac_bits: Optional[int] = 8,
             adc_bits: Optional[int] = 8, dac_range_mode: str = "calibrated",
             adc_range_mode: str = "calibrated", **device) -> TileConfig:
    """Gaussian programming noise (0.5 uS absolute by default) on a 0-25 uS device."""
    params = dict(model="gaussian", prog_sigma_abs=0.5)
    params.update(device)
    return _tile(DeviceConfig(**params), rows, cols, dac_bits, adc_bits, dac_range_mode, adc_range_mode)


def pcm(rows: int = 256, cols: int = 256, dac_bits: Optional[int] = 8,
        adc_bits: Optional[int] = 8, dac_range_mode: str = "calibrated",
        adc_range_mode: str = "calibrated", **device) -> TileConfig:
    """PCM (PHYSICS.md 2-4): programming noise, drift, 1/f and per-read noise on.

    The conductance-dependent read noise is the 1/f fit. The fast per-read noise is
    additive and constant, 0.1 uS per device (the additive-constant convention of
    aihwkit's forward weight noise): an illustrative value, not a fit, so set
    read_sigma_abs/read_sigma_rel to your device's values.
    """
    params = dict(model="pcm", g_min=0.0, g_max=25.0, drift=True, read_noise_1f=True,
                  read_sigma_abs=0.1, read_sigma_rel=0.0)
    params.update(device)
    return _tile(DeviceConfig(**params), rows, cols, dac_bits, adc_bits, dac_range_mode, adc_range_mode)


def reram(rows: int = 256, cols: int = 256, dac_bits: Optional[int] = 8,
          adc_bits: Optional[int] = 8, dac_range_mode: str = "calibrated",
          adc_range_mode: str = "calibrated", **device) -> TileConfig:
    """ReRAM (Wan et al. 2022; PHYSICS.md 12): programming noise and its relaxation at
    1 s to 2 days, on 0-40 uS devices (the fit's g_max).

    The fit has no read noise of its own; following aihwkit's note on it (about 1% of
    the weight range per read), each device has a per-read sigma of 0.01 g_max / sqrt(2),
    so that a pair's is 1% of g_max.
    """
    params = dict(model="reram", g_min=0.0, g_max=40.0, drift=True, read_sigma_abs=0.01 * 40.0 / 2 ** 0.5)
    params.update(device)
    return _tile(DeviceConfig(**params), rows, cols, dac_bits, adc_bits, dac_range_mode, adc_range_mode)


def hermes(rows: int = 256, cols: int = 256, dac_bits: Optional[int] = 8,
           adc_bits: Optional[int] = 8, dac_range_mode: str = "calibrated",
           adc_range_mode: str = "calibrated", **device) -> TileConfig:
    """PCM of the IBM HERMES chip (Le Gallo et al. 2023; PHYSICS.md 12): programming
    noise, drift and 1/f noise on 0-20.7 uS devices, t0 = 300 s, t_read = 512 ns. The
    fit's read noise is the 1/f term; no per-read sigma is added (set read_sigma_abs)."""
    params = dict(model="hermes", g_min=0.0, g_max=20.7, drift=True, read_noise_1f=True, t0=300.0,
                  t_read=512e-9)
    params.update(device)
    return _tile(DeviceConfig(**params), rows, cols, dac_bits, adc_bits, dac_range_mode, adc_range_mode)


PRESETS = {"ideal": ideal, "gaussian": gaussian, "pcm": pcm, "reram": reram, "hermes": hermes}
