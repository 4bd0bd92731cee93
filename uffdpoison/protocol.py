"""Sans-IO wire protocol between a uffdpoison source and destination (h11-style).

A ``Connection`` turns bytes into events (``receive_data`` + ``next_event``) and events into
bytes (``send``). It owns no socket. Every frame is validated symmetrically: a frame we are about
to send goes through the same checks as one we receive, so our own bugs never reach the wire.
A frame that fails any check raises ``ProtocolError`` naming the problem, and nothing from it is
acted on (no state, id or counter changes). Byte layout and rules: docs/PROTOCOL.md.
"""

from __future__ import annotations

import enum
import struct
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Final, TypeGuard

import msgpack

__all__ = [
    "BASE_PAGE_SIZE",
    "CLOSED",
    "ERROR_CODES",
    "MAGIC",
    "MAX_AUTH",
    "MAX_CODE",
    "MAX_HEADER",
    "MAX_MESSAGE",
    "MAX_PAGES_PER_FRAME",
    "MAX_PAYLOAD",
    "MAX_SESSION",
    "NEED_DATA",
    "PREFIX_SIZE",
    "PROTOCOL_VERSION",
    "Channel",
    "Connection",
    "Done",
    "Error",
    "Event",
    "Hello",
    "PageKind",
    "Pages",
    "ProtocolError",
    "Request",
    "Side",
    "State",
    "Welcome",
    "bench_codec",
    "open_pair",
]

# Major version: peers must agree exactly. Compatible additions are new optional map keys, which
# every peer ignores when it does not know them, so they do not bump this number.
PROTOCOL_VERSION: Final = 1
MAGIC: Final = b"uP"
# Prefix: magic (2 bytes), header length (u16), payload length (u32), network byte order like
# msgpack itself, so a hot frame's prefix and header are one struct.pack.
_PREFIX = struct.Struct(">2sHI")
PREFIX_SIZE: Final = _PREFIX.size
MAX_HEADER: Final = 4096
MAX_PAYLOAD: Final = 64 * 1024 * 1024
BASE_PAGE_SIZE: Final = 4096
# Bounds `count` of a Request or Pages frame whatever its kind (a DATA frame is also bounded by
# MAX_PAYLOAD, i.e. count * page_size <= MAX_PAYLOAD).
MAX_PAGES_PER_FRAME: Final = MAX_PAYLOAD // BASE_PAGE_SIZE
MAX_SESSION: Final = 64
MAX_AUTH: Final = 1024
MAX_CODE: Final = 64
MAX_MESSAGE: Final = 1024
_U64_LIMIT: Final = 1 << 64

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


class Channel(enum.IntEnum):
    URGENT = 1
    BULK = 2


class PageKind(enum.IntEnum):
    DATA = 1
    ZERO = 2
    POISONED = 3
    CLEAN = 4


class State(enum.Enum):
    HANDSHAKE = "handshake"  # before the Welcome
    OPEN = "open"
    DONE = "done"  # bulk channel: both sides sent Done and nothing is outstanding
    ABORTED = "aborted"  # an Error with id None was sent or received: the channel is finished
    CLOSED = "closed"  # next_event returned CLOSED (peer's EOF)


@dataclass(frozen=True, slots=True)
class Hello:
    version: int
    channel: Channel
    session: bytes | None
    page_size: int = 0
    want_poison_list: bool = True
    auth: bytes | None = None


@dataclass(frozen=True, slots=True)
class Welcome:
    version: int
    session: bytes
    page_size: int
    memory_size: int
    huge_page_size: int
    poisoned_count: int
    poison_list: memoryview | None


@dataclass(frozen=True, slots=True)
class Request:
    id: int
    offset: int
    count: int
    urgent: bool
    digests: memoryview | None = None


@dataclass(frozen=True, slots=True)
class Pages:
    id: int | None
    kind: PageKind
    offset: int
    count: int
    data: memoryview | None = None


@dataclass(frozen=True, slots=True)
class Error:
    id: int | None
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Done:
    pass


Event = Hello | Welcome | Request | Pages | Error | Done

_T_HELLO, _T_WELCOME, _T_REQUEST, _T_PAGES, _T_ERROR, _T_DONE = 1, 2, 3, 4, 5, 6
_KINDS = {k.value: k for k in PageKind}
_CHANNELS = {c.value: c for c in Channel}
_NOT_TYPE = "field {!r} of {} must be {}, got {}"

# The two hot frames (Pages with an id, Request) are written with a fixed 40-byte header: the
# same map as the generic encoder but every int as msgpack uint64 (0xcf), so prefix and header
# are a single struct.pack and a receiver recognises them with one unpack. Both are ordinary
# msgpack; any other encoding of the same map is accepted through the generic decoder.
_FAST_HEADER = 40
_PAGES_C = (b"\x85\xa1t\x04\xa1i\xcf", b"\xa1k", b"\xa1o\xcf", b"\xa1n\xcf")
_PAGES_T = struct.Struct(">7sQ2sB3sQ3sQ")
_PAGES_F = struct.Struct(">2sHI7sQ2sB3sQ3sQ")
_REQ_C = (b"\x85\xa1t\x03\xa1i\xcf", b"\xa1o\xcf", b"\xa1n\xcf", b"\xa1u")
_REQ_T = struct.Struct(">7sQ3sQ3sQ2sB")
_REQ_F = struct.Struct(">2sHI7sQ3sQ3sQ2sB")
assert _PAGES_T.size == _REQ_T.size == _FAST_HEADER
# The push (Pages with id nil, on BULK) likewise, in a fixed 32-byte header:
# {"t":4,"i":nil,"k":K,"o":u64,"n":u64} = 85 a1 74 04 a1 69 c0 a1 6b K a1 6f cf <8> a1 6e cf <8>
_PUSH_HEADER = 32
_PUSH_C = (b"\x85\xa1t\x04\xa1i\xc0\xa1k", b"\xa1o\xcf", b"\xa1n\xcf")
_PUSH_T = struct.Struct(">9sB3sQ3sQ")
_PUSH_F = struct.Struct(">2sHI9sB3sQ3sQ")
_PUSH_KINDS = frozenset((PageKind.DATA, PageKind.ZERO, PageKind.POISONED))
assert _PUSH_T.size == _PUSH_HEADER
_MSGPACK_TRUE, _MSGPACK_FALSE = 0xC3, 0xC2


