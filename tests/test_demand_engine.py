"""The C demand engine (csrc/demand.c) against the real kernel and real sources.

The engine is the default demand path of every ``Session``; test_embed, test_daemon, test_demo
and test_examples drive it through toy VMMs. Here: its wire bytes, that it (and not the Python
loop) serves faults, poison and discards, how it hands the URGENT channel back to Python, and
that stopping it leaves nothing running.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import threading
from array import array
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import msgpack
import pytest
import trio
from conftest import SIGBUS_CODES
from destination_helpers import make_guest, start_source

from uffdpoison import protocol
from uffdpoison.destination.client import SourceClient
from uffdpoison.destination.embed import FEATURES, serve_memory
from uffdpoison.destination.faultloop import Session, SessionFailed
from uffdpoison.destination.regions import Region, RegionMap
from uffdpoison.harness.toucher import OUTCOME_OK, OUTCOME_SIGBUS, Toucher
from uffdpoison.kernel import RegisterMode, RunResult, Userfaultfd, memory
from uffdpoison.kernel.demand import encode_request
from uffdpoison.kernel.digest import page_digests
from uffdpoison.ledger import PageState
from uffdpoison.protocol import Channel, PageKind, Side

PS = 4096


def test_request_bytes_are_protocol_fast_encoding() -> None:
    """The engine's Request frame is byte for byte what protocol.Connection sends, and the
    source side decodes it as an urgent Request."""
    src, dst = protocol.open_pair(Channel.URGENT, memory_size=1 << 40)
    for rid, off, n in ((1, 0, 1), (2, 4096 * 12345, 1), (0xFFFF_FFFF_FF, (1 << 40) - PS, 1)):
        ours = encode_request(rid, off, n)
        theirs = b"".join(bytes(b) for b in dst.send(protocol.Request(rid, off, n, True)))
        assert ours == theirs
        src.receive_data(ours)
        assert src.next_event() == protocol.Request(rid, off, n, True, None)
    assert len(encode_request(7, 0, 64)) == 48


def _touch(addrs: list[int], **kw: Any) -> Toucher:
    t = Toucher(array("Q", addrs), **kw)
    t.start()
    return t


async def test_engine_serves_faults_poison_and_zero_from_a_source(nursery: trio.Nursery) -> None:
    """Every page faulted, requested and placed by the engine: data (digests match), zero
    pages, and poison the source discovered after the handshake (POISONED replies, placed as
    markers: the touch SIGBUSes with BUS_MCEERR_AR, or BUS_ADRERR on kernels without
    MEMORY_FAILURE)."""
    n = 256
    guest = make_guest(n, poisoned=[], zero=[i for i in range(n) if i % 7 == 3])
    backend = guest.backend()
    source = await start_source(nursery, backend)
    late_poison = [5, 77, 200]
    with memory.anon(n * PS) as m:
        base = m.addr
        region = Region(base, n * PS, 0)
        async with serve_memory([region], source, background=False) as server:
            session = server.session
            assert session._engine_live and session._engine is not None
            backend.add_poison([i * PS for i in late_poison])  # unknown at the handshake
            t = _touch([m.addr + i * PS for i in range(n)], digest=True, threads=2)
            await t.wait()
            r = t.results
            eng = session._engine.stats()
            assert session._engine_live, "the engine handed over unexpectedly"
            assert eng["faults"] >= n and eng["demand_requests"] == n
            assert eng["poisoned"] == len(late_poison)
            assert eng["copied"] + eng["zeroed"] == n - len(late_poison)
            assert eng["replies"] == n
            assert session._py_stats.faults == 0, "the Python loop served faults"
            assert server.stats["faults"] == eng["faults"]  # merged into placement.Stats
            counts = server.page_counts()
            assert counts["poisoned"] == len(late_poison)
            assert counts["present"] == n - len(late_poison)
    digests = guest.digests()
    for i in range(n):
        if i in late_poison:
            assert r.outcome[i] == OUTCOME_SIGBUS, f"page {i}"
            assert r.si_code[i] in SIGBUS_CODES
            assert r.si_addr[i] == base + i * PS
        else:
            assert r.outcome[i] == OUTCOME_OK and r.digest[i] == digests[i], f"page {i}"


async def test_remove_of_poisoned_and_data_pages(nursery: trio.Nursery) -> None:
    """MADV_DONTNEED (a REMOVE event, read by the engine): a poisoned page is re-poisoned on
    its next fault, a data page comes back as zeros, and neither asks the source again."""
    guest = make_guest(32, poisoned=[], zero=[])
    backend = guest.backend()
    source = await start_source(nursery, backend)
    with memory.anon(32 * PS) as m:
        async with serve_memory([Region(m.addr, 32 * PS, 0)], source, background=False) as srv:
            backend.add_poison([3 * PS])
            t = _touch([m.addr + i * PS for i in range(32)])
            await t.wait()
            assert t.results.outcome[3] == OUTCOME_SIGBUS
            eng = srv.session._engine
            assert eng is not None
            requests = eng.stats()["demand_requests"]
            # madvise waits until the REMOVE event is read: call it off the trio thread
            await trio.to_thread.run_sync(m.discard, 3 * PS, PS)
            await trio.to_thread.run_sync(m.discard, 5 * PS, 2 * PS)
            t = _touch([m.addr + 3 * PS, m.addr + 5 * PS, m.addr + 6 * PS], digest=True)
            await t.wait()
            r = t.results
            assert r.outcome[0] == OUTCOME_SIGBUS and r.si_code[0] in SIGBUS_CODES
            zero = page_digests(bytes(PS), PS)[0]
            assert r.outcome[1] == r.outcome[2] == OUTCOME_OK
            assert r.digest[1] == r.digest[2] == zero
            st = eng.stats()
            assert st["removes"] == 2
            assert st["repoisoned"] == 1 and st["zero_after_remove"] == 2
            assert st["demand_requests"] == requests, "a discarded page was asked for again"
            assert srv.session._engine_live


# ---- a hand-driven source: handshake through protocol.Connection, replies built by hand ----

Reply = Callable[[trio.SocketStream, protocol.Request], Awaitable[None]]


async def _fake_source(nursery: trio.Nursery, npages: int, reply: Reply) -> str:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def handle(stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            await serve_one(stream)

    async def serve_one(stream: trio.SocketStream) -> None:
        conn = protocol.Connection(Side.SOURCE, Channel.URGENT)

        async def next_event() -> Any:
            while (ev := conn.next_event()) is protocol.NEED_DATA:
                data = await stream.receive_some(1 << 16)
                conn.receive_data(data)
            return ev

        hello = await next_event()
        assert isinstance(hello, protocol.Hello)
        welcome = protocol.Welcome(protocol.PROTOCOL_VERSION, b"fake", PS, npages * PS, 0, 0, None)
        for b in conn.send(welcome):
            await stream.send_all(b)
        while isinstance(ev := await next_event(), protocol.Request):
            await reply(stream, ev)

    nursery.start_soon(partial(trio.serve_listeners, handle, listeners))
    return f"127.0.0.1:{port}"


def _generic_pages(rid: int, kind: PageKind, off: int, n: int, payload: bytes = b"") -> bytes:
    """A valid Pages frame in msgpack's compact encoding (not the fixed 40-byte header)."""
    header = msgpack.packb({"t": 4, "i": rid, "k": int(kind), "o": off, "n": n})
    return struct.pack(">2sHI", b"uP", len(header), len(payload)) + header + payload


