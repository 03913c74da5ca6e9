"""Small statistics helpers for toy-world metrics."""

from __future__ import annotations

import math


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion: ``k`` successes in ``n`` trials.

    ``z`` is the normal quantile (1.96 gives a 95% interval). Unlike the normal approximation
    the interval stays inside [0, 1] and is sensible for ``k = 0`` or ``k = n``.
    """
    if n <= 0:
        raise ValueError(f"wilson_interval needs n >= 1 trials, got n={n}")
    if not 0 <= k <= n:
        raise ValueError(f"wilson_interval needs 0 <= k <= n, got k={k}, n={n}")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


# Student's t quantile at 0.975 for 1-30 degrees of freedom (two-sided 95 %)
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t_interval(values: list[float]) -> tuple[float, float]:
    """The two-sided 95 % Student-t interval of the mean of ``values`` (e.g. per-seed
    differences of paired runs: seeds are the samples). Needs at least two values; beyond 31
    the normal quantile 1.96 is used."""
    n = len(values)
    if n < 2:
        raise ValueError(f"t_interval needs at least 2 values, got {n}")
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = (_T975[n - 2] if n - 1 <= len(_T975) else 1.96) * sd / math.sqrt(n)
    return mean - half, mean + half