# ---------------------------------------------------------------- field checks (send and receive)


def _flat_bytes(v: object, nbytes: int) -> TypeGuard[memoryview]:
    """A fast path's payload: exactly a flat, contiguous byte memoryview of ``nbytes``."""
    return (
        type(v) is memoryview
        and v.format == "B"
        and v.ndim == 1
        and v.c_contiguous
        and v.nbytes == nbytes
    )


def _is_int(v: object) -> bool:
    # bool is an int subclass in Python; on the wire it is a different msgpack type.
    return isinstance(v, int) and not isinstance(v, bool)


def _u64(frame: str, name: str, v: object) -> int:
    if not _is_int(v):
        raise ProtocolError(_NOT_TYPE.format(name, frame, "an int", type(v).__name__))
    if not 0 <= v < _U64_LIMIT:  # type: ignore[operator]
        raise ProtocolError(f"field {name!r} of {frame} out of u64 range: {v}")
    return v  # type: ignore[return-value]


def _opt_u64(frame: str, name: str, v: object) -> int | None:
    return None if v is None else _u64(frame, name, v)


def _bool(frame: str, name: str, v: object) -> bool:
    if not isinstance(v, bool):
        raise ProtocolError(_NOT_TYPE.format(name, frame, "a bool", type(v).__name__))
    return v


def _bytes(frame: str, name: str, v: object, lo: int, hi: int, optional: bool) -> bytes | None:
    if v is None and optional:
        return None
    if not isinstance(v, bytes):
        want = "bytes or None" if optional else "bytes"
        raise ProtocolError(_NOT_TYPE.format(name, frame, want, type(v).__name__))
    if not lo <= len(v) <= hi:
        raise ProtocolError(f"field {name!r} of {frame} must be {lo}..{hi} bytes, got {len(v)}")
    return v


def _str(frame: str, name: str, v: object, lo: int, hi: int) -> str:
    if not isinstance(v, str):
        raise ProtocolError(_NOT_TYPE.format(name, frame, "a str", type(v).__name__))
    if not lo <= len(v) <= hi:
        raise ProtocolError(f"field {name!r} of {frame} must be {lo}..{hi} chars, got {len(v)}")
    return v


def _page_size(frame: str, name: str, v: int, allow_zero: bool) -> None:
    if v == 0 and allow_zero:
        return
    if v < BASE_PAGE_SIZE or v & (v - 1) or v > MAX_PAYLOAD:
        raise ProtocolError(
            f"{name} of {frame} must be a power of two in {BASE_PAGE_SIZE}..{MAX_PAYLOAD}"
            f"{' or 0' if allow_zero else ''}, got {v}"
        )


def _as_bytes_view(frame: str, name: str, v: object) -> memoryview:
    """A flat unsigned-byte view of a payload buffer, without copying it."""
    try:
        mv = v if isinstance(v, memoryview) else memoryview(v)  # type: ignore[arg-type]
    except TypeError:
        raise ProtocolError(
            f"field {name!r} of {frame} must be a buffer (memoryview), got {type(v).__name__}"
        ) from None
    if not mv.c_contiguous:
        raise ProtocolError(f"field {name!r} of {frame} is not a contiguous buffer")
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


def _check_poison_list(mv: memoryview, page_size: int, memory_size: int) -> None:
    """Entries are u64 LE byte offsets, page-aligned, strictly ascending, inside the memory."""
    # A native u64 view costs no copy; a big-endian host unpacks instead.
    little = sys.byteorder == "little"
    entries = mv.cast("Q") if little else struct.unpack_from(f"<{len(mv) // 8}Q", mv)
    mask = page_size - 1
    prev = -1
    for i, off in enumerate(entries):
        if off & mask:
            raise ProtocolError(f"poison_list[{i}] = {off} is not aligned to page size {page_size}")
        if off <= prev:
            raise ProtocolError(f"poison_list[{i}] = {off} is not above the previous entry {prev}")
        if off >= memory_size:
            raise ProtocolError(f"poison_list[{i}] = {off} is past memory_size {memory_size}")
        prev = off


