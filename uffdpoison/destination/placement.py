"""Turning the source's answers into placements: reply → ledger → ioctl.

Every byte placed in guest memory goes through a ``Ledger``; this module only maps guest offsets
to (region, page) and decides how to react to what the kernel said. It places the bulk push, the
handshake's poison list and, on the Python demand path, demand replies; the C demand engine
(csrc/demand.c) places its replies itself with the same rules, through the same C ledgers.
Nothing here decides to place data over a poisoned page: the ledger refuses that, and a refusal
is counted and logged.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields

import trio

from uffdpoison import protocol
from uffdpoison.destination.regions import RegionMap
from uffdpoison.kernel import errors as kerrors
from uffdpoison.ledger import Ledger, PlaceResult
from uffdpoison.protocol import PageKind

log = logging.getLogger(__name__)

# A bulk frame is placed in chunks this size so that a demand reply waits behind at most one
# chunk (64 x 4 KiB COPY is ~55 µs here; KERNEL-FACTS).
BULK_CHUNK_BYTES = 64 * 4096


def chunk_pages(page_size: int) -> int:
    """Pages in one placement chunk: BULK_CHUNK_BYTES, or one huge page."""
    return max(1, BULK_CHUNK_BYTES // page_size)


# How long a placement waits for the event reader to drain a pending non-cooperative event.
_EVENT_PENDING_BACKOFF = (0.0, 0.0, 0.0001, 0.0005, 0.002)


# A placement that met a pending event: (ledger, kind, first page, pages, data).
Deferred = tuple[Ledger, PageKind, int, int, "memoryview | None"]


class SessionEnded(Exception):
    """The VMM (the target mm) is gone: nothing more can be placed."""


@dataclass(slots=True)
class Stats:
    faults: int = 0
    minor_faults: int = 0
    demand_requests: int = 0
    coalesced: int = 0
    woken_present: int = 0
    repoisoned: int = 0
    zero_after_remove: int = 0
    unknown_address: int = 0
    removes: int = 0
    copied: int = 0
    zeroed: int = 0
    poisoned: int = 0
    continued: int = 0
    clean: int = 0
    bulk_pages: int = 0
    refused: int = 0
    dropped: int = 0
    raced: int = 0
    already: int = 0
    retries: int = 0
    range_gone: int = 0
    forks: int = 0
    remaps: int = 0
    replies: int = 0  # demand reply frames placed by the demand engine
    unsent: int = 0  # pages the engine could not ask for (socket released or failed)
    pushes: int = 0  # bulk push frames placed by the demand engine

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def add(self, counts: Mapping[str, int]) -> None:
        """Add a counter set of the same names (the demand engine's); an unknown name is an
        error, never dropped."""
        for name, n in counts.items():
            setattr(self, name, getattr(self, name) + n)


class Placer:
    """Applies ``Pages`` events to the ledgers of one session."""

    def __init__(
        self,
        regions: RegionMap,
        ledgers: Sequence[Ledger],
        stats: Stats,
        on_progress: Callable[[], None],
    ) -> None:
        self.regions = regions
        self.ledgers = ledgers
        self.stats = stats
        self.page_size = regions.page_size
        self._on_progress = on_progress

    def _count(self, res: PlaceResult, kind: PageKind) -> None:
        s = self.stats
        if kind is PageKind.DATA:
            s.copied += res.placed
        elif kind is PageKind.ZERO:
            s.zeroed += res.placed
        elif kind is PageKind.POISONED:
            s.poisoned += res.placed
        else:
            s.continued += res.placed
        s.already += res.already
        s.dropped += res.dropped
        s.raced += res.raced
        if res.refused:
            s.refused += res.refused
            log.error(
                "refused to place %s over %d poisoned page(s): poison is never overwritten",
                kind.name,
                res.refused,
            )

    def _place_one(
        self, led: Ledger, kind: PageKind, first: int, n: int, data: memoryview | None
    ) -> PlaceResult:
        if kind is PageKind.DATA:
            return led.copy(first, n, data, strict=False)
        if kind is PageKind.ZERO:
            return led.zero(first, n, strict=False)
        if kind is PageKind.POISONED:
            return led.poison(first, n)
        return led.continue_(first, n, strict=False)

    def _parts(
        self, ev: protocol.Pages, chunk: int
    ) -> Iterator[tuple[Ledger, int, int, memoryview | None]]:
        """(ledger, first page, pages, payload part) for every region a run covers, in pieces
        of at most ``chunk`` pages (0: one piece a region)."""
        ps = self.page_size
        data = ev.data
        for i, delta, length in self.regions.split_offsets(ev.offset, ev.count * ps):
            led = self.ledgers[i]
            first, total = delta // ps, length // ps
            base = self.regions.regions[i].offset + delta - ev.offset  # this part in the payload
            step = chunk or total
            for done in range(0, total, step):
                n = min(step, total - done)
                part = data[base + done * ps : base + (done + n) * ps] if data is not None else None
                yield led, first + done, n, part

    async def place(self, ev: protocol.Pages, *, chunk: int = 0) -> None:
        """Place a pushed run (may wait): ``chunk`` > 0 splits it, yielding between pieces so a
        demand reply never waits behind more than one."""
        kind = ev.kind
        if kind is PageKind.CLEAN:
            self.stats.clean += ev.count
        for k, (led, first, n, part) in enumerate(self._parts(ev, chunk)):
            if k:
                await trio.lowlevel.checkpoint()
            if not self.place_now(led, kind, first, n, part):
                await self._retry_until_placed(led, kind, first, n, part)
        self._on_progress()

    def place_sync(self, ev: protocol.Pages) -> list[Deferred]:
        """Place a demand reply without ever waiting (for the task that also reads the
        userfaultfd: it must not wait for itself). Parts that met a pending non-cooperative
        event are returned, to be retried by a task that may wait."""
        kind = ev.kind
        if kind is PageKind.CLEAN:
            self.stats.clean += ev.count
        deferred: list[Deferred] = [
            (led, kind, first, n, part)
            for led, first, n, part in self._parts(ev, 0)
            if not self.place_now(led, kind, first, n, part)
        ]
        self._on_progress()
        return deferred

    async def place_deferred(self, item: Deferred) -> None:
        await self._retry_until_placed(*item)
        self._on_progress()

    async def _retry_until_placed(
        self, led: Ledger, kind: PageKind, first: int, n: int, data: memoryview | None
    ) -> None:
        """After ``place_now`` met a pending event: back off while the event reader reads it,
        then try again. Pages placed before the event are in the ledger; a retry skips them."""
        for attempt in itertools.count():
            self.stats.retries += 1
            await trio.sleep(_EVENT_PENDING_BACKOFF[min(attempt, len(_EVENT_PENDING_BACKOFF) - 1)])
            if self.place_now(led, kind, first, n, data):
                return

    def place_now(
        self, led: Ledger, kind: PageKind, first: int, n: int, data: memoryview | None = None
    ) -> bool:
        """Place without waiting. False when a non-cooperative event is pending (retry after
        it is read); the other kernel outcomes are final and handled here."""
        try:
            res = self._place_one(led, kind, first, n, data)
        except kerrors.EventPending:
            return False
        except kerrors.RangeGone as e:
            # The VMM unregistered or unmapped the range: nothing to place any more.
            self.stats.range_gone += n
            log.warning(
                "dropping %d page(s) at %#x: range no longer registered (%s)",
                n,
                led.address(first),
                e,
            )
            return True
        except kerrors.TargetGone as e:
            raise SessionEnded(f"guest memory is gone: {e}") from e
        self._count(res, kind)
        return True

    async def place_known_poison(self, offsets: memoryview) -> int:
        """Poison, before the guest touches them, the pages the handshake listed."""
        ps = self.page_size
        placed = 0
        for k, off in enumerate(offsets):
            i = self.regions.by_offset(off)
            if i < 0:
                continue
            led, first = self.ledgers[i], (off - self.regions.regions[i].offset) // ps
            if not self.place_now(led, PageKind.POISONED, first, 1):
                await self._retry_until_placed(led, PageKind.POISONED, first, 1, None)
            placed += 1
            if k % 256 == 255:
                await trio.lowlevel.checkpoint()
        self._on_progress()
        return placed
