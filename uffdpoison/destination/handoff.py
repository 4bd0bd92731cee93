"""The destination daemon: VMMs hand it their userfaultfd in Firecracker's format.

A VMM connects to a Unix socket and sends, in one message, a JSON array of regions
(``base_host_virt_addr``, ``size``, ``offset``, ``page_size``) with its userfaultfd attached as
SCM_RIGHTS. The daemon serves that VMM from the one ``--source`` until the VMM process is gone
(a pidfd from the peer's SO_PEERCRED pid). EOF on the handoff socket does not end the session:
some Firecracker releases close it right after sending.

Each VMM is isolated: a malformed handoff or a failed session is logged and reported on the
status stream, and never disturbs the other VMMs.
"""

from __future__ import annotations

import array
import contextlib
import errno
import json
import logging
import os
import socket
import stat
import struct
from collections.abc import Sequence
from typing import Any, NamedTuple

import trio

from uffdpoison.destination.link import SourceInfo, probe
from uffdpoison.destination.regions import (
    MAX_HANDOFF_BYTES,
    RegionError,
    RegionMap,
    parse_firecracker_regions,
)
from uffdpoison.destination.session import Session, SessionFailed, StatusSink
from uffdpoison.kernel import Userfaultfd, errors as kerrors

log = logging.getLogger(__name__)

HANDOFF_TIMEOUT = 10.0
_UCRED = struct.Struct("iII")
_MAX_FDS = 8


class HandoffError(Exception):
    """A VMM's handoff was unusable; the message says what was wrong."""


