"""One destination session: a userfaultfd, its regions and their ledgers, one source.

Trio is the control plane, C the data plane (docs/DESIGN.md). The session handshakes with the
source (``SourceLink``), puts the handshake's poison list into the ledgers, then hands the
userfaultfd and both sockets to a ``DestPlane``, which owns them for the whole session:
fault → ledger → Request → reply → ledger → ioctl, and the source's push between faults, all in
C. The session reads the plane's notes and answers with instructions: a control frame judged
by the protocol (Done: go on; Error: fail), completion (release the source), a failure (stop).

A lost source pauses the session (active → paused → recovering → active, QEMU's postcopy
model): the plane lets go of both sockets and keeps serving what needs no source, its vCPUs
wait, the session reconnects with backoff and resumes (the source is told what is held, the
plane re-sends what was unanswered) or, past the deadline, fails with ``SourceLost``.

Page state lives only in the ledgers (C arrays, one byte a page; in a state file when the
daemon keeps one). The userfaultfd is never closed here: closing it while the VMM runs would
let the kernel zero-fill every unplaced page. A failed session leaves its vCPUs blocked;
nothing is guessed.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import trio

from uffdpoison import protocol
from uffdpoison.auth import Token
from uffdpoison.control import notes, run_loop
from uffdpoison.destination.link import SourceLink, SourceUnavailable
from uffdpoison.destination.regions import RegionMap
from uffdpoison.exgroups import leaf_of
from uffdpoison.kernel import Userfaultfd
from uffdpoison.kernel.ledger import Ledger, PageState
from uffdpoison.kernel.planes import DestPlane, DestRegion, Flag, Note, NoteKind, have
from uffdpoison.kernel.tls import TlsContext
from uffdpoison.metrics import DestSample
from uffdpoison.protocol import Channel
from uffdpoison.transport import tcp_rtt

log = logging.getLogger(__name__)

StatusSink = Callable[[dict[str, Any]], None]

REQUEST_TIMEOUT = 10.0  # a demand request unanswered this long: the source is taken as lost
RESUME_DEADLINE = 120.0  # a paused session that cannot resume this long fails
BACKOFF = (0.05, 0.5)  # reconnect delays: first, most (doubling in between)
CONFIRM_BYTES = 4 << 20  # MINOR mode: cached pages confirmed at a time in the background
_UNPLACED = (PageState.MISSING, PageState.REQUESTED, PageState.BACKGROUND, PageState.REMOVED)
# Fatal Errors from a source that may well come back (the session pauses for them).
_RESUMABLE = frozenset({"shutdown", "busy"})

# Counters that are logged when they move (at most once a second each): what the data plane
# could only count.
_LOGGED = (
    ("unknown_address", logging.ERROR, "fault(s) in no region, woken unserved"),
    ("minor_unservable", logging.ERROR, "MINOR fault(s) in a region handed over without its "
     "memory file; those vCPUs stay blocked (hand over the file, or register MISSING only)"),
    ("forks", logging.WARNING, "VMM fork(s); the child's memory is not served"),
    ("remaps", logging.ERROR, "VMM mremap(s) of guest memory; not supported, pages there will "
     "not be served"),
)  # fmt: skip


class SessionFailed(Exception):
    """The session cannot continue (source error, protocol violation, local failure)."""


class SourceLost(SessionFailed):
    """The source was lost and did not come back within the resume deadline."""


class SessionEnded(Exception):
    """The VMM (the target mm) is gone: nothing more can be placed."""


class Session:
    """Serve one guest's faults from one source until cancelled."""

    def __init__(
        self,
        uffd: Userfaultfd | None,
        regions: RegionMap,
        link: SourceLink,
        *,
        ledgers: Sequence[Ledger] | None = None,
        hugetlb: bool = False,
        name: str = "session",
        status: StatusSink | None = None,
        request_timeout: float = REQUEST_TIMEOUT,
        resume_deadline: float = RESUME_DEADLINE,
        resumed: bool = False,
        token: Token | None = None,
        tls: TlsContext | None = None,
        confirm: bool = False,
        epoch: bytes | None = None,
    ) -> None:
        """``ledgers``: the regions' (made here if None); ``resumed``: they were kept by an
        earlier owner of this userfaultfd, whose unserved faults are woken to fault anew.
        ``confirm`` (MINOR mode): the background confirms the cached pages (``_confirm``)."""
        if link.info.page_size != regions.page_size:
            raise ValueError(
                f"source serves {link.info.page_size}-byte pages, regions use {regions.page_size}"
            )
        regions.check_within(link.info.memory_size)
        self.uffd = uffd
        self.regions = regions
        self.link = link
        self.source = link.address  # where a lost source is looked for (set_source changes it)
        self.name = name
        self.page_size = regions.page_size
        self.resume_deadline = resume_deadline
        self.resumed = resumed
        self.token, self.tls = token, tls  # a reconnection authenticates and encrypts too
        self.confirm = confirm
        # asked for again on reconnecting (vouched only by the same source process); a precopy
        # keeps the epoch its first source started
        self.epoch = link.info.epoch if epoch == b"" else epoch
        self._status = status or (lambda _d: None)
        self.ledgers = list(ledgers) if ledgers is not None else _ledgers(uffd, regions, hugetlb)
        self._dest_regions = _dest_regions(regions, self.ledgers)
        # Known poison goes into the ledgers here, before any byte from the source is read.
        self.plane = DestPlane(
            -1 if uffd is None else uffd.fileno(),
            self.page_size,
            link.info.memory_size,
            self._dest_regions,
            link.poison_offsets,
            request_timeout=request_timeout,
        )
        self._attached: set[Channel] = set()
        self._bulk = link.bulk is not None  # a push was asked for (asked again on resuming)
        self._attach(link)
        if resumed and uffd is not None:
            for r in regions:  # faults the earlier owner read unserved: they fault again
                uffd.wake(r.base, r.size)
        self.state = "active"  # → paused → recovering → active; complete; failed
        self.pauses = 0
        self.completed = trio.Event()
        self.failed: str | None = None
        self._detached = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._recovery: trio.CancelScope | None = None
        # The resume deadline runs from the first pause until a resumed source places a page:
        # a source that accepts and drops us again and again still fails at the deadline.
        self._lost_since: float | None = None
        self._placed_at_resume = 0
        self._progress = trio.lowlevel.ParkingLot()
        self._logged: dict[str, tuple[int, float]] = {}

    @classmethod
    async def connect(
        cls,
        uffd: Userfaultfd | None,
        regions: RegionMap,
        source: str,
        *,
        bulk: bool = True,
        hugetlb: bool = False,
        state_fds: Sequence[int] | None = None,
        resumed: bool = False,
        poisoned: Sequence[int] = (),
        token: Token | None = None,
        tls: TlsContext | None = None,
        memory_file: int | None = None,
        epoch: bytes | None = None,
        digests: Sequence[bytes | memoryview] | None = None,
        **kw: Any,
    ) -> Session:
        """Handshake with ``source`` (``HOST:PORT``) and set the session up; the link is
        closed again if that fails. ``bulk=False``: no push, pages come only when asked.
        ``state_fds``: a state file per region for the ledgers (``resumed``: adopted from an
        earlier owner, and the source is told what they hold). ``poisoned``: host addresses
        known to hold poison markers already (POISONED before anything is placed).
        ``memory_file``: MINOR mode (regions registered MISSING|MINOR over this shmem or
        hugetlbfs file, each at its offset in it): a cached page is confirmed, not fetched;
        ``uffd`` None: a precopy, the push written into the file. ``epoch``: the source's
        precopy epoch (b"": start one); ``digests``: a precopy's, per region (``Precopy``)."""
        ledgers = _ledgers(uffd, regions, hugetlb, state_fds, memory_file)
        serving = uffd is not None
        try:
            for addr in poisoned:
                i, first, _ = next(regions.split_pages(addr, addr + 1))
                ledgers[i].mark(first, 1, PageState.POISONED, only_from=_UNPLACED)
            for led, known in zip(ledgers, digests or (), strict=False):
                view, kept = led.digests, memoryview(known).cast("B")
                if view is None:
                    continue
                if kept.nbytes != 8 * led.npages:
                    raise ValueError(
                        f"a precopy's digests cover {kept.nbytes // 8} pages, the "
                        f"region at {led.base:#x} has {led.npages}: not its precopy"
                    )
                view[:] = kept.cast("Q")
            held = partial(have, _dest_regions(regions, ledgers), regions.page_size)
            link = await SourceLink.connect(
                source, page_size=regions.page_size,
                bulk=bulk and (memory_file is None or not serving),  # MINOR: confirm instead
                have=held if resumed else None, token=token, tls=tls, epoch=epoch,
            )  # fmt: skip
            try:
                return cls(
                    uffd,
                    regions,
                    link,
                    ledgers=ledgers,
                    resumed=resumed,
                    token=token,
                    tls=tls,
                    confirm=bulk and memory_file is not None and serving,
                    epoch=epoch,
                    **kw,
                )
            except BaseException:
                link.close()
                raise
        except BaseException:
            for led in ledgers:
                led.close()
            raise

    def _attach(self, link: SourceLink) -> None:
        """Give the link's sockets to the data plane (at a frame boundary, just handshaken)."""
        for ch in (Channel.URGENT, Channel.BULK):
            if ch is Channel.URGENT or link.bulk is not None:
                stream = link.stream(ch)
                stream.conn.delegate_data()
                self.plane.attach(ch, stream.fileno(), stream.tls)
                self._attached.add(ch)

    # -- lifecycle -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled. A lost source pauses and resumes; raises ``SourceLost`` past
        the resume deadline, ``SessionFailed`` if the source breaks the protocol or reports a
        fatal error, ``SessionEnded`` when the VMM's memory is gone. The ledgers and the
        userfaultfd stay as they are (the caller keeps the fd open while the VMM lives)."""
        self._emit(
            "session-started",
            regions=len(self.regions),
            pages=self.regions.total_pages,
            page_size=self.page_size,
            source=self.link.address,
            poisoned_at_source=self.link.info.poisoned_count,
            resumed=self.resumed,
            pages_held=self.regions.total_pages - self.page_counts()["missing"],
        )
        try:
            try:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(run_loop, self.plane.run, self.plane.stop)
                    if self.confirm:
                        nursery.start_soon(self._confirm)
                    task_status.started()
                    async for flags, got in notes(self.plane.notes_fd, self.plane.take_notes):
                        self._on_flags(flags)
                        for note in got:
                            self._on_note(note)
            except BaseExceptionGroup as group:
                reason = leaf_of(group, (SessionEnded, SessionFailed))
                if reason is None:
                    raise
                raise reason from None
        except SessionEnded as e:
            self._emit("session-ended", reason=str(e), placed=self.stats)
            raise
        except SessionFailed as e:
            self._failing(str(e))
            log.error("%s: FAILED: %s (vCPUs stay blocked; no page is guessed)", self.name, e)
            self._emit("session-failed", reason=str(e), pages=self.page_counts(), placed=self.stats)
            raise
        finally:
            self._nursery = None
            self._log_counters()

    def close(self) -> None:
        """Free the data plane and the ledgers, close the source's sockets. Only once the
        VMM is gone (see the module doc)."""
        self.plane.close()
        self.link.close()
        for led in self.ledgers:
            led.close()

    @property
    def stats(self) -> dict[str, int]:
        return self.plane.stats()

    def page_counts(self) -> dict[str, int]:
        total = {s.name.lower(): 0 for s in PageState}
        for led in self.ledgers:
            for state, n in led.counts.items():
                total[state.name.lower()] += n
        return total

    def sample(self) -> DestSample:
        """What a scrape or ``status`` shows of this session, read now (C counters and
        histograms copied out). ValueError once the session is closed."""
        timing = self.plane.timing()  # first: it raises once closed, before the ledgers are read
        connected = self.state in ("active", "complete") and Channel.URGENT in self._attached
        return DestSample(
            self.name, self.state, self.page_counts(), self.stats, timing, self.pauses,
            self.plane.outstanding, tcp_rtt(self.link.urgent.sock) if connected else None,
        )  # fmt: skip

    def _emit(self, event: str, **fields: Any) -> None:
        self._status({"event": event, "session": self.name, **fields})

    # -- a lost source ---------------------------------------------------------------------

    def _pause(self, why: str) -> None:
        """The source is gone: vCPUs wait, the plane lets go of its sockets, we look for it."""
        if self.state != "active" or self._nursery is None:
            return
        self.state = "paused"
        self.pauses += 1
        log.warning("%s: paused: %s (vCPUs wait for pages; nothing is guessed)", self.name, why)
        self._emit("session-paused", reason=why, source=self.source)
        self._detached = trio.Event()
        for ch in self._attached:
            self.plane.close_channel(ch)
        self._nursery.start_soon(self._recover, why)

    def _placed(self) -> int:
        st = self.stats
        return st["copied"] + st["zeroed"] + st["poisoned"] + st["continued"]

    async def _recover(self, why: str) -> None:
        t0 = time.monotonic()
        if self._lost_since is None or self._placed() > self._placed_at_resume:
            self._lost_since = t0
        with trio.CancelScope() as self._recovery:
            await self._detached.wait()  # the plane let go: the old sockets are ours to close
            self.link.close()
            self.state = "recovering"
            link = await self._reconnect(why, self._lost_since)
            self._placed_at_resume = self._placed()
            self.link = link
            self._attach(link)
            self.state = "active"
            paused = time.monotonic() - t0
            log.warning("%s: resumed from %s after %.3f s", self.name, link.address, paused)
            self._emit("session-resumed", source=link.address, paused_s=round(paused, 6))
        self._recovery = None

    async def _reconnect(self, why: str, t0: float) -> SourceLink:
        delay, attempt = BACKOFF[0], 0
        held = partial(have, self._dest_regions, self.page_size)
        with trio.move_on_after(max(0.0, t0 + self.resume_deadline - time.monotonic())):
            while True:
                attempt += 1
                try:
                    link = await SourceLink.connect(
                        self.source, page_size=self.page_size, bulk=self._bulk,
                        have=held, token=self.token, tls=self.tls, epoch=self.epoch,
                    )  # fmt: skip
                except SourceUnavailable as e:
                    if attempt == 1 or attempt % 20 == 0:
                        log.info("%s: source not back yet (attempt %d): %s", self.name, attempt, e)
                    await trio.sleep(delay)
                    delay = min(delay * 2, BACKOFF[1])
                    continue
                if link.info.memory_size != self.link.info.memory_size:
                    link.close()
                    raise SessionFailed(
                        f"source {link.address} serves {link.info.memory_size} bytes of guest "
                        f"memory, not this guest's {self.link.info.memory_size}"
                    )
                return link
        raise SourceLost(
            f"source {self.source} lost ({why}) and not back within {self.resume_deadline:g} s"
        )

    def set_source(self, address: str) -> None:
        """Where to look for the source from now on (a replacement after a loss)."""
        self.source = address

    # -- what the data plane tells ---------------------------------------------------------

    def _on_flags(self, flags: Flag) -> None:
        if flags & Flag.LOG:
            self._log_counters()
        if flags & Flag.COMPLETE and not self.completed.is_set():
            self.completed.set()
            counts = self.page_counts()
            log.info("%s: complete: %s", self.name, counts)
            self._emit("session-completed", pages=counts, placed=self.stats)
            self._release_source()
        if flags & (Flag.PROGRESS | Flag.COMPLETE):
            self._progress.unpark_all()

    def _release_source(self) -> None:
        """Every page is placed: tell the source (Done on BULK) and close both channels; a
        pause in progress ends, there is nothing left to ask for."""
        if self._recovery is not None:
            self._recovery.cancel()
        if self.state == "active" and Channel.BULK in self._attached:
            conn = self.link.stream(Channel.BULK).conn
            if not conn.our_done and not conn.failed:
                self.plane.send(Channel.BULK, b"".join(conn.send(protocol.Done())))
        self.state = "complete"
        for ch in self._attached:
            self.plane.close_channel(ch)

    def _failing(self, reason: str) -> None:
        """Known at once to every waiter (ensure_present raises it), before the nursery has
        unwound."""
        if self.failed is None:
            self.failed = reason
            self.state = "failed"
        self._progress.unpark_all()

    def _on_note(self, note: Note) -> None:
        try:
            self._on_one_note(note)
        except SessionFailed as e:
            self._failing(str(e))
            raise

    def _on_one_note(self, note: Note) -> None:
        kind, ch = note.kind, note.channel
        where = f"source {self.link.address}"
        if kind is NoteKind.CONTROL:
            frame = self.plane.held(ch)
            if frame and self.state == "active":  # else the channel was let go meanwhile
                self._judge(ch, frame)
        elif kind is NoteKind.DETACHED:
            self._attached.discard(Channel(ch))
            if not self._attached:
                self._detached.set()
        elif kind is NoteKind.BAD_FRAME:
            raise SessionFailed(f"{where} broke the protocol on {Channel(ch).name}: {note.text}")
        elif kind in (NoteKind.EOF, NoteKind.SOCK_ERROR):
            if self.state == "active":
                what = "closed the connection" if kind is NoteKind.EOF else note.describe()
                self._pause(f"{where} lost: {Channel(ch).name.lower()}: {what}")
        elif kind is NoteKind.TARGET_GONE:
            raise SessionEnded(f"guest memory is gone: {note.describe()}")
        else:
            raise SessionFailed(f"data plane: {note.describe()}")

    def _judge(self, ch: int, frame: bytes) -> None:
        """A control frame the data plane held: the protocol's verdict."""
        conn = self.link.stream(ch).conn
        try:
            conn.receive_data(frame)
            ev = conn.next_event()
        except protocol.ProtocolError as e:
            raise SessionFailed(f"source {self.link.address} broke the protocol: {e}") from None
        if isinstance(ev, protocol.Done):
            if not self.completed.is_set():
                log.info("%s: source offered every page; waiting on %s", self.name,
                         self.page_counts())  # fmt: skip
            self.plane.release(ch)
        elif isinstance(ev, protocol.Error) and ev.id is None and ev.code in _RESUMABLE:
            self._pause(f"source {self.link.address}: {ev.code}: {ev.message}")
        elif isinstance(ev, protocol.Error):
            what = f"request {ev.id}" if ev.id is not None else Channel(ch).name.lower()
            raise SessionFailed(f"source error ({what}): {ev.code}: {ev.message}")
        else:  # pragma: no cover - the protocol allows nothing else here
            raise SessionFailed(f"unexpected {type(ev).__name__} from the source")

    def _log_counters(self) -> None:
        """Log what the data plane could only count: at most one line a second each (a fault
        woken unserved faults again at once)."""
        st = self.stats
        now = time.monotonic()
        for key, level, what in _LOGGED:
            seen, at = self._logged.get(key, (0, -2.0))
            if st[key] > seen and now - at >= 1.0:
                log.log(level, "%s: %d %s (last at %#x)", self.name, st[key], what,
                        st["last_fault"])  # fmt: skip
                self._logged[key] = (st[key], now)
        seen, at = self._logged.get("refused", (0, -2.0))
        if st["refused"] > seen and now - at >= 1.0:
            log.error(
                "%s: protocol violation: source %s sent data for %d page(s) poisoned here (last "
                "at guest offset %#x): refused, poison is never overwritten",
                self.name,
                self.link.address,
                st["refused"] - seen,
                st["last_refused"],
            )
            self._logged["refused"] = (st["refused"], now)

    # -- for embedders ---------------------------------------------------------------------

    async def ensure_present(self, addr: int, length: int) -> list[int]:
        """Fault in [addr, addr+length) on the VMM's behalf; returns the poisoned page
        addresses (never read those). Safe from Python: nothing here touches guest memory."""
        self.plane.notify(1)  # before requesting: a placement then always raises PROGRESS
        try:
            pending = list(self.regions.split_pages(addr, addr + length))
            for i, first, last in pending:
                while (rc := self.plane.request(i, first, last - first)) == -errno.EAGAIN:
                    await trio.sleep(0.0005)  # a pending event: the data plane reads it
                if rc < 0 and not self.completed.is_set():
                    name = errno.errorcode.get(-rc, str(-rc))
                    raise SessionFailed(self.failed or f"cannot ask the source for pages: {name}")
            return await self._wait_placed(pending)
        finally:
            self.plane.notify(-1)

    async def _confirm(self) -> None:
        """MINOR mode's background, instead of a push: the cached pages nobody touched yet are
        confirmed with the source, CONFIRM_BYTES at a time (their digests, hashed off the
        event loop: CLEAN maps a page as cached, a changed one arrives as DATA), until every
        page is resident. Only what changed crosses the wire; a fault waits behind at most
        one chunk's replies."""
        chunk = max(1, CONFIRM_BYTES // self.page_size)
        self.plane.notify(1)
        try:
            for i, led in enumerate(self.ledgers):
                for first in range(0, led.npages, chunk):
                    n = min(chunk, led.npages - first)
                    ask = partial(self.plane.request, i, first, n, digests=True)
                    while (rc := await trio.to_thread.run_sync(ask)) == -errno.EAGAIN:
                        await trio.sleep(0.0005)
                    if rc < 0:
                        name = errno.errorcode.get(-rc, str(-rc))
                        raise SessionFailed(f"cannot ask the source to confirm pages: {name}")
                    await self._wait_placed([(i, first, first + n)])
        finally:
            self.plane.notify(-1)

    async def _wait_placed(self, pending: list[tuple[int, int, int]]) -> list[int]:
        poisoned: list[int] = []
        for i, first, last in pending:
            led = self.ledgers[i]
            idx = first
            while True:
                if self.failed:
                    raise SessionFailed(self.failed)
                idx = led.find(idx, _UNPLACED)  # pages before idx were placed already
                if idx < 0 or idx >= last:
                    break
                await self._progress.park()
            poisoned.extend(led.address(k) for k in led.poisoned_in(first, last))
        return poisoned


def _dest_regions(regions: RegionMap, ledgers: Sequence[Ledger]) -> list[DestRegion]:
    return [
        DestRegion(r.base, r.size, r.offset, led) for r, led in zip(regions, ledgers, strict=True)
    ]


def _ledgers(
    uffd: Userfaultfd | None,
    regions: RegionMap,
    hugetlb: bool,
    state_fds: Sequence[int] | None = None,
    memory_file: int | None = None,
) -> list[Ledger]:
    """``memory_file``: MINOR mode, every region's pages are that file's at its offset."""
    fds = state_fds or [-1] * len(regions)
    out: list[Ledger] = []
    try:
        for r, fd in zip(regions, fds, strict=True):
            mf = None if memory_file is None else (memory_file, r.offset)
            out.append(Ledger(uffd, r.base, r.size, r.page_size, hugetlb=hugetlb, state_fd=fd,
                              memory_file=mf))  # fmt: skip
    except BaseException:
        for led in out:
            led.close()
        raise
    return out


@asynccontextmanager
async def serving(session: Session) -> AsyncIterator[trio.Nursery]:
    """``session`` running in a nursery of its own for the block (cancelled after it); a
    failure comes out as the ``SessionFailed`` (or ``SourceLost``) itself, not in a group."""
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(session.run)
            yield nursery
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        failed = leaf_of(group, SessionFailed)
        if failed is None:
            raise
        raise failed from None
