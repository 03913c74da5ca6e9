"""Intervals for evaluation metrics: Wilson for accuracies (proportions, also of averaged
per-sample scores in [0, 1]), the normal approximation for means of unbounded scores."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def wilson_interval(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval for ``k`` successes in ``n`` trials (``k`` may be a sum of
    partial credits in [0, 1], as VQA accuracy gives). ``z`` 1.96: 95%. The interval stays in
    [0, 1] and is sensible for ``k = 0`` or ``k = n``."""
    if n <= 0:
        raise ValueError(f"wilson_interval needs n >= 1 trials, got n={n}")
    if not 0 <= k <= n:
        raise ValueError(f"wilson_interval needs 0 <= k <= n, got k={k}, n={n}")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy(scores: Sequence[float]) -> dict[str, Any]:
    """``{"value", "ci95", "n"}`` of per-sample scores in [0, 1] (the Wilson interval of their
    sum)."""
    n = len(scores)
    if n == 0:
        return {"value": None, "ci95": None, "n": 0}
    total = float(sum(scores))
    return {"value": total / n, "ci95": list(wilson_interval(total, n)), "n": n}


def mean(values: Sequence[float], z: float = 1.96) -> dict[str, Any]:
    """``{"value", "ci95", "n"}`` of a mean with the normal approximation (``ci95`` is
    ``None`` for fewer than two values)."""
    n = len(values)
    if n == 0:
        return {"value": None, "ci95": None, "n": 0}
    m = float(sum(values)) / n
    if n < 2:
        return {"value": m, "ci95": None, "n": n}
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    half = z * sd / math.sqrt(n)
    return {"value": m, "ci95": [m - half, m + half], "n": n}
