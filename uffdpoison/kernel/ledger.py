"""The page ledger (csrc/ledger.c): per-region page states, and every placement.

Home of the never-un-poison invariant. The kernel refuses to place a poison marker over
anything but lets UFFDIO_COPY, UFFDIO_CONTINUE and shmem UFFDIO_ZEROPAGE replace one, so every
placement goes through one C function that applies the page-state table of docs/DESIGN.md and
refuses data over POISONED pages before any ioctl. The states are one byte a page in
mmap(MAP_NORESERVE) memory: a terabyte region costs nothing until it is used.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from uffdpoison.kernel._ffi import ffi, lib
from uffdpoison.kernel.errors import UffdError, error_for
from uffdpoison.kernel.uffd import Userfaultfd
from uffdpoison.owned import Owned

log = logging.getLogger(__name__)


class PageState(enum.IntEnum):
    MISSING = lib.UP_MISSING
    REQUESTED = lib.UP_REQUESTED  # a demand request is in flight
    BACKGROUND = lib.UP_BACKGROUND
    PRESENT = lib.UP_PRESENT
    POISONED = lib.UP_POISONED  # terminal
    REMOVED = lib.UP_REMOVED  # the guest discarded it: the next fault gets zeros


@dataclass(slots=True)
class PlaceResult:
    """Pages of one call: placed by our ioctl, skipped as already there (PRESENT, or a
    POISONED page whose marker is still there), refused (POISONED), dropped (REMOVED: stale
    data), raced (the kernel said EEXIST on a page we thought empty)."""

    placed: int
    already: int
    refused: int
    dropped: int
    raced: int


class LedgerError(Exception):
    """A placement the ledger will not do, or bad ledger input."""


class PoisonOverwriteRefused(LedgerError):
    """Strict mode: a data placement covered POISONED pages; nothing was placed."""

    def __init__(self, op: str, first: int, count: int, first_page: int, pages: int) -> None:
        super().__init__(
            f"{op} of pages {first}+{count} refused: {pages} page(s) hold poison markers, "
            f"first at page {first_page}"
        )
        self.first_page = first_page
        self.pages = pages


def _mask(states: Iterable[PageState]) -> int:
    m = 0
    for s in states:
        m |= 1 << int(s)
    return m


_OPNAMES = {lib.UP_OP_COPY: "copy", lib.UP_OP_ZERO: "zero", lib.UP_OP_CONTINUE: "continue",
            lib.UP_OP_POISON: "poison"}  # fmt: skip


class Ledger(Owned):
    """Page states of one registered region [base, base+size) served through ``uffd``; owns
    its ``up_ledger``. Placements return a ``PlaceResult``; a kernel error raises the matching
    ``UffdError`` (``EventPending`` for a pending non-cooperative event: read events, then
    retry) with ``.result`` (what was done, all recorded) and ``.stop_page`` attached. Thread
    safe (the C holds a mutex across check → ioctl → record)."""

    __slots__ = ("_l", "_owner", "_res", "base", "hugetlb", "minor", "npages", "page_size",
                 "size", "uffd")  # fmt: skip

    def __init__(
        self,
        uffd: Userfaultfd | None,
        base: int,
        size: int,
        page_size: int,
        *,
        hugetlb: bool = False,
        state_fd: int = -1,
        memory_file: tuple[int, int] | None = None,
    ) -> None:
        """``state_fd``: keep the states in that file (see ``up_ledger_new``): an empty file
        starts all MISSING, one left by an earlier owner is adopted (what was in flight is
        MISSING again). The mapping outlives the fd. ``memory_file``: (fd, offset) of the
        shmem or hugetlbfs file behind a region registered MISSING|MINOR: pages are placed
        through the page cache and CONTINUE (``up_ledger_minor``); the fd may be closed after.
        ``uffd`` None (a precopy, MINOR mode only): pages are only written into the cache."""
        if uffd is None and memory_file is None:
            raise LedgerError("a ledger without a userfaultfd places through a memory file only")
        if page_size <= 0 or page_size & (page_size - 1):
            raise LedgerError(f"page size {page_size:#x} is not a power of two")
        if base % page_size or size % page_size:
            raise LedgerError(
                f"region {base:#x}+{size:#x} is not aligned to the page size {page_size:#x}"
            )
        fd = -1 if uffd is None else uffd.fileno()
        ptr = lib.up_ledger_new(fd, base, size, page_size, int(hugetlb), state_fd)
        if ptr == ffi.NULL:
            err = ffi.errno
            what = (
                "a state file not of this region" if state_fd >= 0 and err == errno.EINVAL else ""
            )
            raise OSError(err, f"page states for {base:#x}+{size:#x}: {what or os.strerror(err)}")
        self._l: Any = ptr
        self.uffd, self.base, self.size, self.page_size = uffd, base, size, page_size
        self.hugetlb = hugetlb
        self.minor = memory_file is not None
        if memory_file is not None:
            rc = lib.up_ledger_minor(ptr, memory_file[0], memory_file[1])
            if rc:
                lib.up_ledger_free(ptr)
                self._l = None
                what = "the memory file ends before the region does" if rc == -errno.EINVAL else ""
                raise OSError(-rc, f"memory file for {base:#x}+{size:#x} at offset "
                              f"{memory_file[1]:#x}: {what or os.strerror(-rc)}")  # fmt: skip
        self.npages: int = ptr.npages
        # The preallocated result serves the creating thread; any other thread gets its own.
        self._res = ffi.new("up_place_result *")
        self._owner = threading.get_ident()

    @property
    def raw(self) -> Any:
        """The ``up_ledger *`` (for the data plane, which places through it)."""
        if self._l is None:
            raise ValueError("ledger is closed")
        return self._l

    def close(self) -> None:
        if self._l is not None:
            lib.up_ledger_free(self._l)
            self._l = None

    @property
    def digests(self) -> memoryview | None:
        """MINOR mode: XXH64 of each page as written through the page cache (0: not known),
        one u64 a page, writable (``up_ledger_digests``); a view of the ledger's own memory:
        do not keep it past ``close()``."""
        p = lib.up_ledger_digests(self.raw)
        if p == ffi.NULL:
            return None
        return memoryview(ffi.buffer(p, self.npages * 8)).cast("Q")

    def __del__(self) -> None:
        if getattr(self, "_l", None) is not None:
            self.close()

    # -- addressing and states ------------------------------------------------------------

    def _range(self, first: int, count: int) -> None:
        if first < 0 or count < 0 or first + count > self.npages:
            raise IndexError(f"pages {first}+{count} outside 0..{self.npages}")

    def index(self, addr: int) -> int:
        off = addr - self.base
        if not 0 <= off < self.size:
            raise LedgerError(f"address {addr:#x} outside {self.base:#x}+{self.size:#x}")
        return off // self.page_size

    def address(self, index: int) -> int:
        if not 0 <= index < self.npages:
            raise LedgerError(f"page {index} outside 0..{self.npages - 1}")
        return self.base + index * self.page_size

    def state(self, index: int) -> PageState:
        s = lib.up_ledger_get(self.raw, index) if index >= 0 else -1
        if s < 0:
            raise IndexError(f"page {index} outside 0..{self.npages - 1}")
        return PageState(s)

    def claim(self, index: int) -> int:
        """The page's state (a plain int); a MISSING or BACKGROUND page becomes REQUESTED, so
        the caller asks the source for it exactly once."""
        s = lib.up_ledger_claim(self.raw, index) if index >= 0 else -1
        if s < 0:
            raise IndexError(f"page {index} outside 0..{self.npages - 1}")
        return s

    def mark(self, first: int, count: int, to: PageState, *, only_from: Iterable[PageState]) -> int:
        """Pages of [first, first+count) in a state of ``only_from`` become ``to``; returns how
        many changed. A POISONED page never changes (POISONED is terminal; the C enforces it)."""
        self._range(first, count)
        return lib.up_ledger_mark(self.raw, first, count, _mask(only_from), int(to))

    def find(self, start: int, states: Iterable[PageState]) -> int:
        """The first page >= start in one of ``states``, or -1."""
        if start < 0:
            raise IndexError(f"start page {start} is negative")
        return lib.up_ledger_find(self.raw, start, _mask(states))

    def poisoned_in(self, first: int, last: int) -> list[int]:
        """Indices of the POISONED pages in [first, last) (counted first, so the search never
        runs past the last of them into the rest of a large region)."""
        mask = _mask((PageState.POISONED,))
        self._range(first, last - first)
        n = lib.up_ledger_count(self.raw, first, last - first, mask)
        out: list[int] = []
        idx = first
        while len(out) < n:
            idx = lib.up_ledger_find(self.raw, idx, mask)
            out.append(idx)
            idx += 1
        return out

    @property
    def counts(self) -> dict[PageState, int]:
        c = self.raw.counts
        return {s: c[s] for s in PageState}

    @property
    def refused_total(self) -> int:
        return self.raw.refused

    @property
    def raced_total(self) -> int:
        return self.raw.raced

    @property
    def complete(self) -> bool:
        """No page MISSING, REQUESTED or BACKGROUND."""
        c = self.raw.counts
        return c[PageState.MISSING] + c[PageState.REQUESTED] + c[PageState.BACKGROUND] == 0

    # -- placement ------------------------------------------------------------------------

    def _place(self, op: int, first: int, count: int, src: Any, flags: int) -> PlaceResult:
        r = self._res if threading.get_ident() == self._owner else ffi.new("up_place_result *")
        if src is not None and type(src) is not int:
            buf = ffi.from_buffer(src)
            if len(buf) < count * self.page_size:
                raise ValueError(f"source buffer of {len(buf)} bytes is short of {count} pages")
            src = ffi.cast("uint64_t", buf)
        try:
            rc = lib.up_ledger_place(self.raw, op, first, count, src or 0, flags, r)
        except (OverflowError, TypeError) as e:
            raise ValueError(f"bad placement pages {first!r}+{count!r}: {e}") from e
        result = PlaceResult(r.placed, r.already, r.refused, r.dropped, r.raced)
        if rc == 0:
            return result
        name = _OPNAMES[op]
        if rc == lib.UP_REFUSED_POISON:
            raise PoisonOverwriteRefused(name, first, count, r.stop, r.refused)
        if rc == -errno.EINVAL and r.stop < 0:
            raise LedgerError(f"{name} of pages {first}+{count}: outside 0..{self.npages}")
        stop = r.stop
        start = self.base + max(stop, first) * self.page_size
        err: UffdError = error_for(-rc, f"ledger {name}", start,
                                   (first + count - max(stop, first)) * self.page_size,
                                   r.progress)  # fmt: skip
        err.result = result  # type: ignore[attr-defined]
        err.stop_page = stop  # type: ignore[attr-defined]
        raise err

    @staticmethod
    def _flags(wake: bool, strict: bool) -> int:
        return (lib.UP_PLACE_WAKE if wake else 0) | (lib.UP_PLACE_STRICT if strict else 0)

    def copy(
        self, first: int, count: int, src: Any, *, wake: bool = True, strict: bool = True
    ) -> PlaceResult:
        """UFFDIO_COPY pages [first, first+count) from ``src`` (a buffer of count*page_size
        bytes, or an address)."""
        return self._place(lib.UP_OP_COPY, first, count, src, self._flags(wake, strict))

    def zero(
        self, first: int, count: int, *, wake: bool = True, strict: bool = True
    ) -> PlaceResult:
        return self._place(lib.UP_OP_ZERO, first, count, None, self._flags(wake, strict))

    def continue_(
        self, first: int, count: int, *, wake: bool = True, strict: bool = True
    ) -> PlaceResult:
        return self._place(lib.UP_OP_CONTINUE, first, count, None, self._flags(wake, strict))

    def poison(self, first: int, count: int, *, wake: bool = True) -> PlaceResult:
        """Place poison markers; PRESENT pages are skipped (``already``: data was there)."""
        result = self._place(lib.UP_OP_POISON, first, count, None, self._flags(wake, False))
        if result.already or result.raced:
            # not an error, but a guest may have consumed data the source calls poisoned
            log.info("poison of pages %d+%d: %d already there (data or our marker), %d raced",
                     first, count, result.already, result.raced)  # fmt: skip
        return result
