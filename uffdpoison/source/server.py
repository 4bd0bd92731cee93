"""The source's page server: listens, handshakes, and gives each session its data plane.

Each destination opens a session with two connections. URGENT carries demand Requests and
their replies only, so a faulting vCPU never queues behind bulk data; BULK carries the
source-driven push, then Done. The handshake is trio's (one frame at a time, ``FrameStream``);
then the session's C data plane owns the socket (``SourceSession``). A bandwidth cap applies
to the push only, summed over every session (one link).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any

import trio

from uffdpoison import auth, protocol
from uffdpoison.auth import Token
from uffdpoison.kernel.planes import Pacer
from uffdpoison.kernel.tls import TlsContext
from uffdpoison.metrics import SourceSample, SourceTotals
from uffdpoison.protocol import Channel, Hello, Side
from uffdpoison.source.backends import Backend, SourceError
from uffdpoison.source.session import SourceSession
from uffdpoison.transport import (
    ConnectionLost,
    FrameStream,
    accept_patiently,
    format_address,
    keep_alive,
    parse_address,
)

__all__ = ["PUSH_NICE", "SourceServer", "parse_listen", "serve"]

log = logging.getLogger("uffdpoison.source")

StatusCallback = Callable[[dict[str, Any]], None]

# The push runs this much lower (nice) than the demand replies: it fills idle CPU time, and a
# demand reply (or anything else) that needs the CPU goes first. Measured (docs/BENCHMARKS.md):
# demand p99 under a 64 MiB/s push 138-176 µs at nice 0 or 10, 49-127 µs at 19.
PUSH_NICE = 19
HANDSHAKE_TIMEOUT = 10.0  # a connection that sends no Hello in this long is dropped
# Connections in their handshake at once (unauthenticated, so bounded): the next waits in the
# listen backlog. Sessions served at once: the next is refused "busy".
MAX_HANDSHAKES = 64
MAX_SESSIONS = 64
# Once part of a frame is on the wire, how long the rest may take before the peer is dropped.
PARTIAL_FRAME_TIMEOUT = 30.0


def parse_listen(listen: str) -> tuple[str, int]:
    """'HOST:PORT' or '[IPv6]:PORT' -> (host, port)."""
    return parse_address(listen.strip(), what="listen address")


def _can_restore_priority(base: int, lowered: int) -> bool:
    """Raising a thread's priority back needs CAP_SYS_NICE: tried once on a throwaway thread,
    so a pooled thread is never left lowered."""
    ok: list[bool] = []

    def probe() -> None:
        tid = threading.get_native_id()
        try:
            os.setpriority(os.PRIO_PROCESS, tid, lowered)
            os.setpriority(os.PRIO_PROCESS, tid, base)
            ok.append(True)
        except OSError:
            ok.append(False)

    t = threading.Thread(target=probe, name="uffdpoison-nice-probe")
    t.start()
    t.join()
    return ok == [True]


class SourceServer:
    """Serves one backend to any number of destination sessions."""

    def __init__(
        self,
        backend: Backend,
        *,
        max_bandwidth: float | None = None,
        status: StatusCallback | None = None,
        push_nice: int = PUSH_NICE,
        partial_timeout: float = PARTIAL_FRAME_TIMEOUT,
        token: Token | None = None,
        tls: TlsContext | None = None,
        max_sessions: int = MAX_SESSIONS,
        timing: bool = True,
    ) -> None:
        """``push_nice``: how much lower (nice) the push runs than the demand replies; 0 = the
        same. ``max_bandwidth``: bytes/s for every session's push together. ``token``: serve
        only destinations that prove they hold it (``uffdpoison.auth``). ``tls``: a server
        context; every connection is TLS (with client certificates if it has a CA).
        ``timing``: record each request's service time (for the metrics)."""
        if max_bandwidth is not None and max_bandwidth <= 0:
            raise ValueError(f"max_bandwidth must be positive, got {max_bandwidth}")
        self.backend = backend
        self.max_bandwidth = max_bandwidth
        self.push_nice = max(0, min(push_nice, 39))
        self.partial_timeout = partial_timeout
        self.token = token
        self.tls = tls
        self.max_sessions = max_sessions
        self._handshakes = trio.Semaphore(MAX_HANDSHAKES)
        self._status = status
        self.sessions: dict[bytes, SourceSession] = {}
        self.gone: str | None = None  # set once the served process is gone
        self.epoch: bytes | None = None  # the precopy epoch the backend tracks changes since
        self._pacer: Pacer | None = None
        self._nice: tuple[int | None, int | None] = (None, None)
        self._ended = SourceTotals()  # the metrics of sessions that ended
        self.timing = timing

    def sample(self) -> SourceSample:
        """What a scrape shows: every session's counters and latencies, ended ones included."""
        totals = self._ended.copied()
        for s in self.sessions.values():
            totals.add(s.plane.stats(), s.plane.timing())
        return SourceSample(
            len(self.sessions), self.backend.poisoned_count(), totals.stats, totals.latency
        )

    def status(self, fields: dict[str, Any]) -> None:
        if self._status is not None:
            try:
                self._status(fields)
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
        base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        lowered = min(19, base + self.push_nice)
        if self.push_nice and not _can_restore_priority(base, lowered):
            log.info("push at normal priority: restoring a thread's priority needs CAP_SYS_NICE")
            lowered = base
        self._nice = (lowered, base)
        listeners = await trio.open_tcp_listeners(port, host=host, backlog=128)
        self._pacer = Pacer(self.max_bandwidth) if self.max_bandwidth else None
        try:
            async with trio.open_nursery() as nursery:
                for listener in listeners:  # a name may resolve to several addresses
                    nursery.start_soon(self._accept, nursery, listener)
                bound = listeners[0].socket.getsockname()
                log.info("listening on %s", format_address(bound[0], bound[1]))
                task_status.started((bound[0], bound[1]))
        finally:
            for listener in listeners:
                listener.socket.close()
            if self._pacer is not None:
                self._pacer.close()

    async def _accept(self, nursery: trio.Nursery, listener: trio.SocketListener) -> None:
        while True:
            await self._handshakes.acquire()  # back-pressure: the rest wait in the backlog
            tsock = (await accept_patiently(listener.accept, "a destination")).socket
            try:
                peer = _peer_name(tsock.getpeername())
            except OSError:  # reset before we looked
                tsock.close()
                self._handshakes.release()
                continue
            sock = socket.socket(tsock.family, tsock.type, tsock.proto, tsock.detach())
            keep_alive(sock)
            nursery.start_soon(self._handle, nursery, sock, peer)

    async def _handle(self, nursery: trio.Nursery, sock: socket.socket, peer: str) -> None:
        """One connection until its handshake is done; then its session owns it."""
        stream = FrameStream(sock, protocol.Connection(Side.SOURCE, None), name=peer)
        handed = False
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                if self.tls is not None:
                    await stream.start_tls(self.tls)
                hello = await stream.receive()
                if isinstance(hello, Hello):
                    bound = await self._authenticate(stream, hello)
                    if bound is not None:
                        handed = await self._start(nursery, stream, hello, bound)
        except protocol.ProtocolError as e:
            log.warning("%s: protocol error before the handshake: %s", peer, e)
            await _refuse(stream, "bad-request", str(e))
        except ConnectionLost as e:
            log.info("%s: connection lost before the handshake: %s", peer, e)
        except OSError as e:  # TlsError: the peer failed the TLS handshake or its checks
            log.warning("%s: refused: %s", peer, e.strerror or e)
        except trio.TooSlowError:
            log.warning("%s: no handshake within %.0f s", peer, HANDSHAKE_TIMEOUT)
        finally:
            self._handshakes.release()
            if not handed:
                stream.close()

    async def _authenticate(self, stream: FrameStream, hello: Hello) -> bytes | None:
        """The handshake's transcript once both sides proved they hold the token (b"" with no
        token on either side); None if the destination was refused."""
        if self.token is None and hello.auth is None:
            return b""
        if self.token is None:
            await _refuse(stream, "auth-failed", "this source has no token to authenticate with")
            return None
        if hello.auth is None:
            log.warning("%s: refused: did not authenticate", stream.name)
            await _refuse(stream, "auth-failed", "this source serves authenticated peers only")
            return None
        nonce = auth.nonce()
        transcript = auth.transcript(hello, nonce)
        await stream.send(protocol.Challenge(nonce, self.token.mac("source", transcript)))
        proof = await stream.receive()
        if isinstance(proof, protocol.Proof) and self.token.verify(
            "destination", transcript, proof.mac
        ):
            return transcript
        log.warning("%s: refused: authentication failed", stream.name)
        await _refuse(stream, "auth-failed", "authentication failed")
        return None

    async def _start(
        self, nursery: trio.Nursery, stream: FrameStream, hello: Hello, transcript: bytes
    ) -> bool:
        """Answer a Hello; True once the stream belongs to a session. ``transcript``: of the
        authenticated handshake (b"" without one), to which the session token is bound."""
        if self.gone is not None:
            await _refuse(stream, "read-failed", self.gone)
            return False
        if hello.channel is Channel.URGENT:
            if len(self.sessions) >= self.max_sessions:
                await _refuse(stream, "busy", f"this source serves {self.max_sessions} sessions")
                return False
            try:
                unit = self.backend.check_unit(hello.page_size)
            except SourceError as e:
                await _refuse(stream, "bad-page-size", str(e))
                return False
            token = self.token.session(transcript) if self.token else secrets.token_bytes(16)
            session = self._session(token, unit, stream.name)
            epoch = self._epoch(hello.epoch)
            if epoch is not None and hello.epoch:
                session.plane.vouch()  # its cache is that epoch's: unchanged pages are CLEAN
            self.sessions[token] = session  # before the Welcome: BULK may follow at once
            try:
                await stream.send(self._welcome(token, unit, hello, epoch))
            except BaseException:
                del self.sessions[token]
                session.plane.close()
                raise
            await nursery.start(self._run_session, session)
            session.add(Channel.URGENT, stream)
            log.info("%s: session %s started, page size %d", stream.name, token.hex()[:8], unit)
            self.status(
                {
                    "event": "session-started",
                    "session": token.hex(),
                    "peer": stream.name,
                    "page_size": unit,
                    "memory_size": self.backend.size,
                    "poisoned": self.backend.poisoned_count(unit),
                }
            )
            return True
        joined = self.sessions.get(hello.session or b"")
        if joined is None:
            log.warning("%s: bulk Hello for unknown session", stream.name)
            await _refuse(stream, "unknown-session", "no such session (open URGENT first)")
            return False
        if Channel.BULK in joined.streams:
            await _refuse(stream, "bad-request", "this session already has a BULK connection")
            return False
        if hello.page_size and hello.page_size != joined.unit:
            await _refuse(
                stream,
                "bad-page-size",
                f"BULK page size {hello.page_size} differs from the session's {joined.unit}",
            )
            return False
        await stream.send(self._welcome(joined.token, joined.unit, hello))
        if hello.resume and not await _take_haves(stream, joined):
            return False
        await joined.started.wait()
        joined.add(Channel.BULK, stream)
        return True

    def _session(self, token: bytes, unit: int, peer: str) -> SourceSession:
        push_nice, base_nice = self._nice
        return SourceSession(
            token,
            unit,
            peer,
            self.backend.guest(),
            pacer=self._pacer,
            push_nice=push_nice,
            base_nice=base_nice,
            partial_timeout=self.partial_timeout,
            status=self.status,
            on_gone=self._source_gone,
            timing=self.timing,
        )

    async def _run_session(
        self,
        session: SourceSession,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            await session.run(task_status=task_status)
        finally:
            self.sessions.pop(session.token, None)
            if session.final is not None:
                self._ended.add(*session.final)

    def _epoch(self, asked: bytes | None) -> bytes | None:
        """The epoch a Welcome vouches for: a new one when the Hello asks to start one (b"")
        and the backend can tell changes; the Hello's own if it is the current one; else None
        (CLEAN answers then compare digests)."""
        if asked == b"":
            self.epoch = secrets.token_bytes(protocol.EPOCH) if self.backend.start_epoch() else None
            if self.epoch is not None:
                log.info("precopy epoch %s started", self.epoch.hex()[:8])
            return self.epoch
        return asked if asked is not None and asked == self.epoch else None

    def _welcome(
        self, token: bytes, unit: int, hello: Hello, epoch: bytes | None = None
    ) -> protocol.Welcome:
        offsets = self.backend.poisoned_offsets(unit)
        plist: memoryview | None = None
        if hello.want_poison_list and len(offsets) * 8 <= protocol.MAX_PAYLOAD:
            if sys.byteorder != "little":  # pragma: no cover - the wire is little-endian
                offsets.byteswap()
            plist = memoryview(offsets).cast("B")
        return protocol.Welcome(
            protocol.PROTOCOL_VERSION,
            token,
            unit,
            self.backend.size,
            self.backend.huge_page_size,
            len(offsets),
            plist,
            epoch,
        )

    def _source_gone(self, message: str) -> None:
        """The served process is gone: every session ends with an Error, never with zeros."""
        if self.gone is None:
            log.error("%s", message)
            self.gone = message
        for s in list(self.sessions.values()):
            s.abort("read-failed", message)


async def _take_haves(stream: FrameStream, session: SourceSession) -> bool:
    """A resuming destination's Have frames, up to the last: what not to push (and what it
    knows is poisoned), marked before the push starts. False if it gave up instead."""
    held = poisoned = 0
    while True:
        ev = await stream.receive()
        if not isinstance(ev, protocol.Have):  # the protocol lets only an Error through
            log.info("%s: resuming destination gave up: %s", stream.name, ev)
            return False
        assert ev.bits is not None
        session.plane.mark(ev.poisoned, ev.offset // session.unit, ev.count, ev.bits)
        n = int.from_bytes(ev.bits, "little").bit_count()
        poisoned, held = (poisoned + n, held) if ev.poisoned else (poisoned, held + n)
        if ev.final:
            log.info("%s: session %s resumes: %d units held, %d known poisoned", stream.name,
                     session.token.hex()[:8], held, poisoned)  # fmt: skip
            return True


async def _refuse(stream: FrameStream, code: str, message: str) -> None:
    """Best effort: a fatal Error instead of a Welcome (the peer may already be gone)."""
    with trio.move_on_after(2), contextlib.suppress(ConnectionLost, protocol.ProtocolError):
        await stream.send(protocol.Error(None, code, message[: protocol.MAX_MESSAGE]))


def _peer_name(addr: Any) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        return format_address(addr[0], addr[1])
    return str(addr) or "unix"


async def serve(
    backend: Backend,
    listen: str,
    *,
    max_bandwidth: float | None = None,
    status: StatusCallback | None = None,
    push_nice: int = PUSH_NICE,
    token: Token | None = None,
    tls: TlsContext | None = None,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``backend`` on ``listen`` ('HOST:PORT', '[IPv6]:PORT'; port 0 = a free port)
    until cancelled. Calls task_status.started((host, port)) once bound."""
    server = SourceServer(
        backend, max_bandwidth=max_bandwidth, status=status, push_nice=push_nice, token=token,
        tls=tls,
    )  # fmt: skip
    await server.serve(listen, task_status=task_status)
