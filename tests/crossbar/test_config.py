import json
import math

import pytest

from crossbar import ADCConfig, DACConfig, DeviceConfig, TileConfig, presets

INVALID = [
    (DeviceConfig, "model", "memristor"),
    (DeviceConfig, "g_min", -1.0),
    (DeviceConfig, "g_min", math.nan),
    (DeviceConfig, "g_max", 0.0),
    (DeviceConfig, "g_max", math.inf),
    (DeviceConfig, "prog_noise_scale", -0.1),
    (DeviceConfig, "prog_sigma_abs", -1.0),
    (DeviceConfig, "prog_sigma_rel", 11.0),
    (DeviceConfig, "read_noise_1f", "yes"),
    (DeviceConfig, "read_noise_1f_scale", -1.0),
    (DeviceConfig, "read_sigma_abs", -0.1),
    (DeviceConfig, "read_sigma_rel", math.nan),
    (DeviceConfig, "drift", 1),
    (DeviceConfig, "drift_scale", -2.0),
    (DeviceConfig, "t0", 0.0),
    (DeviceConfig, "t_read", -1e-9),
    (DeviceConfig, "levels", 1),
    (DeviceConfig, "levels", 2.5),
    (DeviceConfig, "stuck_min_fraction", 1.5),
    (DeviceConfig, "stuck_max_fraction", -0.1),
    (DACConfig, "bits", 0),
    (DACConfig, "bits", 25),
    (DACConfig, "bits", True),
    (DACConfig, "range_mode", "auto"),
    (DACConfig, "range", 0.0),
    (DACConfig, "percentile", 0.0),
    (DACConfig, "percentile", 100.5),
    (ADCConfig, "bits", -3),
    (ADCConfig, "range_mode", "per_vector"),
    (ADCConfig, "range", -5.0),
    (ADCConfig, "percentile", math.inf),
    (TileConfig, "rows", 0),
    (TileConfig, "cols", 70000),
    (TileConfig, "rows", 12.0),
    (TileConfig, "device", "pcm"),
]


@pytest.mark.parametrize("cls,field,value", INVALID)
def test_invalid_field_names_field_and_value(cls, field, value):
    kwargs = {field: value}
    if cls is DeviceConfig and field in ("prog_sigma_abs", "prog_sigma_rel"):
        kwargs["model"] = "gaussian"
    if cls is DeviceConfig and field in ("read_noise_1f_scale", "read_sigma_abs", "read_sigma_rel",
                                         "drift_scale", "t0", "t_read"):
        kwargs["model"] = "pcm"
    with pytest.raises(ValueError) as err:
        cls(**kwargs)
    assert field in str(err.value)
    assert repr(value) in str(err.value) or str(value) in str(err.value)


def test_cross_field_rules():
    with pytest.raises(ValueError, match="g_max"):
        DeviceConfig(g_min=10.0, g_max=5.0)
    with pytest.raises(ValueError, match="stuck"):
        DeviceConfig(stuck_min_fraction=0.6, stuck_max_fraction=0.6)
    # physics a model does not have is refused, not silently ignored
    with pytest.raises(ValueError, match="drift.*'gaussian'"):
        DeviceConfig(model="gaussian", drift=True)
    with pytest.raises(ValueError, match="read_noise_1f.*'ideal'"):
        DeviceConfig(model="ideal", read_noise_1f=True)
    with pytest.raises(ValueError, match="prog_sigma_abs.*'pcm'"):
        DeviceConfig(model="pcm", prog_sigma_abs=1.0)
    with pytest.raises(ValueError, match="read_sigma_abs.*'ideal'"):
        DeviceConfig(model="ideal", read_sigma_abs=1.0)


@pytest.mark.parametrize("make", [presets.ideal, presets.gaussian, presets.pcm])
def test_json_round_trip(make):
    cfg = make(rows=128, cols=64, dac_bits=6, adc_bits=None)
    text = cfg.to_json()
    assert TileConfig.from_json(text) == cfg
    assert json.loads(text)["adc"]["bits"] is None
    assert cfg.rows == 128 and cfg.cols == 64 and cfg.dac.bits == 6


def test_unknown_key_and_dotted_paths():
    data = presets.pcm().to_dict()
    data["device"]["g_maxx"] = 3
    with pytest.raises(ValueError, match="device.g_maxx"):
        TileConfig.from_dict(data)
    cfg = presets.pcm().with_path("adc.bits", 4).with_path("device.prog_noise_scale", 2.0)
    assert cfg.adc.bits == 4 and cfg.device.prog_noise_scale == 2.0
    assert cfg.get_path("adc.bits") == 4
    with pytest.raises(ValueError, match="'adcc'"):
        cfg.with_path("adcc.bits", 3)
    with pytest.raises(ValueError, match="adc.bits"):
        cfg.with_path("adc.bits", 0)
