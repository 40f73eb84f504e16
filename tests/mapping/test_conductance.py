import numpy as np
import pytest

from mapping import MappingConfig, conductances_to_weights, reference_weight, weights_to_conductances


def test_round_trip_and_range(rng):
    w = rng.normal(0, 0.1, (40, 30))
    g_plus, g_minus, scale, clipped = weights_to_conductances(w, 2.0, 27.0, np.abs(w).max())
    assert clipped == 0
    assert g_plus.min() >= 2.0 and g_plus.max() <= 27.0 + 1e-12 and g_minus.min() >= 2.0
    assert np.all((g_plus == 2.0) | (g_minus == 2.0))  # one side of each pair idles at g_min
    assert np.allclose(conductances_to_weights(g_plus, g_minus, scale), w, atol=1e-14)


@pytest.mark.parametrize("clip,value", [("std", 2.0), ("percentile", 90.0)])
def test_clipping_is_counted(rng, clip, value):
    w = rng.normal(0, 1.0, (100, 100))
    w_ref = reference_weight(w, clip, value)
    expected = np.count_nonzero(np.abs(w) > w_ref)
    g_plus, g_minus, scale, clipped = weights_to_conductances(w, 0.0, 25.0, w_ref)
    assert clipped == expected > 0
    assert np.allclose(conductances_to_weights(g_plus, g_minus, scale), np.clip(w, -w_ref, w_ref))


def test_per_column_reference(rng):
    w = rng.normal(0, 1.0, (50, 4)) * np.array([1, 2, 3, 4])
    ref = reference_weight(w, "max", 0.0, axis=0)
    assert np.allclose(ref, np.abs(w).max(axis=0))
    g_plus, g_minus, _, _ = weights_to_conductances(w, 0.0, 25.0, ref)
    assert np.allclose(np.maximum(g_plus, g_minus).max(axis=0), 25.0)


@pytest.mark.parametrize("field,value", [("scale", "row"), ("clip", "mean"), ("clip_value", 0.0),
                                         ("compensation_input", "zeros"), ("calibration_rows", 3),
                                         ("drift_compensation", "on"), ("max_rows_per_chunk", 0),
                                         ("gpu_chunk_mb", 0)])
def test_invalid_mapping_options(field, value):
    with pytest.raises(ValueError, match=f"MappingConfig.{field}"):
        MappingConfig(**{field: value})
    with pytest.raises(ValueError, match="clip_value"):
        MappingConfig(clip="percentile", clip_value=120.0)
