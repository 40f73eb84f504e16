"""Device models. A new device is one file with a :class:`Device` subclass, listed here."""
import os

from .base import Device, Programmed
from .gaussian import GaussianDevice
from .hermes import HermesDevice
from .ideal import IdealDevice
from .pcm import PCMDevice
from .reram import ReRAMCrossSimDevice, ReRAMDevice
from .table import TableDevice, parse_table, table_csv

DEVICE_MODELS = {cls.name: cls for cls in (IdealDevice, GaussianDevice, PCMDevice, ReRAMDevice, ReRAMCrossSimDevice,
                                           HermesDevice, TableDevice)}

#: the example device table: the pcm fit (programming, drift, per-read sigma 0.1 uS) at
#: g_target = 0, 0.25, ..., 25 uS, made by ``example_table_csv``
EXAMPLE_TABLE = os.path.join(os.path.dirname(__file__), "tables", "pcm.csv")


def example_table_csv() -> str:
    """The text of EXAMPLE_TABLE, from the pcm fit as the pcm preset configures it."""
    import numpy as np

    from ..presets import pcm
    g = np.linspace(0.0, 25.0, 101)
    return table_csv(g, **PCMDevice(pcm().device).as_table(g))


def make_device(config) -> Device:
    """The device model that ``config.model`` names."""
    return DEVICE_MODELS[config.model](config)


__all__ = ["Device", "Programmed", "DEVICE_MODELS", "make_device", "parse_table", "table_csv", "EXAMPLE_TABLE",
           "example_table_csv",
           "IdealDevice", "GaussianDevice", "PCMDevice", "ReRAMDevice", "ReRAMCrossSimDevice", "HermesDevice",
           "TableDevice"]
