"""The control plane's transport: addresses, connecting, and one frame at a time over a socket.

Trio uses a socket for the handshake (and, at the end, a last Error) before and after a C data
plane owns it. ``FrameStream`` reads exactly one frame at a time and never a byte past its end,
so the socket is at a frame boundary whenever it is handed to the data plane: nothing the
control plane read has to be handed over with it.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from uffdpoison import protocol
from uffdpoison.kernel.tls import WANT_READ, WANT_WRITE, Tls, TlsContext
from uffdpoison.protocol import layout


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


# A peer that is gone without a word (a cut link, a host that froze) is noticed within
# KEEPALIVE_IDLE + KEEPALIVE_INTERVAL * KEEPALIVE_PROBES seconds when the connection is idle,
# and within USER_TIMEOUT when sent data goes unacknowledged; TCP's defaults take minutes.
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_PROBES = 2, 1, 3
USER_TIMEOUT = 5.0


def keep_alive(sock: socket.socket) -> None:
    """TCP_NODELAY and the keepalive bounds above on a connected TCP socket."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(USER_TIMEOUT * 1000))


_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_T = TypeVar("_T")


async def accept_patiently(accept: Callable[[], Awaitable[_T]], what: str) -> _T:
    """``accept()`` until it succeeds. Out of file descriptors (or memory) is back-pressure,
    never fatal: a server keeps serving what it has and accepts again when fds are free; one
    log line every 10 s says so."""
    said = -1e9
    while True:
        try:
            return await accept()
        except OSError as e:
            if e.errno not in _OUT_OF_FDS:
                raise
            if trio.current_time() - said >= 10.0:
                said = trio.current_time()
                logging.getLogger("uffdpoison").warning(
                    "cannot accept %s now (%s): retrying", what, e.strerror
                )
            await trio.sleep(0.1)


_TCPI_RTT = 68  # offset of tcpi_rtt (µs) in struct tcp_info (linux/tcp.h)


def tcp_rtt(sock: socket.socket) -> float | None:
    """The kernel's smoothed round-trip time of a connected TCP socket, in seconds (None: not
    connected). Only reads TCP_INFO: safe while a data plane owns the socket."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except OSError:
        return None
    if len(info) < _TCPI_RTT + 4:
        return None
    return int.from_bytes(info[_TCPI_RTT : _TCPI_RTT + 4], sys.byteorder) / 1e6


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def open_tcp(host: str, port: int) -> socket.socket:
    """Connect without blocking the trio loop; a non-blocking socket (``keep_alive``)."""
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise ConnectionLost(f"cannot resolve {host}: {e.strerror or e}") from None
    last: OSError | None = None
    for family, type_, proto, _, addr in infos:
        try:
            sock = socket.socket(family, type_, proto)
        except OSError as e:  # out of fds: as unreachable as a refused connect, for now
            raise ConnectionLost(f"cannot open a socket: {e.strerror}") from None
        sock.setblocking(False)
        try:
            try:
                sock.connect(addr)
                err = 0
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err))
            keep_alive(sock)
            return sock
        except OSError as e:
            sock.close()
            last = e
        except BaseException:
            sock.close()
            raise
    raise ConnectionLost(f"cannot connect to {format_address(host, port)}: {last}")


class FrameStream:
    """One socket (and, after ``start_tls``, its TLS) and the protocol ``Connection`` over it;
    owns both until closed: a data plane given them borrows them."""

    def __init__(self, sock: socket.socket, conn: protocol.Connection, *, name: str) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.conn = conn
        self.name = name
        self.tls: Tls | None = None
        self._closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    async def start_tls(self, ctx: TlsContext, host: str = "") -> None:
        """The TLS handshake, first thing on the connection; from then on every byte is TLS.
        A client checks the server's certificate for ``host``. Raises ``TlsError``."""
        self.tls = Tls(ctx, self.sock.fileno(), host)
        while step := self.tls.handshake():
            await self._wait(step)

    async def _wait(self, want: int) -> None:
        if want == WANT_WRITE:
            await trio.lowlevel.wait_writable(self.sock)
        else:
            await trio.lowlevel.wait_readable(self.sock)

    def _write(self, views: list[memoryview]) -> int | None:
        """Bytes written from ``views`` (at least one), or None if the socket is full."""
        if self.tls is None:
            try:
                return self.sock.sendmsg(views[: layout.IOV_MAX])
            except BlockingIOError:
                return None
        return self.tls.write(views[0])

    def _read(self, n: int) -> bytes | None:
        """Up to n bytes, b"" at EOF, None if there are none now."""
        if self.tls is None:
            try:
                return self.sock.recv(n)
            except BlockingIOError:
                return None
        return self.tls.read(n)

    async def send(self, event: protocol.Event) -> None:
        """Encode ``event`` and write it whole."""
        views = [memoryview(b).cast("B") for b in self.conn.send(event)]
        while views:
            try:
                n = self._write(views)
            except OSError as e:
                raise ConnectionLost(f"{self.name}: send failed: {e}") from e
            if n is None:
                await self._wait(self.tls.want if self.tls else WANT_WRITE)
                continue
            while n:
                if n >= views[0].nbytes:
                    n -= views.pop(0).nbytes
                else:
                    views[0] = views[0][n:]
                    n = 0

    async def receive(self) -> protocol.Event:
        """The next event, reading no byte past the end of its frame. Raises
        ``ConnectionLost`` at EOF, ``ProtocolError`` on a malformed frame."""
        conn = self.conn
        while True:
            ev = conn.next_event()
            if ev is protocol.CLOSED:
                raise ConnectionLost(f"{self.name}: peer closed the connection")
            if ev is not protocol.NEED_DATA:
                return ev  # type: ignore[return-value]
            try:
                data = self._read(conn.bytes_wanted)
            except OSError as e:
                raise ConnectionLost(f"{self.name}: receive failed: {e}") from e
            if data is None:
                await self._wait(self.tls.want if self.tls else WANT_READ)
                continue
            conn.receive_data(data)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self.sock)  # wake any task parked on this fd
            if self.tls is not None:
                self.tls.close()
            self.sock.close()
