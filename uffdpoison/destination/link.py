"""The destination's two connections to a source, handshaken: URGENT (demand) and BULK (push).

The handshake is the control plane's: trio connects, says Hello and reads the Welcome one
frame at a time, so each socket is at a frame boundary when the session's data plane takes it.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from array import array
from collections.abc import Callable
from dataclasses import dataclass

import trio

from uffdpoison import auth, protocol
from uffdpoison.auth import Token
from uffdpoison.kernel.tls import TlsContext, TlsError
from uffdpoison.protocol import Channel, Hello, Side
from uffdpoison.transport import ConnectionLost, FrameStream, open_tcp, parse_address

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0

# (poisoned, first unit, units) -> the Have bitmap of a resuming session (kernel.planes.have)
HaveFn = Callable[[bool, int, int], bytes]


class SourceUnavailable(ConnectionError):
    """The source could not be reached, or refused or broke the handshake."""


class AuthenticationFailed(SourceUnavailable):
    """Either side could not prove it holds the shared token (or had none)."""


@dataclass(frozen=True, slots=True)
class SourceInfo:
    """What the source's Welcome said about the guest memory space."""

    address: str
    page_size: int
    memory_size: int
    huge_page_size: int
    poisoned_count: int
    epoch: bytes | None = None  # the precopy epoch the source vouches for (MINOR mode)


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
            welcome.epoch,
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
        token: Token | None = None,
        tls: TlsContext | None = None,
        epoch: bytes | None = None,
    ) -> SourceLink:
        """Open URGENT (creating a session), then BULK joining it. ``page_size`` asks the
        source for a unit (e.g. 2 MiB for hugetlb guests; 0 = its own). ``have``: this session
        resumes; BULK tells the source what it holds before the push starts. ``token``: both
        sides prove they hold it before anything of the guest crosses (``uffdpoison.auth``);
        a source that cannot is refused (``AuthenticationFailed``). ``tls``: every byte is
        TLS, the source's certificate checked against the context's CA for its host.
        ``epoch`` (MINOR mode): b"" starts a precopy epoch at the source; a token says this
        destination's page cache holds that epoch's precopy (``info.epoch``: vouched or not)."""
        try:
            host, port = parse_address(address, what="source address")
        except ValueError as e:
            raise SourceUnavailable(str(e)) from None
        v = protocol.PROTOCOL_VERSION
        with trio.move_on_after(CONNECT_TIMEOUT) as scope:
            urgent = await cls._open(host, port, Channel.URGENT, tls)
            try:
                hello = Hello(v, Channel.URGENT, None, page_size, want_poison_list, epoch=epoch)
                welcome = await _handshake(urgent, hello, token)
                bulk_s = None
                if bulk:
                    bulk_s = await cls._open(host, port, Channel.BULK, tls)
                    hello = Hello(v, Channel.BULK, welcome.session, welcome.page_size, False,
                                  resume=have is not None)  # fmt: skip
                    try:
                        _agrees(bulk_s, await _handshake(bulk_s, hello, token), welcome)
                        if have is not None:
                            await _send_have(bulk_s, welcome, have)
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
    async def _open(host: str, port: int, channel: Channel, tls: TlsContext | None) -> FrameStream:
        try:
            sock = await open_tcp(host, port)
        except ConnectionLost as e:
            raise SourceUnavailable(f"source unreachable: {e}") from None
        name = f"{channel.name.lower()} {host}:{port}"
        stream = FrameStream(sock, protocol.Connection(Side.DESTINATION, channel), name=name)
        if tls is not None:
            try:
                await stream.start_tls(tls, host)
            except TlsError as e:
                stream.close()
                raise AuthenticationFailed(f"{name}: {e.strerror}") from None
            except OSError as e:
                stream.close()
                raise SourceUnavailable(f"{name}: TLS handshake: {e}") from None
        return stream

    def close(self) -> None:
        self.urgent.close()
        if self.bulk is not None:
            self.bulk.close()


async def _handshake(s: FrameStream, hello: Hello, token: Token | None) -> protocol.Welcome:
    """Hello, (with a token: the source's Challenge checked, our Proof), the Welcome."""
    if token is not None:
        hello = dataclasses.replace(hello, auth=auth.nonce())
    try:
        await s.send(hello)
        ev = await s.receive()
        transcript = b""
        if token is not None and isinstance(ev, protocol.Challenge):
            transcript = auth.transcript(hello, ev.nonce)
            if not token.verify("source", transcript, ev.mac):
                await s.send(protocol.Error(None, "auth-failed", "the source's proof is wrong"))
                raise AuthenticationFailed(f"{s.name}: the source failed to authenticate")
            await s.send(protocol.Proof(token.mac("destination", transcript)))
            ev = await s.receive()
    except (ConnectionLost, protocol.ProtocolError) as e:
        raise SourceUnavailable(f"{s.name}: handshake failed: {e}") from None
    if isinstance(ev, protocol.Error):
        cls = AuthenticationFailed if ev.code == "auth-failed" else SourceUnavailable
        raise cls(f"{s.name}: source refused the session: {ev.code}: {ev.message}")
    if not isinstance(ev, protocol.Welcome):
        raise SourceUnavailable(f"{s.name}: expected Welcome, got {type(ev).__name__}")
    if token is not None and hello.session is None and ev.session != token.session(transcript):
        raise AuthenticationFailed(f"{s.name}: the Welcome is not bound to this handshake")
    if hello.page_size and ev.page_size != hello.page_size:
        raise SourceUnavailable(
            f"{s.name}: source serves {ev.page_size}-byte pages; this guest needs {hello.page_size}"
        )
    return ev


def _agrees(s: FrameStream, bulk: protocol.Welcome, urgent: protocol.Welcome) -> None:
    """BULK's Welcome must describe the same memory as URGENT's (each Connection knows only
    its own channel)."""
    if (bulk.page_size, bulk.memory_size) != (urgent.page_size, urgent.memory_size):
        raise SourceUnavailable(
            f"{s.name}: the BULK Welcome ({bulk.memory_size} bytes in {bulk.page_size}-byte "
            f"pages) disagrees with URGENT's ({urgent.memory_size} in {urgent.page_size})"
        )


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


async def probe(
    address: str, token: Token | None = None, tls: TlsContext | None = None
) -> SourceInfo:
    """Handshake once (no push) to check a source is there."""
    link = await SourceLink.connect(
        address, want_poison_list=False, bulk=False, token=token, tls=tls
    )
    try:
        return link.info
    finally:
        link.close()
