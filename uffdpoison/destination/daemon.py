"""The destination daemon: VMMs hand it their userfaultfd (``handoff``), it serves each from
the one source until the VMM process is gone.

It starts in any order with its source: it listens at once, looks for the source with backoff,
and a handoff that arrives first waits (its vCPUs blocked, never zero-filled). Each VMM is
isolated: a malformed handoff or a failed session is logged and reported on the status stream
and never disturbs the other VMMs. With a state directory each session's ledgers outlive the
daemon: a restarted daemon resumes a VMM that hands its userfaultfd over again
(``state``, docs/RELIABILITY.md). Cancelling ``serve`` (SIGTERM) stops every session, keeps
their state, and leaves each VMM holding its userfaultfd.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Sequence
from typing import Any

import trio

from uffdpoison.auth import Token
from uffdpoison.destination.admin import serve_control
from uffdpoison.destination.handoff import (
    HANDOFF_TIMEOUT,
    HandoffError,
    Peer,
    check_memory_file,
    peer_credentials,
    prepare_socket,
    receive_handoff,
    refuse,
    wait_process_gone,
)
from uffdpoison.destination.link import SourceInfo, SourceUnavailable, probe
from uffdpoison.destination.precopy import MemoryFile, PrecopyFile
from uffdpoison.destination.regions import RegionError, RegionMap, parse_firecracker_regions
from uffdpoison.destination.session import (
    BACKOFF,
    REQUEST_TIMEOUT,
    RESUME_DEADLINE,
    Session,
    SessionFailed,
    SourceLost,
    StatusSink,
)
from uffdpoison.destination.state import SessionState, sweep
from uffdpoison.kernel import Feature, Userfaultfd, errors as kerrors, pagemap
from uffdpoison.kernel.tls import TlsContext
from uffdpoison.metrics import (
    DestCollector,
    DestSnapshot,
    from_any_thread,
    http_endpoint,
    registry_of,
)
from uffdpoison.transport import accept_patiently

log = logging.getLogger(__name__)

SOURCE_LOG_EVERY = 30.0  # seconds between "still waiting for the source" lines
MAX_HANDOFFS = 64  # handoffs being received at once: a connection counts until its fd arrived
MAX_SESSIONS = 1024


class HandoffDaemon:
    def __init__(
        self,
        path: str,
        source: str,
        *,
        allow_uids: Sequence[int] = (),
        mode: int | None = None,
        owner: tuple[int, int] | None = None,
        status: StatusSink | None = None,
        handoff_timeout: float = HANDOFF_TIMEOUT,
        state_dir: str | None = None,
        control: str | None = None,
        resume_deadline: float = RESUME_DEADLINE,
        request_timeout: float = REQUEST_TIMEOUT,
        token: Token | None = None,
        tls: TlsContext | None = None,
        max_handoffs: int = MAX_HANDOFFS,
        max_sessions: int = MAX_SESSIONS,
        metrics: tuple[str, int] | None = None,
        precopy: str | None = None,
    ) -> None:
        """``state_dir``: keep each session's ledgers there, for a restarted daemon to resume
        (None: not kept). ``control``: a local control socket (``admin``). At most
        ``max_handoffs`` connections are read at once (the next waits in the listen backlog)
        and ``max_sessions`` VMMs served (the next is refused). ``metrics``: serve Prometheus
        metrics over HTTP there (``uffdpoison.metrics``). ``precopy``: MINOR mode, precopy
        the guest into that file (tmpfs or hugetlbfs) until a VMM hands it over
        (``PrecopyFile``)."""
        self.path = path
        self.source = source
        self.allow_uids = frozenset(allow_uids or (os.getuid(),))
        self.mode = mode
        self.owner = owner
        self._status = status or (lambda _d: None)
        self.handoff_timeout = handoff_timeout
        self.state_dir = state_dir
        self.control = control
        self.resume_deadline = resume_deadline
        self.request_timeout = request_timeout
        self.token, self.tls = token, tls
        self.max_sessions = max_sessions
        self.metrics = metrics
        self.precopy = PrecopyFile(precopy, owner) if precopy else None
        self._handoffs = trio.Semaphore(max_handoffs)
        self.source_info: SourceInfo | None = None
        self.sessions: dict[str, Session] = {}
        self.vmm_pids: dict[str, int] = {}
        self._source_ready = trio.Event()
        self._counter = 0

    def _emit(self, event: str, **fields: Any) -> None:
        self._status({"event": event, **fields})

    def set_source(self, address: str) -> None:
        """A replacement source, for every session from now on (a paused one resumes there)."""
        log.warning("source is now %s (was %s)", address, self.source)
        self.source = address
        for s in self.sessions.values():
            s.set_source(address)

    def snapshot(self) -> DestSnapshot:
        """Every session as a metrics scrape sees it (read now)."""
        ready = self.source_info is not None
        return DestSnapshot([s.sample() for s in self.sessions.values()], ready)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self.state_dir is not None:
            os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
            sweep(self.state_dir)
        registry = registry_of(DestCollector(from_any_thread(self.snapshot)))
        async with http_endpoint(self.metrics, registry) as metrics:
            await self._serve(metrics, task_status)

    async def _serve(self, metrics: str | None, task_status: trio.TaskStatus[None]) -> None:
        sock = prepare_socket(self.path, self.mode, self.owner)
        self._emit("listening", path=self.path, source=self.source, state_dir=self.state_dir,
                   metrics=metrics)  # fmt: skip
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._find_source)
                if self.control is not None:
                    await nursery.start(serve_control, self, self.control)
                task_status.started()
                while True:
                    await self._handoffs.acquire()  # back-pressure: the rest wait in the backlog
                    conn = await self._accept(sock)
                    self._counter += 1
                    nursery.start_soon(self._serve_vmm, conn, f"vmm-{self._counter}")
        finally:
            trio.lowlevel.notify_closing(sock)
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            if self.sessions:
                log.warning("stopped with %d session(s); their VMMs keep their userfaultfd%s",
                            len(self.sessions), f", state kept in {self.state_dir}"
                            if self.state_dir else "")  # fmt: skip

    async def _accept(self, sock: socket.socket) -> socket.socket:
        async def once() -> socket.socket:
            while True:
                await trio.lowlevel.wait_readable(sock)
                try:
                    conn, _ = sock.accept()
                except BlockingIOError:
                    continue
                conn.setblocking(False)
                return conn

        return await accept_patiently(once, "a handoff")

    async def _find_source(self) -> None:
        """Until the source answers a handshake: backoff, and a line now and then."""
        delay, said = BACKOFF[0], -SOURCE_LOG_EVERY
        while True:
            try:
                info = await probe(self.source, self.token, self.tls)
                break
            except SourceUnavailable as e:
                if trio.current_time() - said >= SOURCE_LOG_EVERY:
                    said = trio.current_time()
                    log.warning("waiting for the source: %s", e)
                    self._emit("source-waiting", source=self.source, reason=str(e))
                await trio.sleep(delay)
                delay = min(delay * 2, 2.0)
        self.source_info = info
        log.info("source %s: %d bytes in %d-byte pages", self.source, info.memory_size,
                 info.page_size)  # fmt: skip
        self._emit("source-ready", source=self.source, memory_size=info.memory_size,
                   page_size=info.page_size)  # fmt: skip
        self._source_ready.set()
        if self.precopy is not None:  # MINOR mode: fill the file before a VMM hands it over
            await self.precopy.run(self.source, info.memory_size, token=self.token,
                                   tls=self.tls, status=self._status)  # fmt: skip

    async def _serve_vmm(self, conn: socket.socket, name: str) -> None:
        uffd: Userfaultfd | None = None
        peer: Peer | None = None
        fds: list[int] = []
        try:
            try:
                peer = peer_credentials(conn)
                if peer.uid not in self.allow_uids:
                    raise HandoffError(
                        f"peer pid {peer.pid} uid {peer.uid} is not allowed "
                        f"(allowed uids: {sorted(self.allow_uids)})"
                    )
                if len(self.sessions) >= self.max_sessions:
                    raise HandoffError(f"the daemon serves {self.max_sessions} VMMs already")
                body, fds = await receive_handoff(conn, self.handoff_timeout)
            finally:
                self._handoffs.release()
            try:
                uffd = Userfaultfd.adopt(fds[0])
            except kerrors.NotAUserfaultfd as e:
                raise HandoffError(str(e)) from None
            fds = fds[1:]  # the first is owned by uffd now
            regions = RegionMap(parse_firecracker_regions(body))
            memory_fd = check_memory_file(fds[0], regions) if fds else None
            if not self._source_ready.is_set():
                log.info("%s (pid %d): waits for the source; its vCPUs block", name, peer.pid)
                with trio.move_on_after(self.resume_deadline):
                    await self._source_ready.wait()
                if not self._source_ready.is_set():
                    raise SourceLost(
                        f"source {self.source} not reachable within {self.resume_deadline:g} s"
                    )
            assert self.source_info is not None
            regions.check_within(self.source_info.memory_size)
            if uffd.lacks:
                log.info("%s (pid %d): the userfaultfd lacks: %s", name, peer.pid, uffd.lacks)
            memfile = None
            if memory_fd is not None:  # MINOR mode: the switchover ends a precopy into it
                pc = await self.precopy.switchover(memory_fd, regions) if self.precopy else None
                memfile = MemoryFile(memory_fd, pc)
            await self._run_session(name, peer, uffd, regions, memfile)
        except (HandoffError, RegionError, kerrors.UffdError) as e:
            log.error("%s: handoff rejected: %s", name, e)
            self._emit("handoff-rejected", session=name, reason=str(e))
            refuse(conn, str(e))
        except SessionFailed as e:
            log.error("%s: FAILED: %s", name, e)
            self._emit("session-failed", session=name, reason=str(e))
        except Exception as e:
            log.exception("%s: session error", name)
            self._emit("session-failed", session=name, reason=f"{type(e).__name__}: {e}")
        finally:
            for fd in fds:
                os.close(fd)
            conn.close()
            try:
                if uffd is not None and peer is not None:
                    # Whatever ended it (the VMM gone, bad regions, no source, a bug of ours),
                    # the userfaultfd stays open while the VMM lives: closing it would let the
                    # kernel zero-fill every page not placed. Returns at once if it is gone.
                    await wait_process_gone(peer.pid)
            finally:
                if uffd is not None:
                    uffd.close()

    async def _run_session(
        self,
        name: str,
        peer: Peer,
        uffd: Userfaultfd,
        regions: RegionMap,
        memfile: MemoryFile | None,
    ) -> None:
        state = SessionState(self.state_dir, peer.pid, regions) if self.state_dir else None
        try:
            poisoned: list[int] = []
            if state is not None and state.adopted:
                log.warning("%s (pid %d): resuming from %s", name, peer.pid, state.path)
            else:
                poisoned = _account_for(peer.pid, uffd, regions)
            session = await self._connect(name, peer, uffd, regions, state, poisoned, memfile)
            self.sessions[name], self.vmm_pids[name] = session, peer.pid
            try:
                await self._serve_until_gone(session, peer)
            finally:
                del self.sessions[name], self.vmm_pids[name]
                session.close()
            if state is not None:
                state.remove()  # the VMM is gone: nothing left to resume
        finally:
            if state is not None:
                state.close()

    async def _connect(
        self,
        name: str,
        peer: Peer,
        uffd: Userfaultfd,
        regions: RegionMap,
        state: SessionState | None,
        poisoned: list[int],
        memfile: MemoryFile | None,
    ) -> Session:
        """A session with the source, retried (the source may have gone since it answered)."""
        delay = BACKOFF[0]
        pc = memfile.precopy if memfile else None
        with trio.move_on_after(self.resume_deadline):
            while True:
                try:
                    return await Session.connect(
                        uffd, regions, self.source, hugetlb=regions.page_size > 4096, name=name,
                        status=lambda d: self._status({**d, "pid": peer.pid}),
                        state_fds=state.fds if state else None,
                        resumed=bool(state and state.adopted), poisoned=poisoned,
                        resume_deadline=self.resume_deadline,
                        request_timeout=self.request_timeout, token=self.token, tls=self.tls,
                        memory_file=memfile.fd if memfile else None,
                        epoch=pc.epoch if pc else None, digests=pc.digests if pc else None,
                    )  # fmt: skip
                except SourceUnavailable as e:
                    log.info("%s: source not reachable: %s", name, e)
                    await trio.sleep(delay)
                    delay = min(delay * 2, BACKOFF[1])
        raise SourceLost(f"source {self.source} not reachable within {self.resume_deadline:g} s")

    async def _serve_until_gone(self, session: Session, peer: Peer) -> None:
        async with trio.open_nursery() as nursery:

            async def serve() -> None:
                try:
                    await session.run()
                except SessionFailed:
                    # Keep the fd (and the vCPUs blocked) until the VMM is gone: closing it
                    # would zero-fill every unplaced page.
                    return
                nursery.cancel_scope.cancel()  # ended: target mm gone

            nursery.start_soon(serve)
            await wait_process_gone(peer.pid)
            nursery.cancel_scope.cancel()
        if not session.failed:
            self._emit(
                "session-ended",
                session=session.name,
                pid=peer.pid,
                reason="VMM exited",
                pages=session.page_counts(),
                placed=session.stats,
            )


def _account_for(pid: int, uffd: Userfaultfd, regions: RegionMap) -> list[int]:
    """A handoff with no state to resume from: its memory should be untouched. If pagemap shows
    pages there already (served by an earlier daemon whose state is lost), they are accounted
    for only if the guest's discards were never tracked: then the poison markers (visible with
    CAP_SYS_ADMIN) are returned, to be POISONED before anything is placed. With REMOVE events
    a discarded page cannot be told from a missing one, so the handoff is refused rather than
    let stale data replace a page that must read zero. Returns the marked host addresses."""
    try:
        fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise HandoffError(f"cannot read the VMM's pagemap: {e.strerror}") from None
    try:
        if not any(pagemap.populated(fd, r.base, r.size) for r in regions):
            return []
        if uffd.features & Feature.EVENT_REMOVE:
            raise HandoffError(
                "the VMM's memory was partly served already and no state for it survives "
                "(--state-dir): a page it discarded cannot be told from one never served; "
                "refusing to guess (its vCPUs stay blocked)"
            )
        return [r.base + k * pagemap.PAGE_SIZE for r in regions
                for k in pagemap.poison_markers(fd, r.base, r.size)]  # fmt: skip
    except pagemap.ProcessGone:
        raise HandoffError(f"process {pid} exited during the handoff") from None
    finally:
        os.close(fd)
