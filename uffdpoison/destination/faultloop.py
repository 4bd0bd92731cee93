"""One destination session: a userfaultfd, its regions, their ledgers, one source.

Data flows one way: fault → ledger → request → reply → ledger → ioctl. Three tasks:

* the **event reader** drains the userfaultfd in batches and never waits on the source or on a
  placement (a pending non-cooperative event makes every placement EAGAIN until it is read);
* the **urgent reader** places demand replies;
* the **bulk reader** places the source's background push in small chunks.

Page state lives only in the ledgers (C arrays, one byte a page).

The userfaultfd is never closed while the session's VMM may still run: closing it would let the
kernel zero-fill every page not yet placed, silently. A failed session leaves its vCPUs blocked.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import select
from collections.abc import Callable
from typing import Any

import trio

from uffdpoison import protocol
from uffdpoison.destination.client import SourceClient
from uffdpoison.destination.placement import Deferred, Placer, SessionEnded, Stats
from uffdpoison.destination.regions import RegionMap
from uffdpoison.kernel import EventBatch, EventKind, Userfaultfd
from uffdpoison.ledger import Ledger, PageState
from uffdpoison.protocol import PageKind
from uffdpoison.transport import ConnectionLost, FrameTransport
from uffdpoison.trioutil import leaf_of

log = logging.getLogger(__name__)

_FLAG_MINOR = 1 << 2
_MISSING = int(PageState.MISSING)
_REQUESTED = int(PageState.REQUESTED)
_BACKGROUND = int(PageState.BACKGROUND)
_PRESENT = int(PageState.PRESENT)
_POISONED = int(PageState.POISONED)
_REMOVED = int(PageState.REMOVED)
_PAGEFAULT = int(EventKind.PAGEFAULT)
_REMOVE = int(EventKind.REMOVE)
_UNMAP = int(EventKind.UNMAP)
_FORK = int(EventKind.FORK)
_REMAP = int(EventKind.REMAP)


class SessionFailed(Exception):
    """The session cannot continue (source lost, source error, protocol violation)."""


StatusSink = Callable[[dict[str, Any]], None]


class Session:
    """Serve one guest's faults from one source until cancelled."""

    def __init__(
        self,
        uffd: Userfaultfd,
        regions: RegionMap,
        client: SourceClient,
        *,
        hugetlb: bool = False,
        name: str = "session",
        status: StatusSink | None = None,
    ) -> None:
        client_ps = client.info.page_size
        if client_ps != regions.page_size:
            raise ValueError(
                f"source serves {client_ps}-byte pages, regions use {regions.page_size}"
            )
        regions.check_within(client.info.memory_size)
        self.uffd = uffd
        self.regions = regions
        self.client = client
        self.name = name
        self.page_size = regions.page_size
        self.stats = Stats()
        self.ledgers = [Ledger(uffd, r.base, r.size, r.page_size, hugetlb=hugetlb) for r in regions]
        self._status = status or (lambda _d: None)
        self.placer = Placer(regions, self.ledgers, self.stats, self._check_complete)
        self.completed = trio.Event()
        self.failed: str | None = None
        self._progress = trio.lowlevel.ParkingLot()
        self._retry: list[Deferred] = []
        self._retry_wakeup = trio.Event()
        self._client_closed = False

    # -- lifecycle -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled. Raises ``SessionFailed`` if the source is lost; the ledgers and
        the userfaultfd stay as they are (the caller keeps the fd open while the VMM lives)."""
        self._emit(
            "session-started",
            regions=len(self.regions),
            pages=self.regions.total_pages,
            page_size=self.page_size,
            source=self.client.address,
            poisoned_at_source=self.client.info.poisoned_count,
        )
        try:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._demand_loop)
                    nursery.start_soon(self._retry_loop)
                    nursery.start_soon(self._source_tasks)
                    task_status.started()
            except BaseExceptionGroup as group:
                reason = leaf_of(group, (SessionEnded, SessionFailed))
                if reason is None:
                    raise
                raise reason from None
        except SessionEnded as e:
            self._emit("session-ended", reason=str(e), placed=self.stats.as_dict())
        except SessionFailed as e:
            self.failed = str(e)
            log.error("%s: FAILED: %s (vCPUs stay blocked; no page is guessed)", self.name, e)
            self._emit(
                "session-failed",
                reason=str(e),
                pages=self.page_counts(),
                placed=self.stats.as_dict(),
            )
            raise
        finally:
            self._close_client()

    async def _source_tasks(self) -> None:
        """Everything that talks to the source; returns once the session is complete."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.client.urgent.run_writer)
                if self.client.bulk is not None:
                    nursery.start_soon(self._bulk_reader)
                poison = self.client.welcome.poison_list
                if poison is not None and len(poison):
                    offsets = poison.cast("B").cast("Q")
                    n = await self.placer.place_known_poison(offsets)
                    log.info("%s: poisoned %d page(s) known at handshake", self.name, n)
                self._check_complete()
                await self.completed.wait()
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            lost = leaf_of(group, (ConnectionLost, protocol.ProtocolError))
            if lost is None:
                raise
            if self.completed.is_set():
                return
            raise SessionFailed(f"source {self.client.address} lost: {lost}") from None
        finally:
            self._close_client()

    def _close_client(self) -> None:
        if not self._client_closed:
            self._client_closed = True
            self.client.close()

    def close(self) -> None:
        """Free the ledgers. Only once the VMM is gone (see module doc)."""
        for led in self.ledgers:
            led.close()

    def _emit(self, event: str, **fields: Any) -> None:
        self._status({"event": event, "session": self.name, **fields})

    def _check_complete(self) -> None:
        self._progress.unpark_all()
        if self.completed.is_set():
            return
        if all(led.complete for led in self.ledgers):
            self.completed.set()
            counts = self.page_counts()
            log.info("%s: complete: %s", self.name, counts)
            self._emit("session-completed", pages=counts, placed=self.stats.as_dict())

    def page_counts(self) -> dict[str, int]:
        total: dict[str, int] = {s.name.lower(): 0 for s in PageState}
        for led in self.ledgers:
            for state, n in led.counts.items():
                total[state.name.lower()] += n
        return total

    # -- the userfaultfd side --------------------------------------------------------------

    async def _demand_loop(self) -> None:
        """The demand path in one task: userfaultfd events and urgent replies.

        Both fds sit in an epoll set of our own, so one trio wait covers both and a fault and
        its reply are handled without a task hop. Nothing here waits on the network or on a
        placement: a reply part that meets a pending event goes to the retry task.
        """
        uffd = self.uffd
        batch = EventBatch(64)
        raw = batch.raw
        urgent = self.client.urgent
        ufd, sfd = uffd.fileno(), urgent.sock.fileno()
        ep = select.epoll()
        ep.register(ufd, select.EPOLLIN)
        ep.register(sfd, select.EPOLLIN)
        watching = True
        spins = 0
        try:
            while True:
                if watching and self._client_closed:
                    # Completed (or failed): the socket is closed; stop watching it.
                    with contextlib.suppress(OSError):
                        ep.unregister(sfd)
                    watching = False
                # One epoll_wait(0) says which fd is ready: no EAGAIN reads on the other.
                ready = ep.poll(0)
                if not ready:
                    spins = 0
                    await trio.lowlevel.wait_readable(ep.fileno())
                    continue
                for fd, _ in ready:
                    if fd == ufd:
                        n = uffd.read_events(batch)
                        for k in range(n):
                            ev = raw[k]
                            kind = ev.kind
                            if kind == _PAGEFAULT:
                                self._on_fault(ev.address, ev.flags)
                            elif kind in (_REMOVE, _UNMAP):
                                self._on_remove(ev.start, ev.end, unmap=kind == _UNMAP)
                            elif kind == _FORK:
                                log.warning(
                                    "%s: VMM forked; the child's memory is not served", self.name
                                )
                                os.close(ev.fork_fd)
                            elif kind == _REMAP:
                                log.error(
                                    "%s: VMM moved guest memory (mremap); not supported, "
                                    "pages there will not be served",
                                    self.name,
                                )
                    elif watching and not self._client_closed:
                        while (reply := self._urgent_nowait(urgent)) is not None:
                            self._on_reply(reply)
                spins += 1
                if spins >= 16:
                    spins = 0
                    await trio.lowlevel.checkpoint()  # fairness under a flood of faults
        finally:
            trio.lowlevel.notify_closing(ep.fileno())
            ep.close()

    def _urgent_nowait(self, urgent: FrameTransport) -> protocol.Event | None:
        try:
            return urgent.receive_nowait()
        except (ConnectionLost, protocol.ProtocolError) as e:
            if self.completed.is_set() or self._client_closed:
                return None
            raise SessionFailed(f"source {self.client.address} lost: {e}") from None

    def _on_reply(self, ev: protocol.Event) -> None:
        if isinstance(ev, protocol.Pages):
            deferred = self.placer.place_sync(ev)
            if deferred:
                self._retry.extend(deferred)
                self._retry_wakeup.set()
        elif isinstance(ev, protocol.Error):
            raise SessionFailed(f"source error for request {ev.id}: {ev.code}: {ev.message}")
        else:
            raise SessionFailed(f"unexpected {type(ev).__name__} on the urgent channel")

    def _on_fault(self, addr: int, flags: int) -> None:
        stats = self.stats
        stats.faults += 1
        ps = self.page_size
        page_addr = addr & ~(ps - 1)
        i = self.regions.by_address(addr)
        if i < 0:
            stats.unknown_address += 1
            log.error("%s: fault at %#x is in no region; waking it unserved", self.name, addr)
            self.uffd.wake(page_addr, ps)
            return
        led = self.ledgers[i]
        idx = (page_addr - led.base) // ps
        if flags & _FLAG_MINOR:
            # The page cache holds a copy, but whether it is current (or poisoned at the
            # source) needs the MINOR-mode exchange (digests, CLEAN, CONTINUE), which this
            # session does not speak yet. COPY cannot resolve a MINOR fault and CONTINUE would
            # map a copy nobody checked: leave the vCPU blocked rather than guess.
            stats.minor_faults += 1
            if stats.minor_faults == 1:
                log.error(
                    "%s: MINOR fault at %#x: MINOR-mode sessions are not supported; the "
                    "vCPU stays blocked (register MISSING only)",
                    self.name,
                    addr,
                )
            return
        state = self._request_or_zero(i, led, idx)
        if state == _REQUESTED:
            stats.coalesced += 1
        elif state == _PRESENT:
            # Placed by the background stream between the fault and now.
            stats.woken_present += 1
            self.uffd.wake(page_addr, ps)
        elif state == _POISONED:
            # The marker was discarded (MADV_DONTNEED & co) but the page stays poisoned.
            stats.repoisoned += 1
            self._place_local(led, PageKind.POISONED, idx)

    def _request_or_zero(self, i: int, led: Ledger, idx: int) -> int:
        """A page someone needs now (a fault, ``ensure_present``): ask the source for it once
        (never making it wait behind the bulk push), or zero it if the guest discarded it.
        Returns the state it was in."""
        state = led.claim(idx)  # MISSING/BACKGROUND become REQUESTED
        if state in (_MISSING, _BACKGROUND):
            self.stats.demand_requests += 1
            self.client.request(self.regions.regions[i].offset + idx * self.page_size, 1)
        elif state == _REMOVED:
            self.stats.zero_after_remove += 1
            self._place_local(led, PageKind.ZERO, idx)
        return state

    def _place_local(self, led: Ledger, kind: PageKind, idx: int) -> None:
        if not self.placer.place_now(led, kind, idx, 1):
            self._retry.append((led, kind, idx, 1, None))
            self._retry_wakeup.set()

    async def _retry_loop(self) -> None:
        """Local placements that met a pending event: retried after the reader has read it."""
        while True:
            await self._retry_wakeup.wait()
            self._retry_wakeup = trio.Event()
            while self._retry:
                await self.placer.place_deferred(self._retry.pop(0))

    def _on_remove(self, start: int, end: int, *, unmap: bool) -> None:
        """The guest discarded [start, end): it reads as zeros from now on, except poisoned
        pages, which stay poisoned and are re-poisoned on their next fault."""
        self.stats.removes += 1
        ps = self.page_size
        for i, r in enumerate(self.regions.regions):
            lo = max(start, r.base)
            hi = min(end, r.end)
            if lo >= hi:
                continue
            first = (lo - r.base) // ps
            last = math.ceil((hi - r.base) / ps)
            self.ledgers[i].mark(
                first,
                last - first,
                PageState.REMOVED,
                only_from=(
                    PageState.MISSING,
                    PageState.REQUESTED,
                    PageState.BACKGROUND,
                    PageState.PRESENT,
                ),
            )
        self._check_complete()

    # -- the source side -------------------------------------------------------------------

    async def _bulk_reader(self) -> None:
        t = self.client.bulk
        assert t is not None
        chunk = _bulk_chunk(self.page_size)
        while True:
            ev = await t.receive()
            if isinstance(ev, protocol.Pages):
                self.stats.bulk_pages += ev.count
                await self.placer.place(ev, chunk=chunk)
            elif isinstance(ev, protocol.Done):
                self._check_complete()
                if not self.completed.is_set():
                    counts = self.page_counts()
                    log.info("%s: source offered every page; waiting on %s", self.name, counts)
                return
            elif isinstance(ev, protocol.Error):
                raise SessionFailed(f"source error on the bulk channel: {ev.code}: {ev.message}")

    # -- for embedders ---------------------------------------------------------------------

    async def ensure_present(self, addr: int, length: int) -> list[int]:
        """Fault in [addr, addr+length) on the VMM's behalf; returns poisoned page addresses
        (never read those). Safe to call from Python: nothing here touches guest memory."""
        ps = self.page_size
        end = addr + length
        addr &= ~(ps - 1)
        pending: list[tuple[int, int, int]] = []
        for i, r in enumerate(self.regions.regions):
            lo, hi = max(addr, r.base), min(end, r.end)
            if lo >= hi:
                continue
            first, last = (lo - r.base) // ps, math.ceil((hi - r.base) / ps)
            led = self.ledgers[i]
            for idx in range(first, last):
                self._request_or_zero(i, led, idx)
            pending.append((i, first, last))
        poisoned: list[int] = []
        for i, first, last in pending:
            led = self.ledgers[i]
            while True:
                if self.failed:
                    raise SessionFailed(self.failed)
                idx = led.find(
                    first,
                    (
                        PageState.MISSING,
                        PageState.REQUESTED,
                        PageState.BACKGROUND,
                        PageState.REMOVED,
                    ),
                )
                if idx < 0 or idx >= last:
                    break
                await self._progress.park()
            poisoned.extend(
                led.address(idx) for idx in range(first, last) if led.state(idx) == _POISONED
            )
        return poisoned


def _bulk_chunk(page_size: int) -> int:
    return max(1, (64 * 4096) // page_size) if page_size <= 4096 else 1
