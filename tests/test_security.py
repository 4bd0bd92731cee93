"""Hostile and broken input: authentication (both directions, replay, a source that skips it),
handoffs built to hurt (split, huge, stalled, absurd regions), a flood of connections at a low
fd limit. Each case leaves the daemon serving its other VMMs."""

from __future__ import annotations

import json
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from destination_helpers import ToyVMM, make_guest, start_source
from test_daemon import Daemon, check_touches, expect_rejected
from test_reliability import DestProcess

from uffdpoison import auth, protocol
from uffdpoison.auth import Token, TokenError
from uffdpoison.destination.embed import AuthenticationFailed, serve_memory
from uffdpoison.destination.link import SourceLink, SourceUnavailable
from uffdpoison.destination.regions import Region
from uffdpoison.kernel import memory
from uffdpoison.protocol import Channel, Side, codec, layout
from uffdpoison.source.spawn import SourceProcess

PS = 4096
TOKEN = Token(b"the shared secret, 32 bytes long")
OTHER = Token(b"another secret entirely, 32 long")


# -- authentication ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source_token", "dest_token", "words"),
    [
        (TOKEN, OTHER, "failed to authenticate"),
        (TOKEN, None, "serves authenticated peers only"),
        (None, TOKEN, "has no token"),
    ],
)
async def test_without_the_right_token_both_sides_refuse(
    nursery: trio.Nursery, source_token: Token | None, dest_token: Token | None, words: str
) -> None:
    guest = make_guest(16)
    statuses: list[dict[str, Any]] = []
    source = await start_source(
        nursery, guest.backend(), token=source_token, status=statuses.append
    )
    with memory.anon(16 * PS) as m, pytest.raises(AuthenticationFailed, match=words):
        async with serve_memory([Region(m.addr, 16 * PS, 0)], source, token=dest_token):
            pass
    assert not [s for s in statuses if s["event"] == "session-started"]  # no page data sent
    # The right token on both sides: served.
    with memory.anon(16 * PS) as m:
        right = source_token or dest_token
        source2 = await start_source(nursery, guest.backend(), token=right)
        async with serve_memory([Region(m.addr, 16 * PS, 0)], source2, token=right) as server:
            await server.ensure_present(m.addr, 16 * PS)
            assert m.read(0, PS) == bytes(guest.image[:PS])


