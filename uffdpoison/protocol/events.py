"""The protocol's vocabulary: sides, channels, page kinds, connection states and the events."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from uffdpoison.protocol import layout

# Error codes the project uses; other codes are allowed (shown to the user as-is).
ERROR_CODES: Final = {
    "bad-request": "request malformed or not servable as asked",
    "out-of-range": "range outside the guest memory space",
    "read-failed": "source could not read the pages (other than poison)",
    "unknown-session": "bulk Hello names a session the source does not know",
    "bad-version": "major protocol version not supported",
    "bad-page-size": "requested page size not available for this guest",
    "auth-failed": "authentication refused",
    "busy": "source refuses new sessions for now",
    "shutdown": "source is shutting down",
    "internal": "unexpected failure in the sender",
}


class ProtocolError(Exception):
    """The peer (or we, on send) broke the protocol; the message names what was wrong."""


class _Sentinel:
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA: Final = _Sentinel("NEED_DATA")
CLOSED: Final = _Sentinel("CLOSED")


class Side(enum.Enum):
    SOURCE = "source"
    DESTINATION = "destination"

    @property
    def other(self) -> Side:
        return Side.DESTINATION if self is Side.SOURCE else Side.SOURCE


class Channel(enum.IntEnum):
    URGENT = layout.CHANNEL_URGENT
    BULK = layout.CHANNEL_BULK


class PageKind(enum.IntEnum):
    DATA = layout.KIND_DATA
    ZERO = layout.KIND_ZERO
    POISONED = layout.KIND_POISONED
    CLEAN = layout.KIND_CLEAN


class State(enum.Enum):
    HANDSHAKE = "handshake"  # before the Welcome
    OPEN = "open"
    DONE = "done"  # bulk channel: both sides sent Done
    ABORTED = "aborted"  # an Error with id None was sent or received: the channel is finished
    CLOSED = "closed"  # next_event returned CLOSED (peer's EOF)


@dataclass(frozen=True, slots=True)
class Hello:
    version: int
    channel: Channel
    session: bytes | None
    page_size: int = 0
    want_poison_list: bool = True
    auth: bytes | None = None  # the destination's nonce: it authenticates (Challenge, Proof)
    resume: bool = False  # BULK: Have frames follow the Welcome; the push waits for the last
    # MINOR mode, URGENT: b"" asks the source to start a precopy epoch; EPOCH bytes say the
    # destination's page cache holds that epoch's precopy (docs/PROTOCOL.md, "MINOR mode")
    epoch: bytes | None = None


@dataclass(frozen=True, slots=True)
class Welcome:
    version: int
    session: bytes
    page_size: int
    memory_size: int
    huge_page_size: int
    poisoned_count: int
    poison_list: memoryview | None  # u64 LE byte offsets (the payload), or None
    epoch: bytes | None = None  # the epoch the source vouches for (answering a Hello's)


@dataclass(frozen=True, slots=True)
class Request:
    id: int
    offset: int
    count: int
    digests: memoryview | None = None  # MINOR mode: u64 LE XXH64 of each page held


@dataclass(frozen=True, slots=True)
class Pages:
    id: int  # the Request answered, or PUSH_ID (0): the source's unsolicited push on BULK
    kind: PageKind
    offset: int
    count: int
    data: memoryview | None = None  # DATA: count * page_size bytes


@dataclass(frozen=True, slots=True)
class Error:
    id: int | None  # the Request it answers (source only), or None: fatal for the channel
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Done:
    pass


@dataclass(frozen=True, slots=True)
class Have:
    """A resuming destination's bitmap (BULK, after the Welcome, when its Hello said resume):
    bit i (LSB first) of ``bits`` set means the page at ``offset + i * page_size`` is not to
    be pushed; with ``poisoned``, it is known poisoned. ``final``: the last; the push starts."""

    poisoned: bool
    offset: int
    count: int
    bits: memoryview | None  # (count + 7) // 8 bytes
    final: bool


@dataclass(frozen=True, slots=True)
class Challenge:
    """The source's answer to a Hello with a nonce: its own nonce, and its proof that it holds
    the shared secret (HMAC over the handshake; ``uffdpoison.auth``)."""

    nonce: bytes
    mac: bytes


@dataclass(frozen=True, slots=True)
class Proof:
    """The destination's proof that it holds the shared secret, over the same handshake."""

    mac: bytes


Event = Hello | Welcome | Request | Pages | Error | Done | Have | Challenge | Proof
DATA_EVENTS = (Request, Pages)  # the fixed-layout frames: the data planes' business
