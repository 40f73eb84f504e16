"""Gaussian device: programming error sigma_prog = sigma_abs + sigma_rel * g_T (PHYSICS.md 2)."""
import numpy as np

from .base import Device


class GaussianDevice(Device):
    name = "gaussian"
    uses_prog_sigma = True

    def programming_sigma(self, g_target: np.ndarray) -> np.ndarray:
        return self.config.prog_sigma_abs + self.config.prog_sigma_rel * g_target