async def _fake_source(nursery: trio.Nursery, answer: Any) -> str:
    """A source that answers each Hello with ``answer(conn, hello)``'s events."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")

    async def handle(stream: trio.SocketStream) -> None:
        conn = protocol.Connection(Side.SOURCE, None)
        while (ev := conn.next_event()) is protocol.NEED_DATA:
            conn.receive_data(await stream.receive_some(1 << 16))
        for out in answer(ev):
            # Through a throwaway connection: a lying source breaks the rules on purpose.
            for part in protocol.codec.encode(out, protocol.codec.payload_of(out)):
                await stream.send_all(part)
        await trio.sleep_forever()

    nursery.start_soon(trio.serve_listeners, handle, listeners)
    return f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"


def _welcome(session: bytes = b"s" * 16) -> protocol.Welcome:
    return protocol.Welcome(protocol.PROTOCOL_VERSION, session, PS, 16 * PS, 0, 0, None)


async def test_a_source_that_does_not_authenticate_is_refused(nursery: trio.Nursery) -> None:
    skips = await _fake_source(nursery, lambda hello: [_welcome()])
    with pytest.raises(SourceUnavailable, match="unauthenticated source"):
        await SourceLink.connect(skips, bulk=False, token=TOKEN)
    forged = await _fake_source(
        nursery, lambda hello: [protocol.Challenge(auth.nonce(), b"\0" * 32), _welcome()]
    )
    with pytest.raises(AuthenticationFailed, match="failed to authenticate"):
        await SourceLink.connect(forged, bulk=False, token=TOKEN)

    def unbound(hello: protocol.Hello) -> list[protocol.Event]:
        n = auth.nonce()  # knows the token, but its Welcome is not of this handshake
        mac = TOKEN.mac("source", auth.transcript(hello, n))
        return [protocol.Challenge(n, mac), _welcome(b"x" * 16)]

    with pytest.raises(AuthenticationFailed, match="not bound"):
        await SourceLink.connect(await _fake_source(nursery, unbound), bulk=False, token=TOKEN)


async def test_a_replayed_proof_is_refused(nursery: trio.Nursery) -> None:
    """A recorded exchange is worth nothing: each handshake has a fresh source nonce."""
    guest = make_guest(16)
    source = await start_source(nursery, guest.backend(), token=TOKEN)
    host, port = source.rsplit(":", 1)

    async def handshake(proof: bytes | None) -> protocol.Event:
        stream = await trio.open_tcp_stream(host, int(port))
        conn = protocol.Connection(Side.DESTINATION, Channel.URGENT)
        hello = protocol.Hello(protocol.PROTOCOL_VERSION, Channel.URGENT, None, auth=b"n" * 32)
        events: list[protocol.Event] = [hello]
        ev: Any = None
        while True:
            for e in events:
                for part in conn.send(e):
                    await stream.send_all(part)
            events = []
            while (ev := conn.next_event()) is protocol.NEED_DATA:  # type: ignore[assignment]
                conn.receive_data(await stream.receive_some(1 << 16))
            if not isinstance(ev, protocol.Challenge):
                await stream.aclose()
                return ev
            mac = proof or TOKEN.mac("destination", auth.transcript(hello, ev.nonce))
            events = [protocol.Proof(mac)]

    first = await handshake(None)
    assert isinstance(first, protocol.Welcome)
    recorded = TOKEN.mac("destination", b"an old transcript")
    refused = await handshake(recorded)
    assert isinstance(refused, protocol.Error) and refused.code == "auth-failed"


def test_token_files_are_checked(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_text("tiny\n")
    with pytest.raises(TokenError, match=r"16\.\.4096 bytes"):
        Token.from_file(short)
    with pytest.raises(TokenError, match="cannot read"):
        Token.from_file(tmp_path / "missing")
    good = tmp_path / "good"
    good.write_text("  a secret of enough bytes \n")
    assert Token.from_file(good).verify(
        "x", b"t", Token(b"a secret of enough bytes").mac("x", b"t")
    )
    assert "secret" not in repr(Token.from_file(good))


# -- handoffs built to hurt ------------------------------------------------------------------------

# argv: path, a file holding the body, mode, cut: the fd goes with the first message,
# body[:cut]; "rest" sends the remainder a moment later, "stall" never does, "whole" sends it
# all at once.
HANDOFF_PARTS = """
import socket, sys, time
from uffdpoison.kernel import Feature, Userfaultfd
u = Userfaultfd.create(Feature.EVENT_REMOVE)
body, mode = open(sys.argv[2], "rb").read(), sys.argv[3]
cut = len(body) if mode == "whole" else int(sys.argv[4])
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
try:
    n = socket.send_fds(s, [body[:cut]], [u.fileno()])
    s.sendall(body[n:cut])  # a large first message may go out in parts
    if mode == "rest":
        time.sleep(0.2); s.sendall(body[cut:])
    s.recv(4096)  # until the daemon closes its end
except OSError:
    pass  # the daemon closed it early (a refused handoff)
