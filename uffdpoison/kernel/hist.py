"""The data planes' latency histograms (csrc/hist.c), copied out of C on a scrape.

Power-of-two buckets from 1 µs: bucket i < ``BOUNDED`` counts latencies <= 2**i µs, the last
one everything longer. One histogram per class of what was served (``CLASSES``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from uffdpoison.kernel._ffi import ffi, lib

BOUNDED: int = lib.UP_HIST_BOUNDED
BUCKETS: int = lib.UP_HIST_BUCKETS
BOUNDS_S = tuple(2**i / 1e6 for i in range(BOUNDED))  # each bounded bucket's upper bound
CLASSES = {  # the C class numbers, by the name the metrics use
    "data": lib.UP_CLASS_DATA,
    "zero": lib.UP_CLASS_ZERO,
    "poisoned": lib.UP_CLASS_POISONED,
    "clean": lib.UP_CLASS_CLEAN,
    "present": lib.UP_CLASS_PRESENT,
    "local": lib.UP_CLASS_LOCAL,
    "mixed": lib.UP_CLASS_MIXED,
}
SOURCE_REPLIES = ("data", "zero", "poisoned", "clean")  # what a source's reply says a page is


@dataclass(frozen=True, slots=True)
class Histogram:
    """One class's latencies: ``buckets`` (not cumulative, ``BUCKETS`` of them), their sum."""

    buckets: tuple[int, ...] = (0,) * BUCKETS
    sum_ns: int = 0

    @property
    def count(self) -> int:
        return sum(self.buckets)

    def __add__(self, other: Histogram) -> Histogram:
        b = tuple(x + y for x, y in zip(self.buckets, other.buckets, strict=True))
        return Histogram(b, self.sum_ns + other.sum_ns)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound in seconds, count at or below it), ending with (inf, count)."""
        out, total = [], 0
        for bound, n in zip((*BOUNDS_S, float("inf")), self.buckets, strict=True):
            total += n
            out.append((bound, total))
        return out

    def quantile(self, q: float) -> float | None:
        """The q-quantile in seconds, interpolated linearly within its bucket (as Prometheus's
        histogram_quantile does); in the overflow bucket, its lower bound. None if empty."""
        n = self.count
        if not n:
            return None
        rank, below, lower = q * n, 0, 0.0
        for k, bound in enumerate(BOUNDS_S):
            c = self.buckets[k]
            if c and below + c >= rank:
                return lower + (bound - lower) * (rank - below) / c
            below, lower = below + c, bound
        return BOUNDS_S[-1]


def combined(hists: dict[str, Histogram]) -> Histogram:
    """Every class in one histogram."""
    out = Histogram()
    for h in hists.values():
        out = out + h
    return out


@dataclass(frozen=True, slots=True)
class Timing:
    """What a scrape reads of a plane besides its counters."""

    latency: dict[str, Histogram]  # by class
    pages: dict[str, int]  # destination: pages in demand replies, by class
    bytes_urgent: int  # destination: received on URGENT (the demand replies)
    bytes_bulk: int  # destination: received on BULK (the push)


def read_timing(getter: Any, plane: Any) -> Timing:
    """``getter(plane, up_timing *)`` (up_dest_get_timing or up_src_get_timing), as a Timing."""
    t = ffi.new("up_timing *")
    getter(plane, t)
    latency, pages = {}, {}
    for name, k in CLASSES.items():
        lat = t.h.lat[k]
        latency[name] = Histogram(tuple(lat.buckets), lat.sum_ns)
        pages[name] = t.h.pages[k]
    return Timing(latency, pages, t.bytes_urgent, t.bytes_bulk)
