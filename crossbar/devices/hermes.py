"""Phase-change memory of the IBM HERMES Project Chip: the fits of Le Gallo et al.,
Nature Electronics 6, 680 (2023), as aihwkit's HermesNoiseModel gives them for its
default unit cell of two devices per conductance (multi-device programming; PHYSICS.md
section 12). Characterised up to g_max = 20.7 uS, with drift and 1/f noise referred to
the first read t0 = 300 s after programming and t_read = 512 ns; x = g / g_max.
"""
import numpy as np

from .arrays import float64, namespace
from .base import Device

FIT_G_MAX = 20.7  # uS, the largest characterised conductance
PROG_COEFFS = (0.16603222, 4.71806468, -8.48101252, 4.68961419)  # sigma_prog in uS at FIT_G_MAX
_X_FLOOR = 1e-7  # x is held above this before the logarithms, as in the fit's code


def _cubic(coeffs, x: np.ndarray) -> np.ndarray:
    c0, c1, c2, c3 = coeffs
    return c0 + x * (c1 + x * (c2 + x * c3))


class HermesDevice(Device):
    name = "hermes"
    has_drift = True
    has_slow_noise = True
    fit_g_max = FIT_G_MAX

    def _x(self, g: np.ndarray) -> np.ndarray:
        xp = namespace(g)
        return xp.clip(xp.abs(float64(g)) / self.config.g_max, _X_FLOOR, None)

    def programming_sigma(self, g_target: np.ndarray) -> np.ndarray:
        x = float64(g_target) / self.config.g_max
        return _cubic(PROG_COEFFS, x) * (self.config.g_max / FIT_G_MAX)

    def drift_exponents(self, g_target: np.ndarray, normals) -> np.ndarray:
        xp = namespace(g_target)
        if not self.config.drift:
            return xp.zeros_like(g_target)
        x = self._x(g_target)
        mu = xp.where(x < 0.0945, xp.clip(-0.0387 * xp.log(x) - 0.0182, 0.0720, 0.13),
                      -0.0436 * x * x - 0.0126 * x + 0.0736)
        sigma = xp.where(x < 0.3055, xp.clip(-0.0117 * xp.log(x) - 0.0057, 0.0091, 0.04),
                         -0.0118 * x * x + 0.0093 * x + 0.0073)
        return xp.abs(mu + sigma * normals()) * self.config.drift_scale

    def slow_noise_sigma(self, g_prog: np.ndarray, g_t: np.ndarray, t: float) -> np.ndarray:
        cfg = self.config
        xp = namespace(g_prog)
        x = self._x(g_prog)
        q_s = xp.where(x < 0.16, xp.clip(-0.0117 * xp.log(x) - 0.0069, 0.015, 0.04),
                       _cubic((0.0123, 0.0211, -0.0280, 0.0069), x))
        return xp.abs(g_t) * q_s * np.sqrt(np.log((t + cfg.t0 + cfg.t_read) / (2.0 * cfg.t_read)))