sys.stdin.read()  # the VMM lives until the test closes our stdin
"""


async def _hand(path: str, body: str, mode: str, cut: int = 0) -> trio.Process:
    file = Path(path).with_name(f"body-{len(body)}-{mode}")
    file.write_text(body)
    return await trio.lowlevel.open_process(
        [sys.executable, "-c", HANDOFF_PARTS, path, str(file), mode, str(cut)],
        stdin=subprocess.PIPE,
    )


async def test_handoffs_are_read_whole_before_they_are_judged(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """A table split inside a string, or sent as one 150 KB message, is a valid handoff; half a
    message and a stall waits for the deadline (not refused at once); a body past the limit is
    refused as too large. Meanwhile a good VMM is served."""
    n = 4096
    guest = make_guest(n)
    source = await start_source(nursery, guest.backend())
    d = Daemon(str(tmp_path / "h.sock"), source, handoff_timeout=1.5)
    await nursery.start(d.daemon.serve)
    base = 1 << 40  # regions the VMM did not map: the daemon only reads the table
    region = {"base_host_virt_addr": base, "size": PS, "offset": 0, "page_size": PS}
    split = json.dumps([region])
    inside = split.index("base_host") + 4  # the cut falls inside a string
    many = json.dumps([{**region, "base_host_virt_addr": base + 2 * k * PS, "offset": k * PS}
                       for k in range(2000)])  # fmt: skip
    assert len(many) > 150_000
    procs = [await _hand(d.path, split, "rest", inside), await _hand(d.path, many, "whole")]
    await d.wait_for("session-started", 2)
    t0 = time.monotonic()
    procs.append(await _hand(d.path, split, "stall", inside))
    (rejected,) = await d.wait_for("handoff-rejected", 1)
    assert "incomplete after" in rejected["reason"] and time.monotonic() - t0 >= 1.0
    good = await ToyVMM.start(d.path, len(guest.image))
    try:
        check_touches(guest, await good.touch(list(range(64))), list(range(64)))
    finally:
        await good.close()
        for p in procs:
            p.kill()
            await p.wait()


def _region_with_a_long_field(n: int) -> str:
    return json.dumps([{"base_host_virt_addr": 4096, "size": 4096, "offset": 0, "x": "y" * n}])


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ('[{"base_host_virt_addr": 18446744073709547520, "size": 8192, "offset": 0}]', "past any"),
        ('[{"base_host_virt_addr": 1180591620717411303424, "size": 4096, "offset": 0}]', "past"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        (_region_with_a_long_field(2 << 20), "exceeds"),
    ],
)
async def test_absurd_handoffs_are_rejected_with_a_reason(
    nursery: trio.Nursery, tmp_path: Path, body: str, words: str
) -> None:
    guest = make_guest(16)
    d = Daemon(str(tmp_path / "h.sock"), await start_source(nursery, guest.backend()))
    await nursery.start(d.daemon.serve)
    await expect_rejected(d, await _hand(d.path, body, "whole"), words)


async def test_a_flood_of_connections_at_a_low_fd_limit_is_back_pressure(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """300 idle connections to a daemon allowed 128 fds: accept() fails with EMFILE, which is
    back-pressure, not an exit; once the idle connections time out a VMM is served."""
    guest = make_guest(64)
    source = await start_source(nursery, guest.backend())
    path = str(tmp_path / "h.sock")
    argv = ["--source", source, "--handoff", path, "--state-dir", "none",
            "--handoff-timeout", "1", "--max-handoffs", "500"]  # fmt: skip

    def low_fds() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))

    dest = DestProcess(nursery, argv, preexec=low_fds)
    await dest.start()
    idle: list[socket.socket] = []
    with trio.move_on_after(3):
        while len(idle) < 300:  # more than the daemon has fds: accept() meets EMFILE
            s = socket.socket(socket.AF_UNIX)
            s.setblocking(False)
            try:
                s.connect(path)
                idle.append(s)
            except BlockingIOError:  # the backlog is full until the daemon accepts again
                s.close()
                await trio.sleep(0.005)
    assert len(idle) > 128
    await trio.sleep(1.5)  # every idle one timed out (or waits in the backlog)
    for s in idle:
        s.close()
    assert dest.proc is not None and dest.proc.returncode is None, "the daemon exited"
    vmm = await ToyVMM.start(path, len(guest.image))
    try:
        check_touches(guest, await vmm.touch("all"))
    finally:
        await vmm.close()
        assert await dest.stop(15) == 0


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_unauthenticated_peers_cannot_make_a_source_allocate(tmp_path: Path) -> None:
    """100 connections, each announcing a 64 MiB payload and sending 64 KiB of it, before any
    handshake: the source holds what arrived, not what was announced (it allocated 64 MiB a
    connection before), bounds the handshakes it reads at once, and serves a real peer after."""
    image = tmp_path / "guest.img"
    image.write_bytes(make_guest(16).image)
    (tmp_path / "token").write_bytes(b"the shared secret, 32 bytes long")
    with SourceProcess(image, options=["--token-file", str(tmp_path / "token")]) as sp:
        assert sp.proc is not None
        before = _rss_kib(sp.proc.pid)
        host, port = sp.address.rsplit(":", 1)
        prefix = codec.PREFIX.pack(layout.MAGIC, 16, layout.MAX_PAYLOAD)
        flood = []
        for _ in range(100):
            s = socket.create_connection((host, int(port)))
            s.sendall(prefix + bytes(16) + bytes(64 << 10))
            flood.append(s)
        time.sleep(1.0)
        grown = _rss_kib(sp.proc.pid) - before
        for s in flood:
            s.close()
        assert grown < 64 << 10, f"the source grew by {grown} KiB"
        trio.run(_served_with_token, sp.address)


async def _served_with_token(source: str) -> None:
    with memory.anon(16 * PS) as m:
        async with serve_memory([Region(m.addr, 16 * PS, 0)], source, token=TOKEN) as server:
            await server.ensure_present(m.addr, PS)
