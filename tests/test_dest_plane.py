"""The destination's C data plane (csrc/dest_plane.c) against the real kernel and real sources.

Every destination session runs on it; test_embed, test_daemon, test_demo and test_examples drive
it through toy VMMs. Here: that it serves faults, poison and discards, places the push, holds
control frames for trio's verdict, refuses what fails a check (placing nothing of it), and that
stopping it leaves nothing running.
"""

from __future__ import annotations

import contextlib
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
from test_protocol import pages_frame

from uffdpoison import protocol
from uffdpoison.destination.embed import FEATURES, serve_memory
from uffdpoison.destination.link import SourceLink
from uffdpoison.destination.regions import Region, RegionMap
from uffdpoison.destination.session import Session, SessionFailed, SourceLost
from uffdpoison.harness.toucher import OUTCOME_OK, OUTCOME_SIGBUS, Toucher
from uffdpoison.kernel import RegisterMode, Userfaultfd, memory
from uffdpoison.kernel.digest import page_digests
from uffdpoison.kernel.ledger import PageState
from uffdpoison.protocol import PUSH_ID, Channel, PageKind, Side

PS = 4096


def _touch(addrs: list[int], **kw: Any) -> Toucher:
    t = Toucher(array("Q", addrs), **kw)
    t.start()
    return t


def _page(i: int) -> bytes:
    return bytes([i % 251 + 1]) * PS


async def test_serves_faults_poison_and_zero_from_a_source(nursery: trio.Nursery) -> None:
    """Every page faulted, requested and placed in C: data (digests match), zero pages, and
    poison the source discovered after the handshake (POISONED replies, placed as markers: the
    touch SIGBUSes with BUS_MCEERR_AR, or BUS_ADRERR on kernels without MEMORY_FAILURE)."""
    n = 256
    guest = make_guest(n, poisoned=[], zero=[i for i in range(n) if i % 7 == 3])
    backend = guest.backend()
    source = await start_source(nursery, backend)
    late_poison = [5, 77, 200]
    with memory.anon(n * PS) as m:
        base = m.addr
        async with serve_memory([Region(base, n * PS, 0)], source, background=False) as server:
            backend.add_poison([i * PS for i in late_poison])  # unknown at the handshake
            t = _touch([m.addr + i * PS for i in range(n)], digest=True, threads=2)
            await t.wait()
            r = t.results
            st = server.stats
            assert st["faults"] >= n and st["demand_requests"] == n
            assert st["poisoned"] == len(late_poison)
            assert st["copied"] + st["zeroed"] == n - len(late_poison)
            assert st["replies"] == n
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
    """MADV_DONTNEED (a REMOVE event, read by the data plane): a poisoned page is re-poisoned
    on its next fault, a data page comes back as zeros, and neither asks the source again."""
    guest = make_guest(32, poisoned=[], zero=[])
    backend = guest.backend()
    source = await start_source(nursery, backend)
    with memory.anon(32 * PS) as m:
        async with serve_memory([Region(m.addr, 32 * PS, 0)], source, background=False) as srv:
            backend.add_poison([3 * PS])
            t = _touch([m.addr + i * PS for i in range(32)])
            await t.wait()
            assert t.results.outcome[3] == OUTCOME_SIGBUS
            requests = srv.stats["demand_requests"]
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
            st = srv.stats
            assert st["removes"] == 2
            assert st["repoisoned"] == 1 and st["zero_after_remove"] == 2
            assert st["demand_requests"] == requests, "a discarded page was asked for again"


# ---- a hand-driven source: handshake through protocol.Connection, frames built by hand -------

Reply = Callable[[trio.SocketStream, protocol.Request], Awaitable[None]]
Push = Callable[[trio.SocketStream, protocol.Connection], Awaitable[None]]


def _raw(header: dict[str, Any], payload: bytes = b"") -> bytes:
    body = msgpack.packb(header)
    return struct.pack(">2sHI", b"uP", len(body), len(payload)) + body + payload


