"""The device interface: program, drift exponents, conductance at time t, read noise.

A device model works on arrays of conductances in uS and never sees weights: mapping
weights to conductances lives in ``mapping/``. Randomness comes in from the caller
(numpy Generators, or the normals of the 1/f sample) so that the tile grid decides which
stream feeds which physical effect of which tile.

Generic programming effects that every model shares (finite levels, stuck-at faults,
the clamp of negative conductances at 0) are implemented once here; a model supplies
its programming sigma and, where it has them, drift exponents and slow-noise sigma.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar, Optional

import numpy as np


@dataclass
class Programmed:
    """Conductances right after programming (t = 0) and what happened on the way.

    Attributes:
        g: programmed conductances, uS.
        stuck: True where the device is stuck (it then neither drifts nor programs).
        clamped: devices whose noisy conductance fell below 0 uS and were set to 0.
        stuck_min: devices stuck at g_min.
        stuck_max: devices stuck at g_max.
    """

    g: np.ndarray
    stuck: np.ndarray
    clamped: int
    stuck_min: int
    stuck_max: int


class Device:
    """Base device model. Subclasses set ``name`` and override the hooks they model."""

    name: ClassVar[str] = ""
    #: which optional physics this model has; configs asking for more are rejected
    has_drift: ClassVar[bool] = False
    has_slow_noise: ClassVar[bool] = False
    has_read_noise: ClassVar[bool] = True
    uses_prog_sigma: ClassVar[bool] = False
    #: (first, last) inference time in s that the model's fit covers; None: no stated bound
    fit_times: ClassVar[Optional[tuple]] = None
    #: the largest g_max (uS) the model's fit covers; None: no bound
    fit_g_max: ClassVar[Optional[float]] = None
    #: the drift state a stuck device keeps (a drift exponent of 0: it never moves)
    stuck_drift_state: ClassVar[float] = 0.0
    _warned: ClassVar[set] = set()  # models that have warned of a time outside their fit

    def __init__(self, config) -> None:
        self.config = config

    @classmethod
    def check_config(cls, cfg) -> None:
        """Reject settings of physics that this model does not have."""
        def refuse(field: str, value) -> None:
            raise ValueError(
                f"DeviceConfig.{field} = {value!r} is invalid for model {cls.name!r}: "
                f"that model has no such effect (see PHYSICS.md)"
            )
        if cfg.drift and not cls.has_drift:
            refuse("drift", cfg.drift)
        if cfg.read_noise_1f and not cls.has_slow_noise:
            refuse("read_noise_1f", cfg.read_noise_1f)
        if not cls.has_read_noise:
            for f in ("read_sigma_abs", "read_sigma_rel"):
                if getattr(cfg, f) != 0.0:
                    refuse(f, getattr(cfg, f))
        if cls.fit_g_max is not None and cfg.g_max > cls.fit_g_max:
            raise ValueError(f"DeviceConfig.g_max = {cfg.g_max!r} is invalid for model {cls.name!r}: its fit "
                             f"covers conductances up to {cls.fit_g_max} uS")
        if not cls.uses_prog_sigma:
            for f in ("prog_sigma_abs", "prog_sigma_rel"):
                if getattr(cfg, f) != 0.0:
                    refuse(f, getattr(cfg, f))

    def check_time(self, t: float) -> None:
        """Warn, once per model and process, of an inference time t > 0 outside the
        times the model's fit covers (the fit's end values hold there)."""
        if self.fit_times is None or t == 0:
            return
        first, last = self.fit_times
        if not first <= t <= last and self.name not in Device._warned:
            Device._warned.add(self.name)
            warnings.warn(f"device model {self.name!r}: t = {t:g} s is outside the times its fit covers, "
                          f"[{first:g}, {last:g}] s; the fit's end values hold there (warned once)", stacklevel=3)

    # -- hooks ---------------------------------------------------------------------------
    def programming_mean(self, g_target: np.ndarray) -> np.ndarray:
        """Mean programmed conductance, uS, for targets g_target (the target itself
        unless the model has a measured bias)."""
        return g_target

    def programming_sigma(self, g_target: np.ndarray) -> np.ndarray:
        """Standard deviation of the programming error, uS, before prog_noise_scale."""
        return np.zeros_like(g_target)

    def drift_exponents(self, g_target: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Drift exponents nu, drawn once per device at programming (more generally the
        per-device state that ``conductance_at`` evolves from)."""
        return np.zeros_like(g_target)

    def slow_noise_sigma(self, g_prog: np.ndarray, g_t: np.ndarray, t: float) -> np.ndarray:
        """Sigma of the frozen (1/f) read noise at inference time t, uS."""
        return np.zeros_like(g_prog)

    # -- shared behaviour ----------------------------------------------------------------
    def program(self, g_target: np.ndarray, rng_noise: np.random.Generator,
                rng_faults: np.random.Generator) -> Programmed:
        """Program target conductances (uS): snap to levels, add noise, clamp, stuck-at."""
        cfg = self.config
        g = np.asarray(g_target, dtype=np.float64)
        if cfg.levels is not None:
            step = (cfg.g_max - cfg.g_min) / (cfg.levels - 1)
            g = cfg.g_min + np.round((g - cfg.g_min) / step) * step
        sigma = self.programming_sigma(g) * cfg.prog_noise_scale
        g = self.programming_mean(g)
        if np.any(sigma > 0):
            g = g + sigma * rng_noise.standard_normal(g.shape)
        # Conductance cannot be negative; the clamp biases devices near 0 upwards, so
        # it is counted and reported (move g_min off zero to avoid it).
        below = g < 0.0
        clamped = int(below.sum())
        g = np.where(below, 0.0, g)
        stuck = np.zeros(g.shape, dtype=bool)
        n_min = n_max = 0
        if cfg.stuck_min_fraction > 0 or cfg.stuck_max_fraction > 0:
            u = rng_faults.random(g.shape)
            at_min = u < cfg.stuck_min_fraction
            at_max = (~at_min) & (u < cfg.stuck_min_fraction + cfg.stuck_max_fraction)
            g = np.where(at_min, cfg.g_min, np.where(at_max, cfg.g_max, g))
            stuck = at_min | at_max
            n_min, n_max = int(at_min.sum()), int(at_max.sum())
        return Programmed(g=g, stuck=stuck, clamped=clamped, stuck_min=n_min, stuck_max=n_max)

    def conductance_at(self, g_prog: np.ndarray, nu: np.ndarray, t: float, normals) -> tuple:
        """Conductance read at time t (s) after programming: drift, then one frozen
        1/f sample, clamped at 0. ``normals()`` returns the standard normals of the 1/f
        sample, shaped like g_prog (called only where the model has 1/f noise). Returns
        (g, mask of the devices clamped at 0, or None where nothing can be clamped)."""
        cfg = self.config
        g_prog = np.asarray(g_prog, dtype=np.float64)
        g = g_prog
        if cfg.drift and t > 0:
            g = g_prog * ((t + cfg.t0) / cfg.t0) ** (-np.asarray(nu, dtype=np.float64))
        if cfg.read_noise_1f:
            sigma = self.slow_noise_sigma(g_prog, g, t) * cfg.read_noise_1f_scale
            g = g + sigma * normals()
            below = g < 0.0
            return np.where(below, 0.0, g), below
        return g, None

    def read_variance(self, g: np.ndarray) -> np.ndarray:
        """Variance of the fast (white) noise of one read of each device, uS^2."""
        cfg = self.config
        return (cfg.read_sigma_abs + cfg.read_sigma_rel * np.asarray(g, dtype=np.float64)) ** 2

    @property
    def has_fast_noise(self) -> bool:
        return self.config.read_sigma_abs > 0 or self.config.read_sigma_rel > 0
