"""Configuration of a crossbar tile: device, DAC, ADC and array size.

All conductances are in microsiemens (uS) and times in seconds. Inputs are normalised
voltages: the DAC maps [-range, +range] onto its codes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .configbase import Config, check_bool, check_choice, check_int, check_number

MAX_BITS = 24
MAX_TILE_SIZE = 65536


@dataclass(frozen=True)
class DeviceConfig(Config):
    """One memristive device model and its parameters (PHYSICS.md sections 2-4).

    Attributes:
        model: device model name: ``"ideal"`` (exact programming, no noise),
            ``"gaussian"`` (programming noise sigma_abs + sigma_rel * g), ``"pcm"``
            (the Nandakumar/Joshi PCM fits: programming noise, drift, 1/f noise),
            ``"hermes"`` (the HERMES chip's PCM fits), ``"reram"`` and
            ``"reram_crosssim"`` (the Wan 2022 ReRAM fits as aihwkit and CrossSim give
            them) or ``"table"`` (measured statistics from a CSV file; see ``table``).
        g_min: lowest programmable conductance, uS, in [0, g_max). Moving it off zero
            keeps the clamp of noisy conductances at 0 from acting.
        g_max: highest programmable conductance, uS, in (g_min, 1e6].
        prog_noise_scale: multiplier on the programming-noise sigma, in [0, 100].
        prog_sigma_abs: ``gaussian`` only: absolute programming sigma, uS, >= 0.
        prog_sigma_rel: ``gaussian`` only: programming sigma per uS of target, in [0, 10].
        read_noise_1f: slow 1/f read noise, frozen per inference time (``pcm``, ``hermes``).
        read_noise_1f_scale: multiplier on the 1/f sigma, in [0, 100].
        read_sigma_abs: fast per-read noise, absolute part, uS, >= 0.
        read_sigma_rel: fast per-read noise per uS of conductance, in [0, 10].
        drift: conductance drift g(t) = g_prog ((t + t0)/t0)^-nu (``pcm``, ``hermes``,
            ``table`` with drift columns), or ``reram``'s relaxation after programming.
        drift_scale: multiplier on the drift exponents nu, in [0, 100].
        t0: drift reference time, s, > 0.
        t_read: read pulse duration of the 1/f model, s, > 0.
        levels: number of evenly spaced programmable levels in [g_min, g_max] that
            targets snap to before noise, in [2, 2**20], or None for continuous.
        stuck_min_fraction: fraction of devices stuck at g_min, in [0, 1].
        stuck_max_fraction: fraction of devices stuck at g_max, in [0, 1]; the two
            fractions sum to at most 1.
        table: ``table`` only: the CSV file of the device's measured statistics
            (PHYSICS.md section 11), read and validated when the config is made.
        table_csv: that file's text, kept in the config (and so in every result) so
            that a run stays reproducible when the file changes; filled from ``table``
            unless given. Changing ``table`` (``replace``, ``with_path``) reads the new file.
    """

    model: str = "ideal"
    g_min: float = 0.0
    g_max: float = 25.0
    prog_noise_scale: float = 1.0
    prog_sigma_abs: float = 0.0
    prog_sigma_rel: float = 0.0
    read_noise_1f: bool = False
    read_noise_1f_scale: float = 1.0
    read_sigma_abs: float = 0.0
    read_sigma_rel: float = 0.0
    drift: bool = False
    drift_scale: float = 1.0
    t0: float = 20.0
    t_read: float = 250e-9
    levels: Optional[int] = None
    stuck_min_fraction: float = 0.0
    stuck_max_fraction: float = 0.0
    table: Optional[str] = None
    table_csv: Optional[str] = None

    def replace(self, **changes) -> "DeviceConfig":
        if "table" in changes and changes["table"] != self.table and "table_csv" not in changes:
            changes["table_csv"] = None  # another file: read it, not the old one's text
        return super().replace(**changes)

    def validate(self) -> None:
        from .devices import DEVICE_MODELS  # the registry knows what each model supports

        o = "DeviceConfig"
        check_choice(o, "model", self.model, sorted(DEVICE_MODELS))
        self._load_table()
        check_number(o, "g_min", self.g_min, 0.0, 1e6, unit="uS")
        check_number(o, "g_max", self.g_max, 0.0, 1e6, lo_open=True, unit="uS")
        if not self.g_max > self.g_min:
            raise ValueError(f"DeviceConfig.g_max = {self.g_max!r} is invalid: must exceed g_min = {self.g_min!r} uS")
        check_number(o, "prog_noise_scale", self.prog_noise_scale, 0.0, 100.0)
        check_number(o, "prog_sigma_abs", self.prog_sigma_abs, 0.0, 1e6, unit="uS")
        check_number(o, "prog_sigma_rel", self.prog_sigma_rel, 0.0, 10.0)
        check_bool(o, "read_noise_1f", self.read_noise_1f)
        check_number(o, "read_noise_1f_scale", self.read_noise_1f_scale, 0.0, 100.0)
        check_number(o, "read_sigma_abs", self.read_sigma_abs, 0.0, 1e6, unit="uS")
        check_number(o, "read_sigma_rel", self.read_sigma_rel, 0.0, 10.0)
        check_bool(o, "drift", self.drift)
        check_number(o, "drift_scale", self.drift_scale, 0.0, 100.0)
        check_number(o, "t0", self.t0, 0.0, 1e12, lo_open=True, unit="s")
        check_number(o, "t_read", self.t_read, 0.0, 1e3, lo_open=True, unit="s")
        check_int(o, "levels", self.levels, 2, 2 ** 20, optional=True)
        check_number(o, "stuck_min_fraction", self.stuck_min_fraction, 0.0, 1.0)
        check_number(o, "stuck_max_fraction", self.stuck_max_fraction, 0.0, 1.0)
        if self.stuck_min_fraction + self.stuck_max_fraction > 1.0:
            raise ValueError(
                f"DeviceConfig.stuck_max_fraction = {self.stuck_max_fraction!r} is invalid: "
                f"stuck_min_fraction + stuck_max_fraction must be <= 1"
            )
        DEVICE_MODELS[self.model].check_config(self)

    def _load_table(self) -> None:
        o = "DeviceConfig"
        for name in ("table", "table_csv"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{o}.{name} = {value!r} is invalid: expected a string or None")
        if self.model != "table":
            if self.table is not None or self.table_csv is not None:
                raise ValueError(f"{o}.table = {self.table!r} is invalid for model {self.model!r}: "
                                 f"only model 'table' reads a table")
            return
        if self.table_csv is None and self.table is not None:
            try:
                with open(self.table, encoding="utf-8") as f:
                    text = f.read()
            except OSError as err:
                raise ValueError(f"{o}.table = {self.table!r} is invalid: cannot read it: {err}") from None
            object.__setattr__(self, "table_csv", text)  # frozen: set once, at construction


@dataclass(frozen=True)
class DACConfig(Config):
    """Input digital-to-analog converter, one per tile row (signed).

    Attributes:
        bits: resolution in [1, 24], or None for an ideal converter (no quantization
            and no clipping). b >= 2 bits give 2^(b-1) - 1 levels each side of zero
            with step range / (2^(b-1) - 1); 1 bit is a sign converter (+-range).
        range_mode: ``"fixed"`` (``range``), ``"calibrated"`` (the ``percentile`` of
            |x| over sample data, set by ``Tile.calibrate``) or ``"per_vector"`` (each
            input vector scaled by its own abs-max, the output rescaled digitally).
        range: input full scale for ``fixed``, normalised volts, > 0.
        percentile: percentile of |x| for ``calibrated``, in (0, 100].
        bits_per_cycle: bit-serial inputs (PHYSICS.md section 9): the DAC code's
            magnitude is applied p bits per cycle, in ceil((bits - 1) / p) cycles, each
            read through the ADCs and combined digitally; p in [1, bits - 1], needs
            bits >= 2. None: the whole value in one cycle.
    """

    bits: Optional[int] = None
    range_mode: str = "fixed"
    range: float = 1.0
    percentile: float = 99.99
    bits_per_cycle: Optional[int] = None

    def validate(self) -> None:
        o = "DACConfig"
        check_int(o, "bits", self.bits, 1, MAX_BITS, optional=True)
        check_choice(o, "range_mode", self.range_mode, ("fixed", "calibrated", "per_vector"))
        check_number(o, "range", self.range, 0.0, 1e12, lo_open=True)
        check_number(o, "percentile", self.percentile, 0.0, 100.0, lo_open=True)
        if self.bits_per_cycle is not None:
            if self.bits is None or self.bits < 2:
                raise ValueError(f"DACConfig.bits_per_cycle = {self.bits_per_cycle!r} is invalid: bit-serial "
                                 f"inputs need a DAC of bits >= 2 (bits = {self.bits!r})")
            check_int(o, "bits_per_cycle", self.bits_per_cycle, 1, self.bits - 1)

    @property
    def cycles(self) -> int:
        """Input cycles per conversion: ceil((bits - 1) / bits_per_cycle), or 1."""
        if self.bits_per_cycle is None:
            return 1
        return -(-(self.bits - 1) // self.bits_per_cycle)


@dataclass(frozen=True)
class ADCConfig(Config):
    """Output analog-to-digital converter, one per tile column (signed).

    Attributes:
        bits: resolution in [1, 24], or None for an ideal converter (no quantization
            and no saturation). Levels as for :class:`DACConfig`.
        range_mode: ``"fixed"`` (``range``), ``"calibrated"`` (the ``percentile`` of
            |column output| over sample data, one range per tile) or ``"worst_case"``
            (rows * (g_max - g_min) * largest DAC input).
        range: output full scale for ``fixed``, uS x normalised volts, > 0.
        percentile: percentile of |y| for ``calibrated``, in (0, 100].
        offset_sigma: sigma of each ADC's fixed offset, in LSB (steps), in [0, 1e3];
            drawn once per chip (PHYSICS.md section 10).
        gain_sigma: sigma of each ADC's fixed relative gain error, in [0, 1]; the gain
            is 1 + N(0, gain_sigma), drawn once per chip.
        noise_sigma: input-referred noise of every conversion, in LSB, in [0, 1e3].
        nonlinearity: a of the static transfer curve v -> r tanh(a v / r) / tanh(a), r
            the full scale, in [0, 20]; 0 is linear.
        The four need a finite ``bits`` (their unit is the step).
    """

    bits: Optional[int] = None
    range_mode: str = "worst_case"
    range: float = 1.0
    percentile: float = 99.99
    offset_sigma: float = 0.0
    gain_sigma: float = 0.0
    noise_sigma: float = 0.0
    nonlinearity: float = 0.0

    def validate(self) -> None:
        o = "ADCConfig"
        check_int(o, "bits", self.bits, 1, MAX_BITS, optional=True)
        check_choice(o, "range_mode", self.range_mode, ("fixed", "calibrated", "worst_case"))
        check_number(o, "range", self.range, 0.0, 1e15, lo_open=True)
        check_number(o, "percentile", self.percentile, 0.0, 100.0, lo_open=True)
        check_number(o, "offset_sigma", self.offset_sigma, 0.0, 1e3, unit="LSB")
        check_number(o, "gain_sigma", self.gain_sigma, 0.0, 1.0)
        check_number(o, "noise_sigma", self.noise_sigma, 0.0, 1e3, unit="LSB")
        check_number(o, "nonlinearity", self.nonlinearity, 0.0, 20.0)
        if self.bits is None and self.has_errors:
            raise ValueError("ADCConfig.bits = None is invalid with offset_sigma, gain_sigma, noise_sigma or "
                             "nonlinearity set: ADC errors are in steps of a finite converter; give bits")

    @property
    def has_errors(self) -> bool:
        """Whether any converter non-ideality of PHYSICS.md section 10 is on."""
        return any(v != 0 for v in (self.offset_sigma, self.gain_sigma, self.noise_sigma, self.nonlinearity))

    @property
    def has_fixed_errors(self) -> bool:
        """Whether per-ADC offsets or gains are drawn for a chip."""
        return self.offset_sigma != 0 or self.gain_sigma != 0


@dataclass(frozen=True)
class IRDropConfig(Config):
    """Parasitic wire resistance of the tile's arrays (PHYSICS.md section 8).

    Attributes:
        r_row: resistance of one word-line segment (driver to first cross point, and
            between neighbouring cross points), ohms, in [0, 1e6]; 0: ideal wires.
        r_col: resistance of one bit-line segment (between neighbouring cross points,
            and from the last one to the sense amplifier), ohms, in [0, 1e6].
    """

    r_row: float = 0.0
    r_col: float = 0.0

    def validate(self) -> None:
        check_number("IRDropConfig", "r_row", self.r_row, 0.0, 1e6, unit="ohm")
        check_number("IRDropConfig", "r_col", self.r_col, 0.0, 1e6, unit="ohm")

    @property
    def on(self) -> bool:
        return self.r_row > 0 or self.r_col > 0


@dataclass(frozen=True)
class SlicingConfig(Config):
    """Bit slicing of the weights (PHYSICS.md section 9).

    Attributes:
        weight_slices: k, the device pairs (in columns of their own) per weight, in
            [1, 16]; each slice is read by its own ADC conversions.
        bits_per_slice: b, the bits each slice holds, in [1, 16] with k * b <= 32; the
            weight magnitude is quantized to k * b bits. None (only with k = 1): the
            continuous mapping of section 1.
    """

    weight_slices: int = 1
    bits_per_slice: Optional[int] = None

    def validate(self) -> None:
        o = "SlicingConfig"
        check_int(o, "weight_slices", self.weight_slices, 1, 16)
        check_int(o, "bits_per_slice", self.bits_per_slice, 1, 16, optional=True)
        if self.bits_per_slice is None and self.weight_slices != 1:
            raise ValueError(f"SlicingConfig.bits_per_slice = None is invalid with weight_slices = "
                             f"{self.weight_slices}: slices need bits_per_slice")
        if self.bits_per_slice is not None and self.weight_slices * self.bits_per_slice > 32:
            raise ValueError(f"SlicingConfig.bits_per_slice = {self.bits_per_slice} is invalid: weight_slices * "
                             f"bits_per_slice = {self.weight_slices * self.bits_per_slice} must be <= 32")

    @property
    def on(self) -> bool:
        """Whether weights are quantized into slices (False: the continuous mapping)."""
        return self.bits_per_slice is not None


@dataclass(frozen=True)
class TileConfig(Config):
    """One crossbar tile: its physical size, devices and periphery.

    Attributes:
        rows: physical word lines (inputs), in [1, 65536].
        cols: physical bit lines (outputs), in [1, 65536].
        device: the devices at every cross point.
        dac: the input converters.
        adc: the output converters.
        ir_drop: the resistance of the word and bit lines.
        slicing: how many columns (slices) each weight occupies.
    """

    rows: int = 256
    cols: int = 256
    device: DeviceConfig = field(default_factory=DeviceConfig)
    dac: DACConfig = field(default_factory=DACConfig)
    adc: ADCConfig = field(default_factory=ADCConfig)
    ir_drop: IRDropConfig = field(default_factory=IRDropConfig)
    slicing: SlicingConfig = field(default_factory=SlicingConfig)

    def validate(self) -> None:
        check_int("TileConfig", "rows", self.rows, 1, MAX_TILE_SIZE)
        check_int("TileConfig", "cols", self.cols, 1, MAX_TILE_SIZE)
        for name, kind in (("device", DeviceConfig), ("dac", DACConfig), ("adc", ADCConfig),
                           ("ir_drop", IRDropConfig), ("slicing", SlicingConfig)):
            if not isinstance(getattr(self, name), kind):
                raise ValueError(f"TileConfig.{name} = {getattr(self, name)!r} is invalid: expected a {kind.__name__}")
        if self.cols % self.slicing.weight_slices:
            raise ValueError(f"TileConfig.cols = {self.cols} is invalid with slicing.weight_slices = "
                             f"{self.slicing.weight_slices}: a weight's slices sit side by side in one tile, "
                             f"so cols must be a multiple of weight_slices")
