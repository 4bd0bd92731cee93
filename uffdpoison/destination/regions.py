"""Guest memory regions on the destination: where each lies in this process (or the VMM's) and
where it lies in the source's guest memory space.

A region is Firecracker's ``GuestRegionUffdMapping``: ``base_host_virt_addr``, ``size``,
``offset`` (bytes into the source's guest memory space) and ``page_size``. Faults and replies
are mapped to regions in C (the data plane); here, host ranges are split into region pages for
``ensure_present``, a bisect over a handful of regions, never a per-page structure.
"""

from __future__ import annotations

import bisect
import itertools
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

MAX_HANDOFF_BYTES = 1 << 20
# No process's address space reaches past 2^57 (x86-64 5-level paging, arm64 52-bit VA); the
# guest memory space is addressed by u64 offsets on the wire.
ADDRESS_LIMIT = 1 << 57
OFFSET_LIMIT = 1 << 64
_PAGE_SIZES = (4096, 2 << 20, 1 << 30)


class RegionError(ValueError):
    """A region description is unusable (misaligned, overlapping, past the source's memory...)."""


@dataclass(frozen=True, slots=True)
class Region:
    base: int  # host virtual address of the region's first byte
    size: int
    offset: int  # byte offset of that first byte in the source's guest memory space
    page_size: int = 4096

    @property
    def end(self) -> int:
        return self.base + self.size

    @property
    def offset_end(self) -> int:
        return self.offset + self.size

    @property
    def npages(self) -> int:
        return self.size // self.page_size

    def validate(self) -> None:
        ps = self.page_size
        if ps not in _PAGE_SIZES:
            raise RegionError(
                f"region at {self.base:#x}: page size {ps} is not one of {_PAGE_SIZES}"
            )
        if self.size <= 0:
            raise RegionError(f"region at {self.base:#x}: size {self.size} must be positive")
        if self.end > ADDRESS_LIMIT:
            raise RegionError(
                f"region at {self.base:#x}+{self.size:#x} ends past any process's address space "
                f"({ADDRESS_LIMIT:#x})"
            )
        if self.offset_end > OFFSET_LIMIT:
            raise RegionError(
                f"region at {self.base:#x}: offset {self.offset:#x}+{self.size:#x} is past the "
                "64-bit guest memory space"
            )
        for name, value in (
            ("base_host_virt_addr", self.base),
            ("size", self.size),
            ("offset", self.offset),
        ):
            if value < 0 or value % ps:
                raise RegionError(
                    f"region at {self.base:#x}: {name} {value:#x} is not aligned to page size {ps}"
                )


class RegionMap:
    """A validated, sorted, non-overlapping set of regions sharing one page size."""

    def __init__(self, regions: Iterable[Region]) -> None:
        regs = sorted(regions, key=lambda r: r.base)
        if not regs:
            raise RegionError("no regions given")
        for r in regs:
            r.validate()
        sizes = {r.page_size for r in regs}
        if len(sizes) != 1:
            raise RegionError(f"regions mix page sizes {sorted(sizes)}; one session has one unit")
        for a, b in itertools.pairwise(regs):
            if b.base < a.end:
                raise RegionError(
                    f"regions overlap in this address space: [{a.base:#x}, {a.end:#x}) "
                    f"and [{b.base:#x}, {b.end:#x})"
                )
        by_off = sorted(regs, key=lambda r: r.offset)
        for a, b in itertools.pairwise(by_off):
            if b.offset < a.offset_end:
                raise RegionError(
                    f"regions overlap in the guest memory space: offsets [{a.offset:#x}, "
                    f"{a.offset_end:#x}) and [{b.offset:#x}, {b.offset_end:#x})"
                )
        self.regions: tuple[Region, ...] = tuple(regs)
        self.page_size: int = regs[0].page_size
        self._bases = [r.base for r in regs]

    def __iter__(self) -> Iterator[Region]:
        return iter(self.regions)

    def __len__(self) -> int:
        return len(self.regions)

    @property
    def total_pages(self) -> int:
        return sum(r.npages for r in self.regions)

    def check_within(self, memory_size: int) -> None:
        for r in self.regions:
            if r.offset_end > memory_size:
                raise RegionError(
                    f"region at {r.base:#x} covers guest offsets "
                    f"[{r.offset:#x}, {r.offset_end:#x}) but the source's memory is only "
                    f"{memory_size:#x} bytes"
                )

    def split_pages(self, start: int, end: int) -> Iterator[tuple[int, int, int]]:
        """Yield ``(region index, first page, end page)`` for every region a host address
        range [start, end) touches: the pages that hold any byte of it, in address order."""
        ps = self.page_size
        for i in range(max(bisect.bisect_right(self._bases, start) - 1, 0), len(self.regions)):
            r = self.regions[i]
            if r.base >= end:
                break
            lo, hi = max(start, r.base), min(end, r.end)
            if lo < hi:
                yield i, (lo - r.base) // ps, -(-(hi - r.base) // ps)


