"""Monte Carlo summaries: mean, standard deviation, 95% confidence intervals, and the
equivalence test of the validation check.

A confidence interval needs an estimate of the spread: with one repeat, or with
repeats that all gave the same accuracy, there is none, and the interval is reported
as not available (None) rather than as a zero-width interval that looks certain."""
from __future__ import annotations

import math
from typing import Optional, Sequence

from scipy import stats

MAX_REPEATS = 100_000  # RunConfig.repeats' upper bound


def _mean_var(values: Sequence[float]) -> tuple:
    n = len(values)
    if min(values) == max(values):  # exactly no spread (rounding would make it a hair above 0)
        return float(values[0]), 0.0
    mean = math.fsum(values) / n
    return mean, math.fsum((v - mean) ** 2 for v in values) / (n - 1)


def summarize(values: Sequence[float]) -> dict:
    """Mean, sample std (ddof=1) and the Student-t 95% CI of the mean of ``values``
    (accuracies), the CI clipped to [0, 1] where few repeats make it reach past; the CI
    is None when the spread cannot be estimated (one value, or all values equal)."""
    n = len(values)
    if n == 0:
        raise ValueError("summarize: no values")
    mean, var = _mean_var(values)
    std = math.sqrt(var)
    ci = None
    if std > 0:
        half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
        ci = [max(0.0, mean - half), min(1.0, mean + half)]
    return {"accuracy_mean": mean, "accuracy_std": std, "ci95": ci, "n": n}


def _welch(va: float, vb: float, na: int, nb: int) -> tuple:
    """(standard error of the difference of means, Welch-Satterthwaite dof)."""
    sa, sb = va / na, vb / nb
    se = math.sqrt(sa + sb)
    dof = (sa + sb) ** 2 / ((sa ** 2 / (na - 1) if sa else 0.0) + (sb ** 2 / (nb - 1) if sb else 0.0))
    return se, dof


def difference_ci(a: Sequence[float], b: Sequence[float]) -> tuple:
    """mean(a) - mean(b) and its Welch 95% CI (None when either side has fewer than two
    values or neither varies)."""
    (ma, va), (mb, vb) = _mean_var(a), _mean_var(b)
    diff = ma - mb
    if len(a) < 2 or len(b) < 2 or va + vb == 0:
        return diff, None
    se, dof = _welch(va, vb, len(a), len(b))
    half = float(stats.t.ppf(0.975, dof)) * se
    return diff, [diff - half, diff + half]


def equivalence(a: Sequence[float], b: Sequence[float], tolerance: float) -> dict:
    """Is mean(a) - mean(b) within +-tolerance? PASSED when its whole 95% CI lies within
    it, FAILED when the CI lies wholly outside, INCONCLUSIVE otherwise (or when no CI
    can be estimated), with the repeats per side that would likely decide it if the
    observed difference and spreads held."""
    diff, ci = difference_ci(a, b)
    if ci is not None and -tolerance <= ci[0] and ci[1] <= tolerance:
        verdict = "PASSED"
    elif ci is not None and (ci[1] < -tolerance or ci[0] > tolerance):
        verdict = "FAILED"
    else:
        verdict = "INCONCLUSIVE"
    needed = None if verdict != "INCONCLUSIVE" else repeats_to_decide(a, b, tolerance)
    return {"verdict": verdict, "difference": diff, "ci95": ci, "repeats_needed": needed}


def repeats_to_decide(a: Sequence[float], b: Sequence[float], tolerance: float) -> Optional[int]:
    """The smallest equal number of repeats per side whose 95% CI half-width, at the
    observed spreads, is below the distance of the observed difference from the
    tolerance: what would likely turn INCONCLUSIVE into PASSED or FAILED. None when it
    cannot be estimated (a side with one value, no spread, the difference exactly at
    the tolerance) or exceeds MAX_REPEATS."""
    if len(a) < 2 or len(b) < 2:
        return None
    (ma, va), (mb, vb) = _mean_var(a), _mean_var(b)
    margin = abs(tolerance - abs(ma - mb))
    if va + vb == 0 or margin == 0:
        return None
    # normal approximation first, then step up until the t-based half-width fits
    n = max(2, math.ceil(1.96 ** 2 * (va + vb) / margin ** 2))
    while n <= MAX_REPEATS:
        se, dof = _welch(va, vb, n, n)
        if stats.t.ppf(0.975, dof) * se < margin:
            return n
        n += max(1, n // 20)
    return None


def ci_bounds(ci) -> tuple:
    """(low, high) of a CI, (None, None) where it is not available."""
    return (None, None) if ci is None else (ci[0], ci[1])
