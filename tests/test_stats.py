"""The one percentile definition (nearest rank) behind every reported figure."""

from __future__ import annotations

import pytest

from uffdpoison.stats import percentile


def test_nearest_rank() -> None:
    v = list(range(1, 101))  # 1..100
    assert percentile(v, 50) == 50
    assert percentile(v, 99) == 99
    assert percentile(v, 99.9) == 100
    assert percentile(v, 100) == 100
    assert percentile(v, 0) == 1
    assert percentile([7], 50) == 7


@pytest.mark.parametrize(("values", "p", "message"), [([], 50, "no values"), ([1], 101, "0..100")])
def test_bad_input(values: list[int], p: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        percentile(values, p)
