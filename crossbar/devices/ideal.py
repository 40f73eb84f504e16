"""Ideal device: programmed exactly, never drifts, reads without noise."""
from .base import Device


class IdealDevice(Device):
    name = "ideal"
    has_read_noise = False
