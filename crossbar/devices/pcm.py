"""Phase-change memory: the fits of Nandakumar et al. (2019) and Joshi et al. (2020),
Nature Communications 11:2473, as in PHYSICS.md sections 2-4 (also aihwkit's
PCMLikeNoiseModel). The fits were made at g_max = 25 uS; x = g / g_max.
"""
import numpy as np

from .arrays import namespace
from .base import Device

FIT_G_MAX = 25.0  # uS, the g_max at which the programming-noise polynomial was fitted
PROG_COEFFS = (0.26348, 1.9650, -1.1731)  # sigma_prog in uS at FIT_G_MAX: c0 + c1 x + c2 x^2


class PCMDevice(Device):
    name = "pcm"
    has_drift = True
    has_slow_noise = True

    def programming_sigma(self, g_target: np.ndarray) -> np.ndarray:
        g_max = self.config.g_max
        x = g_target / g_max
        c0, c1, c2 = PROG_COEFFS
        return (c0 + c1 * x + c2 * x * x) * (g_max / FIT_G_MAX)

    def drift_statistics(self, g_target: np.ndarray) -> tuple:
        """(mu_nu, sigma_nu) of the normal whose magnitude is nu (PHYSICS.md section 3)."""
        # x -> 0 sends both fits to their upper clip; the floor only avoids log(0)
        xp = namespace(g_target)
        log_x = xp.log(xp.clip(g_target / self.config.g_max, 1e-12, None))
        return xp.clip(-0.0155 * log_x + 0.0244, 0.049, 0.1), xp.clip(-0.0125 * log_x - 0.0059, 0.008, 0.045)

    def drift_exponents(self, g_target: np.ndarray, normals) -> np.ndarray:
        xp = namespace(g_target)
        if not self.config.drift:
            return xp.zeros_like(g_target)
        mu, sigma = self.drift_statistics(g_target)
        return xp.abs(mu + sigma * normals()) * self.config.drift_scale

    def as_table(self, g_target: np.ndarray) -> dict:
        """This fit's statistics at g_target as the columns of a device table (PHYSICS.md
        section 11): programming, drift and the per-read sigma at g_target (the 1/f
        noise has no column; a table device has none)."""
        g = np.asarray(g_target, dtype=np.float64)
        mu, sigma = self.drift_statistics(g)
        return {"prog_mean": g, "prog_std": self.programming_sigma(g) * self.config.prog_noise_scale,
                "nu_mean": mu, "nu_std": sigma, "read_std": np.sqrt(self.read_variance(g))}

    def slow_noise_sigma(self, g_prog: np.ndarray, g_t: np.ndarray, t: float) -> np.ndarray:
        cfg = self.config
        xp = namespace(g_prog)
        q_s = xp.clip(0.0088 / xp.clip(g_prog / cfg.g_max, 1e-3, None) ** 0.65, None, 0.2)
        return g_t * q_s * np.sqrt(np.log((t + cfg.t0 + cfg.t_read) / (2.0 * cfg.t_read)))
