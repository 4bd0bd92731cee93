"""The demo's timeline from the toucher's per-touch records: bins, windows, poisoned touches."""

from __future__ import annotations

from array import array
from typing import Any

from uffdpoison.timeline import touch_series

ORIGIN = 10**12  # a CLOCK_MONOTONIC reading: the vCPU threads start
MS = 1_000_000
US = 1_000


def series(touches: list[tuple[int | None, int, int]]) -> dict[str, Any]:
    """``touches``: (done ms after the origin or None, latency µs, outcome)."""
    done = array("Q", (0 if t is None else ORIGIN + t * MS for t, _, _ in touches))
    lat = array("Q", (us * US for _, us, _ in touches))
    out = array("B", (o for _, _, o in touches))
    return touch_series(ORIGIN, done, lat, out, sigbus=1, fault_ns=10 * US)


def test_faults_binned_per_10_ms_and_latency_per_window() -> None:
    tl = series([
        (1, 100, 0), (4, 300, 0), (9, 2, 0),  # two faults in [0, 10) ms; 2 µs: no fault
        (25, 50, 0),                           # [20, 30)
        (26, 5, 1),                            # a poisoned page: SIGBUS after 5 µs
        (3, 7, 1),
        (None, 0, 2),                          # not run: counts nowhere
    ])  # fmt: skip
    assert tl["fault_bin_ms"] == 10 and tl["faults"] == [2, 0, 1]
    assert tl["latency_window_ms"] == 10  # the faults spread over less than 2 s
    assert tl["latency_ms"] == [0, 20]
    assert tl["latency_p50_us"] == [100.0, 50.0] and tl["latency_p99_us"] == [300.0, 50.0]
    assert tl["poison_touch_ms"] == [3.0, 26.0] and tl["poison_touch_us"] == [7.0, 5.0]


def test_long_runs_take_50_ms_windows() -> None:
    tl = series([(0, 20, 0), (30, 40, 0), (2500, 60, 0)])
    assert tl["latency_window_ms"] == 50
    assert tl["latency_ms"] == [0, 2500] and tl["latency_p50_us"] == [20.0, 60.0]
    assert len(tl["faults"]) == 251 and sum(tl["faults"]) == 3


def test_no_fault_no_bins() -> None:
    tl = series([(1, 1, 0), (2, 3, 1)])
    assert tl["faults"] == [] and tl["latency_ms"] == [] and tl["latency_p99_us"] == []
    assert tl["poison_touch_ms"] == [2.0]
