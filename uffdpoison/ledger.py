"""The page ledger: per-region page states and every placement, in C.

Home of the never-un-poison invariant. The kernel refuses to place a poison marker over
anything but lets UFFDIO_COPY, UFFDIO_CONTINUE and shmem UFFDIO_ZEROPAGE replace one, so
every placement goes through one C function (csrc/ledger.c) that applies the page-state
table of docs/DESIGN.md and refuses data over POISONED pages before any ioctl.
"""

from __future__ import annotations

import enum
import errno
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from uffdpoison.kernel import UffdError, Userfaultfd, pagestates
from uffdpoison.kernel.errors import error_for
from uffdpoison.kernel.pagestates import PageStates


class PageState(enum.IntEnum):
    MISSING = pagestates.MISSING
    REQUESTED = pagestates.REQUESTED
    BACKGROUND = pagestates.BACKGROUND
    PRESENT = pagestates.PRESENT
    POISONED = pagestates.POISONED
    REMOVED = pagestates.REMOVED


@dataclass(slots=True)
class PlaceResult:
    """Pages of one call: placed by our ioctl, skipped as already there (PRESENT, or a
    POISONED page whose marker is still there), refused (POISONED), dropped (REMOVED:
    stale data), raced (the kernel said EEXIST on a page we thought empty)."""

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


_COPY = pagestates.OP_COPY
_ZERO = pagestates.OP_ZERO
_CONT = pagestates.OP_CONTINUE
_POISON = pagestates.OP_POISON
_WAKE = pagestates.FLAG_WAKE
_STRICT = pagestates.FLAG_STRICT
_REFUSED = pagestates.REFUSED_POISON
log = logging.getLogger(__name__)
_OPNAMES = {_COPY: "copy", _ZERO: "zero", _CONT: "continue", _POISON: "poison"}


