"""Sockets under the sans-IO protocol: one non-blocking socket, one ``protocol.Connection``.

Trio's ``SocketStream`` costs several scheduler hops per message; on the demand-fault path that is
most of a round trip. Here the socket is a plain non-blocking one and trio is only asked to wait
(``wait_readable`` / ``wait_writable``) when the kernel says EAGAIN, so a request is usually on
the wire before the fault handler returns, and a reply is read with one ``recv`` syscall.

Sending never blocks the caller: ``post()`` writes what the kernel takes at once and queues the
rest for a writer task (``run_writer``), so the userfaultfd reader never waits on the network.
"""

from __future__ import annotations

import os
import socket
from collections import deque

import trio

from uffdpoison import protocol

RECV_SIZE = 1 << 20
YIELD_EVERY = 16  # events receive() returns back to back before it yields anyway
_IOV_MAX = 512


class ConnectionLost(ConnectionError):
    """The peer closed the connection or the socket failed."""


def parse_address(text: str, *, what: str = "address") -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` → ``(host, port)``; a clear error otherwise."""
    host: str
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or not text[close + 1 :].startswith(":"):
            raise ValueError(f"{what} {text!r}: expected [IPv6]:PORT")
        host, port_s = text[1:close], text[close + 2 :]
    else:
        host, sep, port_s = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{what} {text!r}: expected HOST:PORT or [IPv6]:PORT")
        if ":" in host:
            raise ValueError(
                f"{what} {text!r}: an IPv6 host must be written in brackets: [{host}]:PORT"
            )
    try:
        port = int(port_s, 10)
    except ValueError:
        raise ValueError(f"{what} {text!r}: port {port_s!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"{what} {text!r}: port {port} is out of range 0-65535")
    return host, port


async def open_tcp(host: str, port: int) -> socket.socket:
    """Connect without blocking the trio loop; returns a non-blocking socket with TCP_NODELAY."""
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    last: OSError | None = None
    for family, type_, proto, _, addr in infos:
        sock = socket.socket(family, type_, proto)
        sock.setblocking(False)
        try:
            try:
                sock.connect(addr)
                err = 0
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, f"connect to {host}:{port}: {os.strerror(err)}")
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except OSError as e:
            sock.close()
            last = e
        except BaseException:
            sock.close()
            raise
    raise ConnectionLost(f"cannot connect to {host}:{port}: {last}")


class FrameTransport:
    """Owns one socket and drives one protocol ``Connection`` over it."""

    def __init__(self, sock: socket.socket, conn: protocol.Connection, *, name: str = "") -> None:
        sock.setblocking(False)
        self.sock = sock
        self.conn = conn
        self.name = name
        self._outbox: deque[memoryview] = deque()
        self._pending = trio.Event()
        self._closed = False
        # Reused: a fresh 1 MiB bytes per recv() costs page faults on every call.
        self._rbuf = bytearray(RECV_SIZE)
        self._rview = memoryview(self._rbuf)
        self.bytes_in = 0
        self._unyielded = 0
        self.bytes_out = 0

    # -- sending ---------------------------------------------------------------------------

    def post(self, event: protocol.Event) -> None:
        """Encode ``event`` and send it now if the kernel takes it; otherwise queue the rest."""
        if self._closed:
            raise ConnectionLost(f"{self.name}: connection closed")
        self._post_bufs(self.conn.send(event))

    def post_encoded(self, data: bytes) -> None:
        """Send bytes another writer of this stream encoded and handed over (the demand
        engine's unsent tail), ahead of anything posted after them."""
        if self._closed:
            raise ConnectionLost(f"{self.name}: connection closed")
        if data:
            self._post_bufs([data])

    def _post_bufs(self, bufs: list[bytes | memoryview]) -> None:
        if self._outbox:
            self._outbox.extend(memoryview(b).cast("B") for b in bufs)
            return
        total = sum(len(b) for b in bufs)
        try:
            sent = self.sock.sendmsg(bufs)
        except BlockingIOError:
            sent = 0
        except OSError as e:
            raise ConnectionLost(f"{self.name}: send failed: {e}") from e
        self.bytes_out += sent
        if sent == total:
            return
        for b in bufs:
            mv = memoryview(b).cast("B")
            if sent >= len(mv):
                sent -= len(mv)
                continue
            self._outbox.append(mv[sent:])
            sent = 0
        self._pending.set()

    async def send(self, event: protocol.Event) -> None:
        """Post ``event`` and wait until it has left (back-pressure for bulk senders)."""
        self.post(event)
        while self._outbox:
            await self._flush_some()

    async def run_writer(self) -> None:
        """Drain what ``post()`` could not send at once. Run one per transport in a nursery."""
        while True:
            await self._pending.wait()
            while self._outbox:
                await self._flush_some()
            self._pending = trio.Event()

    async def _flush_some(self) -> None:
        await trio.lowlevel.wait_writable(self.sock)
        bufs = [self._outbox[i] for i in range(min(len(self._outbox), _IOV_MAX))]
        try:
            sent = self.sock.sendmsg(bufs)
        except BlockingIOError:
            return
        except OSError as e:
            raise ConnectionLost(f"{self.name}: send failed: {e}") from e
        self.bytes_out += sent
        while sent:
            head = self._outbox[0]
            if sent >= len(head):
                sent -= len(head)
                self._outbox.popleft()
            else:
                self._outbox[0] = head[sent:]
                sent = 0

    # -- receiving -------------------------------------------------------------------------

    def receive_nowait(self) -> protocol.Event | None:
        """The next event if it can be had without waiting, else None. Raises
        ``ConnectionLost`` at EOF, ``ProtocolError`` on a malformed frame (nothing of that
        frame is returned)."""
        conn = self.conn
        while True:
            ev = conn.next_event()
            if ev is protocol.NEED_DATA:
                try:
                    n = self.sock.recv_into(self._rbuf)
                except BlockingIOError:
                    return None
                except OSError as e:
                    raise ConnectionLost(f"{self.name}: receive failed: {e}") from e
                self.bytes_in += n
                conn.receive_data(self._rview[:n])
                continue
            if ev is protocol.CLOSED:
                raise ConnectionLost(f"{self.name}: peer closed the connection")
            return ev  # type: ignore[return-value]

    async def receive_to_boundary(self) -> protocol.Event | None:
        """The next event already begun, reading no byte past the end of its frame; None once
        the Connection holds nothing (a frame boundary), so another reader of the socket (the
        C demand engine) can go on from there. Raises as ``receive_nowait``."""
        conn = self.conn
        while True:
            ev = conn.next_event()
            if ev is protocol.CLOSED:
                raise ConnectionLost(f"{self.name}: peer closed the connection")
            if ev is not protocol.NEED_DATA:
                return ev  # type: ignore[return-value]
            if conn.idle:
                return None
            want = min(conn.bytes_wanted, RECV_SIZE)
            try:
                n = self.sock.recv_into(self._rview[:want])
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.sock)
                continue
            except OSError as e:
                raise ConnectionLost(f"{self.name}: receive failed: {e}") from e
            self.bytes_in += n
            conn.receive_data(self._rview[:n])

    async def receive(self) -> protocol.Event:
        """The next event from the peer, waiting for it (see ``receive_nowait``).

        While frames keep arriving this returns without suspending, and ``await`` on a call
        that does not suspend does not yield in trio: every ``YIELD_EVERY`` events it yields
        anyway, so a steady stream (the bulk push) cannot starve the other tasks."""
        while True:
            ev = self.receive_nowait()
            if ev is not None:
                self._unyielded += 1
                if self._unyielded >= YIELD_EVERY:
                    self._unyielded = 0
                    await trio.lowlevel.checkpoint()
                return ev
            self._unyielded = 0
            await trio.lowlevel.wait_readable(self.sock)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            # Wake any task parked on this fd before the number can be reused.
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()
