"""The device interface: program, drift exponents, conductance at time t, read noise.

A device model works on arrays of conductances in uS and never sees weights: mapping
weights to conductances lives in ``mapping/``. Randomness comes in from the caller, as
functions that return standard normals or uniforms shaped like the conductances, so
that the tile grid decides which stream feeds which physical effect of which tile
(``chip_draws.py``); a model calls them only for the effects it has.

Generic programming effects that every model shares (finite levels, stuck-at faults,
the clamp of negative conductances at 0) are implemented once here; a model supplies
its programming sigma and, where it has them, drift exponents and slow-noise sigma.

Every hook takes numpy arrays or torch tensors (``arrays.py``) and answers in kind: the
grid runs the models on the host, or on the device that holds its chip. A new model
writes its arithmetic with ``xp = arrays.namespace(g)`` and is tested on both
(``tests/crossbar/test_chip_on_device.py`` holds every model to the host bitwise).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, ClassVar, Optional

import numpy as np

from .arrays import float64, namespace


@dataclass
class Programmed:
    """Conductances right after programming (t = 0) and what happened on the way, as
    arrays of the targets' kind.

    Attributes:
        g: programmed conductances, uS.
        below: True where the noisy conductance fell below 0 uS and was set to 0.
        at_min: True where the device is stuck at g_min (None: no faults configured).
        at_max: True where the device is stuck at g_max (None: no faults configured).
    """

    g: np.ndarray
    below: np.ndarray
    at_min: Optional[np.ndarray] = None
    at_max: Optional[np.ndarray] = None

    @property
    def stuck(self) -> Optional[np.ndarray]:
        """True where the device is stuck (it then neither drifts nor programs); None
        without faults."""
        return None if self.at_min is None else self.at_min | self.at_max

    @property
    def clamped(self) -> int:
        return int(self.below.sum())

    @property
    def stuck_min(self) -> int:
        return 0 if self.at_min is None else int(self.at_min.sum())

    @property
    def stuck_max(self) -> int:
        return 0 if self.at_max is None else int(self.at_max.sum())


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
        return namespace(g_target).zeros_like(g_target)

    def drift_exponents(self, g_target: np.ndarray, normals: Callable) -> np.ndarray:
        """Drift exponents nu, drawn once per device at programming (more generally the
        per-device state that ``conductance_at`` evolves from); ``normals()`` returns
        standard normals shaped like g_target (called only where the model draws)."""
        return namespace(g_target).zeros_like(g_target)

    def slow_noise_sigma(self, g_prog: np.ndarray, g_t: np.ndarray, t: float) -> np.ndarray:
        """Sigma of the frozen (1/f) read noise at inference time t, uS."""
        return namespace(g_prog).zeros_like(g_prog)

    # -- shared behaviour ----------------------------------------------------------------
    def program(self, g_target: np.ndarray, normals: Callable, uniforms: Callable) -> Programmed:
        """Program target conductances (uS): snap to levels, add noise, clamp, stuck-at.
        ``normals()`` and ``uniforms()`` return standard normals and uniforms in (0, 1]
        shaped like g_target, from two streams of their own (called only where needed)."""
        cfg = self.config
        xp = namespace(g_target)
        g = float64(g_target)
        if cfg.levels is not None:
            step = (cfg.g_max - cfg.g_min) / (cfg.levels - 1)
            g = cfg.g_min + xp.round((g - cfg.g_min) / step) * step
        sigma = self.programming_sigma(g) * cfg.prog_noise_scale
        g = self.programming_mean(g)
        if bool((sigma > 0).any()):
            g = g + sigma * normals()
        # Conductance cannot be negative; the clamp biases devices near 0 upwards, so
        # it is counted and reported (move g_min off zero to avoid it).
        below = g < 0.0
        g = xp.where(below, 0.0, g)
        if cfg.stuck_min_fraction > 0 or cfg.stuck_max_fraction > 0:
            u = uniforms()
            at_min = u < cfg.stuck_min_fraction
            at_max = (~at_min) & (u < cfg.stuck_min_fraction + cfg.stuck_max_fraction)
            g = xp.where(at_min, cfg.g_min, xp.where(at_max, cfg.g_max, g))
            return Programmed(g=g, below=below, at_min=at_min, at_max=at_max)
        return Programmed(g=g, below=below)

    def conductance_at(self, g_prog: np.ndarray, nu: np.ndarray, t: float, normals: Callable) -> tuple:
        """Conductance read at time t (s) after programming: drift, then one frozen
        1/f sample, clamped at 0. ``normals()`` returns the standard normals of the 1/f
        sample, shaped like g_prog (called only where the model has 1/f noise). Returns
        (g, mask of the devices clamped at 0, or None where nothing can be clamped)."""
        cfg = self.config
        g_prog = float64(g_prog)
        g = g_prog
        if cfg.drift and t > 0:
            g = g_prog * ((t + cfg.t0) / cfg.t0) ** (-float64(nu))
        if cfg.read_noise_1f:
            sigma = self.slow_noise_sigma(g_prog, g, t) * cfg.read_noise_1f_scale
            g = g + sigma * normals()
            below = g < 0.0
            return namespace(g).where(below, 0.0, g), below
        return g, None

    def read_variance(self, g: np.ndarray) -> np.ndarray:
        """Variance of the fast (white) noise of one read of each device, uS^2."""
        cfg = self.config
        return (cfg.read_sigma_abs + cfg.read_sigma_rel * float64(g)) ** 2

    @property
    def has_fast_noise(self) -> bool:
        return self.config.read_sigma_abs > 0 or self.config.read_sigma_rel > 0
