"""One destination session: a userfaultfd, its regions and their ledgers, one source.

Trio is the control plane, C the data plane (docs/DESIGN.md). The session handshakes with the
source (``SourceLink``), puts the handshake's poison list into the ledgers, then hands the
userfaultfd and both sockets to a ``DestPlane``, which owns them for the whole session:
fault → ledger → Request → reply → ledger → ioctl, and the source's push between faults, all in
C. The session reads the plane's notes and answers with instructions: a control frame judged
by the protocol (Done: go on; Error: fail), completion (release the source), a failure (stop).

Page state lives only in the ledgers (C arrays, one byte a page). The userfaultfd is never
closed here: closing it while the VMM runs would let the kernel zero-fill every unplaced page.
A failed session leaves its vCPUs blocked; nothing is guessed.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from typing import Any

import trio

from uffdpoison import protocol
from uffdpoison.control import notes, run_loop
from uffdpoison.destination.link import SourceLink
from uffdpoison.destination.regions import RegionMap
from uffdpoison.exgroups import leaf_of
from uffdpoison.kernel import Userfaultfd
from uffdpoison.kernel.ledger import Ledger, PageState
from uffdpoison.kernel.planes import DestPlane, DestRegion, Flag, Note, NoteKind
from uffdpoison.protocol import Channel

log = logging.getLogger(__name__)

StatusSink = Callable[[dict[str, Any]], None]

# Counters that are logged when they move (at most once a second each): what the data plane
# could only count.
_LOGGED = (
    ("unknown_address", logging.ERROR, "fault(s) in no region, woken unserved"),
    ("minor_faults", logging.ERROR, "MINOR fault(s): MINOR-mode sessions are not supported; "
     "those vCPUs stay blocked (register MISSING only)"),
    ("forks", logging.WARNING, "VMM fork(s); the child's memory is not served"),
    ("remaps", logging.ERROR, "VMM mremap(s) of guest memory; not supported, pages there will "
     "not be served"),
)  # fmt: skip


class SessionFailed(Exception):
    """The session cannot continue (source lost, source error, protocol violation)."""


class SessionEnded(Exception):
    """The VMM (the target mm) is gone: nothing more can be placed."""


class Session:
    """Serve one guest's faults from one source until cancelled."""

    def __init__(
        self,
        uffd: Userfaultfd,
        regions: RegionMap,
        link: SourceLink,
        *,
        hugetlb: bool = False,
        name: str = "session",
        status: StatusSink | None = None,
        request_timeout: float = 0.0,
    ) -> None:
        if link.info.page_size != regions.page_size:
            raise ValueError(
                f"source serves {link.info.page_size}-byte pages, regions use {regions.page_size}"
            )
        regions.check_within(link.info.memory_size)
        self.uffd = uffd
        self.regions = regions
        self.link = link
        self.name = name
        self.page_size = regions.page_size
        self._status = status or (lambda _d: None)
        self.ledgers = [Ledger(uffd, r.base, r.size, r.page_size, hugetlb=hugetlb) for r in regions]
        # Known poison goes into the ledgers here, before any byte from the source is read.
        self.plane = DestPlane(
            uffd.fileno(),
            self.page_size,
            link.info.memory_size,
            [
                DestRegion(r.base, r.size, r.offset, led)
                for r, led in zip(regions.regions, self.ledgers, strict=True)
            ],
            link.poison_offsets,
            request_timeout=request_timeout,
        )
        for ch in (Channel.URGENT, Channel.BULK):
            if ch is Channel.URGENT or link.bulk is not None:
                self.plane.attach(ch, link.stream(ch).fileno())
                link.stream(ch).conn.delegate_data()
        self.completed = trio.Event()
        self.failed: str | None = None
        self._progress = trio.lowlevel.ParkingLot()
        self._logged: dict[str, tuple[int, float]] = {}

    @classmethod
    async def connect(
        cls, uffd: Userfaultfd, regions: RegionMap, source: str, *, bulk: bool = True, **kw: Any
    ) -> Session:
        """Handshake with ``source`` (``HOST:PORT``) and set the session up; the link is
        closed again if that fails. ``bulk=False``: no push, pages come only when asked."""
        link = await SourceLink.connect(source, page_size=regions.page_size, bulk=bulk)
        try:
            return cls(uffd, regions, link, **kw)
        except BaseException:
            link.close()
            raise

    # -- lifecycle -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled. Raises ``SessionFailed`` if the source is lost or breaks the
        protocol, ``SessionEnded`` when the VMM's memory is gone; the ledgers and the
        userfaultfd stay as they are (the caller keeps the fd open while the VMM lives)."""
        self._emit(
            "session-started",
            regions=len(self.regions),
            pages=self.regions.total_pages,
            page_size=self.page_size,
            source=self.link.address,
            poisoned_at_source=self.link.info.poisoned_count,
        )
        try:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(run_loop, self.plane.run, self.plane.stop)
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

    def _emit(self, event: str, **fields: Any) -> None:
        self._status({"event": event, "session": self.name, **fields})

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
        """Every page is placed: tell the source (Done on BULK) and close both channels."""
        if self.link.bulk is not None:
            conn = self.link.bulk.conn
            if not conn.our_done and not conn.failed:
                self.plane.send(Channel.BULK, b"".join(conn.send(protocol.Done())))
            self.plane.close_channel(Channel.BULK)
        self.plane.close_channel(Channel.URGENT)

    def _failing(self, reason: str) -> None:
        """Known at once to every waiter (ensure_present raises it), before the nursery has
        unwound."""
        if self.failed is None:
            self.failed = reason
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
            self._judge(ch, self.plane.held(ch))
        elif kind is NoteKind.BAD_FRAME:
            raise SessionFailed(f"{where} broke the protocol on {Channel(ch).name}: {note.text}")
        elif kind in (NoteKind.EOF, NoteKind.SOCK_ERROR):
            if self.completed.is_set() and kind is NoteKind.EOF:
                return  # the source is no longer needed
            what = "closed the connection" if kind is NoteKind.EOF else note.describe()
            raise SessionFailed(f"{where} lost: {Channel(ch).name.lower()}: {what}")
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
                "%s: refused to place data over %d poisoned page(s) (last at guest offset %#x): "
                "poison is never overwritten",
                self.name,
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
                while rc == -errno.ENOTCONN and not (self.failed or self.completed.is_set()):
                    await self._progress.park()  # the source is gone: its note tells why
                if rc < 0 and not self.completed.is_set():
                    name = errno.errorcode.get(-rc, str(-rc))
                    raise SessionFailed(self.failed or f"cannot ask the source for pages: {name}")
            return await self._wait_placed(pending)
        finally:
            self.plane.notify(-1)

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