class Ledger:
    """Page states of one registered region [base, base+size) served through ``uffd``.

    Placement methods return a ``PlaceResult``. On a kernel error they raise the matching
    ``UffdError`` (``EventPending`` for a pending non-cooperative event: read events, then
    retry) with ``.result`` (a PlaceResult of what was done, all recorded) and
    ``.stop_page`` (the page index that stopped the call) attached.
    """

    __slots__ = ("_owner", "_ps", "_res", "base", "hugetlb", "npages", "page_size", "size", "uffd")

    def __init__(
        self,
        uffd: Userfaultfd,
        base: int,
        size: int,
        page_size: int,
        *,
        hugetlb: bool = False,
    ) -> None:
        if page_size <= 0 or page_size & (page_size - 1):
            raise LedgerError(f"page size {page_size:#x} is not a power of two")
        if base % page_size or size % page_size:
            raise LedgerError(
                f"region {base:#x}+{size:#x} is not aligned to the page size {page_size:#x}"
            )
        self.uffd = uffd
        self.base = base
        self.size = size
        self.page_size = page_size
        self.hugetlb = hugetlb
        self._ps = PageStates(uffd.fileno(), base, size, page_size, hugetlb)
        self.npages = self._ps.npages
        self._res = self._ps.result
        # The preallocated result serves the creating thread; a call from any other thread (the
        # ledger is thread-safe in C) gets a result of its own.
        self._owner = threading.get_ident()

    def close(self) -> None:
        self._ps.close()

    @property
    def page_states(self) -> PageStates:
        """The C array under this ledger (for the demand engine, which places through it)."""
        return self._ps

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- addressing -------------------------------------------------------------------------

    def index(self, addr: int) -> int:
        off = addr - self.base
        if not 0 <= off < self.size:
            raise LedgerError(f"address {addr:#x} outside {self.base:#x}+{self.size:#x}")
        return off // self.page_size

    def address(self, index: int) -> int:
        if not 0 <= index < self.npages:
            raise LedgerError(f"page {index} outside 0..{self.npages - 1}")
        return self.base + index * self.page_size

    # -- states -----------------------------------------------------------------------------

    def state(self, index: int) -> PageState:
        return PageState(self._ps.get(index))

    def claim(self, index: int) -> int:
        """The demand-fault fast path: returns the page's state (a plain int, compare with
        ``PageState``); a MISSING or BACKGROUND page becomes REQUESTED, so the caller asks the
        source for it exactly once."""
        return self._ps.claim(index)

    def mark(self, first: int, count: int, to: PageState, *, only_from: Iterable[PageState]) -> int:
        """Pages of [first, first+count) in a state of ``only_from`` become ``to``; returns how
        many changed. A POISONED page never changes (POISONED is terminal; the C enforces it)."""
        return self._ps.mark(first, count, _mask(only_from), int(to))

    def find(self, start: int, states: Iterable[PageState]) -> int:
        return self._ps.find(start, _mask(states))

    def poisoned_in(self, first: int, last: int) -> list[int]:
        """Indices of the POISONED pages in [first, last) (counted first, so the search never
        runs past the last of them into the rest of a large region)."""
        mask = _mask((PageState.POISONED,))
        n = self._ps.count(first, last - first, mask)
        out: list[int] = []
        idx = first
        while len(out) < n:
            idx = self._ps.find(idx, mask)
            out.append(idx)
            idx += 1
        return out

    @property
    def counts(self) -> dict[PageState, int]:
        c = self._ps.raw.counts
        return {s: c[s] for s in PageState}

    @property
    def refused_total(self) -> int:
        return self._ps.raw.refused

    @property
    def raced_total(self) -> int:
        return self._ps.raw.raced

    @property
    def already_total(self) -> int:
        return self._ps.raw.already

    @property
    def dropped_total(self) -> int:
        return self._ps.raw.dropped

    @property
    def complete(self) -> bool:
        """No page MISSING, REQUESTED or BACKGROUND."""
        c = self._ps.raw.counts
        return c[0] + c[1] + c[2] == 0

    # -- placement (hot path) ---------------------------------------------------------------

    def _result(self) -> Any:
        return self._res if threading.get_ident() == self._owner else self._ps.new_result()

    def _outcome(self, r: Any, rc: int, op: int, first: int, count: int) -> PlaceResult:
        result = PlaceResult(r.placed, r.already, r.refused, r.dropped, r.raced)
        if rc == 0:
            return result
        if rc == _REFUSED:
            raise PoisonOverwriteRefused(_OPNAMES[op], first, count, r.stop, r.refused)
        stop = r.stop
        if rc == -errno.EINVAL and stop < 0:
            raise LedgerError(
                f"{_OPNAMES[op]} of pages {first}+{count}: outside 0..{self.npages} or no source"
            )
        start = self.base + (stop if stop >= 0 else first) * self.page_size
        err: UffdError = error_for(
            -rc,
            f"ledger {_OPNAMES[op]}",
            start,
            (first + count - max(stop, first)) * self.page_size,
            r.progress,
        )
        err.result = result  # type: ignore[attr-defined]
        err.stop_page = stop  # type: ignore[attr-defined]
        raise err

    def copy(
        self, first: int, count: int, src: Any, *, wake: bool = True, strict: bool = True
    ) -> PlaceResult:
        """UFFDIO_COPY pages [first, first+count) from ``src`` (a buffer of count*page_size
        bytes, or an address)."""
        flags = (_WAKE if wake else 0) | (_STRICT if strict else 0)
        r = self._result()
        if type(src) is int:
            rc = self._ps.place(_COPY, first, count, src, flags, r)
        else:
            rc = self._ps.place_buffer(_COPY, first, count, src, flags, r)
        if rc == 0:
            return PlaceResult(r.placed, r.already, r.refused, r.dropped, r.raced)
        return self._outcome(r, rc, _COPY, first, count)

    def zero(
        self, first: int, count: int, *, wake: bool = True, strict: bool = True
    ) -> PlaceResult:
        flags = (_WAKE if wake else 0) | (_STRICT if strict else 0)
        r = self._result()
        rc = self._ps.place(_ZERO, first, count, 0, flags, r)
        return self._outcome(r, rc, _ZERO, first, count)

    def continue_(
        self, first: int, count: int, *, wake: bool = True, strict: bool = True
    ) -> PlaceResult:
        flags = (_WAKE if wake else 0) | (_STRICT if strict else 0)
        r = self._result()
        rc = self._ps.place(_CONT, first, count, 0, flags, r)
        return self._outcome(r, rc, _CONT, first, count)

    def poison(self, first: int, count: int, *, wake: bool = True) -> PlaceResult:
        """Place poison markers; PRESENT pages are skipped (``already``: data was there)."""
        r = self._result()
        rc = self._ps.place(_POISON, first, count, 0, _WAKE if wake else 0, r)
        result = self._outcome(r, rc, _POISON, first, count)
        if result.already or result.raced:
            # not an error, but a guest may have consumed data the source calls poisoned
            log.info(
                "poison of pages %d+%d: %d already there (data or our marker), %d raced",
                first,
                count,
                result.already,
                result.raced,
            )
        return result