def _int_field(entry: dict[str, Any], key: str, idx: int) -> int:
    if key not in entry:
        raise RegionError(f"handoff region {idx}: missing field {key!r}")
    value = entry[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise RegionError(f"handoff region {idx}: field {key!r} must be an integer, got {value!r}")
    if value < 0:
        raise RegionError(f"handoff region {idx}: field {key!r} must not be negative, got {value}")
    return value


def parse_firecracker_regions(payload: bytes | str) -> list[Region]:
    """Parse Firecracker's handoff JSON: ``[{"base_host_virt_addr", "size", "offset",
    "page_size" | "page_size_kib"}, ...]``.

    Page size comes from ``page_size``; else from ``page_size_kib``, which older Firecracker
    releases fill with bytes despite its name (so a value that is itself a page size in bytes is
    taken as bytes, and anything else as KiB); else 4096.
    """
    if len(payload) > MAX_HANDOFF_BYTES:
        raise RegionError(
            f"handoff message is {len(payload)} bytes, over the {MAX_HANDOFF_BYTES} limit"
        )
    text = payload.encode() if isinstance(payload, str) else payload
    if text.lstrip()[:1] != b"[":
        raise RegionError(f"handoff message is not a JSON array: {text[:60]!r}")
    try:
        doc = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RegionError(f"handoff message is not valid JSON: {e}") from None
    except RecursionError:
        raise RegionError("handoff message is nested too deeply to be a region table") from None
    if not isinstance(doc, list):
        raise RegionError(
            f"handoff message must be a JSON array of regions, got {type(doc).__name__}"
        )
    if not doc:
        raise RegionError("handoff message holds no regions")
    regions = []
    for idx, entry in enumerate(doc):
        if not isinstance(entry, dict):
            raise RegionError(f"handoff region {idx} must be a JSON object, got {entry!r:.60}")
        base = _int_field(entry, "base_host_virt_addr", idx)
        size = _int_field(entry, "size", idx)
        offset = _int_field(entry, "offset", idx)
        if "page_size" in entry:
            page_size = _int_field(entry, "page_size", idx)
        elif "page_size_kib" in entry:
            v = _int_field(entry, "page_size_kib", idx)
            page_size = v if v in _PAGE_SIZES else v * 1024
        else:
            page_size = 4096
        regions.append(Region(base=base, size=size, offset=offset, page_size=page_size))
    return regions


def regions_to_json(regions: Sequence[Region]) -> bytes:
    """The Firecracker handoff body for ``regions`` (used by tests and example VMMs)."""
    return json.dumps(
        [
            {
                "base_host_virt_addr": r.base,
                "size": r.size,
                "offset": r.offset,
                "page_size": r.page_size,
            }
            for r in regions
        ]
    ).encode()
