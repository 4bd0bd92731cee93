"""The source's C urgent path (csrc/urgent.c) against the Python reference path it stands in
for: byte-identical replies, hand-over of every frame it does not serve, shutdown, scale."""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
from test_source_server import ask, make_guest, running, session

from uffdpoison.kernel.digest import page_digests
from uffdpoison.kernel.urgent import Outcome, ReadLayout, UrgentResponder
from uffdpoison.protocol import (
    CLOSED,
    NEED_DATA,
    PROTOCOL_VERSION,
    Channel,
    Connection,
    Error,
    Hello,
    PageKind,
    Pages,
    Request,
    Side,
    Welcome,
)
from uffdpoison.source.backends import Backend, ImageBackend, MemoryBackend
from uffdpoison.source.server import _PushPriority

PS = 4096
HUGE = 2 << 20


async def _raw_replies(
    addr: tuple[str, int], requests: list[tuple[int, int]], page_size: int = 0
) -> bytes:
    """Open a session, send each (offset, count) as an urgent Request, and return the exact
    bytes the source answered (checked frame by frame with a destination Connection)."""
    sock = trio.socket.socket()
    await sock.connect(addr)
    conn = Connection(Side.DESTINATION, Channel.URGENT)
    raw = bytearray()

    async def next_event() -> Any:
        while (ev := conn.next_event()) is NEED_DATA:
            data = await sock.recv(1 << 20)
            raw.extend(data)
            conn.receive_data(data)
        return ev

    with sock:
        for b in conn.send(Hello(PROTOCOL_VERSION, Channel.URGENT, None, page_size, False)):
            await sock.send(b)
        assert isinstance(await next_event(), Welcome)
        del raw[:]
        for rid, (off, n) in enumerate(requests, 1):
            for b in conn.send(Request(rid, off, n, True)):
                await sock.send(b)
            got = 0
            while got < n:
                ev = await next_event()
                assert isinstance(ev, Pages) and ev.id == rid, ev
                got += ev.count
    return bytes(raw)


def _fast_count(srv: Any) -> int:
    return sum(s["fast_requests"] for s in srv.statuses if s["event"] == "session-ended")


async def _ended(srv: Any, n: int) -> None:
    with trio.fail_after(5):
        while sum(s["event"] == "session-ended" for s in srv.statuses) < n:
            await trio.sleep(0.01)


@pytest.mark.parametrize("backend_kind", ["memory", "image"])
async def test_c_replies_are_byte_identical_to_the_python_path(
    tmp_path: Path, backend_kind: str
) -> None:
    n = 1536  # 6 MiB: three huge pages, the first two poisoned
    buf = make_guest(n, zero={3, 4, 5, 40, 700})
    poisoned = [6 * PS, 41 * PS, 600 * PS]
    image = tmp_path / "guest.img"
    image.write_bytes(buf)

    def backend() -> Backend:
        if backend_kind == "memory":
            return MemoryBackend(buf, poisoned)
        return ImageBackend(image, poisoned)

    small = [(0, 1), (3 * PS, 1), (6 * PS, 1), (0, 64), (2 * PS, 50), (30 * PS, 256)]
    big = [(400 * PS, 300)]  # past the C path's 256-unit limit: Python serves it
    huge = [(0, 1), (HUGE, 1), (2 * HUGE, 1), (HUGE, 2)]  # 2 MiB units; (HUGE, 2): Python
    out: dict[bool, tuple[bytes, bytes]] = {}
    for fast in (True, False):
        with backend() as be:
            async with running(be, fast_urgent=fast) as srv:
                four_k = await _raw_replies(srv.addr, small + big)
                two_m = await _raw_replies(srv.addr, huge, page_size=HUGE)
                await _ended(srv, 2)
                out[fast] = (four_k, two_m)
                assert _fast_count(srv) == (len(small) + 3 if fast else 0)
    assert out[True] == out[False]
    # A huge page is POISONED as a whole if any 4 KiB of it is (the decoded stream is checked
    # kind by kind in test_source_server).
    assert out[True][1].count(b"\xa1k\x03") == 3
    assert out[True][1].count(b"\xa1k\x01") == 2