async def _fake_source(
    nursery: trio.Nursery,
    npages: int,
    reply: Reply | None = None,
    push: Push | None = None,
    poison: list[int] = (),  # type: ignore[assignment]
) -> str:
    """URGENT: ``reply`` for each Request (default: ZERO pages); BULK: ``push`` after the
    Welcome. ``poison``: the Welcome's poison list (page indices)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def zero(stream: trio.SocketStream, req: protocol.Request) -> None:
        await stream.send_all(pages_frame(req.id, PageKind.ZERO, req.offset, req.count))

    async def handle(stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            await serve_one(stream)

    async def serve_one(stream: trio.SocketStream) -> None:
        conn = protocol.Connection(Side.SOURCE, None)

        async def next_event() -> Any:
            while (ev := conn.next_event()) is protocol.NEED_DATA:
                conn.receive_data(await stream.receive_some(1 << 16))
            return ev

        hello = await next_event()
        if not isinstance(hello, protocol.Hello):
            return  # a destination that gave up mid-connect (a resume deadline, say)
        plist = (
            memoryview(struct.pack(f"<{len(poison)}Q", *(p * PS for p in poison)))
            if hello.want_poison_list
            else None
        )
        n = len(poison) if plist is not None else 0
        welcome = protocol.Welcome(protocol.PROTOCOL_VERSION, b"fake", PS, npages * PS, 0, n, plist)
        for b in conn.send(welcome):
            await stream.send_all(b)
        if conn.channel is Channel.BULK:
            if push is not None:
                await push(stream, conn)
            await trio.sleep_forever()
        while isinstance(ev := await next_event(), protocol.Request):
            await (reply or zero)(stream, ev)

    nursery.start_soon(partial(trio.serve_listeners, handle, listeners))
    return f"127.0.0.1:{port}"


@pytest.mark.parametrize(
    "bad", ["unknown-id", "wrong-offset", "short-payload", "generic", "error", "eof"]
)
async def test_bad_reply_fails_the_session_and_places_nothing(
    nursery: trio.Nursery, bad: str
) -> None:
    """A reply that fails a check (or another encoding of Pages, or an Error) fails the
    session naming it: nothing of it is placed and the vCPU stays blocked (until the range is
    unregistered at exit, which lets the kernel zero-fill it)."""

    async def reply(stream: trio.SocketStream, req: protocol.Request) -> None:
        data = b"\xee" * PS
        if bad == "unknown-id":
            frame = pages_frame(req.id + 1000, PageKind.DATA, req.offset, 1, data)
        elif bad == "wrong-offset":
            frame = pages_frame(req.id, PageKind.DATA, req.offset + PS, 1, data)
        elif bad == "short-payload":
            frame = pages_frame(req.id, PageKind.DATA, req.offset, 1, data[:-1])
        elif bad == "generic":
            frame = _raw({"t": 4, "i": req.id, "k": 1, "o": req.offset, "n": 1}, data)
        elif bad == "error":
            frame = _raw({"t": 5, "i": req.id, "c": "read-failed", "m": "disk on fire"})
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
                [Region(m.addr, 16 * PS, 0)], source, background=False, status=events.append,
                resume_deadline=1,
            ):  # fmt: skip
                t.start()
                await trio.sleep(10)
                pytest.fail("the session did not fail")
        assert t.join(5), "the blocked vCPU was not released by the unregister"
        failed = [e for e in events if e["event"] == "session-failed"]
        assert failed and failed[0]["pages"]["present"] == 0
        assert failed[0]["placed"]["copied"] == 0
        assert t.results.value[0] == 0, "the bad reply's data reached guest memory"
    words = {
        "unknown-id": "unknown request id",
        "wrong-offset": "skips pages",
        "short-payload": "DATA payload",
        "generic": "fixed encoding",
        "error": "disk on fire",
        "eof": "lost",
    }
    assert words[bad] in str(ei.value)


async def test_cancel_stops_the_data_plane_thread(nursery: trio.Nursery) -> None:
    """Cancelling a session stops the C loop (its worker thread returns) promptly, with a vCPU
    still blocked in a fault; the userfaultfd stays open for the caller."""
    n = 8

    async def reply(stream: trio.SocketStream, req: protocol.Request) -> None:
        pass  # never answer: the fault stays pending

    source = await _fake_source(nursery, n, reply)
    with memory.anon(n * PS) as m, Userfaultfd.create(FEATURES) as uffd:
        uffd.register(m.addr, m.size, RegisterMode.MISSING)
        link = await SourceLink.connect(source, page_size=PS, bulk=False)
        session = Session(uffd, RegionMap([Region(m.addr, n * PS, 0)]), link)
        t = Toucher(array("Q", [m.addr]))
        try:
            async with trio.open_nursery() as inner:
                await inner.start(session.run)
                t.start()
                with trio.fail_after(5):
                    while session.stats["faults"] == 0:
                        await trio.sleep(0.005)
                with trio.fail_after(2):
                    inner.cancel_scope.cancel()
            assert session.plane.outstanding == 1
            uffd.wake(m.addr, PS)  # fd still open and usable
        finally:
            uffd.unregister(m.addr, m.size)
            assert t.join(5)
            session.close()


async def test_ensure_present_requests_through_the_data_plane(nursery: trio.Nursery) -> None:
    """ensure_present claims and requests through the data plane (one Request for a run) and
    wakes on its PROGRESS flag; poisoned pages are reported."""
    n = 256
    guest = make_guest(n, poisoned=[], zero=[])
    backend = guest.backend()
    source = await start_source(nursery, backend)
    with memory.anon(n * PS) as m:
        async with serve_memory([Region(m.addr, n * PS, 0)], source, background=False) as srv:
            backend.add_poison([50 * PS])
            with trio.fail_after(10):
                poisoned = await srv.ensure_present(m.addr + 10 * PS, 100 * PS)
            assert poisoned == [m.addr + 50 * PS]
            assert srv.stats["demand_requests"] == 1
            assert m.read(10 * PS, 40 * PS) == bytes(guest.image[10 * PS : 50 * PS])
            assert m.read(51 * PS, 59 * PS) == bytes(guest.image[51 * PS : 110 * PS])


async def test_fault_in_no_region_is_counted_and_logged(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """A fault in registered memory that no region covers is woken unserved (it faults again)
    and counted; the control plane logs it from the counters."""
    guest = make_guest(8, poisoned=[], zero=[])
    source = await start_source(nursery, guest.backend())
    with memory.anon(16 * PS) as m:
        # serve_memory registers only the region; register the rest of the mapping ourselves
        async with serve_memory([Region(m.addr, 8 * PS, 0)], source, background=False) as srv:
            uffd = srv.session.uffd
            assert uffd is not None
            uffd.register(m.addr + 8 * PS, 8 * PS, RegisterMode.MISSING)
            t = _touch([m.addr + 12 * PS])
            with trio.fail_after(5):
                while srv.stats["unknown_address"] == 0:
                    await trio.sleep(0.005)
                while not any("in no region" in r.message for r in caplog.records):
                    await trio.sleep(0.005)
            uffd.unregister(m.addr + 8 * PS, 8 * PS)  # lets the touch finish
            assert t.join(5)


async def test_requests_queue_while_the_socket_is_full(nursery: trio.Nursery) -> None:
    """More requests than the socket takes (a source that does not read for a while): the data
    plane queues the rest and sends them as the socket drains; every page arrives."""
    n = 6000
    release = trio.Event()

    async def reply(stream: trio.SocketStream, req: protocol.Request) -> None:
        await release.wait()
        await stream.send_all(pages_frame(req.id, PageKind.ZERO, req.offset, req.count))

    source = await _fake_source(nursery, n, reply)
    with memory.anon(n * PS) as m, Userfaultfd.create(FEATURES) as uffd:
        uffd.register(m.addr, m.size, RegisterMode.MISSING)
        link = await SourceLink.connect(source, page_size=PS, bulk=False)
        link.urgent.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        session = Session(uffd, RegionMap([Region(m.addr, n * PS, 0)]), link)
        try:
            async with trio.open_nursery() as inner:
                await inner.start(session.run)
                for i in range(n):  # one request a page: 6000 x 45 bytes
                    assert session.plane.request(0, i, 1, 1) == 0
                await trio.sleep(0.1)
                assert session.plane.outstanding == n
                release.set()
                with trio.fail_after(20):
                    while session.ledgers[0].counts[PageState.PRESENT] < n:
                        await trio.sleep(0.01)
                st = session.stats
                assert st["demand_requests"] == st["replies"] == n
                inner.cancel_scope.cancel()
        finally:
            uffd.unregister(m.addr, m.size)
            session.close()


async def test_faults_are_served_while_the_vmm_discards_in_a_loop(nursery: trio.Nursery) -> None:
    """Balloon-style discards (MADV_DONTNEED after MADV_DONTNEED from another thread) keep a
    non-cooperative event pending almost all the time: every placement meets EAGAIN. The data
    plane reads each event at once and retries in the short window before the next, so the
    faults are still served (with the discarding thread on another CPU)."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs: the discarding thread must run beside the data plane")
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
            st = srv.stats
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
        await stream.send_all(pages_frame(req.id, PageKind.DATA, req.offset, 1, b"\xab" * PS))

    source = await _fake_source(nursery, 8, reply)
    with memory.anon(8 * PS) as m:
        async with serve_memory([Region(m.addr, 8 * PS, 0)], source, background=False) as srv:
            t = _touch([m.addr + 2 * PS])
            with trio.fail_after(5):
                await asked.wait()
            await trio.to_thread.run_sync(m.discard, 2 * PS, PS)  # REMOVE, read by the plane
            go.set()
            with trio.fail_after(5):
                await t.wait()
            assert t.results.outcome[0] == OUTCOME_OK and t.results.value[0] == 0
            st = srv.stats
            assert (st["dropped"], st["zero_after_remove"], st["copied"], st["zeroed"]) == (
                1,
                1,
                0,
                1,
            )


