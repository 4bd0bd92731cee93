"""The handoff in Firecracker's format: what a VMM sends the destination daemon, and its socket.

A VMM connects to a Unix socket and sends, in one message, a JSON array of regions
(``base_host_virt_addr``, ``size``, ``offset``, ``page_size``) with its userfaultfd attached as
SCM_RIGHTS. EOF on the handoff socket does not end the session: some Firecracker releases close
it right after sending. A handoff the daemon refuses is answered with one JSON line
``{"error": reason}`` before the daemon closes the socket; a close without it means the daemon
stopped (the VMM may hand over again: docs/FIRECRACKER.md).
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
from typing import NamedTuple

import trio

from uffdpoison.destination.regions import (
    MAX_HANDOFF_BYTES,
    RegionMap,
)

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


async def receive_handoff(sock: socket.socket, timeout: float) -> tuple[bytes, list[int]]:
    """Read one handoff: a JSON array of regions (at most MAX_HANDOFF_BYTES) with the
    userfaultfd as SCM_RIGHTS on its first message, and in MINOR mode the guest memory's
    file after it (so [uffd] or [uffd, memory file]). Bytes are read until they hold one whole
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
        if len(fds) > 2:
            raise HandoffError(
                f"handoff carried {len(fds)} file descriptors; expected the userfaultfd, and "
                "in MINOR mode the guest memory file after it"
            )
        return bytes(buf), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def check_memory_file(fd: int, regions: RegionMap) -> int:
    """A MINOR-mode handoff's guest memory file, checked against its regions (each at its
    ``offset`` in the file): a file long enough for all of them. Its kind (a shmem memfd or a
    hugetlbfs file) the VMM's MINOR registration already required."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise HandoffError(
            "the second file descriptor is not a file; in MINOR mode it is the guest memory "
            "file (a shmem memfd or a hugetlbfs file)"
        )
    end = max(r.offset_end for r in regions)
    if st.st_size < end:
        raise HandoffError(
            f"the guest memory file holds {st.st_size} bytes; the regions need {end} "
            "(each region's offset is its offset in that file)"
        )
    return fd


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


def prepare_socket(path: str, mode: int | None, owner: tuple[int, int] | None) -> socket.socket:
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


def refuse(conn: socket.socket, reason: str) -> None:
    """Tell the VMM why its handoff was refused (best effort: it may be gone already)."""
    with contextlib.suppress(OSError):
        conn.send((json.dumps({"error": reason}) + "\n").encode(), socket.MSG_DONTWAIT)


async def wait_process_gone(pid: int) -> None:
    """Until the process is gone (at once if it already is)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        await trio.lowlevel.wait_readable(pidfd)
    finally:
        trio.lowlevel.notify_closing(pidfd)
        os.close(pidfd)
