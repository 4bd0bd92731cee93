"""The source's C urgent path (csrc/urgent.c) against the Python reference path it stands in
for: byte-identical replies, hand-over of every frame it does not serve, shutdown, scale."""

from __future__ import annotations

import socket
import struct
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
from test_source_server import ask, make_guest, running, session

from uffdpoison.kernel.digest import page_digests
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
        # Pipelined fast requests in one write, then one sent a byte at a time.
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
        assert ended["demand_requests"] == 11


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
    with socket.socket() as s:
        from uffdpoison.kernel.urgent import ReadLayout, UrgentResponder

        with pytest.raises(ValueError, match="exactly one"):
            UrgentResponder(
                s.fileno(),
                ReadLayout(),
                size=PS,
                base_page_size=PS,
                unit=PS,
                poison_bits=bytearray(1),
                offered_bits=bytearray(1),
            )