def _fast_pages(rid: int, kind: PageKind, off: int, n: int, payload: bytes = b"") -> bytes:
    c1, c2, c3, c4 = protocol._PAGES_C
    return (
        protocol._PAGES_F.pack(b"uP", 40, len(payload), c1, rid, c2, kind, c3, off, c4, n) + payload
    )


@pytest.mark.parametrize("bad", ["unknown-id", "wrong-offset", "short-payload", "error", "eof"])
async def test_bad_reply_fails_the_session_and_places_nothing(
    nursery: trio.Nursery, bad: str
) -> None:
    """A reply the engine cannot take goes to Python's decoder, which fails the session as
    before: nothing of it is placed and the vCPU stays blocked (until the range is
    unregistered at exit, which lets the kernel zero-fill it)."""

    async def reply(stream: trio.SocketStream, req: protocol.Request) -> None:
        data = b"\xee" * PS
        if bad == "unknown-id":
            frame = _fast_pages(req.id + 1000, PageKind.DATA, req.offset, 1, data)
        elif bad == "wrong-offset":
            frame = _fast_pages(req.id, PageKind.DATA, req.offset + PS, 1, data)
        elif bad == "short-payload":
            frame = _fast_pages(req.id, PageKind.DATA, req.offset, 1, data[:-1])
        elif bad == "error":
            body = msgpack.packb({"t": 5, "i": req.id, "c": "read-failed", "m": "disk on fire"})
            frame = struct.pack(">2sHI", b"uP", len(body), 0) + body
        else:
            await stream.aclose()
            return
        await stream.send_all(frame)

    source = await _fake_source(nursery, 16, reply)
    events: list[dict[str, Any]] = []
    with memory.anon(16 * PS) as m:
        t = Toucher(array("Q", [m.addr + 9 * PS]))
        with pytest.raises(SessionFailed) as ei:
            async with serve_memory(
                [Region(m.addr, 16 * PS, 0)], source, background=False, status=events.append
            ):
                t.start()
                await trio.sleep(10)
                pytest.fail("the session did not fail")
        assert t.join(5), "the blocked vCPU was not released by the unregister"
        failed = [e for e in events if e["event"] == "session-failed"]
        assert failed and failed[0]["pages"]["present"] == 0
        assert failed[0]["placed"]["copied"] == 0
        assert t.results.value[0] == 0, "the bad reply's data reached guest memory"
    if bad == "error":
        assert "disk on fire" in str(ei.value)


