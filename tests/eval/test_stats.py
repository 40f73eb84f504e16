"""Confidence intervals that are honest about what few repeats can say, and the
equivalence test of the validation check."""
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from eval.results import table
from eval.stats import _welch, equivalence, repeats_to_decide, summarize


def test_equivalence_passes_only_when_the_whole_ci_is_within_tolerance():
    rng = np.random.default_rng(0)
    same = equivalence(list(0.95 + rng.normal(0, 0.002, 20)), list(0.95 + rng.normal(0, 0.002, 20)), 0.01)
    assert same["verdict"] == "PASSED" and -0.01 <= same["ci95"][0] and same["ci95"][1] <= 0.01
    far = equivalence(list(0.80 + rng.normal(0, 0.002, 20)), list(0.95 + rng.normal(0, 0.002, 20)), 0.01)
    assert far["verdict"] == "FAILED" and far["ci95"][1] < -0.01
    assert same["repeats_needed"] is None and far["repeats_needed"] is None


def test_two_wild_repeats_are_inconclusive_not_passed():
    # the case from the field: a CI of [-55, +44] points printed PASSED
    result = equivalence([0.30, 0.95], [0.90, 0.91], 0.01)
    assert result["verdict"] == "INCONCLUSIVE"
    assert result["ci95"][0] < -0.5 and result["ci95"][1] > 0.4


def test_one_repeat_is_inconclusive_with_no_ci():
    result = equivalence([0.9], [0.9], 0.01)
    assert result == {"verdict": "INCONCLUSIVE", "difference": 0.0, "ci95": None, "repeats_needed": None}


def test_repeats_needed_would_decide_at_the_observed_spread():
    a, b = [0.90, 0.915, 0.93, 0.905], [0.90, 0.91, 0.92, 0.935]
    result = equivalence(a, b, 0.01)
    assert result["verdict"] == "INCONCLUSIVE"
    n = result["repeats_needed"]
    assert isinstance(n, int) and n > 4
    va, vb = np.var(a, ddof=1), np.var(b, ddof=1)
    margin = 0.01 - abs(np.mean(a) - np.mean(b))
    se, dof = _welch(va, vb, n, n)
    assert scipy_stats.t.ppf(0.975, dof) * se < margin  # n repeats would decide it
    se, dof = _welch(va, vb, 4, 4)
    assert scipy_stats.t.ppf(0.975, dof) * se >= margin  # the 4 we have do not
    assert repeats_to_decide([0.9], [0.9, 0.91], 0.01) is None


def test_ci_is_not_available_without_spread_and_printed_as_such():
    one, flat = summarize([0.8]), summarize([0.8, 0.8, 0.8])
    assert one["ci95"] is None and flat["ci95"] is None and flat["accuracy_std"] == 0.0
    varied = summarize([0.8, 0.9])
    half = 12.706204736174707 * math.sqrt(0.005) / math.sqrt(2)  # t(0.975, 1) s / sqrt(2)
    assert varied["ci95"] == pytest.approx([max(0, 0.85 - half), min(1, 0.85 + half)])
    results = {"dataset": "d", "model": "m", "ideal_accuracy": 0.9, "test_samples": 10,
               "analog": [{"time": 1.0, **one, "effective_eta": 0.1, "dac_clip_rate": 0.0,
                           "adc_saturation_rate": 0.0}],
               "baseline": [{"sigma": 0.1, "normalization": "std", **flat}],
               "validation": {"verdict": "INCONCLUSIVE", "prog_sigma_abs": 1.0, "difference": 0.0, "ci95": None,
                              "tolerance": 0.01, "repeats": 1, "repeats_needed": None,
                              "crossbar": one, "baseline": one}}
    text = table(results)
    assert text.count("n/a") == 3 and "[" not in text.split("validation")[0].split("\n", 2)[2]
    assert "INCONCLUSIVE" in text and "cannot be estimated" in text
