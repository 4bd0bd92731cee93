"""One destination session: a userfaultfd, its regions, their ledgers, one source.

Data flows one way: fault → ledger → request → reply → ledger → ioctl. The demand path (the
userfaultfd and the URGENT connection) runs in one of two ways:

* by default in C: the **demand engine** (csrc/demand.c) runs on a worker thread and is the
  only reader of the userfaultfd and the only user of the URGENT socket while it runs; Python
  hears from it through an eventfd only when someone waits for progress (``ensure_present``),
  when the session becomes complete, or when there is something to log. A frame the engine
  does not take (not the exact fast encoding, an Error, EOF) hands the URGENT channel back to
  Python, seeded with the engine's outstanding requests, and the Python loop goes on;
* in Python (``engine=False``, or after such a hand-over): one task drains the userfaultfd and
  places urgent replies, never waiting on the source or on a placement.

The source's background push (BULK): with the engine, the engine reads and places it between
faults, in 64 KiB slices, and hands BULK back to Python's **bulk reader** at the first frame
that is not a push in the fixed encoding (Done, Error, EOF...); without it, the bulk reader
places it all, in small chunks. Both go through the same ledgers (thread-safe in C).

Page state lives only in the ledgers (C arrays, one byte a page).

The userfaultfd is never closed while the session's VMM may still run: closing it would let the
kernel zero-fill every page not yet placed, silently. A failed session leaves its vCPUs blocked.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import trio

from uffdpoison import protocol
from uffdpoison.destination.client import SourceClient
from uffdpoison.destination.placement import Deferred, Placer, SessionEnded, Stats, chunk_pages
from uffdpoison.destination.regions import RegionMap
from uffdpoison.kernel import (
    DemandEngine,
    DemandRegion,
    EventBatch,
    EventKind,
    RunResult,
    Userfaultfd,
)
from uffdpoison.kernel.demand import BulkState
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
# The demand engine by default; UFFDPOISON_DEMAND=python selects the Python loop.
_DEFAULT_ENGINE = os.environ.get("UFFDPOISON_DEMAND", "c") != "python"


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
        engine: bool | None = None,
    ) -> None:
        """``engine``: serve demand faults with the C demand engine (default, unless
        ``UFFDPOISON_DEMAND=python``) or with the Python loop (False)."""
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
        self._py_stats = Stats()  # what Python placed and saw; the engine counts its own
        self.ledgers = [Ledger(uffd, r.base, r.size, r.page_size, hugetlb=hugetlb) for r in regions]
        self._status = status or (lambda _d: None)
        self.placer = Placer(regions, self.ledgers, self._py_stats, self._check_complete)
        self.use_engine = _DEFAULT_ENGINE if engine is None else engine
        self._engine: DemandEngine | None = None
        self._engine_live = False  # the engine owns the userfaultfd and the URGENT socket
        self._bulk_in_engine = False  # BULK was attached to the engine and not taken back
        self._bulk_back = trio.Event()  # the engine let go of BULK (or returned)
        self._logged: dict[str, int] = {}
        self._last_fault = 0  # address of the latest fault the Python loop only counted
        self._logged_at: dict[str, float] = {}
        self.completed = trio.Event()
        self.failed: str | None = None
        self._progress = trio.lowlevel.ParkingLot()
        self._retry: deque[Deferred] = deque()
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
            if self.use_engine:
                self._start_engine()
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._demand)
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
            self._progress.unpark_all()  # ensure_present waiters raise it
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
        if self._client_closed:
            return
        self._client_closed = True
        if self._engine_live and self._engine is not None:
            # The engine is using the URGENT socket: shut it down under it (the source sees
            # EOF, the engine stops using it); the fd is closed once the engine has returned.
            self._engine.release_socket()  # shuts BULK down too, if the engine reads it
            if self.client.bulk is not None and not self._bulk_in_engine:
                self.client.bulk.close()
        else:
            self.client.close()

    def close(self) -> None:
        """Free the engine and the ledgers. Only once the VMM is gone (see module doc)."""
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        for led in self.ledgers:
            led.close()

    @property
    def stats(self) -> Stats:
        """Python's counters plus the demand engine's (same names)."""
        if self._engine is None:
            return self._py_stats
        merged = Stats(**self._py_stats.as_dict())
        merged.add(self._engine.stats())
        return merged

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

    async def _demand(self) -> None:
        if self.use_engine:
            await self._run_engine()
        await self._demand_loop()

    def _start_engine(self) -> None:
        """Made before the session reports started, so ``ensure_present`` and every request
        go through the engine from the first one (its table of outstanding requests must
        know them all)."""
        self._engine = DemandEngine(
            self.uffd.fileno(),
            self.client.urgent.sock.fileno(),
            self.page_size,
            self.client.info.memory_size,
            self.client.next_id,
            [
                DemandRegion(r.base, r.size, r.offset, led.page_states)
                for r, led in zip(self.regions.regions, self.ledgers, strict=True)
            ],
        )
        self._engine_live = True

    async def _run_engine(self) -> None:
        """Serve demand faults in C until cancelled; returns only to hand the demand path
        back to Python (see the module doc)."""
        eng = self._engine
        assert eng is not None and self._engine_live
        # The worker thread serves faults with the affinity of the session's thread (a pinned
        # handler stays pinned; trio's cached worker threads may have been made elsewhere).
        affinity = os.sched_getaffinity(0)

        def serve() -> RunResult:
            before = os.sched_getaffinity(0)
            if before != affinity:
                os.sched_setaffinity(0, affinity)
            try:
                return eng.run()
            finally:
                if before != affinity:
                    os.sched_setaffinity(0, before)

        async def stopper() -> None:
            try:
                await trio.sleep_forever()
            finally:
                eng.stop()  # run() returns STOPPED; run_sync (not abandoned) then returns

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stopper)
                nursery.start_soon(self._engine_progress, eng)
                # a limiter of its own: the thread is held for the whole session, and the
                # default limiter (40) would cap how many sessions a daemon can serve
                result = await trio.to_thread.run_sync(serve, limiter=trio.CapacityLimiter(1))
                nursery.cancel_scope.cancel()
        finally:
            self._engine_live = False
            self._log_counters()
            if self._client_closed:
                self.client.close()  # deferred by _close_client
        await self._hand_over(eng, result)

    async def _engine_progress(self, eng: DemandEngine) -> None:
        fd = eng.progress_fd
        while True:
            await trio.lowlevel.wait_readable(fd)
            with contextlib.suppress(BlockingIOError):
                os.read(fd, 8)
            self._log_counters()
            if self._bulk_in_engine and eng.bulk_state is BulkState.RETURNED:
                self._bulk_back.set()
                if self._client_closed and self.client.bulk is not None:
                    self.client.bulk.close()  # deferred by _close_client
            self._check_complete()

    def _log_counters(self) -> None:
        """Log faults and events served only by counting them (either demand path counts;
        this logs): at most one line a second each, since a fault woken unserved faults
        again at once."""
        st = self.stats.as_dict()
        last = self._last_fault or (self._engine.last_fault if self._engine is not None else 0)
        seen = self._logged
        for key, level, what in (
            ("unknown_address", logging.ERROR, "fault(s) in no region, woken unserved"),
            ("minor_faults", logging.ERROR, "MINOR fault(s): MINOR-mode sessions are not "
             "supported; those vCPUs stay blocked (register MISSING only)"),
            ("forks", logging.WARNING, "VMM fork(s); the child's memory is not served"),
            ("remaps", logging.ERROR, "VMM mremap(s) of guest memory; not supported, pages "
             "there will not be served"),
        ):  # fmt: skip
            n = st[key]
            now = time.monotonic()
            if n > seen.get(key, 0) and now - self._logged_at.get(key, -2.0) >= 1.0:
                log.log(level, "%s: %d %s (last at %#x)", self.name, n, what, last)
                seen[key] = n
                self._logged_at[key] = now

    async def _hand_over(self, eng: DemandEngine, result: RunResult) -> None:
        """The engine returned: the URGENT channel comes back to Python's Connection, which
        learns the engine's outstanding requests and judges the bytes the engine did not
        take (a valid generic encoding goes on; an Error, EOF or violation fails the session
        in the Python loop, as it always has). BULK goes back to the bulk reader too."""
        if self._bulk_in_engine:
            self._bulk_back.set()
        if result is RunResult.TARGET_GONE:
            raise SessionEnded(f"guest memory is gone: {os.strerror(eng.last_errno)}")
        if result in (RunResult.PLACE_ERROR, RunResult.UFFD_ERROR, RunResult.NOMEM):
            err = eng.last_errno
            raise SessionFailed(
                f"demand engine: {result.name.lower()}: {os.strerror(err) if err else ''}"
            )
        if result is RunResult.SOCK_ERROR and not self._client_closed:
            err = eng.last_errno
            raise SessionFailed(f"source {self.client.address} lost: {os.strerror(err)}")
        urgent = self.client.urgent
        leftover, unsent = eng.leftover(), eng.unsent()
        out = eng.outstanding()
        self.client.next_id = eng.next_id
        if not self._client_closed:
            try:
                urgent.conn.adopt_outstanding(out)
                if leftover:
                    urgent.conn.receive_data(leftover)
                if result is RunResult.EOF:
                    urgent.conn.receive_data(b"")
            except protocol.ProtocolError as e:
                raise SessionFailed(f"source {self.client.address}: {e}") from None
            try:
                # Queued, not awaited: a request posted after this (ensure_present, on the
                # Python path from now on) must follow it, never cut into it.
                urgent.post_encoded(unsent)
            except ConnectionLost as e:
                raise SessionFailed(f"source {self.client.address} lost: {e}") from None
        log.info(
            "%s: demand engine handed over to Python (%s, %d request(s) outstanding, %d byte(s)"
            " unparsed)",
            self.name,
            result.name,
            len(out),
            len(leftover),
        )

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
        watching = not self._client_closed  # after a hand-over the socket may be gone
        spins = 0
        try:
            if watching:
                ep.register(sfd, select.EPOLLIN)
                # frames already buffered (handed over by the engine) make no fd readable
                while (reply := self._urgent_nowait(urgent)) is not None:
                    self._on_reply(reply)
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
                                self._py_stats.forks += 1  # the child's memory is not served
                                os.close(ev.fork_fd)
                            elif kind == _REMAP:
                                self._py_stats.remaps += 1
                        if n:
                            self._log_counters()
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
        stats = self._py_stats
        stats.faults += 1
        ps = self.page_size
        page_addr = addr & ~(ps - 1)
        i = self.regions.by_address(addr)
        if i < 0:
            stats.unknown_address += 1  # logged by _log_counters, at most once a second
            self._last_fault = addr
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
            self._last_fault = addr
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
            self._py_stats.demand_requests += 1
            self.client.request(self.regions.regions[i].offset + idx * self.page_size, 1)
        elif state == _REMOVED:
            self._py_stats.zero_after_remove += 1
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
                await self.placer.place_deferred(self._retry.popleft())

    def _on_remove(self, start: int, end: int, *, unmap: bool) -> None:
        """The guest discarded [start, end): it reads as zeros from now on, except poisoned
        pages, which stay poisoned and are re-poisoned on their next fault."""
        self._py_stats.removes += 1
        for i, first, last in self.regions.split_pages(start, end):
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
        chunk = chunk_pages(self.page_size)
        eng = self._engine if self._engine_live else None
        if eng is not None:
            # What the handshake's reads already took is placed here, up to a frame boundary;
            # from there the engine reads the push, between faults, until a frame it does not
            # take (Done, Error, another encoding) or EOF hands BULK back (docs/DESIGN.md).
            while (ev := await t.receive_to_boundary()) is not None:
                if await self._on_bulk(ev, chunk):
                    return
            if self._engine_live and not self._client_closed:
                eng.attach_bulk(t.sock.fileno())
                self._bulk_in_engine = True
                await self._bulk_back.wait()
                await self._take_bulk_back(eng, t)
        while True:
            if await self._on_bulk(await t.receive(), chunk):
                return

    async def _on_bulk(self, ev: protocol.Event, chunk: int) -> bool:
        """One event from BULK; True once the push is over (Done)."""
        if isinstance(ev, protocol.Pages):
            self._py_stats.bulk_pages += ev.count
            await self.placer.place(ev, chunk=chunk)
        elif isinstance(ev, protocol.Done):
            self._check_complete()
            if not self.completed.is_set():
                counts = self.page_counts()
                log.info("%s: source offered every page; waiting on %s", self.name, counts)
            return True
        elif isinstance(ev, protocol.Error):
            raise SessionFailed(f"source error on the bulk channel: {ev.code}: {ev.message}")
        return False

    async def _take_bulk_back(self, eng: DemandEngine, t: FrameTransport) -> None:
        """The engine let go of BULK (or returned): its Connection goes on from the bytes the
        engine did not take."""
        while (rc := eng.detach_bulk()) == -errno.EAGAIN:
            await trio.sleep(0.0005)  # a pending event: the demand path reads it
        if rc > 0:
            if rc == RunResult.TARGET_GONE:
                raise SessionEnded(f"guest memory is gone: {os.strerror(eng.last_errno)}")
            raise SessionFailed(
                f"demand engine: bulk: {RunResult(rc).name.lower()}: {os.strerror(eng.last_errno)}"
            )
        if rc < 0:
            raise SessionFailed(f"demand engine: bulk: {os.strerror(-rc)}")
        leftover, eof = eng.bulk_leftover()
        self._bulk_in_engine = False
        try:
            if leftover:
                t.conn.receive_data(leftover)
            if eof:
                t.conn.receive_data(b"")
        except protocol.ProtocolError as e:
            raise SessionFailed(f"source {self.client.address}: {e}") from None
        log.info(
            "%s: BULK handed back to Python (%d push page(s) placed by the engine, %d byte(s)"
            " unparsed%s)",
            self.name,
            eng.stats()["bulk_pages"],
            len(leftover),
            ", then EOF" if eof else "",
        )

    # -- for embedders ---------------------------------------------------------------------

    async def ensure_present(self, addr: int, length: int) -> list[int]:
        """Fault in [addr, addr+length) on the VMM's behalf; returns poisoned page addresses
        (never read those). Safe to call from Python: nothing here touches guest memory."""
        eng = self._engine if self._engine_live else None
        if eng is not None:
            eng.notify(1)  # before requesting: a placement then always signals progress
        try:
            pending = list(self.regions.split_pages(addr, addr + length))
            for i, first, last in pending:
                await self._request_range(i, first, last - first)
            return await self._wait_placed(pending)
        finally:
            if eng is not None:
                eng.notify(-1)

    async def _request_range(self, i: int, first: int, count: int) -> None:
        """Ask for pages [first, first+count) of region i: through the engine while it owns
        the URGENT socket (its table must know every request), else on the Python path. The
        engine may hand the socket back while this waits out a pending event."""
        run = chunk_pages(self.page_size)  # ensure_present asks in runs of one bulk chunk
        while (eng := self._engine if self._engine_live else None) is not None:
            rc = eng.request(i, first, count, run)
            if rc == -errno.EAGAIN:
                await trio.sleep(0.0005)  # a pending event: the engine reads it
                continue
            if rc == -errno.ESRCH:
                raise SessionEnded("guest memory is gone")
            if rc < 0:
                # no socket any more (the session failed or completed) or a send failed
                raise SessionFailed(
                    self.failed or f"source {self.client.address} lost: {os.strerror(-rc)}"
                )
            return
        led = self.ledgers[i]
        for idx in range(first, first + count):
            self._request_or_zero(i, led, idx)

    async def _wait_placed(self, pending: list[tuple[int, int, int]]) -> list[int]:
        unplaced = (PageState.MISSING, PageState.REQUESTED, PageState.BACKGROUND, PageState.REMOVED)
        poisoned: list[int] = []
        for i, first, last in pending:
            led = self.ledgers[i]
            idx = first
            while True:
                if self.failed:
                    raise SessionFailed(self.failed)
                idx = led.find(idx, unplaced)  # pages before idx were placed already
                if idx < 0 or idx >= last:
                    break
                await self._progress.park()
            poisoned.extend(led.address(k) for k in led.poisoned_in(first, last))
        return poisoned