def _decode_header(header: bytes) -> dict[str, object]:
    try:
        obj = msgpack.unpackb(header, raw=False, strict_map_key=True, use_list=True)
    except Exception as e:  # msgpack raises many exception types for bad input
        raise ProtocolError(f"frame header is not valid msgpack: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"frame header must be a msgpack map, got {type(obj).__name__}")
    for k in obj:
        if not isinstance(k, str):
            raise ProtocolError(f"frame header keys must be str, got {type(k).__name__}")
    return obj


def _field(h: dict[str, object], key: str, frame: str, name: str) -> object:
    try:
        return h[key]
    except KeyError:
        raise ProtocolError(f"{frame} frame lacks field {name!r} (key {key!r})") from None


def _event_from_header(h: dict[str, object], payload: memoryview | None) -> Event:
    """Build an event from a decoded header map, checking each field's wire type."""
    t = _field(h, "t", "frame", "type")
    if type(t) is not int:
        raise ProtocolError(f"frame type must be an int, got {type(t).__name__}")
    f = h.get
    if t == _T_PAGES:
        k = _field(h, "k", "Pages", "kind")
        kind = _KINDS.get(k) if type(k) is int else None  # type: ignore[call-overload]
        if kind is None:
            raise ProtocolError(f"Pages frame has unknown kind {k!r}")
        return Pages(
            _opt_u64("Pages", "id", _field(h, "i", "Pages", "id")),
            kind,
            _u64("Pages", "offset", _field(h, "o", "Pages", "offset")),
            _u64("Pages", "count", _field(h, "n", "Pages", "count")),
            payload,
        )
    if t == _T_REQUEST:
        return Request(
            _u64("Request", "id", _field(h, "i", "Request", "id")),
            _u64("Request", "offset", _field(h, "o", "Request", "offset")),
            _u64("Request", "count", _field(h, "n", "Request", "count")),
            _bool("Request", "urgent", _field(h, "u", "Request", "urgent")),
            payload,
        )
    if t == _T_HELLO:
        c = _field(h, "c", "Hello", "channel")
        channel = _CHANNELS.get(c) if type(c) is int else None  # type: ignore[call-overload]
        if channel is None:
            raise ProtocolError(f"Hello frame has unknown channel {c!r}")
        _no_payload("Hello", payload)
        return Hello(
            _u64("Hello", "version", _field(h, "v", "Hello", "version")),
            channel,
            _bytes("Hello", "session", _field(h, "s", "Hello", "session"), 1, MAX_SESSION, True),
            _u64("Hello", "page_size", _field(h, "p", "Hello", "page_size")),
            _bool("Hello", "want_poison_list", _field(h, "w", "Hello", "want_poison_list")),
            _bytes("Hello", "auth", f("a"), 0, MAX_AUTH, True),
        )
    if t == _T_WELCOME:
        has_list = _bool("Welcome", "has_poison_list", _field(h, "l", "Welcome", "has_list"))
        if not has_list:
            _no_payload("Welcome without a poison list", payload)
        return Welcome(
            _u64("Welcome", "version", _field(h, "v", "Welcome", "version")),
            _bytes(
                "Welcome", "session", _field(h, "s", "Welcome", "session"), 1, MAX_SESSION, False
            ),  # type: ignore[arg-type]
            _u64("Welcome", "page_size", _field(h, "p", "Welcome", "page_size")),
            _u64("Welcome", "memory_size", _field(h, "m", "Welcome", "memory_size")),
            _u64("Welcome", "huge_page_size", _field(h, "h", "Welcome", "huge_page_size")),
            _u64("Welcome", "poisoned_count", _field(h, "n", "Welcome", "poisoned_count")),
            (payload if payload is not None else memoryview(b"")) if has_list else None,
        )
    if t == _T_ERROR:
        _no_payload("Error", payload)
        return Error(
            _opt_u64("Error", "id", _field(h, "i", "Error", "id")),
            _str("Error", "code", _field(h, "c", "Error", "code"), 1, MAX_CODE),
            _str("Error", "message", _field(h, "m", "Error", "message"), 0, MAX_MESSAGE),
        )
    if t == _T_DONE:
        _no_payload("Done", payload)
        return Done()
    raise ProtocolError(f"unknown frame type {t}")


def _no_payload(frame: str, payload: memoryview | None) -> None:
    if payload is not None:
        raise ProtocolError(f"{frame} frame must carry no payload, got {len(payload)} bytes")


def _check_event_types(ev: object) -> None:
    """Send side: the same wire-type checks the receiver applies to a decoded header."""
    if isinstance(ev, Pages):
        _opt_u64("Pages", "id", ev.id)
        if not isinstance(ev.kind, PageKind):
            raise ProtocolError(f"field 'kind' of Pages must be a PageKind, got {ev.kind!r}")
        _u64("Pages", "offset", ev.offset)
        _u64("Pages", "count", ev.count)
    elif isinstance(ev, Request):
        _u64("Request", "id", ev.id)
        _u64("Request", "offset", ev.offset)
        _u64("Request", "count", ev.count)
        _bool("Request", "urgent", ev.urgent)
    elif isinstance(ev, Hello):
        _u64("Hello", "version", ev.version)
        if not isinstance(ev.channel, Channel):
            raise ProtocolError(f"field 'channel' of Hello must be a Channel, got {ev.channel!r}")
        _bytes("Hello", "session", ev.session, 1, MAX_SESSION, True)
        _u64("Hello", "page_size", ev.page_size)
        _bool("Hello", "want_poison_list", ev.want_poison_list)
        _bytes("Hello", "auth", ev.auth, 0, MAX_AUTH, True)
    elif isinstance(ev, Welcome):
        _u64("Welcome", "version", ev.version)
        _bytes("Welcome", "session", ev.session, 1, MAX_SESSION, False)
        _u64("Welcome", "page_size", ev.page_size)
        _u64("Welcome", "memory_size", ev.memory_size)
        _u64("Welcome", "huge_page_size", ev.huge_page_size)
        _u64("Welcome", "poisoned_count", ev.poisoned_count)
    elif isinstance(ev, Error):
        _opt_u64("Error", "id", ev.id)
        _str("Error", "code", ev.code, 1, MAX_CODE)
        _str("Error", "message", ev.message, 0, MAX_MESSAGE)
    elif not isinstance(ev, Done):
        raise ProtocolError(f"not a protocol event: {type(ev).__name__}")


def _encode(
    ev: Event, payload: memoryview | None, packer: msgpack.Packer
) -> tuple[bytes, memoryview | None]:
    h: dict[str, object]
    if isinstance(ev, Pages):
        h = {"t": _T_PAGES, "i": ev.id, "k": int(ev.kind), "o": ev.offset, "n": ev.count}
    elif isinstance(ev, Request):
        h = {"t": _T_REQUEST, "i": ev.id, "o": ev.offset, "n": ev.count, "u": ev.urgent}
    elif isinstance(ev, Hello):
        h = {
            "t": _T_HELLO,
            "v": ev.version,
            "c": int(ev.channel),
            "s": ev.session,
            "p": ev.page_size,
            "w": ev.want_poison_list,
            "a": ev.auth,
        }
    elif isinstance(ev, Welcome):
        h = {
            "t": _T_WELCOME,
            "v": ev.version,
            "s": ev.session,
            "p": ev.page_size,
            "m": ev.memory_size,
            "h": ev.huge_page_size,
            "n": ev.poisoned_count,
            "l": ev.poison_list is not None,
        }
    elif isinstance(ev, Error):
        h = {"t": _T_ERROR, "i": ev.id, "c": ev.code, "m": ev.message}
    else:
        h = {"t": _T_DONE}
    header = packer.pack(h)
    if len(header) > MAX_HEADER:
        raise ProtocolError(f"{type(ev).__name__} header is {len(header)} bytes > MAX_HEADER")
    if payload is not None and not len(payload):
        payload = None  # an empty payload is no payload on the wire
    n = 0 if payload is None else payload.nbytes
    if n > MAX_PAYLOAD:  # the receiver would refuse the frame at its prefix
        raise ProtocolError(f"{type(ev).__name__} payload is {n} bytes > MAX_PAYLOAD")
    return _PREFIX.pack(MAGIC, len(header), n) + header, payload


class _Out:
    """One outstanding request: the next byte offset a reply must start at, and its end."""

    __slots__ = ("end", "has_digests", "next")

    def __init__(self, start: int, end: int, has_digests: bool) -> None:
        self.next = start
        self.end = end
        self.has_digests = has_digests


class Connection:
    """One channel of a session, from one side's point of view. Does no I/O."""

    def __init__(self, side: Side, channel: Channel) -> None:
        if not isinstance(side, Side) or not isinstance(channel, Channel):
            raise TypeError("Connection(side: Side, channel: Channel)")
        self.side: Final = side
        self.channel: Final = channel
        self._packer = msgpack.Packer(use_bin_type=True)
        self._state = State.HANDSHAKE
        self.page_size = 0  # known after the Welcome
        self.memory_size = 0
        self.huge_page_size = 0
        self.session: bytes | None = None
        self.hello: Hello | None = None
        self.welcome: Welcome | None = None
        self._out: dict[int, _Out] = {}
        self.our_done = False
        self.their_done = False
        self._our_abort = False
        self._their_abort = False
        # May the hot frames take the fast paths? (OPEN, and that direction not finished)
        self._fast_in = False
        # Whether the last event received came in the fixed 40-byte encoding (a peer that
        # uses it can be served by a C fast path that reads only that encoding).
        self.last_was_fast = False
        self._fast_out = False
        # receive side: complete frames not yet decoded, the prefix/header being gathered, the
        # payload being filled, and a framing error waiting its turn
        self._frames: deque[tuple[bytes, bytearray | memoryview | None]] = deque()
        self._stash = bytearray()
        self._pending: tuple[bytes, memoryview] | None = None  # header, view of its payload
        self._fill = 0
        self._frame_error: ProtocolError | None = None
        self._eof = False
        self._failed: ProtocolError | None = None

    # ------------------------------------------------------------------ public state

    @property
    def state(self) -> State:
        return self._state

    @property
    def outstanding(self) -> int:
        """Requests sent (destination) or received (source) that are not fully answered."""
        return len(self._out)

    @property
    def max_data_pages(self) -> int:
        """Most pages one DATA frame may carry at the page size in force."""
        if not self.page_size:
            return 0
        return min(MAX_PAGES_PER_FRAME, MAX_PAYLOAD // self.page_size)

    @property
    def failed(self) -> ProtocolError | None:
        """The ProtocolError next_event raised, if any (it raises it again on every call)."""
        return self._failed

    @property
    def idle(self) -> bool:
        """Nothing received is waiting to be returned: no whole frame, no part of one (and no
        framing error). Another reader of the same stream (a C fast path) may take over."""
        return (
            not self._frames
            and not self._stash
            and self._pending is None
            and self._frame_error is None
            and not self._eof
        )

    @property
    def bytes_wanted(self) -> int:
        """Hint for transports: bytes that would complete the frame being received (or the
        next frame's prefix)."""
        if self._pending is not None:
            return len(self._pending[1]) - self._fill
        have = len(self._stash)
        if have < PREFIX_SIZE:
            return PREFIX_SIZE - have
        _, hl, pl = _PREFIX.unpack_from(self._stash)
        return PREFIX_SIZE + hl + pl - have

    # ------------------------------------------------------------------ sending

    def send(self, event: Event) -> list[bytes | memoryview]:
        """Validate and encode one event. Returns the header bytes, then the payload (if any)
        as the caller's own memoryview: write them in order, do not join them."""
        if self._fast_out:
            cls = type(event)
            if cls is Pages:
                fast = self._send_pages_fast(event)  # type: ignore[arg-type]
                if fast is not None:
                    return fast
            elif cls is Request:
                fast = self._send_request_fast(event)  # type: ignore[arg-type]
                if fast is not None:
                    return fast
        _check_event_types(event)
        payload = self._payload_of(event)
        self._validate(event, payload, ours=True)
        header, payload = _encode(event, payload, self._packer)
        self._apply(event, ours=True)
        return [header] if payload is None else [header, payload]

    # Fast paths: the common, valid case of the two hot frames, checked directly. Anything
    # unusual returns None and takes the generic path, which accepts or names the problem.

    def _send_pages_fast(self, ev: Pages) -> list[bytes | memoryview] | None:
        rid, kind, off, n, data = ev.id, ev.kind, ev.offset, ev.count, ev.data
        if rid is None:
            return self._send_push_fast(kind, off, n, data)
        if (
            self.side is not Side.SOURCE
            or type(rid) is not int
            or type(off) is not int
            or type(n) is not int
            or type(kind) is not PageKind
        ):
            return None
        out = self._out.get(rid)
        if out is None or off != out.next or not 0 < n <= MAX_PAGES_PER_FRAME:
            return None
        end = off + n * self.page_size
        if end > out.end:
            return None
        if kind is PageKind.DATA:
            if not _flat_bytes(data, end - off) or end - off > MAX_PAYLOAD:
                return None
            pl = data.nbytes
        elif data is not None or (kind is PageKind.CLEAN and not out.has_digests):
            return None
        else:
            pl = 0
        c1, c2, c3, c4 = _PAGES_C
        head = _PAGES_F.pack(MAGIC, _FAST_HEADER, pl, c1, rid, c2, kind, c3, off, c4, n)
        out.next = end
        if end == out.end:
            del self._out[rid]
            self._maybe_done()
        return [head] if data is None else [head, data]

    def _send_push_fast(
        self, kind: PageKind, off: int, n: int, data: memoryview | None
    ) -> list[bytes | memoryview] | None:
        ps = self.page_size
        if (
            self.side is not Side.SOURCE
            or self.channel is not Channel.BULK
            or type(off) is not int
            or type(n) is not int
            or type(kind) is not PageKind
            or kind not in _PUSH_KINDS
            or off < 0
            or off % ps
            or not 0 < n <= MAX_PAGES_PER_FRAME
            or off + n * ps > self.memory_size
        ):
            return None
        if kind is PageKind.DATA:
            if not _flat_bytes(data, n * ps) or n * ps > MAX_PAYLOAD:
                return None
            pl = data.nbytes
        elif data is not None:
            return None
        else:
            pl = 0
        c1, c2, c3 = _PUSH_C
        head = _PUSH_F.pack(MAGIC, _PUSH_HEADER, pl, c1, kind, c2, off, c3, n)
        return [head] if data is None else [head, data]

    def _send_request_fast(self, ev: Request) -> list[bytes | memoryview] | None:
        rid, off, n, urgent, dig = ev.id, ev.offset, ev.count, ev.urgent, ev.digests
        ps = self.page_size
        if (
            self.side is not Side.DESTINATION
            or type(rid) is not int
            or type(off) is not int
            or type(n) is not int
            or urgent is not (self.channel is Channel.URGENT)
            or not 0 <= rid < _U64_LIMIT
            or rid in self._out
            or off < 0
            or off % ps
            or not 0 < n <= MAX_PAGES_PER_FRAME
            or off + n * ps > self.memory_size
        ):
            return None
        if dig is None:
            pl = 0
        elif not _flat_bytes(dig, 8 * n):
            return None
        else:
            pl = dig.nbytes
        c1, c2, c3, c4 = _REQ_C
        head = _REQ_F.pack(
            MAGIC, _FAST_HEADER, pl, c1, rid, c2, off, c3, n, c4,
            _MSGPACK_TRUE if urgent else _MSGPACK_FALSE,
        )  # fmt: skip
        self._out[rid] = _Out(off, off + n * ps, dig is not None)
        return [head] if dig is None else [head, dig]

    def _accept_push_fast(self, header: bytes, payload: memoryview | None) -> Event | None:
        if self.side is not Side.DESTINATION or self.channel is not Channel.BULK:
            return None
        c1, k, c2, off, c3, n = _PUSH_T.unpack(header)
        ps = self.page_size
        if (
            (c1, c2, c3) != _PUSH_C
            or off % ps
            or not 0 < n <= MAX_PAGES_PER_FRAME
            or off + n * ps > self.memory_size
        ):
            return None
        if k == PageKind.DATA:
            if payload is None or payload.nbytes != n * ps:
                return None
        elif payload is not None or not (k == PageKind.ZERO or k == PageKind.POISONED):
            return None
        return Pages(None, _KINDS[k], off, n, payload)

    def _accept_fast(self, header: bytes, payload: memoryview | None) -> Event | None:
        t = header[3]
        if t == _T_PAGES and self.side is Side.DESTINATION:
            c1, rid, c2, k, c3, off, c4, n = _PAGES_T.unpack(header)
            if (c1, c2, c3, c4) != _PAGES_C:
                return None
            out = self._out.get(rid)
            if out is None or off != out.next or not 0 < n <= MAX_PAGES_PER_FRAME:
                return None
            end = off + n * self.page_size
            if end > out.end:
                return None
            if k == PageKind.DATA:
                if payload is None or payload.nbytes != end - off:
                    return None
            elif payload is not None or not (
                k == PageKind.ZERO
                or k == PageKind.POISONED
                or (k == PageKind.CLEAN and out.has_digests)
            ):
                return None
            ev = Pages(rid, _KINDS[k], off, n, payload)
            out.next = end
            if end == out.end:
                del self._out[rid]
                self._maybe_done()
            return ev
        if t == _T_REQUEST and self.side is Side.SOURCE:
            c1, rid, c2, off, c3, n, c4, u = _REQ_T.unpack(header)
            ps = self.page_size
            if (
                (c1, c2, c3, c4) != _REQ_C
                or u != (_MSGPACK_TRUE if self.channel is Channel.URGENT else _MSGPACK_FALSE)
                or rid in self._out
                or off % ps
                or not 0 < n <= MAX_PAGES_PER_FRAME
                or off + n * ps > self.memory_size
                or (payload is not None and payload.nbytes != 8 * n)
            ):
                return None
            self._out[rid] = _Out(off, off + n * ps, payload is not None)
            return Request(rid, off, n, u == _MSGPACK_TRUE, payload)
        return None

    @staticmethod
    def _payload_of(event: Event) -> memoryview | None:
        if isinstance(event, Pages) and event.data is not None:
            return _as_bytes_view("Pages", "data", event.data)
        if isinstance(event, Request) and event.digests is not None:
            return _as_bytes_view("Request", "digests", event.digests)
        if isinstance(event, Welcome) and event.poison_list is not None:
            return _as_bytes_view("Welcome", "poison_list", event.poison_list)
        return None

    # ------------------------------------------------------------------ receiving

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the transport; b"" means the peer closed (EOF).

        Splits the stream into frames as it arrives, so each payload is copied exactly once,
        from `data` into the buffer the event will hold; `data` is not kept. Framing errors
        (bad prefix, oversize) are raised by next_event after the frames before them."""
        if self._eof:
            if data:
                raise ProtocolError("data received after EOF")
            return
        if not data:
            self._eof = True
            return
        if self._frame_error is not None:
            return  # the stream cannot be resynchronised: drop the rest
        mv = data if isinstance(data, memoryview) else memoryview(data)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")  # slice lengths below are in bytes
        pos, n = 0, mv.nbytes
        frames = self._frames
        while pos < n:
            if self._pending is not None:
                # A payload is being filled: copy straight into its final buffer.
                # (Assigning through a memoryview is one memcpy; bytearray slice assignment
                # from a non-bytearray would copy the source to a temporary first.)
                header, pview = self._pending
                take = min(len(pview) - self._fill, n - pos)
                pview[self._fill : self._fill + take] = mv[pos : pos + take]
                self._fill += take
                pos += take
                if self._fill == len(pview):
                    frames.append((header, pview))
                    self._pending = None
                continue
            stash = self._stash
            if not stash and n - pos >= PREFIX_SIZE:
                # Common case: the prefix (and usually the whole frame) is in this chunk.
                magic, hl, pl = _PREFIX.unpack_from(mv, pos)
                if self._bad_prefix(magic, hl, pl):
                    return
                start = pos + PREFIX_SIZE + hl
                if start <= n:
                    header = bytes(mv[pos + PREFIX_SIZE : start])
                    end = start + pl
                    if pl == 0:
                        frames.append((header, None))
                    elif end <= n:
                        frames.append((header, bytearray(mv[start:end])))
                    else:
                        self._start_payload(header, pl)
                        end = start
                    pos = end
                    continue
            # Prefix or header split across chunks: gather them in the stash.
            if len(stash) < PREFIX_SIZE:
                take = min(PREFIX_SIZE - len(stash), n - pos)
                stash += mv[pos : pos + take]
                pos += take
                if len(stash) < PREFIX_SIZE:
                    return
                magic, hl, pl = _PREFIX.unpack_from(stash)
                if self._bad_prefix(magic, hl, pl):
                    return
            _, hl, pl = _PREFIX.unpack_from(stash)
            take = min(PREFIX_SIZE + hl - len(stash), n - pos)
            stash += mv[pos : pos + take]
            pos += take
            if len(stash) == PREFIX_SIZE + hl:
                header = bytes(stash[PREFIX_SIZE:])
                stash.clear()
                if pl == 0:
                    frames.append((header, None))
                else:
                    self._start_payload(header, pl)

    def _bad_prefix(self, magic: bytes, hl: int, pl: int) -> bool:
        """Record a framing error (raised by next_event in its turn); True if there is one."""
        if magic != MAGIC:
            msg = f"bad frame magic {bytes(magic)!r} (expected {MAGIC!r})"
        elif not 0 < hl <= MAX_HEADER:
            msg = f"frame header length {hl} outside 1..{MAX_HEADER}"
        elif pl > MAX_PAYLOAD:
            msg = f"frame announces a {pl}-byte payload > MAX_PAYLOAD {MAX_PAYLOAD}"
        else:
            return False
        self._frame_error = ProtocolError(msg)
        self._stash.clear()
        return True

    def _start_payload(self, header: bytes, pl: int) -> None:
        self._pending = (header, memoryview(bytearray(pl)))
        self._fill = 0

    def next_event(self) -> Event | _Sentinel:
        """The next complete event, NEED_DATA, or CLOSED (peer's EOF at a frame boundary)."""
        if self._failed is not None:
            raise self._failed
        try:
            if self._frames:
                header, payload = self._frames.popleft()
                if payload is not None and type(payload) is not memoryview:
                    payload = memoryview(payload)
                return self._accept(header, payload)
            if self._frame_error is not None:
                raise self._frame_error
            if not self._eof:
                return NEED_DATA
            if self._pending is not None:
                raise ProtocolError(
                    f"truncated frame at EOF: payload has {self._fill} of "
                    f"{len(self._pending[1])} bytes"
                )
            stash = self._stash
            if len(stash) >= PREFIX_SIZE:
                _, hl, _ = _PREFIX.unpack_from(stash)
                raise ProtocolError(
                    f"truncated frame at EOF: header has {len(stash) - PREFIX_SIZE} of {hl} bytes"
                )
            if stash:
                raise ProtocolError(
                    f"truncated frame at EOF: prefix has {len(stash)} of {PREFIX_SIZE} bytes"
                )
            if self._state is not State.CLOSED:
                self._state = State.CLOSED
                self._refresh()
            return CLOSED
        except ProtocolError as e:
            self._failed = e
            raise

    def _accept(self, header: bytes, payload: memoryview | None) -> Event:
        if self._fast_in:
            hl = len(header)
            if hl == _FAST_HEADER:
                fast = self._accept_fast(header, payload)
            elif hl == _PUSH_HEADER:
                fast = self._accept_push_fast(header, payload)
            else:
                fast = None
            if fast is not None:
                self.last_was_fast = True
                return fast
        self.last_was_fast = False
        event = _event_from_header(_decode_header(header), payload)
        self._validate(event, payload, ours=False)
        self._apply(event, ours=False)
        return event

    # ------------------------------------------------------------------ rules

    def _validate(self, ev: Event, payload: memoryview | None, ours: bool) -> None:
        """Check ev against the connection state; raise ProtocolError, never mutate."""
        sender = self.side if ours else _other(self.side)
        name = type(ev).__name__
        if ours and self._our_abort:
            raise ProtocolError(f"cannot send {name} after our fatal Error")
        if not ours and self._their_abort:
            raise ProtocolError(f"{name} from the peer after its fatal Error")
        # After its Done a side sends only a fatal Error, or (the source) replies with an id.
        if (self.our_done if ours else self.their_done) and not (
            (isinstance(ev, Error) and ev.id is None)
            or (sender is Side.SOURCE and isinstance(ev, Pages | Error) and ev.id is not None)
        ):
            raise ProtocolError(f"{name} sent by {sender.value} after its Done")

        if isinstance(ev, Hello):
            if sender is not Side.DESTINATION:
                raise ProtocolError("Hello sent by the source (only the destination sends it)")
            if self.hello is not None:
                raise ProtocolError("duplicate Hello")
            if ev.version != PROTOCOL_VERSION:
                raise ProtocolError(
                    f"protocol version mismatch: Hello has {ev.version}, "
                    f"this side speaks {PROTOCOL_VERSION}"
                )
            if ev.channel is not self.channel:
                raise ProtocolError(
                    f"Hello for the {ev.channel.name} channel on the {self.channel.name} channel"
                )
            if self.channel is Channel.URGENT and ev.session is not None:
                raise ProtocolError("Hello on the URGENT channel must have session None")
            if self.channel is Channel.BULK and ev.session is None:
                raise ProtocolError("Hello on the BULK channel must carry a session token")
            _page_size("Hello", "page_size", ev.page_size, allow_zero=True)
            return

        if isinstance(ev, Welcome):
            if sender is not Side.SOURCE:
                raise ProtocolError("Welcome sent by the destination (only the source sends it)")
            if self.hello is None:
                raise ProtocolError("Welcome before the Hello")
            if self.welcome is not None:
                raise ProtocolError("duplicate Welcome")
            if ev.version != PROTOCOL_VERSION:
                raise ProtocolError(
                    f"protocol version mismatch: Welcome has {ev.version}, "
                    f"this side speaks {PROTOCOL_VERSION}"
                )
            _page_size("Welcome", "page_size", ev.page_size, allow_zero=False)
            if self.hello.page_size and ev.page_size != self.hello.page_size:
                raise ProtocolError(
                    f"Welcome page_size {ev.page_size} differs from the "
                    f"{self.hello.page_size} the Hello asked for"
                )
            if ev.huge_page_size:
                _page_size("Welcome", "huge_page_size", ev.huge_page_size, allow_zero=False)
            if not ev.memory_size or ev.memory_size % ev.page_size:
                raise ProtocolError(
                    f"Welcome memory_size {ev.memory_size} is not a positive multiple of "
                    f"page_size {ev.page_size}"
                )
            if self.hello.session is not None and ev.session != self.hello.session:
                raise ProtocolError("Welcome on the BULK channel names another session")
            if ev.poisoned_count > ev.memory_size // ev.page_size:
                raise ProtocolError(
                    f"Welcome poisoned_count {ev.poisoned_count} exceeds the number of pages"
                )
            if ev.poison_list is not None:
                if not self.hello.want_poison_list:
                    raise ProtocolError("Welcome carries a poison list the Hello did not want")
                n = 0 if payload is None else payload.nbytes
                if n != 8 * ev.poisoned_count:
                    raise ProtocolError(
                        f"Welcome poison_list is {n} bytes, expected 8 * poisoned_count = "
                        f"{8 * ev.poisoned_count}"
                    )
                if payload is not None:
                    _check_poison_list(payload, ev.page_size, ev.memory_size)
            return

        if self.welcome is None:
            if isinstance(ev, Error) and ev.id is None and self.hello is not None:
                return  # the source refuses the Hello, or the destination gives up
            first = "Hello" if self.hello is None else "Welcome"
            raise ProtocolError(f"{name} before the handshake (expected {first})")

        if isinstance(ev, Pages):
            self._check_range(name, ev.offset, ev.count)
            if ev.kind is PageKind.DATA:
                n = 0 if payload is None else payload.nbytes
                want = ev.count * self.page_size
                if n != want:
                    raise ProtocolError(
                        f"DATA payload is {n} bytes, expected count * page_size = {want}"
                    )
            elif payload is not None and payload.nbytes:
                raise ProtocolError(f"{ev.kind.name} Pages must carry no payload")
            if sender is not Side.SOURCE:
                raise ProtocolError("Pages sent by the destination (only the source sends it)")
            if ev.id is None:
                if self.channel is not Channel.BULK:
                    raise ProtocolError("unsolicited Pages (id None) on the URGENT channel")
                if ev.kind is PageKind.CLEAN:
                    raise ProtocolError("unsolicited Pages cannot be CLEAN (nothing was asked)")
                return
            out = self._out.get(ev.id)
            if out is None:
                raise ProtocolError(f"Pages reply for unknown request id {ev.id}")
            start = ev.offset
            if start != out.next:
                what = "overlaps what was already answered" if start < out.next else "skips pages"
                raise ProtocolError(
                    f"Pages reply for id {ev.id} at offset {start} {what} "
                    f"(next expected offset {out.next})"
                )
            if start + ev.count * self.page_size > out.end:
                raise ProtocolError(f"Pages reply for id {ev.id} runs past the end of its request")
            if ev.kind is PageKind.CLEAN and not out.has_digests:
                raise ProtocolError(f"CLEAN reply for id {ev.id}, whose request had no digests")
            return

        if isinstance(ev, Request):
            if sender is not Side.DESTINATION:
                raise ProtocolError("Request sent by the source (only the destination sends it)")
            self._check_range(name, ev.offset, ev.count)
            if ev.urgent and self.channel is not Channel.URGENT:
                raise ProtocolError("urgent Request on the BULK channel")
            if not ev.urgent and self.channel is not Channel.BULK:
                raise ProtocolError("background (urgent=False) Request on the URGENT channel")
            if payload is not None and payload.nbytes != 8 * ev.count:
                raise ProtocolError(
                    f"Request digests are {payload.nbytes} bytes, expected 8 * count = "
                    f"{8 * ev.count}"
                )
            if ev.id in self._out:
                raise ProtocolError(f"duplicate request id {ev.id} (still outstanding)")
            return

        if isinstance(ev, Error):
            if ev.id is not None:
                if sender is not Side.SOURCE:
                    raise ProtocolError("Error with a request id sent by the destination")
                if ev.id not in self._out:
                    raise ProtocolError(f"Error for unknown request id {ev.id}")
            return

        if isinstance(ev, Done):
            if self.channel is not Channel.BULK:
                raise ProtocolError("Done on the URGENT channel")
            return

    def _check_range(self, name: str, offset: int, count: int) -> None:
        ps = self.page_size
        if offset % ps:
            raise ProtocolError(f"{name} offset {offset} is not aligned to page size {ps}")
        if not 1 <= count <= MAX_PAGES_PER_FRAME:
            raise ProtocolError(f"{name} count {count} outside 1..{MAX_PAGES_PER_FRAME}")
        if offset + count * ps > self.memory_size:
            raise ProtocolError(
                f"{name} range {offset}+{count}*{ps} runs past memory_size {self.memory_size}"
            )

    def _apply(self, ev: Event, ours: bool) -> None:
        """Record a validated event's effect on the connection state."""
        if isinstance(ev, Pages):
            if ev.id is not None:
                out = self._out[ev.id]
                out.next += ev.count * self.page_size
                if out.next == out.end:
                    del self._out[ev.id]
                    self._maybe_done()
            return
        if isinstance(ev, Request):
            start = ev.offset
            self._out[ev.id] = _Out(
                start, start + ev.count * self.page_size, ev.digests is not None
            )
            return
        elif isinstance(ev, Hello):
            self.hello = ev
        elif isinstance(ev, Welcome):
            self.welcome = ev
            self.session = ev.session
            self.page_size = ev.page_size
            self.memory_size = ev.memory_size
            self.huge_page_size = ev.huge_page_size
            self._state = State.OPEN
        elif isinstance(ev, Error):
            if ev.id is not None:
                del self._out[ev.id]
                self._maybe_done()
            else:
                if ours:
                    self._our_abort = True
                else:
                    self._their_abort = True
                self._state = State.ABORTED
        elif isinstance(ev, Done):
            if ours:
                self.our_done = True
            else:
                self.their_done = True
            self._maybe_done()
        self._refresh()

    def _maybe_done(self) -> None:
        if self.our_done and self.their_done and not self._out and self._state is State.OPEN:
            self._state = State.DONE
            self._refresh()

    def _refresh(self) -> None:
        is_open = self._state is State.OPEN
        self._fast_in = is_open and not self.their_done and not self._their_abort
        self._fast_out = is_open and not self.our_done and not self._our_abort

    def adopt_outstanding(self, requests: list[tuple[int, int, int]]) -> None:
        """Take over Requests that another sender on this channel sent (the destination's C
        demand engine, handing the URGENT channel back): ``(id, next offset expected, end
        offset)`` each, without digests. Replies to them are then checked as if this
        Connection had sent the Requests."""
        if self.side is not Side.DESTINATION or self._state is not State.OPEN:
            raise ProtocolError("only an open destination connection can adopt requests")
        ps = self.page_size
        for rid, nxt, end in requests:
            if rid in self._out:
                raise ProtocolError(f"adopted request id {rid} is already outstanding")
            if not (0 <= nxt < end <= self.memory_size and nxt % ps == 0 and end % ps == 0):
                raise ProtocolError(f"adopted request id {rid}: bad range {nxt}..{end}")
            self._out[rid] = _Out(nxt, end, False)


def _other(side: Side) -> Side:
    return Side.DESTINATION if side is Side.SOURCE else Side.SOURCE


# ---------------------------------------------------------------------- benchmark


def open_pair(
    channel: Channel = Channel.URGENT,
    memory_size: int = 1 << 30,
    page_size: int = BASE_PAGE_SIZE,
) -> tuple[Connection, Connection]:
    """A handshaken (source, destination) pair, for tests and benchmarks."""
    src, dst = Connection(Side.SOURCE, channel), Connection(Side.DESTINATION, channel)
    session = b"bench-session" if channel is Channel.BULK else None
    for data in dst.send(Hello(PROTOCOL_VERSION, channel, session)):
        src.receive_data(data)
    src.next_event()
    welcome = Welcome(PROTOCOL_VERSION, b"bench-session", page_size, memory_size, 0, 0, None)
    for data in src.send(welcome):
        dst.receive_data(data)
    dst.next_event()
    return src, dst


def bench_codec(n: int = 20000, pages: int = 64, chunk: int = 65536) -> dict[str, float]:
    """Codec cost without I/O, for `pages`-page DATA frames of 4 KiB pages.

    push: unsolicited DATA frames source→destination, each fed to the receiver as its header
    then `chunk`-byte slices of the payload (as a socket delivers it), next_event after each.
    demand: Request destination→source then a DATA reply, each side's full encode and decode.
    """
    size = pages * BASE_PAGE_SIZE
    data = memoryview(bytearray(size))
    src, dst = open_pair(Channel.BULK)
    t0 = time.perf_counter()
    for i in range(n):
        header, payload = src.send(Pages(None, PageKind.DATA, (i % 1024) * size, pages, data))
        dst.receive_data(header)
        dst.next_event()
        for j in range(0, size, chunk):
            dst.receive_data(payload[j : j + chunk])
            ev = dst.next_event()
        assert isinstance(ev, Pages) and ev.data is not None and ev.data.nbytes == size
    push = time.perf_counter() - t0

    src, dst = open_pair(Channel.URGENT)
    t0 = time.perf_counter()
    for i in range(n):
        for b in dst.send(Request(i, (i % 1024) * size, pages, True)):
            src.receive_data(b)
        req = src.next_event()
        assert isinstance(req, Request)
        for b in src.send(Pages(req.id, PageKind.DATA, req.offset, req.count, data)):
            dst.receive_data(b)
        ev = dst.next_event()
        assert isinstance(ev, Pages) and ev.data is not None
    demand = time.perf_counter() - t0
    return {
        "frames": n,
        "pages_per_frame": pages,
        "push_frames_per_s": n / push,
        "push_GB_per_s": n * size / push / 1e9,
        "demand_round_trips_per_s": n / demand,
        "demand_us_per_round_trip": demand / n * 1e6,
        "demand_GB_per_s": n * size / demand / 1e9,
    }


if __name__ == "__main__":  # pragma: no cover
    for k, v in bench_codec().items():
        print(f"{k:26s} {v:12.2f}")
