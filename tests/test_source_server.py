"""The source server over real loopback TCP, driven by plain protocol clients."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
from live_process import live_process, page_bytes
from test_protocol import body, offsets, req_frame

from uffdpoison import protocol as p
from uffdpoison.kernel.digest import page_digests
from uffdpoison.source.backends import Backend, MemoryBackend, ProcessBackend
from uffdpoison.source.server import SourceServer, parse_listen

PS = 4096
ROOT = Path(__file__).resolve().parent.parent


def make_guest(npages: int, zero: set[int], seed: int = 1) -> bytearray:
    buf = bytearray(npages * PS)
    for i in range(npages):
        if i not in zero:
            buf[i * PS : (i + 1) * PS] = struct.pack("<QQ", i + 1, seed) * (PS // 16)
    return buf


class Client:
    """One destination channel over a trio socket stream, using the sans-IO Connection."""

    def __init__(self, stream: trio.SocketStream, channel: p.Channel) -> None:
        self.stream = stream
        self.conn = p.Connection(p.Side.DESTINATION, channel)

    @classmethod
    async def open(cls, addr: tuple[str, int], channel: p.Channel) -> Client:
        return cls(await trio.open_tcp_stream(*addr), channel)

    async def send(self, ev: p.Event) -> None:
        for b in self.conn.send(ev):
            await self.stream.send_all(b)

    async def next(self) -> Any:
        while True:
            ev = self.conn.next_event()
            if ev is not p.NEED_DATA:
                return ev
            self.conn.receive_data(await self.stream.receive_some(1 << 20))

    async def hello(self, session: bytes | None = None, page_size: int = 0) -> Any:
        assert self.conn.channel is not None
        await self.send(p.Hello(p.PROTOCOL_VERSION, self.conn.channel, session, page_size))
        return await self.next()

    async def aclose(self) -> None:
        await self.stream.aclose()


@asynccontextmanager
async def running(backend: Backend, **kw: Any) -> AsyncIterator[Any]:
    statuses: list[dict[str, Any]] = []
    server = SourceServer(backend, status=statuses.append, **kw)
    async with trio.open_nursery() as nursery:
        addr = await nursery.start(server.serve, "127.0.0.1:0")
        server.addr = addr  # type: ignore[attr-defined]
        server.statuses = statuses  # type: ignore[attr-defined]
        yield server
        nursery.cancel_scope.cancel()


async def session(addr: tuple[str, int], page_size: int = 0) -> tuple[Client, p.Welcome]:
    urgent = await Client.open(addr, p.Channel.URGENT)
    welcome = await urgent.hello(page_size=page_size)
    assert isinstance(welcome, p.Welcome), welcome
    return urgent, welcome


async def ask(c: Client, rid: int, offset: int, count: int, digests: Any = None) -> list[p.Pages]:
    await c.send(p.Request(rid, offset, count, digests))
    got: list[p.Pages] = []
    total = 0
    while total < count:
        ev = await c.next()
        assert isinstance(ev, p.Pages), ev
        assert ev.id == rid
        got.append(ev)
        total += ev.count
    return got


async def drain_bulk(bulk: Client, unit: int = PS) -> list[p.Pages]:
    frames: list[p.Pages] = []
    while True:
        ev = await bulk.next()
        if isinstance(ev, p.Done):
            return frames
        assert isinstance(ev, p.Pages) and ev.id == p.PUSH_ID, ev
        frames.append(ev)


# -- tests ------------------------------------------------------------------------------------


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_listen("[::1]:80") == ("::1", 80)
    for bad in ("127.0.0.1", "::1:80", ":80", "h:99999", "h:x"):
        with pytest.raises(ValueError):
            parse_listen(bad)


async def test_handshake_reports_poison() -> None:
    buf = make_guest(64, set())
    be = MemoryBackend(buf, [3 * PS, 40 * PS])
    async with running(be) as srv:
        urgent, w = await session(srv.addr)
        assert (w.page_size, w.memory_size, w.poisoned_count) == (PS, 64 * PS, 2)
        assert offsets(w) == [3 * PS, 40 * PS]
        # A second session gets its own token.
        urgent2, w2 = await session(srv.addr)
        assert w2.session != w.session
        # Huge units: the poisoned base pages make their 64 KiB units poisoned.
        urgent3, w3 = await session(srv.addr, page_size=16 * PS)
        assert w3.page_size == 16 * PS
        assert offsets(w3) == [0, 32 * PS]
        # An impossible unit is refused with an Error, not a Welcome.
        c = await Client.open(srv.addr, p.Channel.URGENT)
        ev = await c.hello(page_size=128 * PS)  # larger than memory
        assert isinstance(ev, p.Error) and ev.code == "bad-page-size"
        for x in (urgent, urgent2, urgent3, c):
            await x.aclose()
    # A hugetlb guest served in 2 MiB base pages says so.
    huge = 2 << 20
    async with running(MemoryBackend(bytearray(2 * huge), [huge], page_size=huge)) as srv:
        urgent, w = await session(srv.addr)
        assert (w.page_size, w.huge_page_size, w.poisoned_count) == (huge, huge, 1)
        frames = await ask(urgent, 1, 0, 2)
        assert [(f.kind, f.count) for f in frames] == [
            (p.PageKind.ZERO, 1),
            (p.PageKind.POISONED, 1),
        ]
        await urgent.aclose()


async def test_demand_every_reply_kind() -> None:
    n = 32
    buf = make_guest(n, {4, 5, 20})
    be = MemoryBackend(buf, [6 * PS, 7 * PS])
    async with running(be) as srv:
        urgent, _ = await session(srv.addr)
        frames = await ask(urgent, 7, 0, n)
        kinds: list[p.PageKind] = []
        for f in frames:
            kinds += [f.kind] * f.count
            if f.kind is p.PageKind.DATA:
                assert body(f) == bytes(buf[f.offset : f.offset + f.count * PS])
        assert [i for i, k in enumerate(kinds) if k is p.PageKind.ZERO] == [4, 5, 20]
        assert [i for i, k in enumerate(kinds) if k is p.PageKind.POISONED] == [6, 7]
        assert all(k is p.PageKind.DATA for i, k in enumerate(kinds) if i not in (4, 5, 6, 7, 20))
        # MINOR-mode: digests of what the destination has; pages 8, 9 match, 10 differs.
        dig = page_digests(buf[8 * PS : 11 * PS], PS)
        dig[2] ^= 1
        frames = await ask(urgent, 8, 8 * PS, 3, memoryview(dig).cast("B"))
        assert [(f.kind, f.offset, f.count) for f in frames] == [
            (p.PageKind.CLEAN, 8 * PS, 2),
            (p.PageKind.DATA, 10 * PS, 1),
        ]
        assert body(frames[1]) == bytes(buf[10 * PS : 11 * PS])
        # Zero pages: CLEAN when the destination's copy is zero too, else ZERO.
        dig = page_digests(bytes(2 * PS), PS)
        dig[1] ^= 1
        frames = await ask(urgent, 10, 4 * PS, 2, memoryview(dig).cast("B"))
        assert [(f.kind, f.offset, f.count) for f in frames] == [
            (p.PageKind.CLEAN, 4 * PS, 1),
            (p.PageKind.ZERO, 5 * PS, 1),
        ]
        # A poisoned page stays POISONED even when the digest "matches".
        dig = page_digests(buf[6 * PS : 7 * PS], PS)
        frames = await ask(urgent, 9, 6 * PS, 1, memoryview(dig).cast("B"))
        assert [(f.kind, f.count) for f in frames] == [(p.PageKind.POISONED, 1)]
        await urgent.aclose()


async def test_large_demand_split_into_frames() -> None:
    n = 3000  # 12 MB: more than one demand piece
    buf = make_guest(n, set(range(1000, 1010)))
    async with running(MemoryBackend(buf)) as srv:
        urgent, _ = await session(srv.addr)
        frames = await ask(urgent, 42, 0, n)
        assert len(frames) >= 4
        pos = 0
        for f in frames:
            assert f.offset == pos
            if f.kind is p.PageKind.DATA:
                assert body(f) == bytes(buf[pos : pos + f.count * PS])
            else:
                assert f.kind is p.PageKind.ZERO and 1000 <= pos // PS < 1010
            pos += f.count * PS
        assert pos == n * PS
        await urgent.aclose()


async def test_bulk_covers_every_page_once_then_done() -> None:
    n = 3000  # not a multiple of the chunk
    zero = set(range(100, 400)) | {2999}
    buf = make_guest(n, zero)
    poison = [10 * PS, 2000 * PS]
    async with running(MemoryBackend(buf, poison)) as srv:
        urgent, w = await session(srv.addr)
        bulk = await Client.open(srv.addr, p.Channel.BULK)
        wb = await bulk.hello(session=w.session)
        assert isinstance(wb, p.Welcome) and wb.session == w.session
        frames = await drain_bulk(bulk)
        seen = bytearray(n)
        for f in frames:
            for k in range(f.count):
                seen[f.offset // PS + k] += 1
            if f.kind is p.PageKind.DATA:
                assert body(f) == bytes(buf[f.offset : f.offset + f.count * PS])
            elif f.kind is p.PageKind.ZERO:
                assert all(f.offset // PS + k in zero for k in range(f.count))
            else:
                assert f.kind is p.PageKind.POISONED
                assert [f.offset + k * PS for k in range(f.count)] == [
                    p for p in poison if f.offset <= p < f.offset + f.count * PS
                ]
        assert set(seen) == {1}, "every page offered exactly once"
        assert max(f.count for f in frames if f.kind is p.PageKind.DATA) >= 64
        await bulk.aclose()
        await urgent.aclose()


async def test_bulk_skips_demanded_and_restarts_near_demand() -> None:
    n = 4096
    buf = make_guest(n, set())
    async with running(MemoryBackend(buf)) as srv:
        urgent, w = await session(srv.addr)
        await ask(urgent, 1, 1001 * PS, 3)
        bulk = await Client.open(srv.addr, p.Channel.BULK)
        await bulk.hello(session=w.session)
        frames = await drain_bulk(bulk)
        assert frames[0].offset == 1004 * PS, "push starts just after the latest demand"
        offered = {f.offset // PS + k for f in frames for k in range(f.count)}
        assert offered == set(range(n)) - {1001, 1002, 1003}
        await bulk.aclose()
        await urgent.aclose()


async def test_capped_bulk_restarts_at_demand_and_urgent_is_not_held_back() -> None:
    n = 16384  # 64 MiB
    buf = make_guest(n, set())
    cap = 2 << 20  # 2 MiB/s: the whole push would take 32 s
    async with running(MemoryBackend(buf), max_bandwidth=cap) as srv:
        urgent, w = await session(srv.addr)
        t_start = trio.current_time()
        bulk = await Client.open(srv.addr, p.Channel.BULK)
        await bulk.hello(session=w.session)
        first = await bulk.next()
        assert isinstance(first, p.Pages) and first.offset == 0
        # Demand far ahead of the push, at an offset the chunked push cannot reach by itself.
        target = 12345
        frames = await ask(urgent, 5, target * PS, 2)
        assert body(frames[0]) == bytes(buf[target * PS : (target + 2) * PS])
        # The reply came while the capped push was nowhere near done, and the push then
        # restarts just after the demanded pages.
        bulk_pages = first.count
        restarted = False
        while not restarted:
            ev = await bulk.next()
            assert isinstance(ev, p.Pages), "push finished before the demand restart showed"
            bulk_pages += ev.count
            restarted = ev.offset == (target + 2) * PS
        assert bulk_pages < n // 2
        # The cap holds for bulk: keep reading for a while; the sender's token bucket bounds
        # what can have arrived by cap * elapsed (plus one small chunk), whatever the buffering.
        with trio.move_on_after(0.5):
            while True:
                ev = await bulk.next()
                assert isinstance(ev, p.Pages)
                bulk_pages += ev.count
        elapsed = trio.current_time() - t_start
        assert bulk_pages * PS <= cap * elapsed + (256 << 10)
        await bulk.aclose()
        await urgent.aclose()


async def test_ipv6_loopback() -> None:
    import socket

    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError as e:
        pytest.skip(f"no IPv6 loopback here: {e}")
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(
            SourceServer(MemoryBackend(make_guest(4, set()))).serve, "[::1]:0"
        )
        assert host == "::1" and port > 0
        urgent, w = await session((host, port))
        assert w.memory_size == 4 * PS
        await urgent.aclose()
        nursery.cancel_scope.cancel()


async def test_destination_done_stops_push_and_session_outlives_urgent() -> None:
    n = 16384
    buf = make_guest(n, set())
    async with running(MemoryBackend(buf), max_bandwidth=4 << 20) as srv:
        urgent, w = await session(srv.addr)
        bulk = await Client.open(srv.addr, p.Channel.BULK)
        await bulk.hello(session=w.session)
        # URGENT closes first: the session lives on while BULK is open.
        await urgent.aclose()
        ev = await bulk.next()
        assert isinstance(ev, p.Pages) and ev.id == p.PUSH_ID
        # The destination says it has all it needs: the push stops with the source's Done.
        await bulk.send(p.Done())
        pushed = ev.count
        while True:
            ev = await bulk.next()
            if isinstance(ev, p.Done):
                break
            assert isinstance(ev, p.Pages)
            pushed += ev.count
        assert pushed < n
        assert await bulk.next() is p.CLOSED
        await bulk.aclose()
        with trio.fail_after(5):
            while not any(s["event"] == "session-ended" for s in srv.statuses):
                await trio.sleep(0.01)
        (ended,) = [s for s in srv.statuses if s["event"] == "session-ended"]
        assert "destination done" in ended["reason"] and not ended["bulk_done"]


async def test_push_stopped_mid_frame_leaves_a_clean_stream() -> None:
    """The destination's Done arrives while the push is blocked in the middle of a 1 MiB frame
    (the destination stopped reading, buffers full): the frame is finished, then Done, and
    the stream parses cleanly to the end."""
    n = 32768  # 128 MiB, far more than the socket buffers hold
    buf = make_guest(n, set())
    async with running(MemoryBackend(buf)) as srv:
        urgent, w = await session(srv.addr)
        bulk = await Client.open(srv.addr, p.Channel.BULK)
        await bulk.hello(session=w.session)
        await trio.sleep(0.3)  # not reading: the push fills the buffers and blocks mid-frame
        await bulk.send(p.Done())
        pushed = 0
        while True:
            ev = await bulk.next()  # a torn frame would be a ProtocolError here
            if isinstance(ev, p.Done):
                break
            assert isinstance(ev, p.Pages) and ev.kind is p.PageKind.DATA
            assert body(ev)[:16] == bytes(buf[ev.offset : ev.offset + 16])
            pushed += ev.count
        assert 0 < pushed < n
        assert await bulk.next() is p.CLOSED
        await bulk.aclose()
        await urgent.aclose()


async def test_image_truncated_while_serving_is_a_read_error(tmp_path: Path) -> None:
    from uffdpoison.source.backends import ImageBackend

    img = tmp_path / "guest.img"
    img.write_bytes(bytes(make_guest(64, set())))
    with ImageBackend(img) as be:
        async with running(be) as srv:
            urgent, w = await session(srv.addr)
            os.truncate(img, 16 * PS)
            frames = await ask(urgent, 1, 0, 2)
            assert [f.kind for f in frames] == [p.PageKind.DATA]
            await urgent.send(p.Request(2, 32 * PS, 2))
            ev = await urgent.next()
            assert isinstance(ev, p.Error) and ev.id == 2 and ev.code == "read-failed"
            assert "truncated" in ev.message
            # The channel stays usable.
            frames = await ask(urgent, 3, 4 * PS, 1)
            assert frames[0].kind is p.PageKind.DATA
            # The bulk push meets the hole and ends with a fatal read error, never zeros.
            bulk = await Client.open(srv.addr, p.Channel.BULK)
            await bulk.hello(session=w.session)
            while True:
                ev = await bulk.next()
                if isinstance(ev, p.Error):
                    break
                assert isinstance(ev, p.Pages) and ev.kind is p.PageKind.DATA
                assert ev.offset + ev.count * PS <= 16 * PS
            assert ev.id is None and ev.code == "read-failed"
            await bulk.aclose()
            await urgent.aclose()


async def test_bandwidth_cap_is_shared_by_all_sessions() -> None:
    n = 8192
    cap = 2 << 20
    async with running(MemoryBackend(make_guest(n, set())), max_bandwidth=cap) as srv:
        t0 = trio.current_time()
        clients = []
        for _ in range(3):
            urgent, w = await session(srv.addr)
            bulk = await Client.open(srv.addr, p.Channel.BULK)
            await bulk.hello(session=w.session)
            clients += [urgent, bulk]
        got = [0, 0, 0]

        async def drain(k: int, c: Client) -> None:
            while True:
                ev = await c.next()
                assert isinstance(ev, p.Pages)
                got[k] += ev.count

        with trio.move_on_after(0.6):
            async with trio.open_nursery() as nursery:
                for k in range(3):
                    nursery.start_soon(drain, k, clients[2 * k + 1])
        elapsed = trio.current_time() - t0
        assert all(got), "every session makes progress"
        # One clock for all: the sum is bounded, not each session alone.
        assert sum(got) * PS <= cap * elapsed + 3 * (cap // 20)
        for c in clients:
            await c.aclose()


async def test_two_destinations_and_a_malformed_one() -> None:
    n = 512
    buf = make_guest(n, {7})
    async with running(MemoryBackend(buf, [9 * PS])) as srv:
        a, wa = await session(srv.addr)
        b, wb = await session(srv.addr)
        ba = await Client.open(srv.addr, p.Channel.BULK)
        await ba.hello(session=wa.session)
        bb = await Client.open(srv.addr, p.Channel.BULK)
        await bb.hello(session=wb.session)
        # Both sessions get complete pushes, independently.
        async with trio.open_nursery() as nursery:
            results: dict[str, list[p.Pages]] = {}

            async def drain(name: str, c: Client) -> None:
                results[name] = await drain_bulk(c)

            nursery.start_soon(drain, "a", ba)
            nursery.start_soon(drain, "b", bb)
        for frames in results.values():
            assert sum(f.count for f in frames) == n
        # A malformed frame (bad magic) on a's urgent connection: a gets an Error and EOF...
        await a.stream.send_all(b"XX\x01\x00\x00\x00\x00\x00\x80")
        ev = await a.next()
        assert isinstance(ev, p.Error) and ev.id is None
        assert "magic" in ev.message
        assert await a.next() is p.CLOSED
        # ...and b is undisturbed.
        frames = await ask(b, 3, 8 * PS, 2)
        assert [(f.kind, f.count) for f in frames] == [
            (p.PageKind.DATA, 1),
            (p.PageKind.POISONED, 1),
        ]
        # A request past the end (hand-encoded per docs/PROTOCOL.md: our Connection refuses to
        # send it) is an Error.
        c, _ = await session(srv.addr)
        await c.stream.send_all(req_frame(1, n * PS, 1))
        ev = await c.next()
        assert isinstance(ev, p.Error) and ev.id is None and "memory_size" in ev.message
        assert await c.next() is p.CLOSED
        # A Request in another msgpack encoding than the fixed one is refused by name.
        d, _ = await session(srv.addr)
        header = msgpack.packb({"t": 3, "i": 1, "o": 0, "n": 1})
        await d.stream.send_all(struct.pack(">2sHI", b"uP", len(header), 0) + header)
        ev = await d.next()
        assert isinstance(ev, p.Error) and "fixed encoding" in ev.message
        frames = await ask(b, 4, 0, 1)
        assert frames[0].kind is p.PageKind.DATA
        # A bulk Hello with an unknown session token is refused.
        stranger = await Client.open(srv.addr, p.Channel.BULK)
        ev = await stranger.hello(session=b"no-such-session")
        assert isinstance(ev, p.Error) and ev.code == "unknown-session"
        for x in (a, b, ba, bb, c, d, stranger):
            await x.aclose()
        with trio.fail_after(5):
            while sum(s["event"] == "session-ended" for s in srv.statuses) < 4:
                await trio.sleep(0.01)
        ended = [s for s in srv.statuses if s["event"] == "session-ended"]
        assert all(s["bytes_sent"] > 0 for s in ended)


async def test_process_exit_mid_serve_is_an_error_never_zeros() -> None:
    n = 64
    with live_process(n, [5]) as (proc, addr):
        be = ProcessBackend(proc.pid, [(addr, n * PS)])
        async with running(be) as srv:
            urgent, w = await session(srv.addr)
            assert w.poisoned_count == 1
            frames = await ask(urgent, 1, 4 * PS, 2)
            assert [f.kind for f in frames] == [p.PageKind.DATA, p.PageKind.POISONED]
            # The bulk push of a live process (read in a worker thread) is byte-exact.
            bulk = await Client.open(srv.addr, p.Channel.BULK)
            await bulk.hello(session=w.session)
            pushed = await drain_bulk(bulk)
            assert sum(f.count for f in pushed) == n - 2
            for f in pushed:
                if f.offset <= 5 * PS < f.offset + f.count * PS:
                    assert f.kind is p.PageKind.POISONED and f.count == 1
                    continue
                assert f.kind is p.PageKind.DATA
                for k in range(f.count):
                    page = f.offset // PS + k
                    assert body(f)[k * PS : (k + 1) * PS] == page_bytes(page)
            proc.kill()
            proc.wait()
            await urgent.send(p.Request(2, 10 * PS, 4))
            ev = await urgent.next()
            assert isinstance(ev, p.Error) and ev.code == "read-failed", ev
            assert await urgent.next() is p.CLOSED
            # New sessions are refused the same way.
            c = await Client.open(srv.addr, p.Channel.URGENT)
            ev = await c.hello()
            assert isinstance(ev, p.Error) and ev.code == "read-failed"
            await urgent.aclose()
            await bulk.aclose()
            await c.aclose()
        be.close()


# -- CLI --------------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-m", "uffdpoison.source.command", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_cli_listening_line_first_and_sigterm_exits_zero(tmp_path: Path) -> None:
    img = tmp_path / "guest.img"
    img.write_bytes(bytes(make_guest(16, {1})))
    plist = tmp_path / "poison.txt"
    plist.write_text("0x2000\n")
    cli = _cli("--listen", "127.0.0.1:0", "--image", str(img), "--poison-list", str(plist))
    try:
        assert cli.stdout is not None
        first = json.loads(cli.stdout.readline())
        assert first["event"] == "listening" and first["host"] == "127.0.0.1" and first["port"]

        async def one_session() -> None:
            urgent, w = await session((first["host"], first["port"]))
            assert w.poisoned_count == 1
            await urgent.aclose()

        trio.run(one_session)
        started = json.loads(cli.stdout.readline())
        assert started["event"] == "session-started" and started["poisoned"] == 1
        ended = json.loads(cli.stdout.readline())
        assert ended["event"] == "session-ended"
        cli.send_signal(signal.SIGTERM)
        assert cli.wait(timeout=10) == 0
    finally:
        cli.kill()
        cli.wait()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--listen", "0.0.0.0:0", "--image", "{img}"], "--token-file"),
        (["--listen", "127.0.0.1:0", "--image", "{tmp}/missing.img"], "missing.img"),
        (["--listen", "127.0.0.1", "--image", "{img}"], "--listen"),
        (["--listen", "127.0.0.1:0", "--pid", "1"], "--range"),
        (["--listen", "127.0.0.1:0", "--pid", "1", "--range", "zz:1"], "START:LENGTH"),
        (["--listen", "127.0.0.1:0", "--image", "{img}", "--max-bandwidth", "x"], "size"),
        (["--listen", "127.0.0.1:0", "--image", "{img}", "--push-nice", "20"], "0-19"),
        (["--listen", "127.0.0.1:0", "--image", "{img}", "--max-bandwidth", "0"], "positive rate"),
        (
            ["--listen", "127.0.0.1:0", "--pid", "999999999", "--range", "0x1000:0x1000"],
            "process 999999999 does not exist",
        ),
        (["--listen", "127.0.0.1:0", "--image", "{img}", "--page-size", "3000"], "power of two"),
    ],
)
def test_cli_errors(tmp_path: Path, args: list[str], message: str) -> None:
    img = tmp_path / "guest.img"
    img.write_bytes(bytes(PS))
    cli = _cli(*(a.format(img=img, tmp=tmp_path) for a in args))
    out, err = cli.communicate(timeout=20)
    assert cli.returncode != 0
    assert message in err
    assert out == ""


async def test_poison_found_by_eio_is_reported_to_later_sessions() -> None:
    n = 16
    with live_process(n, [5, 9]) as (proc, addr):
        # No pagemap scan: the source learns of the poison only when a read fails with EIO.
        with ProcessBackend(proc.pid, [(addr, n * PS)], scan_pagemap=False) as be:
            async with running(be) as srv:
                first, w1 = await session(srv.addr)
                assert w1.poisoned_count == 0
                frames = await ask(first, 1, 0, n)
                kinds = [f.kind for f in frames for _ in range(f.count)]
                assert [i for i, k in enumerate(kinds) if k is p.PageKind.POISONED] == [5, 9]
                second, w2 = await session(srv.addr)
                assert w2.poisoned_count == 2
                assert offsets(w2) == [5 * PS, 9 * PS]
                await first.aclose()
                await second.aclose()
        assert proc.poll() is None


def test_cli_serves_a_live_process() -> None:
    n = 32
    with live_process(n, [3, 17]) as (child, addr):
        half = n // 2 * PS
        ranges = ["--range", f"{addr + half:#x}:{half:#x}", "--range", f"{addr}:{half}"]
        cli = _cli("--listen", "127.0.0.1:0", "--pid", str(child.pid), *ranges)
        try:
            assert cli.stdout is not None
            first = json.loads(cli.stdout.readline())
            assert first["event"] == "listening"

            async def check() -> None:
                urgent, w = await session((first["host"], first["port"]))
                # Guest offset 0 is the child's page 16: page 17 -> guest 1, 3 -> guest 19.
                assert offsets(w) == [1 * PS, 19 * PS]
                frames = await ask(urgent, 1, 0, 1)
                assert body(frames[0]) == page_bytes(16)
                await urgent.aclose()

            trio.run(check)
            cli.send_signal(signal.SIGINT)
            assert cli.wait(timeout=10) == 0
        finally:
            cli.kill()
            cli.wait()