async def test_generic_encoding_hands_over_to_python(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """Another source implementation may encode a Pages header differently; that is valid
    and must not fail the session: the engine hands the channel back to Python, with its
    outstanding requests, and the Python loop serves the rest of the session."""
    n = 8
    pending: list[protocol.Request] = []

    async def reply(stream: trio.SocketStream, req: protocol.Request) -> None:
        pending.append(req)
        if len(pending) < 2 and req.offset // PS < 2:
            return  # hold the first until the second is outstanding too
        for r in pending:
            i = r.offset // PS
            await stream.send_all(
                _generic_pages(r.id, PageKind.DATA, r.offset, 1, bytes([i + 1]) * PS)
            )
        pending.clear()

    source = await _fake_source(nursery, n, reply)
    caplog.set_level(logging.INFO, logger="uffdpoison.destination.faultloop")
    with memory.anon(n * PS) as m:
        async with serve_memory([Region(m.addr, n * PS, 0)], source, background=False) as srv:
            session = srv.session
            t = _touch([m.addr, m.addr + PS], threads=2)
            await t.wait()
            assert list(t.results.value) == [1, 2]
            assert not session._engine_live, "the engine did not hand over"
            t = _touch([m.addr + i * PS for i in range(2, n)])
            await t.wait()
            assert list(t.results.value) == [i + 1 for i in range(2, n)]
            assert session._py_stats.faults >= n - 2  # the Python loop served these
            assert session.stats.copied == n
    assert any("handed over to Python (FOREIGN, 2 request(s)" in r.message for r in caplog.records)


async def test_cancel_stops_the_engine_thread(nursery: trio.Nursery) -> None:
    """Cancelling a session stops the C loop (its worker thread returns) promptly, with a
    vCPU still blocked in a fault; the fds stay open for the caller."""
    n = 8

    async def reply(stream: trio.SocketStream, req: protocol.Request) -> None:
        pass  # never answer: the fault stays pending

    source = await _fake_source(nursery, n, reply)
    with memory.anon(n * PS) as m, Userfaultfd.create(FEATURES) as uffd:
        uffd.register(m.addr, m.size, RegisterMode.MISSING)
        client = await SourceClient.connect(source, page_size=PS, bulk=False)
        session = Session(uffd, RegionMap([Region(m.addr, n * PS, 0)]), client)
        t = Toucher(array("Q", [m.addr]))
        try:
            async with trio.open_nursery() as inner:
                await inner.start(session.run)
                t.start()
                with trio.fail_after(5):
                    while session._engine is None or session._engine.stats()["faults"] == 0:
                        await trio.sleep(0.005)
                eng = session._engine
                assert eng.running
                with trio.fail_after(2):
                    inner.cancel_scope.cancel()
            assert not eng.running, "the engine's thread is still in its loop"
            assert not session._engine_live
            assert eng.outstanding() == [(1, 0, PS)]
            uffd.wake(m.addr, PS)  # fd still open and usable
        finally:
            uffd.unregister(m.addr, m.size)
            assert t.join(5)
            session.close()


def test_engine_run_result_codes_are_distinct() -> None:
    assert len({int(r) for r in RunResult}) == len(RunResult)


async def test_ensure_present_requests_runs_through_the_engine(nursery: trio.Nursery) -> None:
    """ensure_present claims and requests through the engine (runs of 64 pages, one Request
    each) and wakes on the engine's progress eventfd; poisoned pages are reported."""
    n = 256
    guest = make_guest(n, poisoned=[], zero=[])
    backend = guest.backend()
    source = await start_source(nursery, backend)
    with memory.anon(n * PS) as m:
        async with serve_memory([Region(m.addr, n * PS, 0)], source, background=False) as srv:
            eng = srv.session._engine
            assert eng is not None
            backend.add_poison([50 * PS])
            with trio.fail_after(10):
                poisoned = await srv.ensure_present(m.addr + 10 * PS, 100 * PS)
            assert poisoned == [m.addr + 50 * PS]
            assert eng.stats()["demand_requests"] == 2  # 64 + 36 pages
            assert m.read(10 * PS, 40 * PS) == bytes(guest.image[10 * PS : 50 * PS])
            assert m.read(51 * PS, 59 * PS) == bytes(guest.image[51 * PS : 110 * PS])
            assert srv.session._engine_live


async def test_fault_in_no_region_is_counted_and_logged(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """A fault in registered memory that no region covers is woken unserved (it faults again)
    and counted; Python logs it from the engine's counters."""
    guest = make_guest(8, poisoned=[], zero=[])
    source = await start_source(nursery, guest.backend())
    with memory.anon(16 * PS) as m:
        # serve_memory registers only the region; register the rest of the mapping ourselves
        async with serve_memory([Region(m.addr, 8 * PS, 0)], source, background=False) as srv:
            srv.session.uffd.register(m.addr + 8 * PS, 8 * PS, RegisterMode.MISSING)
            t = _touch([m.addr + 12 * PS])
            eng = srv.session._engine
            assert eng is not None
            with trio.fail_after(5):
                while eng.stats()["unknown_address"] == 0:
                    await trio.sleep(0.005)
                while not any("in no region" in r.message for r in caplog.records):
                    await trio.sleep(0.005)
            srv.session.uffd.unregister(m.addr + 8 * PS, 8 * PS)  # lets the touch finish
            assert t.join(5)


@pytest.mark.parametrize("engine", [True, False])
async def test_both_demand_paths_serve_the_same_guest(nursery: trio.Nursery, engine: bool) -> None:
    """The Python loop stays the fallback (engine=False) and serves exactly what the engine
    does, with the background stream running."""
    n = 512
    guest = make_guest(n)
    source = await start_source(nursery, guest.backend(), max_bandwidth=1 << 20)
    with memory.anon(n * PS) as m:
        base = m.addr
        async with serve_memory([Region(base, n * PS, 0)], source, engine=engine) as srv:
            assert srv.session._engine_live is engine
            t = _touch([base + i * PS for i in reversed(range(n))], digest=True, threads=2)
            await t.wait()
            r = t.results
            await srv.wait_complete()
            assert srv.page_counts()["poisoned"] == len(guest.poisoned)
            assert (srv.session._py_stats.faults > 0) is not engine
    digests = guest.digests()
    for k, i in enumerate(reversed(range(n))):
        if i in guest.poisoned:
            assert r.outcome[k] == OUTCOME_SIGBUS and r.si_code[k] in SIGBUS_CODES
        else:
            assert r.outcome[k] == OUTCOME_OK and r.digest[k] == digests[i], f"page {i}"


async def test_requests_queue_while_the_socket_is_full(nursery: trio.Nursery) -> None:
    """More requests than the socket takes (a source that does not read for a while): the
    engine queues the rest and sends them as the socket drains; every page arrives."""
    n = 6000
    release = trio.Event()

    async def reply(stream: trio.SocketStream, req: protocol.Request) -> None:
        await release.wait()
        await stream.send_all(_fast_pages(req.id, PageKind.ZERO, req.offset, req.count))

    source = await _fake_source(nursery, n, reply)
    with memory.anon(n * PS) as m, Userfaultfd.create(FEATURES) as uffd:
        uffd.register(m.addr, m.size, RegisterMode.MISSING)
        client = await SourceClient.connect(source, page_size=PS, bulk=False)
        client.urgent.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        session = Session(uffd, RegionMap([Region(m.addr, n * PS, 0)]), client)
        try:
            async with trio.open_nursery() as inner:
                await inner.start(session.run)
                eng = session._engine
                assert eng is not None
                for i in range(n):  # one request a page: 6000 x 48 bytes
                    assert eng.request(0, i, 1, 1) == 0
                assert eng.unsent(), "the socket took everything: nothing was queued"
                release.set()
                with trio.fail_after(20):
                    while session.ledgers[0].counts[PageState.PRESENT] < n:
                        await trio.sleep(0.01)
                st = eng.stats()
                assert st["demand_requests"] == st["replies"] == n
                assert session._engine_live
                inner.cancel_scope.cancel()
        finally:
            uffd.unregister(m.addr, m.size)
            session.close()


async def test_faults_are_served_while_the_vmm_discards_in_a_loop(nursery: trio.Nursery) -> None:
    """Balloon-style discards (MADV_DONTNEED after MADV_DONTNEED from another thread) keep a
    non-cooperative event pending almost all the time: every placement meets EAGAIN. The
    engine reads each event at once and retries in the short window before the next, so the
    faults are still served (with the discarding thread on another CPU; on one shared CPU
    neither demand path can get in between)."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs: the discarding thread must run beside the engine")
    n = 2048
    guest = make_guest(n, poisoned=[], zero=[])
    source = await start_source(nursery, guest.backend())
    with memory.anon(n * PS) as m:
        async with serve_memory([Region(m.addr, n * PS, 0)], source, background=False) as srv:
            stop = threading.Event()
            discards = [0]

            def discarder() -> None:
                while not stop.is_set():  # the last 64 pages, never touched
                    m.discard((n - 1 - discards[0] % 64) * PS, PS)
                    discards[0] += 1

            th = threading.Thread(target=discarder)
            th.start()
            try:
                t = _touch([m.addr + i * PS for i in range(n - 64)], digest=True, threads=2)
                with trio.fail_after(30):
                    await t.wait()
            finally:
                stop.set()
                await trio.to_thread.run_sync(th.join)
            r = t.results
            eng = srv.session._engine
            assert eng is not None and srv.session._engine_live
            st = eng.stats()
            assert st["removes"] == discards[0] > 0
            assert st["copied"] == n - 64
    digests = guest.digests()
    assert all(r.outcome[i] == OUTCOME_OK and r.digest[i] == digests[i] for i in range(n - 64))


async def test_reply_for_a_page_discarded_while_in_flight_is_dropped(nursery: trio.Nursery) -> None:
    """The guest discards a page whose reply is on its way: the late data is dropped (never
    placed over the discard), the vCPU is woken and faults again, and gets a zero page."""
    asked = trio.Event()
    go = trio.Event()

    async def reply(stream: trio.SocketStream, req: protocol.Request) -> None:
        asked.set()
        await go.wait()
        await stream.send_all(_fast_pages(req.id, PageKind.DATA, req.offset, 1, b"\xab" * PS))

    source = await _fake_source(nursery, 8, reply)
    with memory.anon(8 * PS) as m:
        async with serve_memory([Region(m.addr, 8 * PS, 0)], source, background=False) as srv:
            t = _touch([m.addr + 2 * PS])
            with trio.fail_after(5):
                await asked.wait()
            await trio.to_thread.run_sync(m.discard, 2 * PS, PS)  # REMOVE, read by the engine
            go.set()
            with trio.fail_after(5):
                await t.wait()
            assert t.results.outcome[0] == OUTCOME_OK and t.results.value[0] == 0
            st = srv.session.stats
            assert (st.dropped, st.zero_after_remove, st.copied, st.zeroed) == (1, 1, 0, 1)
            assert srv.session._engine_live


# ---- the push on BULK, read by the engine ----------------------------------------------------

Push = Callable[[trio.SocketStream, protocol.Connection], Awaitable[None]]


async def _fake_bulk_source(
    nursery: trio.Nursery, npages: int, push: Push, *, generic_replies: bool = False
) -> str:
    """URGENT answers every Request with zero pages (in the generic encoding if asked: the
    engine hands URGENT back); BULK runs ``push`` after the Welcome."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def handle(stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            await serve_one(stream)

    async def serve_one(stream: trio.SocketStream) -> None:
        conn: protocol.Connection | None = None
        buf = bytearray()
        while conn is None:  # the Hello says which channel this is
            data = await stream.receive_some(1 << 16)
            if not data:
                return
            buf += data
            for ch in (Channel.URGENT, Channel.BULK):
                c = protocol.Connection(Side.SOURCE, ch)
                c.receive_data(bytes(buf))
                with contextlib.suppress(protocol.ProtocolError):
                    if isinstance(c.next_event(), protocol.Hello):
                        conn = c
                        break
        welcome = protocol.Welcome(protocol.PROTOCOL_VERSION, b"fake", PS, npages * PS, 0, 0, None)
        for b in conn.send(welcome):
            await stream.send_all(b)
        if conn.channel is Channel.BULK:
            await push(stream, conn)
            await trio.sleep_forever()
        while True:
            while (ev := conn.next_event()) is protocol.NEED_DATA:
                data = await stream.receive_some(1 << 16)
                conn.receive_data(data)
            if not isinstance(ev, protocol.Request):
                return
            encode = _generic_pages if generic_replies else _fast_pages
            await stream.send_all(encode(ev.id, PageKind.ZERO, ev.offset, ev.count))

    nursery.start_soon(partial(trio.serve_listeners, handle, listeners))
    return f"127.0.0.1:{port}"


async def _send(stream: trio.SocketStream, conn: protocol.Connection, ev: protocol.Event) -> None:
    await stream.send_all(b"".join(bytes(b) for b in conn.send(ev)))


def _fast_push(kind: int, off: int, n: int, payload: bytes = b"") -> bytes:
    c1, c2, c3 = protocol._PUSH_C
    return protocol._PUSH_F.pack(b"uP", 32, len(payload), c1, kind, c2, off, c3, n) + payload


def _page(i: int) -> bytes:
    return bytes([i % 251 + 1]) * PS


async def _wait_bulk_attached(session: Session) -> None:
    with trio.fail_after(5):
        while not session._bulk_in_engine:
            await trio.sleep(0.002)


async def test_engine_places_the_push_data_zero_and_poison(nursery: trio.Nursery) -> None:
    """Pushes in the fixed encoding are read and placed by the engine (not Python): data,
    zero pages and poison markers (touches SIGBUS); the Done hands BULK back and the session
    completes."""
    n = 96
    poison = {7, 40, 41, 95}
    zero = set(range(60, 70))
    started = trio.Event()

    async def push(stream: trio.SocketStream, conn: protocol.Connection) -> None:
        await started.wait()  # the engine has BULK: it must take every push
        i = 0
        while i < n:
            j = i
            kind = PageKind.POISONED if i in poison else PageKind.ZERO if i in zero else None
            while j < n and j - i < 20:
                k = PageKind.POISONED if j in poison else PageKind.ZERO if j in zero else None
                if k is not kind:
                    break
                j += 1
            if kind is None:
                data = memoryview(b"".join(_page(p) for p in range(i, j)))
                await _send(stream, conn, protocol.Pages(None, PageKind.DATA, i * PS, j - i, data))
            else:
                await _send(stream, conn, protocol.Pages(None, kind, i * PS, j - i))
            i = j
        await _send(stream, conn, protocol.Done())

    source = await _fake_bulk_source(nursery, n, push)
    with memory.anon(n * PS) as m:
        async with serve_memory([Region(m.addr, n * PS, 0)], source) as srv:
            session = srv.session
            await _wait_bulk_attached(session)
            started.set()
            with trio.fail_after(10):
                await srv.wait_complete()
            eng = session._engine
            assert eng is not None and session._engine_live
            st = eng.stats()
            assert st["bulk_pages"] == n and st["faults"] == 0
            assert st["poisoned"] == len(poison) and st["zeroed"] == len(zero)
            assert st["copied"] == n - len(poison) - len(zero)
            assert session._py_stats.bulk_pages == 0, "Python placed part of the push"
            assert session.stats.bulk_pages == n  # merged into placement.Stats
            with trio.fail_after(5):
                while session._bulk_in_engine:  # the Done handed BULK back
                    await trio.sleep(0.002)
            t = _touch([m.addr + i * PS for i in range(n)])
            await t.wait()
            r = t.results
            for i in range(n):
                if i in poison:
                    assert r.outcome[i] == OUTCOME_SIGBUS and r.si_code[i] in SIGBUS_CODES
                    assert r.si_addr[i] == m.addr + i * PS
                else:
                    assert r.outcome[i] == OUTCOME_OK, f"page {i}"
                    assert r.value[i] == (0 if i in zero else i % 251 + 1), f"page {i}"
            assert eng.stats()["faults"] == 0


@pytest.mark.parametrize("frame", ["generic", "error", "eof"])
async def test_frames_the_engine_does_not_take_go_to_python(
    nursery: trio.Nursery, frame: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A push in another encoding, an Error or EOF on BULK hands BULK back to Python's bulk
    reader, with the bytes after it: a generic push is placed by Python and the session
    completes; an Error or EOF fails it (as before)."""
    n = 64
    started = trio.Event()

    async def push(stream: trio.SocketStream, conn: protocol.Connection) -> None:
        await started.wait()
        data = memoryview(b"".join(_page(p) for p in range(32)))
        await _send(stream, conn, protocol.Pages(None, PageKind.DATA, 0, 32, data))
        if frame == "generic":
            rest = b"".join(
                _generic_pages(None, PageKind.DATA, i * PS, 1, _page(i))  # type: ignore[arg-type]
                for i in range(32, n)
            )
            await stream.send_all(rest + wire_done())
        elif frame == "error":
            body = msgpack.packb({"t": 5, "i": None, "c": "read-failed", "m": "disk on fire"})
            await stream.send_all(struct.pack(">2sHI", b"uP", len(body), 0) + body)
        else:
            await stream.aclose()

    def wire_done() -> bytes:
        body = msgpack.packb({"t": 6})
        return struct.pack(">2sHI", b"uP", len(body), 0) + body

    caplog.set_level(logging.INFO, logger="uffdpoison.destination.faultloop")
    source = await _fake_bulk_source(nursery, n, push)
    with memory.anon(n * PS) as m:
        ctx = (
            contextlib.nullcontext()
            if frame == "generic"
            else pytest.raises(SessionFailed, match="disk on fire" if frame == "error" else "lost")
        )
        with ctx:
            async with serve_memory([Region(m.addr, n * PS, 0)], source) as srv:
                session = srv.session
                await _wait_bulk_attached(session)
                started.set()
                with trio.fail_after(10):
                    await srv.wait_complete()
                    pytest.fail("the session completed") if frame != "generic" else None
                eng = session._engine
                assert eng is not None and session._engine_live
                assert eng.stats()["bulk_pages"] == 32
                assert session._py_stats.bulk_pages == n - 32
                assert m.read(0, n * PS) == b"".join(_page(i) for i in range(n))
        assert any("BULK handed back to Python" in r.message for r in caplog.records)


@pytest.mark.parametrize("bad", ["clean", "misaligned", "past-end", "short-payload", "zero-count"])
async def test_malformed_push_fails_the_session_and_places_nothing(
    nursery: trio.Nursery, bad: str
) -> None:
    """A push in the fixed encoding that fails a check is not placed by the engine: Python's
    decoder judges it and fails the session; nothing of it reaches guest memory."""
    n = 16
    started = trio.Event()

    async def push(stream: trio.SocketStream, conn: protocol.Connection) -> None:
        await started.wait()
        frame = {
            "clean": _fast_push(4, 0, 1),
            "misaligned": _fast_push(1, 100, 1, _page(1)),
            "past-end": _fast_push(1, (n - 1) * PS, 2, _page(1) * 2),
            "short-payload": _fast_push(1, 0, 2, _page(1)),
            "zero-count": _fast_push(2, 0, 0),
        }[bad]
        await stream.send_all(frame)

    source = await _fake_bulk_source(nursery, n, push)
    events: list[dict[str, Any]] = []
    with memory.anon(n * PS) as m:
        with pytest.raises(SessionFailed):
            async with serve_memory(
                [Region(m.addr, n * PS, 0)], source, status=events.append
            ) as srv:
                await _wait_bulk_attached(srv.session)
                started.set()
                await trio.sleep(10)
                pytest.fail("the session did not fail")
        failed = [e for e in events if e["event"] == "session-failed"]
        assert failed and failed[0]["pages"]["present"] == 0
        assert failed[0]["placed"]["copied"] == failed[0]["placed"]["bulk_pages"] == 0


async def test_faults_are_served_while_the_engine_places_a_large_push(
    nursery: trio.Nursery,
) -> None:
    """A real source pushing 64 MiB uncapped while a vCPU touches pages: every touch gets its
    page (data digests match, poison SIGBUSes), the engine placed push pages, and the
    session completes."""
    n = 16384
    guest = make_guest(n, poisoned=[i for i in range(n) if i % 997 == 5], zero=[])
    source = await start_source(nursery, guest.backend())
    order = [(i * 7919) % n for i in range(2000)]
    with memory.anon(n * PS) as m:
        async with serve_memory([Region(m.addr, n * PS, 0)], source) as srv:
            session = srv.session
            t = _touch([m.addr + i * PS for i in order], digest=True)
            with trio.fail_after(30):
                await t.wait()
                await srv.wait_complete()
            eng = session._engine
            assert eng is not None and session._engine_live
            st = eng.stats()
            assert st["bulk_pages"] > n // 2, st
            assert st["faults"] > 0
            assert session.stats.bulk_pages == st["bulk_pages"] + session._py_stats.bulk_pages
            assert srv.page_counts()["poisoned"] == len(guest.poisoned)
            r = t.results
    digests = guest.digests()
    for k, i in enumerate(order):
        if i in guest.poisoned:
            assert r.outcome[k] == OUTCOME_SIGBUS and r.si_code[k] in SIGBUS_CODES
        else:
            assert r.outcome[k] == OUTCOME_OK and r.digest[k] == digests[i], f"page {i}"


async def test_urgent_hand_over_takes_bulk_back_too(nursery: trio.Nursery) -> None:
    """When the engine returns (here: a generic reply on URGENT), BULK goes back to Python
    with it: the pushes after that are placed by Python's bulk reader, and the session
    completes."""
    n = 64
    started, more = trio.Event(), trio.Event()

    async def push(stream: trio.SocketStream, conn: protocol.Connection) -> None:
        await started.wait()
        data = memoryview(b"".join(_page(p) for p in range(32)))
        await _send(stream, conn, protocol.Pages(None, PageKind.DATA, 0, 32, data))
        await more.wait()
        data = memoryview(b"".join(_page(p) for p in range(33, n)))
        await _send(stream, conn, protocol.Pages(None, PageKind.DATA, 33 * PS, n - 33, data))
        await _send(stream, conn, protocol.Done())

    source = await _fake_bulk_source(nursery, n, push, generic_replies=True)
    with memory.anon(n * PS) as m:
        async with serve_memory([Region(m.addr, n * PS, 0)], source) as srv:
            session = srv.session
            await _wait_bulk_attached(session)
            started.set()
            eng = session._engine
            assert eng is not None
            with trio.fail_after(5):
                while eng.stats()["bulk_pages"] < 32:
                    await trio.sleep(0.002)
            t = _touch([m.addr + 32 * PS])  # requested; the generic reply hands URGENT over
            await t.wait()
            assert t.results.value[0] == 0
            assert not session._engine_live
            with trio.fail_after(5):
                while session._bulk_in_engine:
                    await trio.sleep(0.002)
            more.set()
            with trio.fail_after(10):
                await srv.wait_complete()
            assert eng.stats()["bulk_pages"] == 32
            assert session._py_stats.bulk_pages == n - 33
            want = [_page(i) for i in range(n)]
            want[32] = bytes(PS)
            assert m.read(0, n * PS) == b"".join(want)