async def test_every_unusual_frame_is_served_by_python_then_c_resumes() -> None:
    n = 64
    buf = make_guest(n, zero={9})
    async with running(MemoryBackend(buf, [10 * PS]), fast_urgent=True) as srv:
        urgent, _ = await session(srv.addr)
        # A generic (minimal msgpack) encoding of a Request: valid, not the fast layout.
        # (Our Connection records the request; the wire gets the other encoding instead.)
        urgent.conn.send(Request(1, 8 * PS, 3, True))
        header = msgpack.packb({"t": 3, "i": 1, "o": 8 * PS, "n": 3, "u": True})
        await urgent.stream.send_all(struct.pack(">2sHI", b"uP", len(header), 0) + header)
        kinds = []
        got = 0
        while got < 3:
            ev = await urgent.next()
            assert isinstance(ev, Pages) and ev.id == 1
            kinds.append(ev.kind)
            got += ev.count
        assert kinds == [PageKind.DATA, PageKind.ZERO, PageKind.POISONED]
        # A digest-carrying (MINOR) request: Python answers CLEAN.
        dig = page_digests(buf[0:PS], PS)
        frames = await ask(urgent, 2, 0, 1, memoryview(dig).cast("B"))
        assert [f.kind for f in frames] == [PageKind.CLEAN]
        # Python keeps the connection until a plain fast Request (it serves that one too)...
        frames = await ask(urgent, 3, 0, 1)
        assert frames[0].kind is PageKind.DATA
        # ...then C has it again: pipelined requests in one write, one sent a byte at a time.
        wire = b"".join(
            b"".join(urgent.conn.send(Request(10 + i, i * PS, 1, True))) for i in range(8)
        )
        await urgent.stream.send_all(wire)
        for i in range(8):
            ev = await urgent.next()
            assert isinstance(ev, Pages) and ev.id == 10 + i and ev.offset == i * PS
            if ev.kind is PageKind.DATA:
                assert bytes(ev.data) == bytes(buf[i * PS : (i + 1) * PS])
        for byte in b"".join(urgent.conn.send(Request(30, 11 * PS, 1, True))):
            await urgent.stream.send_all(bytes([byte]))
        ev = await urgent.next()
        assert isinstance(ev, Pages) and ev.id == 30 and ev.kind is PageKind.DATA
        # A request past the end: Python names it, the connection ends.
        header = msgpack.packb({"t": 3, "i": 31, "o": n * PS, "n": 1, "u": True})
        await urgent.stream.send_all(struct.pack(">2sHI", b"uP", len(header), 0) + header)
        ev = await urgent.next()
        assert isinstance(ev, Error) and "memory_size" in ev.message
        await urgent.aclose()
        await _ended(srv, 1)
        ended = next(s for s in srv.statuses if s["event"] == "session-ended")
        assert ended["fast_requests"] == 9  # the 8 pipelined and the byte-at-a-time one
        assert ended["demand_requests"] == 12
        assert ended["fast_handoffs"] == 2  # the generic Request, the past-the-end one


async def test_a_minor_mode_peer_stays_on_the_python_path() -> None:
    """Digests on every request (MINOR mode): one hand-off, not a thread hop per request."""
    n = 16
    buf = make_guest(n, zero=set())
    async with running(MemoryBackend(buf), fast_urgent=True) as srv:
        urgent, _ = await session(srv.addr)
        for i in range(n):
            dig = page_digests(buf[i * PS : (i + 1) * PS], PS)
            frames = await ask(urgent, i + 1, i * PS, 1, memoryview(dig).cast("B"))
            assert [f.kind for f in frames] == [PageKind.CLEAN]
        await urgent.aclose()
        await _ended(srv, 1)
        ended = srv.statuses[-1]
        assert ended["fast_handoffs"] == 1 and ended["fast_requests"] == 0
        assert ended["clean_pages"] == n


async def test_eof_in_the_middle_of_a_request_is_a_protocol_error() -> None:
    async with running(MemoryBackend(make_guest(8, zero=set())), fast_urgent=True) as srv:
        urgent, _ = await session(srv.addr)
        wire = b"".join(urgent.conn.send(Request(1, 0, 1, True)))
        await urgent.stream.send_all(wire[:30])
        await urgent.stream.send_eof()
        ev = await urgent.next()
        assert isinstance(ev, Error) and "truncated" in ev.message
        assert await urgent.next() is CLOSED
        await urgent.aclose()
        await _ended(srv, 1)
        assert "truncated" in srv.statuses[-1]["reason"]


async def test_more_sessions_than_trio_default_threads_all_get_answers() -> None:
    """Each URGENT connection holds a thread while its C loop waits; trio's default limit of 40
    threads must not leave the 41st destination's faults unanswered."""
    buf = make_guest(64, zero=set())
    async with running(MemoryBackend(buf), fast_urgent=True) as srv:
        clients = [(await session(srv.addr))[0] for _ in range(48)]
        with trio.fail_after(10):
            for rid, c in enumerate(clients, 1):
                frames = await ask(c, rid, (rid % 64) * PS, 1)
                assert bytes(frames[0].data) == bytes(buf[(rid % 64) * PS : (rid % 64 + 1) * PS])
        for c in clients:
            await c.aclose()


