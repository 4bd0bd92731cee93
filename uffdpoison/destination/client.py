"""The destination's two connections to a source: URGENT (demand faults) and BULK (the source's
background push). One ``SourceClient`` per destination session. While a session's C demand engine
runs, it uses the URGENT socket itself and continues the request ids from ``next_id``."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

from uffdpoison import protocol
from uffdpoison.protocol import Channel, Side
from uffdpoison.transport import ConnectionLost, FrameTransport, open_tcp, parse_address

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0


class SourceUnavailable(ConnectionError):
    """The source could not be reached or refused the handshake."""


@dataclass(frozen=True, slots=True)
class SourceInfo:
    """What the source's Welcome said about the guest memory space."""

    address: str
    page_size: int
    memory_size: int
    huge_page_size: int
    poisoned_count: int


class SourceClient:
    def __init__(
        self, address: str, urgent: FrameTransport, bulk: FrameTransport, welcome: protocol.Welcome
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
        self.next_id = 1  # the next request id (the demand engine continues from it)

    @classmethod
    async def connect(
        cls, address: str, *, page_size: int = 0, want_poison_list: bool = True, bulk: bool = True
    ) -> SourceClient:
        """Open the URGENT connection (creating a session), then the BULK one joining it.

        ``page_size`` asks the source for a unit (e.g. 2 MiB for hugetlb guests; 0 = its own).
        """
        host, port = parse_address(address, what="source address")
        with trio.move_on_after(CONNECT_TIMEOUT) as scope:
            urgent = await cls._open(host, port, Channel.URGENT, "urgent")
            try:
                welcome = await cls._hello(urgent, None, page_size, want_poison_list)
                if page_size and welcome.page_size != page_size:
                    raise SourceUnavailable(
                        f"source {address} serves {welcome.page_size}-byte pages; "
                        f"this guest needs {page_size}"
                    )
                if bulk:
                    bulk_t = await cls._open(host, port, Channel.BULK, "bulk")
                    try:
                        await cls._hello(bulk_t, welcome.session, welcome.page_size, False)
                    except BaseException:
                        bulk_t.close()
                        raise
                else:
                    bulk_t = None
            except BaseException:
                urgent.close()
                raise
        if scope.cancelled_caught:
            raise SourceUnavailable(f"source {address}: no handshake within {CONNECT_TIMEOUT} s")
        client = cls(address, urgent, bulk_t, welcome)  # type: ignore[arg-type]
        return client

    @staticmethod
    async def _open(host: str, port: int, channel: Channel, name: str) -> FrameTransport:
        try:
            sock = await open_tcp(host, port)
        except (OSError, ConnectionLost) as e:
            raise SourceUnavailable(f"source {host}:{port} unreachable: {e}") from e
        return FrameTransport(
            sock, protocol.Connection(Side.DESTINATION, channel), name=f"{name} {host}:{port}"
        )

    @staticmethod
    async def _hello(
        t: FrameTransport, session: bytes | None, page_size: int, want_poison_list: bool
    ) -> protocol.Welcome:
        try:
            await t.send(
                protocol.Hello(
                    version=protocol.PROTOCOL_VERSION,
                    channel=t.conn.channel,
                    session=session,
                    page_size=page_size,
                    want_poison_list=want_poison_list,
                )
            )
            ev = await t.receive()
        except (ConnectionLost, protocol.ProtocolError) as e:
            raise SourceUnavailable(f"{t.name}: handshake failed: {e}") from e
        if isinstance(ev, protocol.Error):
            raise SourceUnavailable(
                f"{t.name}: source refused the session: {ev.code}: {ev.message}"
            )
        if not isinstance(ev, protocol.Welcome):
            raise SourceUnavailable(f"{t.name}: expected Welcome, got {type(ev).__name__}")
        return ev

    def request(
        self, offset: int, count: int, *, urgent: bool = True, digests: memoryview | None = None
    ) -> int:
        """Post a demand request; returns its id. Never waits (see ``FrameTransport.post``)."""
        rid = self.next_id
        self.next_id = rid + 1
        self.urgent.post(
            protocol.Request(id=rid, offset=offset, count=count, urgent=urgent, digests=digests)
        )
        return rid

    def close(self) -> None:
        self.urgent.close()
        if self.bulk is not None:
            self.bulk.close()


async def probe(address: str) -> SourceInfo:
    """Handshake once (no bulk stream) to check a source is there; used by the daemon at start."""
    client = await SourceClient.connect(address, want_poison_list=False, bulk=False)
    try:
        return client.info
    finally:
        client.close()
