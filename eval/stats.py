"""Monte Carlo summaries: mean, standard deviation and a 95% confidence interval."""
from __future__ import annotations

import math
from typing import Sequence

from scipy import stats


def summarize(values: Sequence[float]) -> dict:
    """Mean, sample std (ddof=1) and the Student-t 95% CI of the mean of ``values``
    (accuracies), the CI clipped to [0, 1] where few repeats make it reach past.

    One value has no spread to estimate: std is 0 and the CI collapses onto the mean."""
    n = len(values)
    if n == 0:
        raise ValueError("summarize: no values")
    mean = math.fsum(values) / n
    if n == 1:
        return {"accuracy_mean": mean, "accuracy_std": 0.0, "ci95": [mean, mean], "n": 1}
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)
    return {"accuracy_mean": mean, "accuracy_std": std, "ci95": [max(0.0, mean - half), min(1.0, mean + half)], "n": n}


def difference_ci(a: Sequence[float], b: Sequence[float]) -> tuple:
    """mean(a) - mean(b) and its Welch 95% CI."""
    na, nb = len(a), len(b)
    ma, mb = sum(a) / na, sum(b) / nb
    diff = ma - mb
    if na < 2 or nb < 2:
        return diff, [diff, diff]
    va = sum((x - ma) ** 2 for x in a) / (na - 1) / na
    vb = sum((x - mb) ** 2 for x in b) / (nb - 1) / nb
    se = math.sqrt(va + vb)
    if se == 0:
        return diff, [diff, diff]
    dof = (va + vb) ** 2 / ((va ** 2 / (na - 1) if va else 0) + (vb ** 2 / (nb - 1) if vb else 0))
    half = stats.t.ppf(0.975, dof) * se
    return diff, [diff - half, diff + half]
