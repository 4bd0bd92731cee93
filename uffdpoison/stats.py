"""The one percentile definition every figure of the project uses."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(sorted_values: Sequence[int], p: float) -> int:
    """Nearest-rank percentile ``p`` (0-100) of values already sorted ascending: the
    ceil(n * p / 100)-th value (the first for p = 0)."""
    if not 0 <= p <= 100:
        raise ValueError(f"percentile must be within 0..100, got {p}")
    if not sorted_values:
        raise ValueError("no values to take a percentile of")
    return sorted_values[max(1, math.ceil(len(sorted_values) * p / 100)) - 1]