async def test_shutdown_stops_waiting_c_loops() -> None:
    buf = make_guest(16, zero=set())
    with trio.fail_after(5):
        async with running(MemoryBackend(buf), fast_urgent=True) as srv:
            clients = [(await session(srv.addr))[0] for _ in range(3)]
            await ask(clients[0], 1, 0, 1)
            # Leaving `running` cancels the server: each C loop, blocked in poll(), must stop
            # for the nursery to exit (else fail_after fires).
    # The connections were closed by the server.
    for c in clients:
        assert await c.next() is CLOSED
        await c.aclose()


def test_c_path_needs_a_layout() -> None:
    """Backends C cannot read (a subclass without read_layout) stay on the Python path."""

    class Custom(Backend):
        def _read(self, offset: int, buf: memoryview) -> None:
            buf[:] = bytes(len(buf))

    assert Custom(PS).read_layout() is None
    with socket.socket() as s, pytest.raises(ValueError, match="exactly one"):
        UrgentResponder(
            s.fileno(),
            ReadLayout(),
            size=PS,
            base_page_size=PS,
            unit=PS,
            poison_bits=bytearray(1),
            offered_bits=bytearray(1),
        )


# -- the binding alone (uffdpoison.kernel.urgent), over socket pairs ----------------------------


def _responder(
    sock: socket.socket, layout: ReadLayout, npages: int, poisoned: tuple[int, ...] = (), **kw: Any
) -> tuple[UrgentResponder, bytearray]:
    poison = bytearray((npages + 7) // 8)
    for i in poisoned:
        poison[i >> 3] |= 1 << (i & 7)
    offered = bytearray((npages + 7) // 8)
    r = UrgentResponder(
        sock.fileno(),
        layout,
        size=npages * PS,
        base_page_size=PS,
        unit=PS,
        poison_bits=poison,
        offered_bits=offered,
        **kw,
    )
    return r, offered


def _serve(r: UrgentResponder, timeout: float = 5.0) -> tuple[Outcome, bytes]:
    out: list[tuple[Outcome, bytes]] = []
    th = threading.Thread(target=lambda: out.append(r.serve()))
    th.start()
    th.join(timeout)
    if th.is_alive():
        r.stop()
        th.join()
        pytest.fail("serve() did not return")
    return out[0]


def _request(rid: int, off: int, n: int) -> bytes:
    """The wire bytes of an urgent Request, from a destination Connection after an in-memory
    handshake with a source Connection."""
    dst = Connection(Side.DESTINATION, Channel.URGENT)
    src = Connection(Side.SOURCE, Channel.URGENT)
    src.receive_data(b"".join(dst.send(Hello(PROTOCOL_VERSION, Channel.URGENT, None, 0, False))))
    src.next_event()
    dst.receive_data(b"".join(src.send(Welcome(PROTOCOL_VERSION, b"t", PS, 1 << 30, 0, 0, None))))
    assert isinstance(dst.next_event(), Welcome)
    return b"".join(dst.send(Request(rid, off, n, True)))


def test_binding_serves_then_hands_back_what_it_does_not_serve() -> None:
    guest = make_guest(4, zero={2})
    a, b = socket.socketpair()
    with a, b:
        r, offered = _responder(a, ReadLayout(mem=memoryview(guest)), 4, poisoned=(3,))
        with r:
            generic = struct.pack(">2sHI", b"uP", 1, 0) + b"\x80"  # an empty map: Python's
            b.sendall(_request(5, 0, 4) + generic)
            outcome, left = _serve(r)
            assert outcome is Outcome.HANDOFF and left == generic
            reply = b.recv(1 << 20)
            while reply.count(b"uP") < 3:
                reply += b.recv(1 << 20)
            # DATA 0..1, ZERO 2, POISONED 3: three frames, 48 + 8192 + 48 + 48 bytes.
            assert len(reply) == 3 * 48 + 2 * PS
            assert reply[48 : 48 + 2 * PS] == bytes(guest[: 2 * PS])
            assert [reply[25], reply[48 + 2 * PS + 25], reply[2 * 48 + 2 * PS + 25]] == [1, 2, 3]
            assert offered[0] == 0x0F and r.take_hint() == 4 and r.take_hint() is None
            counts = r.take_counters()
            assert counts["requests"] == 1 and counts["data_pages"] == 2
            assert counts["zero_pages"] == 1 and counts["poisoned_pages"] == 1
            assert counts["bytes_sent"] == len(reply)


def test_binding_never_reads_a_poisoned_page(tmp_path: Path) -> None:
    """The range table covers only page 0: a read of page 1 would fail (HANDOFF). Poisoned,
    it is answered POISONED without a read, as /proc/PID/mem would EIO on it."""
    img = tmp_path / "g"
    img.write_bytes(bytes(make_guest(2, zero=set())))
    a, b = socket.socketpair()
    with a, b, open(img, "rb") as f:
        r, _ = _responder(a, ReadLayout(data_fd=f.fileno(), ranges=[(0, 0, PS)]), 2, (1,))
        with r:
            b.sendall(_request(1, 0, 2))
            b.shutdown(socket.SHUT_WR)
            outcome, left = _serve(r)
            assert outcome is Outcome.EOF and left == b""
            reply = b.recv(1 << 20)
            while len(reply) < 2 * 48 + PS:
                reply += b.recv(1 << 20)
            assert reply[25] == 1 and reply[48 + PS + 25] == 3


def test_binding_read_failure_hands_back_before_sending(tmp_path: Path) -> None:
    img = tmp_path / "short"
    img.write_bytes(bytes(PS))  # the layout says 2 pages; the file ends after 1
    a, b = socket.socketpair()
    with a, b, open(img, "rb") as f:
        r, offered = _responder(a, ReadLayout(data_fd=f.fileno(), ranges=[(0, 0, 2 * PS)]), 2)
        with r:
            req = _request(1, 0, 2)
            b.sendall(req)
            outcome, left = _serve(r)
            assert outcome is Outcome.HANDOFF and left == req
            b.setblocking(False)
            with pytest.raises(BlockingIOError):
                b.recv(1)
            assert offered[0] == 0


def test_binding_stop_and_peer_errors() -> None:
    guest = make_guest(256, zero=set())
    a, b = socket.socketpair()
    with a, b:
        r, _ = _responder(a, ReadLayout(mem=memoryview(guest)), 256)
        with r:
            r.stop()
            assert _serve(r) == (Outcome.STOPPED, b"")
            r.clear_stop()
            b.sendall(_request(1, 0, 1)[:20])  # part of a frame, then the peer goes
            b.close()
            assert _serve(r) == (Outcome.EOF, _request(1, 0, 1)[:20])
    # A reset connection: ERROR with its errno.
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        c = socket.create_connection(lsock.getsockname())
        s, _ = lsock.accept()
        with s:
            r, _ = _responder(s, ReadLayout(mem=memoryview(guest)), 256)
            with r:
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                c.close()
                outcome, _ = _serve(r)
                assert outcome is Outcome.ERROR and r.errno == errno.ECONNRESET
    # A peer that stops reading in the middle of a 1 MiB reply: BROKEN after the timeout.
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        c = socket.socket()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        c.connect(lsock.getsockname())
        s, _ = lsock.accept()
        with c, s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            s.setblocking(False)
            r, _ = _responder(s, ReadLayout(mem=memoryview(guest)), 256, partial_timeout=0.2)
            with r:
                c.sendall(_request(1, 0, 256))
                t0 = time.monotonic()
                outcome, _ = _serve(r)
                assert outcome is Outcome.BROKEN and r.errno == errno.ETIMEDOUT
                assert time.monotonic() - t0 >= 0.2
                assert r.take_counters()["bytes_sent"] < 256 * PS


def _thread_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_push_runs_at_lower_priority_and_demand_replies_do_not() -> None:
    """The bulk push lowers its thread's CPU priority only while it works on a chunk; an
    urgent responder thread made meanwhile (threads inherit it) resets its own."""
    if os.geteuid() != 0:
        pytest.skip("restoring a thread's priority needs CAP_SYS_NICE (not root)")
    seen: list[int] = []
    bases: list[int] = []

    def work() -> None:
        base = _thread_nice()
        prio = _PushPriority(7)
        bases.extend((base, prio.base, prio.delta))
        with prio.lowered():
            seen.append(_thread_nice())
            # A thread made here inherits the lowered priority...
            guest = make_guest(2, zero=set())
            a, b = socket.socketpair()
            with a, b:
                r, _ = _responder(a, ReadLayout(mem=memoryview(guest)), 2, nice=base)
                with r:
                    inner: list[int] = []

                    def serve() -> None:
                        inner.append(_thread_nice())
                        r.stop()
                        r.serve()
                        inner.append(_thread_nice())

                    th = threading.Thread(target=serve)
                    th.start()
                    th.join()
                    seen.extend(inner)
        seen.append(_thread_nice())

    t = threading.Thread(target=work)  # not the test runner's thread: its priority is left be
    t.start()
    t.join()
    base = bases[0]
    assert bases == [base, base, 7]
    # lowered, inherited by the new thread, reset by serve(), restored after the chunk
    low = min(19, base + 7)
    assert seen == [low, low, base, base]
