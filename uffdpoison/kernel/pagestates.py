"""The raw C page-state array (csrc/ledger.c); ``uffdpoison.ledger.Ledger`` is the typed face.

One byte a page in mmap(MAP_NORESERVE) memory, per-state counters, and the single placement
function that applies the page-state table of docs/DESIGN.md.
"""

from __future__ import annotations

import os
from typing import Any

from uffdpoison.kernel._ffi import ffi, lib

MISSING = lib.UP_MISSING
REQUESTED = lib.UP_REQUESTED
BACKGROUND = lib.UP_BACKGROUND
PRESENT = lib.UP_PRESENT
POISONED = lib.UP_POISONED
REMOVED = lib.UP_REMOVED
NSTATES = lib.UP_NSTATES

OP_COPY = lib.UP_OP_COPY
OP_ZERO = lib.UP_OP_ZERO
OP_CONTINUE = lib.UP_OP_CONTINUE
OP_POISON = lib.UP_OP_POISON
FLAG_WAKE = lib.UP_PLACE_WAKE
FLAG_STRICT = lib.UP_PLACE_STRICT
REFUSED_POISON = lib.UP_REFUSED_POISON  # -EHWPOISON: strict refusal over POISONED pages

_place = lib.up_ledger_place


class PageStates:
    """Owns one ``up_ledger``. ``result`` is the preallocated outcome of the last ``place``."""

    __slots__ = ("_l", "npages", "page_size", "result")

    def __init__(self, fd: int, base: int, size: int, page_size: int, hugetlb: bool) -> None:
        ptr = lib.up_ledger_new(fd, base, size, page_size, int(hugetlb))
        if ptr == ffi.NULL:
            err = ffi.errno
            raise OSError(
                err,
                f"page states for {base:#x}+{size:#x} (page {page_size:#x}): {os.strerror(err)}",
            )
        self._l: Any = ptr
        self.npages: int = ptr.npages
        self.page_size = page_size
        self.result: Any = ffi.new("up_place_result *")

    @property
    def raw(self) -> Any:
        """The ``up_ledger *`` (fields: states, counts[6], refused, already, dropped, raced)."""
        if self._l is None:
            raise ValueError("page states are closed")
        return self._l

    def close(self) -> None:
        if self._l is not None:
            lib.up_ledger_free(self._l)
            self._l = None

    def __del__(self) -> None:
        self.close()

    def new_result(self) -> Any:
        """A fresh ``up_place_result *`` (one per thread placing concurrently)."""
        return ffi.new("up_place_result *")

    def place(
        self, op: int, first: int, count: int, src: int, flags: int, result: Any = None
    ) -> int:
        """Apply the placement table over pages [first, first+count); 0 or -errno. The outcome
        goes to ``result`` (default: ``self.result``)."""
        res = self.result if result is None else result
        try:
            return _place(self._l, op, first, count, src, flags, res)
        except (OverflowError, TypeError) as e:
            raise ValueError(f"bad placement pages {first!r}+{count!r} src {src!r}: {e}") from e

    def place_buffer(
        self, op: int, first: int, count: int, buf: Any, flags: int, result: Any = None
    ) -> int:
        """``place`` with the source a Python buffer of count*page_size bytes."""
        cbuf = ffi.from_buffer(buf)
        if len(cbuf) < count * self.page_size:
            raise ValueError(
                f"source buffer of {len(cbuf)} bytes is short of {count} pages "
                f"({count * self.page_size} bytes)"
            )
        res = self.result if result is None else result
        try:
            return _place(self._l, op, first, count, ffi.cast("uint64_t", cbuf), flags, res)
        except OverflowError as e:
            raise ValueError(f"bad placement pages {first!r}+{count!r}: {e}") from e

    def get(self, index: int) -> int:
        s = lib.up_ledger_get(self.raw, index)
        if s < 0:
            raise IndexError(f"page {index} outside 0..{self.npages - 1}")
        return s

    def claim(self, index: int) -> int:
        """Atomically: the page's state; MISSING or BACKGROUND become REQUESTED."""
        s = lib.up_ledger_claim(self.raw, index)
        if s < 0:
            raise IndexError(f"page {index} outside 0..{self.npages - 1}")
        return s

    def _range(self, first: int, count: int) -> None:
        if first < 0 or count < 0 or first + count > self.npages:
            raise IndexError(f"pages {first}+{count} outside 0..{self.npages}")

    def mark(self, first: int, count: int, from_mask: int, to: int) -> int:
        """Pages in [first, first+count) whose state bit is in from_mask become ``to``;
        returns how many changed."""
        self._range(first, count)
        n = lib.up_ledger_mark(self.raw, first, count, from_mask, to)
        if n < 0:
            raise ValueError(f"bad target state {to}")
        return n

    def find(self, start: int, mask: int) -> int:
        """First page >= start whose state bit is in mask, or -1."""
        if start < 0:
            raise IndexError(f"start page {start} is negative")
        return lib.up_ledger_find(self.raw, start, mask)

    def count(self, first: int, count: int, mask: int) -> int:
        self._range(first, count)
        return lib.up_ledger_count(self.raw, first, count, mask)

    def counts(self) -> list[int]:
        return list(self.raw.counts)
