"""The source's page server (trio): answers demand requests at once, pushes the rest in bulk.

Each destination opens a session with two connections. URGENT carries demand Requests and
their replies only, so a faulting vCPU never queues behind bulk data. BULK carries the
source-driven background push: runs of pages this session has not been offered yet, restarting
just after the latest demand (fault locality), then Done. A bandwidth cap applies to BULK only.
Payloads go to the kernel as the buffers they were read into (sendmsg with the header), never
copied through Python objects.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import secrets
import socket
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import trio

from uffdpoison.kernel.digest import page_digests
from uffdpoison.kernel.urgent import FAST_MAX_BYTES, FAST_MAX_UNITS, Outcome, UrgentResponder
from uffdpoison.protocol import (
    CLOSED,
    MAX_PAYLOAD,
    NEED_DATA,
    PROTOCOL_VERSION,
    Channel,
    Connection,
    Done,
    Error,
    Event,
    Hello,
    PageKind,
    Pages,
    ProtocolError,
    Request,
    Side,
    Welcome,
)
from uffdpoison.source.backends import (
    Backend,
    PageBitmap,
    RunKind,
    SourceError,
    SourceGone,
)
from uffdpoison.transport import parse_address

__all__ = ["SourceServer", "parse_listen", "serve"]

log = logging.getLogger("uffdpoison.source")

StatusCallback = Callable[[dict[str, Any]], None]

_KIND = {
    RunKind.DATA: PageKind.DATA,
    RunKind.ZERO: PageKind.ZERO,
    RunKind.POISONED: PageKind.POISONED,
}
_COUNT_KEY = {
    PageKind.DATA: "data_pages",
    PageKind.ZERO: "zero_pages",
    PageKind.POISONED: "poisoned_pages",
    PageKind.CLEAN: "clean_pages",
}
# Bulk frames: up to 1 MiB / 256 base pages a read, so a demand reply waits behind at most that.
BULK_CHUNK_BYTES = 1 << 20
BULK_CHUNK_UNITS = 256
# Demand requests are read and sent in pieces of at most this many bytes (a huge-page request
# could otherwise ask for gigabytes in one buffer).
DEMAND_PIECE_BYTES = 8 << 20
_RECV_SIZE = 1 << 16
_MAX_UNYIELDED = 8
_FRAME_OVERHEAD = 48  # prefix + msgpack header of a Pages frame, for bandwidth accounting
# Once a frame is partly written, how long the rest may take before the connection is dropped.
PARTIAL_FRAME_TIMEOUT = 30.0
_IOV_MAX = 1024
# Threads that run C urgent loops: one per URGENT connection, never queued behind each other
# (trio's default limiter would make the 41st destination's faults wait).
_URGENT_THREADS = trio.CapacityLimiter(math.inf)
# The bulk push runs at this much lower CPU priority (nice) than the rest of the source: it fills
# idle CPU time, and a demand reply (or anything else) that needs the CPU goes first. Measured
# (docs/BENCHMARKS.md): demand p99 under a 64 MiB/s push 138-176 µs at nice 0 or 10, 49-127 µs
# at 19, bulk throughput unchanged (the push only yields CPU someone else wants).
PUSH_NICE = 19


def parse_listen(listen: str) -> tuple[str, int]:
    """'HOST:PORT' or '[IPv6]:PORT' -> (host, port)."""
    return parse_address(listen.strip(), what="listen address")


def _advance(views: list[memoryview], i: int, n: int) -> int:
    """Drop n sent bytes from views[i:]; return the index of the first unsent view."""
    while n:
        v = views[i]
        if n >= v.nbytes:
            n -= v.nbytes
            i += 1
        else:
            views[i] = v[n:]
            n = 0
    while i < len(views) and views[i].nbytes == 0:
        i += 1
    return i


# Wraps each sendmsg() of a frame (never a wait): the bulk push runs it at lower priority.
Around = Callable[[], AbstractContextManager[None]]


async def _sendmsg(sock: socket.socket, views: list[memoryview], around: Around) -> int:
    """One sendmsg on a non-blocking socket; trio is asked to wait only on EAGAIN (no
    scheduler hop when the kernel takes the bytes at once)."""
    while True:
        try:
            with around():
                return sock.sendmsg(views)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)


async def _recv(sock: socket.socket, size: int) -> bytes:
    while True:
        try:
            return sock.recv(size)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)


async def _send_all(
    sock: socket.socket, bufs: list[bytes | memoryview], around: Around = nullcontext
) -> int:
    """Write buffers in order with as few syscalls as the kernel allows; returns bytes sent.

    Cancellation is honoured only before the first byte goes out: once part of a frame is on
    the wire the rest is written shielded (bounded by PARTIAL_FRAME_TIMEOUT), so a cancelled
    push never leaves half a frame in front of the Error or Done that follows it."""
    views = [b if isinstance(b, memoryview) else memoryview(b) for b in bufs]
    total = sum(v.nbytes for v in views)
    i = _advance(views, 0, await _sendmsg(sock, views[:_IOV_MAX], around))
    if i < len(views):
        deadline = trio.current_time() + PARTIAL_FRAME_TIMEOUT
        with trio.CancelScope(shield=True, deadline=deadline) as scope:
            while i < len(views):
                i = _advance(views, i, await _sendmsg(sock, views[i : i + _IOV_MAX], around))
        if scope.cancelled_caught:
            raise trio.BrokenResourceError("peer stopped reading in the middle of a frame")
    return total


class _PushPriority:
    """Lowers the calling thread's CPU priority around pieces of bulk-push work (a read, a
    sendmsg: never a wait, when the thread's other tasks run) and restores it.

    Restoring needs CAP_SYS_NICE; whether we have it is probed once on a throwaway thread, and
    without it the push runs at normal priority (never stuck lowered)."""

    def __init__(self, delta: int) -> None:
        self.delta = max(0, min(delta, 39))
        self.base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        if self.delta and not _can_restore_priority(self.base, self.delta):
            log.info("bulk push at normal priority: restoring a thread's priority needs "
                     "CAP_SYS_NICE")  # fmt: skip
            self.delta = 0

    @contextmanager
    def lowered(self) -> Iterator[None]:
        if not self.delta:
            yield
            return
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, self.base + self.delta))
        try:
            yield
        finally:
            os.setpriority(os.PRIO_PROCESS, tid, self.base)


def _can_restore_priority(base: int, delta: int) -> bool:
    ok: list[bool] = []

    def probe() -> None:
        tid = threading.get_native_id()
        try:
            os.setpriority(os.PRIO_PROCESS, tid, min(19, base + delta))
            os.setpriority(os.PRIO_PROCESS, tid, base)
            ok.append(True)
        except OSError:
            ok.append(False)

    t = threading.Thread(target=probe, name="uffdpoison-nice-probe")
    t.start()
    t.join()
    return ok == [True]


class _Channel:
    """One accepted socket plus its protocol Connection; frames are written whole under a lock."""

    def __init__(self, sock: socket.socket, conn: Connection, peer: str) -> None:
        self.sock = sock
        self.conn = conn
        self.peer = peer
        self.lock = trio.Lock()
        self.bytes_sent = 0
        self._unyielded = 0  # events handled back to back without waiting on the socket

    async def send(self, events: list[Event], around: Around = nullcontext) -> int:
        # Uncontended (always, on URGENT): take the lock without a scheduler hop.
        if self.lock.locked():
            await self.lock.acquire()
        else:
            self.lock.acquire_nowait()
        try:
            # Encoded under the lock, so the Connection's view of what was sent (request
            # coverage, Done) is always the order the bytes hit the wire.
            bufs: list[bytes | memoryview] = []
            for ev in events:
                bufs.extend(self.conn.send(ev))
            n = await _send_all(self.sock, bufs, around)
        finally:
            self.lock.release()
        self.bytes_sent += n
        return n

    async def next_event(self) -> Event | object:
        while True:
            ev = self.conn.next_event()
            if ev is not NEED_DATA:
                return ev
            size = max(_RECV_SIZE, min(self.conn.bytes_wanted, 1 << 22))
            try:
                data = self.sock.recv(size)
                self._unyielded += 1
                if self._unyielded >= _MAX_UNYIELDED:
                    # A peer that keeps the socket full must not starve the other sessions.
                    self._unyielded = 0
                    await trio.lowlevel.checkpoint()
            except BlockingIOError:
                self._unyielded = 0
                data = await _recv(self.sock, size)
            self.conn.receive_data(data)

    async def send_error(self, code: str, message: str) -> None:
        """Best effort fatal Error (id None); the peer may already be gone."""
        try:
            with trio.move_on_after(2) as scope:
                scope.shield = True
                await self.send([Error(None, code, message[:1000])])
        except (ProtocolError, OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass


class Session:
    """One destination: its negotiated unit, what it has been offered, counters."""

    def __init__(self, server: SourceServer, token: bytes, unit: int, peer: str) -> None:
        self.server = server
        self.token = token
        self.unit = unit
        self.peer = peer
        self.nunits = server.backend.size // unit
        self.offered = PageBitmap(self.nunits)
        self.hint: int | None = None  # unit index just after the latest demand
        self.fast: UrgentResponder | None = None  # the C urgent path, while URGENT is open
        self.bulk: _Channel | None = None
        self.urgent: _Channel | None = None
        self._scopes: list[trio.CancelScope] = []
        self.stopped = False
        self.abort_reason: tuple[str, str] | None = None
        self.counts = {
            "demand_requests": 0,
            "demand_pages": 0,
            "fast_requests": 0,  # of demand_requests, those answered by the C urgent path
            "fast_handoffs": 0,  # frames the C urgent path handed to the Python path
            "bulk_pages": 0,
            "data_pages": 0,
            "zero_pages": 0,
            "poisoned_pages": 0,
            "clean_pages": 0,
            "bytes_sent": 0,
        }
        self.bulk_done = False
        self.push_finished = trio.Event()
        self.push_scope: trio.CancelScope | None = None
        self.channels_open = 1  # the URGENT connection that created it
        self.reasons: list[str] = []

    def scope(self) -> trio.CancelScope:
        """A cancel scope for one of this session's connection handlers."""
        scope = trio.CancelScope()
        if self.stopped:
            scope.cancel()
        self._scopes.append(scope)
        return scope

    def stop(self) -> None:
        """End every connection of the session (quietly, unless abort set a reason)."""
        self.stopped = True
        for scope in self._scopes:
            scope.cancel()

    def abort(self, code: str, message: str) -> None:
        """End the session with a fatal Error on each of its connections."""
        if self.abort_reason is None:
            self.abort_reason = (code, message)
        self.stop()

    def count_events(self, events: list[Event]) -> None:
        for ev in events:
            if isinstance(ev, Pages):
                self.counts[_COUNT_KEY[ev.kind]] += ev.count

    def take_hint(self) -> int | None:
        """Unit index just after the latest demand (from either urgent path), once."""
        hint, self.hint = self.hint, None
        if self.fast is not None:
            fast = self.fast.take_hint()
            if fast is not None:
                hint = fast
        return hint


