"""The source's C data plane (csrc/source_plane.c): what the server tests cannot see from outside.

Driven directly over socket pairs (``SourcePlane``), and through the server for what needs
many sessions: threads, priorities, a held control frame, a peer that stops reading.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import time

import pytest
import trio
from test_protocol import body, req_frame
from test_source_server import ask, make_guest, running, session

from uffdpoison.kernel.planes import NoteKind, SourcePlane
from uffdpoison.protocol import CLOSED, Channel, layout
from uffdpoison.source.backends import MemoryBackend

PS = 4096
URGENT, BULK = int(Channel.URGENT), int(Channel.BULK)


def _nice(tid: int) -> int:
    with open(f"/proc/self/task/{tid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[16])  # field 19: nice


def _notes(plane: SourcePlane, want: NoteKind, timeout: float = 5.0) -> list:
    deadline = time.monotonic() + timeout
    got: list = []
    while time.monotonic() < deadline:
        got += plane.take_notes()[1]
        if any(n.kind is want for n in got):
            return got
        time.sleep(0.005)
    pytest.fail(f"no {want.name} note in {got}")


def _read_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        assert chunk, "EOF"
        buf += chunk
    return buf


class _Loop:
    """One channel's loop on a thread of its own (as trio runs it)."""

    def __init__(self, plane: SourcePlane, channel: int, **kw: int) -> None:
        self.tid = 0
        self.thread = threading.Thread(target=self._run, args=(plane, channel, kw))
        self.thread.start()
        while not self.tid:
            time.sleep(0.001)

    def _run(self, plane: SourcePlane, channel: int, kw: dict[str, int]) -> None:
        self.tid = threading.get_native_id()
        plane.run(channel, **kw)

    def join(self, timeout: float = 5.0) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the loop did not return"


def test_a_held_control_frame_stops_reading_until_released() -> None:
    be = MemoryBackend(make_guest(8, set()))
    plane = SourcePlane(be.guest(), PS)
    ours, peer = socket.socketpair()
    try:
        ours.setblocking(False)
        plane.attach(URGENT, ours.fileno())
        loop = _Loop(plane, URGENT)
        # A control frame, then a Request behind it: the Request waits for the verdict.
        done = bytes.fromhex("7550000100000000") + b"\x80"  # {} as a header: trio's to judge
        peer.sendall(done + req_frame(1, 2 * PS, 1))
        notes = _notes(plane, NoteKind.CONTROL)
        assert [n.kind for n in notes] == [NoteKind.CONTROL]
        assert plane.held(URGENT) == done
        peer.settimeout(0.2)
        with pytest.raises(TimeoutError):
            peer.recv(1)  # nothing answered while the frame is held
        plane.release(URGENT)
        peer.settimeout(5)
        reply = _read_exact(peer, layout.PREFIX_SIZE + layout.PAGES.size + PS)
        assert reply[-PS:] == bytes(be.read(2 * PS, 1)[1])
        assert plane.held(URGENT) == b""
        # What trio sends back goes out whole, then the channel closes.
        plane.send(URGENT, b"bye")
        plane.close_channel(URGENT)
        loop.join()
        assert _read_exact(peer, 3) == b"bye" and peer.recv(1) == b""
        assert plane.stats()["requests"] == 1
    finally:
        plane.close()
        ours.close()
        peer.close()
        be.close()


def test_a_peer_that_stops_reading_mid_reply_is_given_up() -> None:
    """Once part of a reply is on the wire the rest must go out whole; a peer that takes no
    byte of it for the partial-frame timeout is dropped (noted ETIMEDOUT), never left with half
    a frame followed by something else."""
    n = 2048  # 8 MiB: far more than the socket buffers hold
    be = MemoryBackend(make_guest(n, set()))
    plane = SourcePlane(be.guest(), PS, partial_timeout=0.3)
    ours, peer = socket.socketpair()
    try:
        ours.setblocking(False)
        plane.attach(URGENT, ours.fileno())
        loop = _Loop(plane, URGENT)
        peer.sendall(req_frame(1, 0, n))  # and never read
        t0 = time.monotonic()
        notes = _notes(plane, NoteKind.SOCK_ERROR)
        assert any(n.err == errno.ETIMEDOUT for n in notes), notes
        assert time.monotonic() - t0 < 3
        loop.join()
    finally:
        plane.close()
        ours.close()
        peer.close()
        be.close()


def test_the_push_runs_lowered_and_restores_its_thread() -> None:
    """The push's thread runs at the lower priority while it pushes and gives it back when it
    returns: trio reuses its worker threads, and a demand responder must not inherit it."""
    if os.geteuid() != 0:
        pytest.skip("raising a thread's priority back needs CAP_SYS_NICE (not root)")
    be = MemoryBackend(make_guest(4096, set()))  # 16 MiB: the push blocks on a full socket
    plane = SourcePlane(be.guest(), PS)
    ours, peer = socket.socketpair()
    try:
        ours.setblocking(False)
        plane.attach(BULK, ours.fileno())
        base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        loop = _Loop(plane, BULK, nice=min(19, base + 7), base_nice=base)
        time.sleep(0.2)
        assert _nice(loop.tid) == min(19, base + 7)
        plane.stop(BULK)
        loop.join()
        # The thread is gone; ask its successor (the same code path, a fresh thread) instead.
        probe = _Loop(plane, URGENT, base_nice=base)
        assert _nice(probe.tid) == base
        plane.stop(URGENT)
        probe.join()
        assert plane.stats()["pushes"] > 0
    finally:
        plane.close()
        ours.close()
        peer.close()
        be.close()


async def test_more_sessions_than_trio_default_threads_all_get_answers() -> None:
    """Each channel's loop holds a thread while it waits; trio's default limit of 40 threads
    must not leave the 41st destination's faults unanswered."""
    buf = make_guest(64, set())
    async with running(MemoryBackend(buf)) as srv:
        clients = [(await session(srv.addr))[0] for _ in range(48)]
        with trio.fail_after(10):
            for rid, c in enumerate(clients, 1):
                frames = await ask(c, rid, (rid % 64) * PS, 1)
                assert body(frames[0]) == bytes(buf[(rid % 64) * PS : (rid % 64 + 1) * PS])
        for c in clients:
            await c.aclose()


async def test_shutdown_stops_waiting_loops() -> None:
    buf = make_guest(16, set())
    with trio.fail_after(5):
        async with running(MemoryBackend(buf)) as srv:
            clients = [(await session(srv.addr))[0] for _ in range(3)]
            await ask(clients[0], 1, 0, 1)
            # Leaving `running` cancels the server: each C loop, blocked in poll(), must stop
            # for the nursery to exit (else fail_after fires).
    for c in clients:
        assert await c.next() is CLOSED
        await c.aclose()