async def test_unanswered_request_fails_the_session_at_its_deadline(nursery: trio.Nursery) -> None:
    """A source that reads a request and never answers: at the deadline the session fails
    naming the request, instead of a vCPU blocked in silence."""

    async def reply(stream: trio.SocketStream, req: protocol.Request) -> None:
        pass

    source = await _fake_source(nursery, 8, reply)
    with memory.anon(8 * PS) as m:
        t = Toucher(array("Q", [m.addr + 3 * PS]))
        with pytest.raises(SourceLost, match=r"request 1 .*unanswered for \d+ ms"):
            async with serve_memory(
                [Region(m.addr, 8 * PS, 0)], source, background=False, request_timeout=0.3,
                resume_deadline=1.0,
            ):  # fmt: skip
                t.start()  # registered by now: the touch faults
                with trio.fail_after(5):
                    await trio.sleep_forever()
        assert t.join(5)


# ---- the push on BULK ------------------------------------------------------------------------


async def _send(stream: trio.SocketStream, conn: protocol.Connection, ev: protocol.Event) -> None:
    await stream.send_all(b"".join(bytes(b) for b in conn.send(ev)))


async def test_places_the_push_data_zero_and_poison(nursery: trio.Nursery) -> None:
    """Pushes are read and placed by the data plane: data, zero pages and poison markers
    (touches SIGBUS); the source's Done is judged by trio and the session completes."""
    n = 96
    poison = {7, 40, 41, 95}
    zero = set(range(60, 70))

    async def push(stream: trio.SocketStream, conn: protocol.Connection) -> None:
        i = 0
        while i < n:
            kind = PageKind.POISONED if i in poison else PageKind.ZERO if i in zero else None
            j = i
            while j < n and j - i < 20:
                k = PageKind.POISONED if j in poison else PageKind.ZERO if j in zero else None
                if k is not kind:
                    break
                j += 1
            if kind is None:
                data = memoryview(b"".join(_page(p) for p in range(i, j)))
                await _send(
                    stream, conn, protocol.Pages(PUSH_ID, PageKind.DATA, i * PS, j - i, data)
                )
            else:
                await _send(stream, conn, protocol.Pages(PUSH_ID, kind, i * PS, j - i))
            i = j
        await _send(stream, conn, protocol.Done())

    source = await _fake_source(nursery, n, push=push)
    with memory.anon(n * PS) as m:
        async with serve_memory([Region(m.addr, n * PS, 0)], source) as srv:
            with trio.fail_after(10):
                await srv.wait_complete()
            st = srv.stats
            assert st["push_pages"] == n and st["faults"] == 0
            assert st["poisoned"] == len(poison) and st["zeroed"] == len(zero)
            assert st["copied"] == n - len(poison) - len(zero)
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
            assert srv.stats["faults"] == 0


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        ("clean", "cannot be CLEAN"),
        ("misaligned", "not aligned"),
        ("past-end", "past memory_size"),
        ("short-payload", "DATA payload"),
        ("zero-count", "count 0"),
        ("generic", "fixed encoding"),
        ("error", "disk on fire"),
        ("eof", "lost"),
    ],
)
async def test_bad_push_fails_the_session_and_places_nothing(
    nursery: trio.Nursery, bad: str, words: str
) -> None:
    """A push that fails a check, another encoding of Pages, an Error or EOF on BULK fails the
    session naming it; nothing of the frame reaches guest memory."""
    n = 16

    async def push(stream: trio.SocketStream, conn: protocol.Connection) -> None:
        if bad == "eof":
            await stream.aclose()
            return
        frame = {
            "clean": pages_frame(PUSH_ID, 4, 0, 1),
            "misaligned": pages_frame(PUSH_ID, 1, 100, 1, _page(1)),
            "past-end": pages_frame(PUSH_ID, 1, (n - 1) * PS, 2, _page(1) * 2),
            "short-payload": pages_frame(PUSH_ID, 1, 0, 2, _page(1)),
            "zero-count": pages_frame(PUSH_ID, 2, 0, 0),
            "generic": _raw({"t": 4, "i": 0, "k": 1, "o": 0, "n": 1}, _page(1)),
            "error": _raw({"t": 5, "i": None, "c": "read-failed", "m": "disk on fire"}),
        }[bad]
        await stream.send_all(frame)

    source = await _fake_source(nursery, n, push=push)
    events: list[dict[str, Any]] = []
    with memory.anon(n * PS) as m:
        with pytest.raises(SessionFailed, match=words):
            region = Region(m.addr, n * PS, 0)
            async with serve_memory([region], source, status=events.append, resume_deadline=1):
                await trio.sleep(10)
                pytest.fail("the session did not fail")
        failed = [e for e in events if e["event"] == "session-failed"]
        assert failed and failed[0]["pages"]["present"] == 0
        assert failed[0]["placed"]["copied"] == failed[0]["placed"]["push_pages"] == 0


