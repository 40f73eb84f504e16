"""Device models. A new device is one file with a :class:`Device` subclass, listed here."""
from .base import Device, Programmed
from .gaussian import GaussianDevice
from .ideal import IdealDevice
from .pcm import PCMDevice

DEVICE_MODELS = {cls.name: cls for cls in (IdealDevice, GaussianDevice, PCMDevice)}


def make_device(config) -> Device:
    """The device model that ``config.model`` names."""
    return DEVICE_MODELS[config.model](config)


__all__ = ["Device", "Programmed", "DEVICE_MODELS", "make_device",
           "IdealDevice", "GaussianDevice", "PCMDevice"]
