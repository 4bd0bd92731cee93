"""The destination's two connections to a source, handshaken: URGENT (demand) and BULK (push).

The handshake is the control plane's: trio connects, says Hello and reads the Welcome one
frame at a time, so each socket is at a frame boundary when the session's data plane takes it.
"""

from __future__ import annotations

import logging
import sys
from array import array
from collections.abc import Callable
from dataclasses import dataclass

import trio

from uffdpoison import protocol
from uffdpoison.protocol import Channel, Side
from uffdpoison.transport import ConnectionLost, FrameStream, open_tcp, parse_address

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0

# (poisoned, first unit, units) -> the Have bitmap of a resuming session (kernel.planes.have)
HaveFn = Callable[[bool, int, int], bytes]


class SourceUnavailable(ConnectionError):
    """The source could not be reached, or refused or broke the handshake."""


@dataclass(frozen=True, slots=True)
class SourceInfo:
    """What the source's Welcome said about the guest memory space."""

    address: str
    page_size: int
    memory_size: int
    huge_page_size: int
    poisoned_count: int


class SourceLink:
    """A session's handshaken streams to one source (``bulk`` None: no background push)."""

    def __init__(
        self,
        address: str,
        urgent: FrameStream,
        bulk: FrameStream | None,
        welcome: protocol.Welcome,
    ) -> None:
        self.address = address
        self.urgent = urgent
        self.bulk = bulk
        self.welcome = welcome
        self.info = SourceInfo(
            address,
            welcome.page_size,
            welcome.memory_size,
            welcome.huge_page_size,
            welcome.poisoned_count,
        )

    def stream(self, channel: int) -> FrameStream:
        s = self.urgent if channel == Channel.URGENT else self.bulk
        assert s is not None
        return s

    @property
    def poison_offsets(self) -> array:
        """The Welcome's poison list: guest byte offsets, ascending (array('Q'))."""
        out = array("Q")
        if self.welcome.poison_list is not None:
            out.frombytes(self.welcome.poison_list)
            if sys.byteorder != "little":  # pragma: no cover - the wire is little-endian
                out.byteswap()
        return out

    @classmethod
    async def connect(
        cls,
        address: str,
        *,
        page_size: int = 0,
        want_poison_list: bool = True,
        bulk: bool = True,
        have: HaveFn | None = None,
    ) -> SourceLink:
        """Open URGENT (creating a session), then BULK joining it. ``page_size`` asks the
        source for a unit (e.g. 2 MiB for hugetlb guests; 0 = its own). ``have``: this session
        resumes; BULK tells the source what it holds before the push starts."""
        try:
            host, port = parse_address(address, what="source address")
        except ValueError as e:
            raise SourceUnavailable(str(e)) from None
        with trio.move_on_after(CONNECT_TIMEOUT) as scope:
            urgent = await cls._open(host, port, Channel.URGENT)
            try:
                welcome = await cls._hello(urgent, None, page_size, want_poison_list)
                bulk_s = None
                if bulk:
                    bulk_s = await cls._open(host, port, Channel.BULK)
                    try:
                        await cls._hello(
                            bulk_s, welcome.session, welcome.page_size, False, welcome, have
                        )
                    except BaseException:
                        bulk_s.close()
                        raise
            except BaseException:
                urgent.close()
                raise
        if scope.cancelled_caught:
            raise SourceUnavailable(f"source {address}: no handshake within {CONNECT_TIMEOUT} s")
        return cls(address, urgent, bulk_s, welcome)

    @staticmethod
    async def _open(host: str, port: int, channel: Channel) -> FrameStream:
        try:
            sock = await open_tcp(host, port)
        except ConnectionLost as e:
            raise SourceUnavailable(f"source unreachable: {e}") from None
        name = f"{channel.name.lower()} {host}:{port}"
        return FrameStream(sock, protocol.Connection(Side.DESTINATION, channel), name=name)

    @staticmethod
    async def _hello(
        s: FrameStream,
        session: bytes | None,
        page_size: int,
        want_poison_list: bool,
        urgent: protocol.Welcome | None = None,
        have: HaveFn | None = None,
    ) -> protocol.Welcome:
        """``urgent``: the URGENT channel's Welcome, which BULK's must agree with. ``have``:
        BULK resumes, and the Have frames follow the Welcome."""
        channel = Channel.URGENT if session is None else Channel.BULK
        hello = protocol.Hello(
            protocol.PROTOCOL_VERSION,
            channel,
            session,
            page_size,
            want_poison_list,
            resume=have is not None,
        )
        try:
            await s.send(hello)
            ev = await s.receive()
        except (ConnectionLost, protocol.ProtocolError) as e:
            raise SourceUnavailable(f"{s.name}: handshake failed: {e}") from None
        if isinstance(ev, protocol.Error):
            raise SourceUnavailable(
                f"{s.name}: source refused the session: {ev.code}: {ev.message}"
            )
        if not isinstance(ev, protocol.Welcome):
            raise SourceUnavailable(f"{s.name}: expected Welcome, got {type(ev).__name__}")
        if urgent is not None and (ev.page_size, ev.memory_size) != (
            urgent.page_size,
            urgent.memory_size,
        ):
            raise SourceUnavailable(
                f"{s.name}: the BULK Welcome ({ev.memory_size} bytes in {ev.page_size}-byte "
                f"pages) disagrees with URGENT's ({urgent.memory_size} in {urgent.page_size})"
            )
        if page_size and ev.page_size != page_size:
            raise SourceUnavailable(
                f"{s.name}: source serves {ev.page_size}-byte pages; this guest needs {page_size}"
            )
        if have is not None:
            await _send_have(s, ev, have)
        return ev

    def close(self) -> None:
        self.urgent.close()
        if self.bulk is not None:
            self.bulk.close()


async def _send_have(s: FrameStream, welcome: protocol.Welcome, have: HaveFn) -> None:
    """What this resuming session holds (then what it knows is poisoned), in bitmaps of at most
    MAX_PAYLOAD bytes; a window with nothing to say is skipped, the last one always sent."""
    ps, units = welcome.page_size, welcome.memory_size // welcome.page_size
    step = protocol.MAX_PAYLOAD * 8
    windows = [(p, first) for p in (False, True) for first in range(0, units, step)]
    try:
        for k, (poisoned, first) in enumerate(windows):
            n = min(step, units - first)
            bits = have(poisoned, first, n)
            final = k == len(windows) - 1
            if final or bits.count(0) < len(bits):
                ev = protocol.Have(poisoned, first * ps, n, memoryview(bits), final)
                await s.send(ev)
    except (ConnectionLost, protocol.ProtocolError) as e:
        raise SourceUnavailable(f"{s.name}: resuming failed: {e}") from None


async def probe(address: str) -> SourceInfo:
    """Handshake once (no push) to check a source is there."""
    link = await SourceLink.connect(address, want_poison_list=False, bulk=False)
    try:
        return link.info
    finally:
        link.close()