class SourceServer:
    """Serves one backend to any number of destination sessions."""

    def __init__(
        self,
        backend: Backend,
        *,
        max_bandwidth: float | None = None,
        status: StatusCallback | None = None,
        fast_urgent: bool = True,
        push_nice: int = PUSH_NICE,
    ) -> None:
        """``fast_urgent``: answer plain demand Requests in C (``kernel.urgent``) where the
        backend allows; False keeps every frame on the Python reference path. ``push_nice``:
        how much lower (nice) the bulk push runs than the serving thread; 0 = the same."""
        if max_bandwidth is not None and max_bandwidth <= 0:
            raise ValueError(f"max_bandwidth must be positive, got {max_bandwidth}")
        self.backend = backend
        self.fast_urgent = fast_urgent
        self.push_nice = push_nice
        self._push_priority: _PushPriority | None = None  # made in serve(), in its thread
        self.max_bandwidth = max_bandwidth
        self._status = status
        self.sessions: dict[bytes, Session] = {}
        self.gone: str | None = None  # set once the backend reported SourceGone
        self._zero_digests: dict[int, int] = {}
        self._bulk_clock = 0.0  # trio time when the bulk link is free again (max_bandwidth)

    def status(self, event: str, **fields: Any) -> None:
        if self._status is not None:
            try:
                self._status({"event": event, **fields})
            except Exception:
                log.exception("status callback failed")

    # -- listening ----------------------------------------------------------------------------

    async def serve(
        self,
        listen: str,
        *,
        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        host, port = parse_listen(listen)
        self._push_priority = _PushPriority(self.push_nice)
        infos = await trio.socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        if not infos:
            raise OSError(f"cannot resolve listen host {host!r}")
        family, type_, proto, _, addr = infos[0]
        lsock = trio.socket.socket(family, type_, proto)
        with lsock:
            lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                lsock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            await lsock.bind(addr)
            lsock.listen(128)
            bound = lsock.getsockname()
            log.info("listening on %s port %d", bound[0], bound[1])
            task_status.started((bound[0], bound[1]))
            async with trio.open_nursery() as nursery:
                while True:
                    tsock, peer = await lsock.accept()
                    sock = socket.socket(tsock.family, tsock.type, tsock.proto, tsock.detach())
                    sock.setblocking(False)
                    nursery.start_soon(self._handle, sock, _peer_name(peer))

    async def _handle(self, sock: socket.socket, peer: str) -> None:
        try:
            await self._handle_socket(sock, peer)
        finally:
            trio.lowlevel.notify_closing(sock)
            sock.close()

    async def _handle_socket(self, sock: socket.socket, peer: str) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            ch, hello = await self._handshake(sock, peer)
        except ProtocolError as e:
            log.warning("%s: protocol error before handshake: %s", peer, e)
            return
        except OSError as e:
            log.info("%s: connection lost before handshake: %s", peer, e)
            return
        if ch is None or hello is None:
            return
        try:
            if hello.channel is Channel.URGENT:
                await self._urgent(ch, hello)
            else:
                await self._bulk(ch, hello)
        except ProtocolError as e:
            log.warning("%s: protocol error, closing this connection: %s", peer, e)
            await ch.send_error("bad-request", str(e))
        except (OSError, trio.BrokenResourceError) as e:
            log.info("%s: connection lost: %s", peer, e)
        except Exception as e:
            # A bug of ours in one connection must not take the other sessions down.
            log.exception("%s: internal error, closing this connection", peer)
            await ch.send_error("internal", f"{type(e).__name__}: {e}")

    async def _handshake(
        self, sock: socket.socket, peer: str
    ) -> tuple[_Channel | None, Hello | None]:
        """Read the Hello. The Connection is per channel but the channel is only named inside
        the Hello, so the same bytes feed one candidate Connection per channel; the one that
        accepts the Hello is kept (with whatever followed it still buffered)."""
        cands = {c: Connection(Side.SOURCE, c) for c in Channel}
        errors: dict[Channel, ProtocolError] = {}
        while True:
            for c, conn in list(cands.items()):
                try:
                    ev = conn.next_event()
                except ProtocolError as e:
                    errors[c] = e
                    del cands[c]
                    continue
                if ev is NEED_DATA:
                    continue
                if ev is CLOSED:
                    return None, None
                if isinstance(ev, Hello):
                    return _Channel(sock, conn, peer), ev
                raise ProtocolError(f"expected Hello, got {type(ev).__name__}")  # pragma: no cover
            if not cands:
                # Report the more telling error: the one not about the channel mismatch.
                raise min(errors.values(), key=lambda e: "channel" in str(e))
            data = await _recv(sock, _RECV_SIZE)
            for conn in cands.values():
                conn.receive_data(data)

    def _welcome(self, session: Session, hello: Hello) -> Welcome:
        unit = session.unit
        plist: memoryview | None = None
        offsets = self.backend.poisoned_offsets(unit)
        if hello.want_poison_list and len(offsets) * 8 <= MAX_PAYLOAD:
            plist = memoryview(offsets).cast("B") if sys.byteorder == "little" else None
            if plist is None:  # pragma: no cover - big-endian host
                offsets.byteswap()
                plist = memoryview(offsets).cast("B")
        return Welcome(
            PROTOCOL_VERSION,
            session.token,
            unit,
            self.backend.size,
            self.backend.huge_page_size,
            len(offsets),
            plist,
        )

    # -- urgent -------------------------------------------------------------------------------

    async def _urgent(self, ch: _Channel, hello: Hello) -> None:
        if self.gone is not None:
            await ch.send_error("read-failed", self.gone)
            return
        try:
            unit = self.backend.check_unit(hello.page_size)
        except SourceError as e:
            await ch.send_error("bad-page-size", str(e))
            return
        token = secrets.token_bytes(16)
        session = Session(self, token, unit, ch.peer)
        session.urgent = ch
        self.sessions[token] = session
        reason = "closed"
        try:
            await ch.send([self._welcome(session, hello)])
            log.info("%s: session %s started, page size %d", ch.peer, token.hex()[:8], unit)
            self.status(
                "session-started",
                session=token.hex(),
                peer=ch.peer,
                page_size=unit,
                memory_size=self.backend.size,
                poisoned=self.backend.poisoned_count(unit),
            )
            session.fast = fast = self._responder(session, ch)
            # The C path has the connection whenever the Connection is idle, except after it
            # handed a Request back: then Python keeps it until a Request arrives that C would
            # serve (fast-encoded, no digests, small), so a MINOR-mode peer (digests on every
            # request) or a peer with another encoder does not bounce between the two paths
            # (a thread hop each way) on every request.
            c_turn = fast is not None
            with session.scope():
                while True:
                    if c_turn and ch.conn.idle:
                        assert fast is not None
                        await self._serve_fast(session, ch, fast)
                    ev = await ch.next_event()
                    if ev is CLOSED:
                        break
                    if isinstance(ev, Request):
                        c_turn = fast is not None and self._c_would_serve(ch.conn, ev, session)
                        await self._answer(session, ch, ev)
                    elif isinstance(ev, Error):
                        log.warning("%s: destination error %s: %s", ch.peer, ev.code, ev.message)
                        reason = f"destination error {ev.code}"
                        break
        except SourceGone as e:
            self._source_gone(str(e))
        except ProtocolError as e:
            reason = f"protocol error: {e}"
            raise
        except (OSError, trio.BrokenResourceError) as e:
            reason = f"connection lost: {e}"
            raise
        finally:
            if session.fast is not None:
                session.fast.close()
            if session.abort_reason is not None:
                reason = session.abort_reason[1]
                await ch.send_error(*session.abort_reason)
            self._channel_closed(session, "urgent", reason)

    def _responder(self, session: Session, ch: _Channel) -> UrgentResponder | None:
        layout = self.backend.read_layout() if self.fast_urgent else None
        if layout is None:
            return None
        return UrgentResponder(
            ch.sock.fileno(),
            layout,
            size=self.backend.size,
            base_page_size=self.backend.page_size,
            unit=session.unit,
            poison_bits=self.backend.poison_bits,
            offered_bits=session.offered.buffer,
            partial_timeout=PARTIAL_FRAME_TIMEOUT,
            # Its worker thread may have been made while a push had this thread's priority
            # lowered (threads inherit it): demand replies run at the server's own priority.
            nice=self._push_priority.base if self._push_priority is not None else None,
        )

    @staticmethod
    def _c_would_serve(conn: Connection, req: Request, session: Session) -> bool:
        return (
            conn.last_was_fast
            and req.digests is None
            and req.count <= FAST_MAX_UNITS
            and req.count * session.unit <= max(FAST_MAX_BYTES, session.unit)
        )

    async def _serve_fast(self, session: Session, ch: _Channel, fast: UrgentResponder) -> None:
        """Let the C loop answer Requests until it meets a frame for Python (left in the
        Connection for ``next_event``), EOF or an error. Cancellation stops it."""
        while True:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_stop_when_cancelled, fast)
                    try:
                        outcome, left = await trio.to_thread.run_sync(
                            fast.serve, limiter=_URGENT_THREADS
                        )
                    finally:
                        nursery.cancel_scope.cancel()
            finally:
                counts = fast.take_counters()
                ch.bytes_sent += counts.pop("bytes_sent")
                session.counts["fast_requests"] += counts["requests"]
                session.counts["demand_requests"] += counts.pop("requests")
                session.counts["demand_pages"] += counts.pop("pages")
                for k, v in counts.items():
                    session.counts[k] += v
            # serve() has returned: the stop the stopper wrote on its way out is stale.
            fast.clear_stop()
            if left:
                ch.conn.receive_data(left)
            if outcome is Outcome.HANDOFF:
                session.counts["fast_handoffs"] += 1
            if outcome is not Outcome.STOPPED:
                break
            await trio.lowlevel.checkpoint()  # stopped by our cancellation: raised here
        if outcome is Outcome.EOF:
            ch.conn.receive_data(b"")
        elif outcome is Outcome.ERROR:
            raise OSError(fast.errno, os.strerror(fast.errno))
        elif outcome is Outcome.BROKEN:
            if fast.errno == errno.ETIMEDOUT:
                raise trio.BrokenResourceError("peer stopped reading in the middle of a frame")
            raise trio.BrokenResourceError(os.strerror(fast.errno))

    def _channel_closed(self, session: Session, which: str, reason: str) -> None:
        """A session ends when both its channels are closed (or URGENT closes with no BULK)."""
        session.reasons.append(f"{which}: {reason}")
        session.channels_open -= 1
        if session.channels_open > 0:
            return
        session.stop()
        token = session.token
        self.sessions.pop(token, None)
        counts = dict(session.counts)
        counts["bytes_sent"] = sum(c.bytes_sent for c in (session.urgent, session.bulk) if c)
        why = "; ".join(session.reasons)
        log.info("%s: session %s ended (%s): %s", session.peer, token.hex()[:8], why, counts)
        self.status(
            "session-ended",
            session=token.hex(),
            peer=session.peer,
            reason=why,
            bulk_done=session.bulk_done,
            **counts,
        )

    def _source_gone(self, message: str) -> None:
        """The served process is gone: every session ends with an ERROR, never with zeros."""
        log.error("%s", message)
        if self.gone is None:
            self.gone = message
        for s in list(self.sessions.values()):
            s.abort("read-failed", message)

    async def _answer(self, session: Session, ch: _Channel, req: Request) -> None:
        """Serve one request (demand on URGENT, background on BULK) in reply frames per kind."""
        unit = session.unit
        session.counts["demand_requests"] += 1
        session.counts["demand_pages"] += req.count
        first = req.offset // unit
        if req.urgent:
            session.hint = first + req.count
        session.offered.set_range(first, first + req.count)
        digests = None
        if req.digests is not None:
            digests = req.digests.cast("B").cast("Q")
        piece_units = max(1, min(DEMAND_PIECE_BYTES // unit, ch.conn.max_data_pages))
        done = 0
        while done < req.count:
            n = min(piece_units, req.count - done)
            off = req.offset + done * unit
            buf = bytearray(n * unit)
            try:
                events = self._reply_events(req.id, off, buf, unit, digests, done)
            except SourceGone:
                raise
            except SourceError as e:
                # Not poison (that is a POISONED reply): the pages cannot be read at all.
                log.error("%s: request %d failed: %s", ch.peer, req.id, e)
                await ch.send([Error(req.id, "read-failed", str(e)[:1000])])
                return
            session.count_events(events)
            await ch.send(events)
            done += n

    def _reply_events(
        self,
        rid: int | None,
        offset: int,
        buf: bytearray | memoryview,
        unit: int,
        digests: memoryview | None,
        dbase: int,
    ) -> list[Event]:
        mv, runs = self.backend.read(offset, buf, unit)
        events: list[Event] = []
        for run in runs:
            kind = _KIND[run.kind]
            if kind is not PageKind.POISONED and digests is not None:
                # MINOR mode: a page whose digest matches the destination's copy is CLEAN
                # (nothing crosses the wire); the others go as DATA or ZERO. Poison never is.
                rel = (run.offset - offset) // unit
                ours: Sequence[int]
                if kind is PageKind.DATA:
                    ours = page_digests(mv[rel * unit : (rel + run.units) * unit], unit)
                else:
                    ours = [self._zero_digest(unit)] * run.units
                k = 0
                while k < run.units:
                    clean = ours[k] == digests[dbase + rel + k]
                    j = k + 1
                    while j < run.units and (ours[j] == digests[dbase + rel + j]) == clean:
                        j += 1
                    self._add_run(
                        events,
                        rid,
                        PageKind.CLEAN if clean else kind,
                        run.offset + k * unit,
                        j - k,
                        mv,
                        offset,
                        unit,
                    )
                    k = j
            else:
                self._add_run(events, rid, kind, run.offset, run.units, mv, offset, unit)
        return events

    def _zero_digest(self, unit: int) -> int:
        d = self._zero_digests.get(unit)
        if d is None:
            d = self._zero_digests[unit] = page_digests(bytes(unit), unit)[0]
        return d

    @staticmethod
    def _add_run(
        events: list[Event],
        rid: int | None,
        kind: PageKind,
        off: int,
        count: int,
        mv: memoryview,
        base: int,
        unit: int,
    ) -> None:
        if kind is PageKind.DATA:
            rel = off - base
            events.append(Pages(rid, kind, off, count, mv[rel : rel + count * unit]))
        else:
            events.append(Pages(rid, kind, off, count))

    # -- bulk ---------------------------------------------------------------------------------

    async def _bulk(self, ch: _Channel, hello: Hello) -> None:
        session = self.sessions.get(hello.session or b"")
        if session is None:
            log.warning("%s: bulk Hello for unknown session", ch.peer)
            await ch.send_error("unknown-session", "no such session (open URGENT first)")
            return
        if session.bulk is not None:
            await ch.send_error("bad-request", "this session already has a BULK connection")
            return
        if hello.page_size and hello.page_size != session.unit:
            await ch.send_error(
                "bad-page-size",
                f"BULK page size {hello.page_size} differs from the session's {session.unit}",
            )
            return
        session.bulk = ch
        session.channels_open += 1
        reason = "closed"
        try:
            await ch.send([self._welcome(session, hello)])
            with session.scope():
                async with trio.open_nursery() as nursery:
                    # Made before the push task runs: a Done read at once cancels it then.
                    session.push_scope = trio.CancelScope()
                    nursery.start_soon(self._push, session, ch)
                    try:
                        reason = await self._bulk_reader(session, ch)
                    except ProtocolError as e:
                        log.warning("%s: protocol error on BULK, closing it: %s", ch.peer, e)
                        reason = f"protocol error: {e}"
                        await ch.send_error("bad-request", str(e))
                    except SourceGone as e:
                        self._source_gone(str(e))
                    except (OSError, trio.BrokenResourceError) as e:
                        log.info("%s: BULK connection lost: %s", ch.peer, e)
                        reason = f"connection lost: {e}"
                    nursery.cancel_scope.cancel()
        finally:
            if session.abort_reason is not None:
                reason = session.abort_reason[1]
                await ch.send_error(*session.abort_reason)
            self._channel_closed(session, "bulk", reason)

    async def _bulk_reader(self, session: Session, ch: _Channel) -> str:
        """Background (urgent=False) requests on BULK, until the destination closes it."""
        while True:
            ev = await ch.next_event()
            if ev is CLOSED:
                return "closed"
            if isinstance(ev, Request):
                await self._answer(session, ch, ev)
            elif isinstance(ev, Error):
                log.warning("%s: bulk error %s: %s", ch.peer, ev.code, ev.message)
                return f"destination error {ev.code}"
            elif isinstance(ev, Done):
                # The destination holds every page it needs: stop pushing, answer with our
                # Done (if the push had not finished) and close.
                if session.push_scope is not None:
                    session.push_scope.cancel()
                await session.push_finished.wait()
                if not ch.conn.our_done:
                    await ch.send([Done()])
                return "destination done"

    async def _pace(self, events: list[Event]) -> None:
        """Hold a bulk chunk until its slot under max_bandwidth. One clock for the whole
        server: the cap bounds the sum of all sessions' pushes (the link they share), and
        demand replies never wait on it. Idle time earns no credit, so there is no burst."""
        assert self.max_bandwidth is not None
        nbytes = sum(
            _FRAME_OVERHEAD + (ev.data.nbytes if isinstance(ev, Pages) and ev.data else 0)
            for ev in events
        )
        now = trio.current_time()
        slot = max(self._bulk_clock, now)
        self._bulk_clock = slot + nbytes / self.max_bandwidth
        if slot > now:
            await trio.sleep_until(slot)

    @contextmanager
    def _lowered(self) -> Iterator[None]:
        if self._push_priority is None:  # not started through serve()
            yield
        else:
            with self._push_priority.lowered():
                yield

    async def _push(self, session: Session, ch: _Channel) -> None:
        try:
            assert session.push_scope is not None
            with session.push_scope:
                await self._push_pages(session, ch)
        except SourceGone as e:
            self._source_gone(str(e))
        except SourceError as e:
            # Not poison and not a vanished process (e.g. an image truncated under us): this
            # push cannot go on; demand requests still get their own per-request errors.
            log.error("%s: bulk push failed: %s", ch.peer, e)
            await ch.send_error("read-failed", str(e))
        except ProtocolError as e:
            # Our own send refused (e.g. after a fatal Error on this channel): stop pushing.
            log.info("%s: bulk push stopped: %s", ch.peer, e)
        except (OSError, trio.BrokenResourceError) as e:
            log.info("%s: bulk push stopped, connection lost: %s", ch.peer, e)
        finally:
            session.push_finished.set()

    async def _push_pages(self, session: Session, ch: _Channel) -> None:
        """Offer every page not yet offered, near the latest demand first, then Done."""
        unit = session.unit
        chunk_bytes = BULK_CHUNK_BYTES
        if self.max_bandwidth is not None:
            # Small chunks keep a capped stream smooth (about 20 chunks a second).
            chunk_bytes = min(chunk_bytes, int(self.max_bandwidth / 20))
        chunk = max(1, min(BULK_CHUNK_UNITS, chunk_bytes // unit, ch.conn.max_data_pages))
        buf = bytearray(chunk * unit)
        offered = session.offered
        cursor = 0
        while True:
            hint = session.take_hint()
            if hint is not None:
                cursor = hint if hint < session.nunits else 0
            i = offered.find_clear(cursor)
            if i < 0:
                i = offered.find_clear(0)
                if i < 0:
                    break
            j = offered.find_set(i, min(i + chunk, session.nunits))
            if j < 0:
                j = min(i + chunk, session.nunits)
            offered.set_range(i, j)
            session.counts["bulk_pages"] += j - i
            view = memoryview(buf)[: (j - i) * unit]
            # Read in the loop thread, not a worker: a worker's Python (classifying, building
            # frames) holds the GIL, and an urgent reply then waits out the interpreter's 5 ms
            # switch interval. A 1 MiB pread of page cache or /proc/PID/mem is ~0.1-0.3 ms.
            with self._lowered():
                events = self._reply_events(None, i * unit, view, unit, None, 0)
                session.count_events(events)
            if self.max_bandwidth is not None:
                await self._pace(events)
            await ch.send(events, around=self._lowered)
            cursor = j
            # Let demand replies (other tasks) go out between bulk frames.
            await trio.lowlevel.checkpoint()
        await ch.send([Done()])
        session.bulk_done = True
        log.info("%s: bulk push done for session %s", ch.peer, session.token.hex()[:8])
        self.status("bulk-done", session=session.token.hex(), pages=session.counts["bulk_pages"])


async def _stop_when_cancelled(fast: UrgentResponder) -> None:
    try:
        await trio.sleep_forever()
    finally:
        fast.stop()


def _peer_name(addr: Any) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = addr[0]
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return str(addr) or "unix"


async def serve(
    backend: Backend,
    listen: str,
    *,
    max_bandwidth: float | None = None,
    status: StatusCallback | None = None,
    fast_urgent: bool = True,
    push_nice: int = PUSH_NICE,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `backend` on `listen` ('HOST:PORT', '[IPv6]:PORT'; port 0 = a free port) until
    cancelled. Calls task_status.started((host, port)) once bound."""
    server = SourceServer(
        backend,
        max_bandwidth=max_bandwidth,
        status=status,
        fast_urgent=fast_urgent,
        push_nice=push_nice,
    )
    await server.serve(listen, task_status=task_status)
