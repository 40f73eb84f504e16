"""ReRAM: the fits of Wan et al., Nature 608, 504 (2022) (the NeuRRAM chip), in the two
forms the peer simulators give them (PHYSICS.md section 12).

``reram`` (the default; aihwkit's ReRamWan2022NoiseModel): the spread of conductances
around their targets as a quartic in x = g_T / g_max, fitted at g_max = 40 uS, at three
times after programming: 1 s (the programming noise), 1 day and 2 days (after
relaxation). At an inference time t > 0 each device reads as a fresh draw around its
target, g_T + sigma_t(g_T) xi_t, frozen for all reads at t (as the 1/f sample of the PCM
models is); between the fit's times sigma is interpolated linearly in log t, and
outside [1 s, 2 days] the nearest end holds (with a warning). There is no drift
exponent: the per-device state kept from programming is the target itself.

``reram_crosssim`` (CrossSim's RRAMWan): a cubic fit in absolute conductance (uS) to the
1 s data of the paper's Extended Data Fig. 3, valid for g_max <= 39.26 uS; programming
noise only, no relaxation.
"""
import numpy as np

from .arrays import float64, float64_copy, namespace
from .base import Device

FIT_G_MAX = 40.0  # uS: the g_max at which the quartic fits were made
FIT_TIMES = (1.0, 86400.0, 2 * 86400.0)  # s
# sigma in uS at FIT_G_MAX: c0 + c1 x + c2 x^2 + c3 x^3 + c4 x^4, one row per fit time
SIGMA_COEFFS = np.array([
    [0.348, 16.030, -43.853, 45.393, -16.815],
    [0.701, 22.086, -50.773, 47.095, -16.458],
    [0.782, 20.274, -43.507, 37.062, -11.934],
])
CROSSSIM_COEFFS = (1.053, 2.374e-1, -1.167e-2, 1.536e-4)  # sigma in uS: d0 + d1 G + d2 G^2 + d3 G^3
CROSSSIM_G_MAX = 39.26  # uS, the largest conductance of that fit's data


def _polynomial(coeffs, x: np.ndarray) -> np.ndarray:
    out = namespace(x).zeros_like(x)  # x is float64
    for c in coeffs[::-1]:
        out = out * x + c
    return out


class ReRAMDevice(Device):
    name = "reram"
    has_drift = True  # the relaxation after programming, switched by DeviceConfig.drift
    fit_times = (FIT_TIMES[0], FIT_TIMES[-1])
    stuck_drift_state = float("nan")  # a stuck device has no target to relax around

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        if cfg.drift_scale != 1.0:
            raise ValueError(f"DeviceConfig.drift_scale = {cfg.drift_scale!r} is invalid for model {cls.name!r}: "
                             f"its relaxation is a measured spread, scaled with prog_noise_scale")

    def sigma_at(self, g_target: np.ndarray, t: float) -> np.ndarray:
        """The fit's spread around the target, uS, at time t (s) after programming."""
        x = float64(g_target) / self.config.g_max
        sigmas = [_polynomial(c, x) for c in SIGMA_COEFFS]
        log_t = np.log(np.clip(t, FIT_TIMES[0], FIT_TIMES[-1]))
        sigma = sigmas[-1]
        for (t_a, s_a), (t_b, s_b) in zip(zip(FIT_TIMES, sigmas), zip(FIT_TIMES[1:], sigmas[1:])):
            if log_t <= np.log(t_b):
                w = (log_t - np.log(t_a)) / (np.log(t_b) - np.log(t_a))
                sigma = (1 - w) * s_a + w * s_b
                break
        return namespace(sigma).clip(sigma, 0.0, None) * (self.config.g_max / FIT_G_MAX)

    def programming_sigma(self, g_target: np.ndarray) -> np.ndarray:
        return self.sigma_at(g_target, FIT_TIMES[0])

    def drift_exponents(self, g_target: np.ndarray, normals) -> np.ndarray:
        return float64_copy(g_target)  # the state relaxation draws around

    def conductance_at(self, g_prog: np.ndarray, nu: np.ndarray, t: float, normals) -> tuple:
        cfg = self.config
        g_prog = float64(g_prog)
        if not cfg.drift or t <= 0:
            return g_prog, None
        xp = namespace(g_prog)
        target = float64(nu)
        stuck = xp.isnan(target)
        target = xp.where(stuck, 0.0, target)
        g = target + self.sigma_at(target, t) * cfg.prog_noise_scale * normals()
        below = (g < 0.0) & ~stuck
        return xp.where(stuck, g_prog, xp.where(below, 0.0, g)), below


class ReRAMCrossSimDevice(Device):
    name = "reram_crosssim"
    fit_g_max = CROSSSIM_G_MAX

    def programming_sigma(self, g_target: np.ndarray) -> np.ndarray:
        sigma = _polynomial(CROSSSIM_COEFFS, float64(g_target))
        return namespace(sigma).clip(sigma, 0.0, None)