async def test_known_poison_is_in_the_ledger_before_any_data(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """A source lists pages as poisoned in its Welcome and at once pushes DATA for them (and
    answers a demand for one with DATA): none of it is placed, every refusal is counted and
    logged, and each of those pages SIGBUSes."""
    n = 4096
    poison = list(range(0, n, 3))  # 1366 pages: the list is long

    async def reply(stream: trio.SocketStream, req: protocol.Request) -> None:
        await stream.send_all(pages_frame(req.id, PageKind.DATA, req.offset, 1, _page(9)))

    async def push(stream: trio.SocketStream, conn: protocol.Connection) -> None:
        for i in poison:
            await _send(
                stream,
                conn,
                protocol.Pages(PUSH_ID, PageKind.DATA, i * PS, 1, memoryview(_page(i))),
            )

    source = await _fake_source(nursery, n, reply, push, poison=poison)
    with memory.anon(n * PS) as m:
        async with serve_memory([Region(m.addr, n * PS, 0)], source) as srv:
            assert srv.stats["known_poison"] == len(poison)
            assert srv.page_counts()["poisoned"] == len(poison)  # before any byte was read
            with trio.fail_after(10):
                while srv.stats["push_pages"] < len(poison):
                    await trio.sleep(0.01)
            t = _touch([m.addr + i * PS for i in poison[:50]])
            await t.wait()
            assert all(o == OUTCOME_SIGBUS for o in t.results.outcome)
            st = srv.stats
            assert st["refused"] == len(poison) and st["copied"] == 0
            assert st["last_refused"] in {i * PS for i in poison}
    # Logged as the protocol violation it is, naming the session and a page (rate-limited).
    lines = [r.getMessage() for r in caplog.records if "protocol violation" in r.getMessage()]
    assert lines and all("embedded" in x and "guest offset 0x" in x for x in lines)


async def test_faults_are_served_while_the_plane_places_a_large_push(
    nursery: trio.Nursery,
) -> None:
    """A real source pushing 64 MiB uncapped while a vCPU touches pages: every touch gets its
    page (data digests match, poison SIGBUSes), the plane placed push pages, and the session
    completes."""
    n = 16384
    guest = make_guest(n, poisoned=[i for i in range(n) if i % 997 == 5], zero=[])
    source = await start_source(nursery, guest.backend())
    order = [(i * 7919) % n for i in range(2000)]
    with memory.anon(n * PS) as m:
        async with serve_memory([Region(m.addr, n * PS, 0)], source) as srv:
            t = _touch([m.addr + i * PS for i in order], digest=True)
            with trio.fail_after(30):
                await t.wait()
                await srv.wait_complete()
            st = srv.stats
            assert st["push_pages"] > n // 2, st
            assert st["faults"] > 0
            assert srv.page_counts()["poisoned"] == len(guest.poisoned)
            r = t.results
    digests = guest.digests()
    for k, i in enumerate(order):
        if i in guest.poisoned:
            assert r.outcome[k] == OUTCOME_SIGBUS and r.si_code[k] in SIGBUS_CODES
        else:
            assert r.outcome[k] == OUTCOME_OK and r.digest[k] == digests[i], f"page {i}"