class Peer(NamedTuple):
    """The VMM at the other end of the handoff socket (SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> Peer:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return Peer._make(_UCRED.unpack(raw))


def _take_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(data[: len(data) - len(data) % a.itemsize])
            fds.extend(a)
    return fds


async def receive_handoff(sock: socket.socket, timeout: float) -> tuple[bytes, int]:
    """Read one handoff: a JSON array of regions (at most MAX_HANDOFF_BYTES) with the
    userfaultfd as SCM_RIGHTS on its first message. Bytes are read until they hold one whole
    JSON document, the VMM closes the socket (some Firecracker releases keep it open) or
    ``timeout`` passes; then the text is judged once, by its parser."""
    buf = bytearray()
    fds: list[int] = []
    try:
        with trio.move_on_after(timeout) as scope:
            await _receive(sock, buf, fds)
        if scope.cancelled_caught and not fds:
            raise HandoffError(f"no handoff within {timeout:.0f} s")
        if scope.cancelled_caught and not _whole_json(buf):
            raise HandoffError(f"handoff incomplete after {timeout:.0f} s ({len(buf)} bytes)")
        for extra in fds[1:]:
            os.close(extra)
        if fds[1:]:
            log.warning("handoff carried %d extra fds; closed them", len(fds) - 1)
        return bytes(buf), fds[0]
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


async def _receive(sock: socket.socket, buf: bytearray, fds: list[int]) -> None:
    while True:
        await trio.lowlevel.wait_readable(sock)
        try:
            data, anc, flags, _ = sock.recvmsg(
                65536, socket.CMSG_SPACE(_MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC
            )
        except BlockingIOError:
            continue
        got = _take_fds(anc)
        if got and buf:
            fds += got
            raise HandoffError("file descriptors arrived after the first message")
        fds += got
        if flags & socket.MSG_CTRUNC:
            raise HandoffError("handoff ancillary data was truncated")
        if not fds:
            raise HandoffError(
                "handoff carried no file descriptor (SCM_RIGHTS) with its first message"
            )
        buf += data
        if len(buf) > MAX_HANDOFF_BYTES:
            raise HandoffError(f"handoff message exceeds {MAX_HANDOFF_BYTES} bytes")
        if not data or _whole_json(buf):
            return


def _whole_json(buf: bytearray) -> bool:
    """Whether the bytes so far are one whole JSON document, or one that more bytes cannot
    mend (not an array; an array closed but broken; too deep; not UTF-8)."""
    text = buf.strip()
    if text[:1] not in (b"", b"["):
        return True
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return text.endswith(b"]")  # a region table ends there: nothing more is coming
    except (RecursionError, UnicodeDecodeError):
        return True
    return True


def _prepare_socket(path: str, mode: int | None, owner: tuple[int, int] | None) -> socket.socket:
    """Bind ``path``, replacing a stale socket file but never a live daemon's or a non-socket."""
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, f"handoff path {path} exists and is not a socket")
        probe_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe_sock.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)
        else:
            raise OSError(errno.EADDRINUSE, f"another process is serving handoffs on {path}")
        finally:
            probe_sock.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        if mode is not None:
            os.chmod(path, mode)
        if owner is not None:
            os.chown(path, owner[0], owner[1])
        sock.listen(64)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def _wait_process_gone(pid: int) -> None:
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        await trio.lowlevel.wait_readable(pidfd)
    finally:
        trio.lowlevel.notify_closing(pidfd)
        os.close(pidfd)


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
    ) -> None:
        self.path = path
        self.source = source
        self.allow_uids = frozenset(allow_uids or (os.getuid(),))
        self.mode = mode
        self.owner = owner
        self._status = status or (lambda _d: None)
        self.handoff_timeout = handoff_timeout
        self.source_info: SourceInfo | None = None
        self.sessions: dict[str, Session] = {}
        self._counter = 0

    def _emit(self, event: str, **fields: Any) -> None:
        self._status({"event": event, **fields})

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # Fail fast: a daemon that cannot reach its source must not accept VMMs.
        self.source_info = await probe(self.source)
        sock = _prepare_socket(self.path, self.mode, self.owner)
        self._emit(
            "listening",
            path=self.path,
            source=self.source,
            memory_size=self.source_info.memory_size,
            page_size=self.source_info.page_size,
        )
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    await trio.lowlevel.wait_readable(sock)
                    try:
                        conn, _ = sock.accept()
                    except BlockingIOError:
                        continue
                    conn.setblocking(False)
                    self._counter += 1
                    nursery.start_soon(self._serve_vmm, conn, f"vmm-{self._counter}")
        finally:
            trio.lowlevel.notify_closing(sock)
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    async def _serve_vmm(self, conn: socket.socket, name: str) -> None:
        uffd: Userfaultfd | None = None
        peer: Peer | None = None
        fd = -1
        try:
            peer = peer_credentials(conn)
            if peer.uid not in self.allow_uids:
                raise HandoffError(
                    f"peer pid {peer.pid} uid {peer.uid} is not allowed "
                    f"(allowed uids: {sorted(self.allow_uids)})"
                )
            body, fd = await receive_handoff(conn, self.handoff_timeout)
            try:
                uffd = Userfaultfd.adopt(fd)
            except kerrors.NotAUserfaultfd as e:
                raise HandoffError(str(e)) from None
            fd = -1  # owned by uffd now
            regions = RegionMap(parse_firecracker_regions(body))
            assert self.source_info is not None
            regions.check_within(self.source_info.memory_size)
            if uffd.lacks:
                log.info("%s (pid %d): the userfaultfd lacks: %s", name, peer.pid, uffd.lacks)
            await self._run_session(name, peer, uffd, regions)
        except (HandoffError, RegionError, kerrors.UffdError) as e:
            log.error("%s: handoff rejected: %s", name, e)
            self._emit("handoff-rejected", session=name, reason=str(e))
        except Exception as e:
            log.exception("%s: session error", name)
            self._emit("session-failed", session=name, reason=f"{type(e).__name__}: {e}")
        finally:
            if fd >= 0:
                os.close(fd)
            conn.close()  # the VMM's signal that this handoff is over
            try:
                if uffd is not None and peer is not None:
                    # Whatever ended it (the VMM gone, bad regions, no source, a bug of ours),
                    # the userfaultfd stays open while the VMM lives: closing it would let the
                    # kernel zero-fill every page not placed. Returns at once if it is gone.
                    await _wait_process_gone(peer.pid)
            finally:
                if uffd is not None:
                    uffd.close()

    async def _run_session(
        self, name: str, peer: Peer, uffd: Userfaultfd, regions: RegionMap
    ) -> None:
        session = await Session.connect(
            uffd, regions, self.source, hugetlb=regions.page_size > 4096, name=name,
            status=lambda d: self._status({**d, "pid": peer.pid}),
        )  # fmt: skip
        self.sessions[name] = session
        try:
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
                await _wait_process_gone(peer.pid)
                nursery.cancel_scope.cancel()
            if not session.failed:
                self._emit(
                    "session-ended",
                    session=name,
                    pid=peer.pid,
                    reason="VMM exited",
                    pages=session.page_counts(),
                    placed=session.stats,
                )
        finally:
            del self.sessions[name]
            session.close()
