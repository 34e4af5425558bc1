"""Percentiles and medians shared by the load generators and the report."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

PERCENTILES = (50, 90, 99)


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (the value below which pct% of the samples fall; no interpolation)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def percentiles_ms(seconds: Sequence[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    result = {f"p{p}": round(percentile(ordered, p) * 1000, 3) for p in PERCENTILES}
    result["max"] = round(ordered[-1] * 1000, 3) if ordered else math.nan
    result["mean"] = round(statistics.fmean(ordered) * 1000, 3) if ordered else math.nan
    result["samples"] = len(ordered)
    return result


def median(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(finite) if finite else math.nan
