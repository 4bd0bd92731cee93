"""One frame ⇄ one event, with the wire-type checks of every field (docs/PROTOCOL.md).

Request and Pages have exactly one encoding, the fixed layouts of ``layout``; any other
encoding of them is a ``ProtocolError``. Hello, Welcome, Error and Done are msgpack maps in any
valid encoding. The same field checks run on send and on receive, so a bug of ours never
reaches the wire. Connection rules (who may send what, when) are ``connection``'s.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from uffdpoison.protocol import layout
from uffdpoison.protocol.events import (
    Channel,
    Done,
    Error,
    Event,
    Hello,
    PageKind,
    Pages,
    ProtocolError,
    Request,
    Welcome,
)

PREFIX = struct.Struct(">2sHI")
_REQ = struct.Struct(">2sHI" + layout.REQUEST.header_format)
_PAGES = struct.Struct(">2sHI" + layout.PAGES.header_format)
_REQ_H = struct.Struct(">" + layout.REQUEST.header_format)
_PAGES_H = struct.Struct(">" + layout.PAGES.header_format)
_REQ_RUNS = tuple(c for c, _ in layout.REQUEST.parts())
_PAGES_RUNS = tuple(c for c, _ in layout.PAGES.parts())
_KINDS = {k.value: k for k in PageKind}
_CHANNELS = {c.value: c for c in Channel}
_U64_LIMIT = 1 << 64
_NOT_TYPE = "field {!r} of {} must be {}, got {}"
_packer = msgpack.Packer(use_bin_type=True)


def prefix_problem(magic: bytes, hl: int, pl: int) -> str | None:
    """What is wrong with a frame prefix, or None."""
    if magic != layout.MAGIC:
        return f"bad frame magic {bytes(magic)!r} (expected {layout.MAGIC!r})"
    if not 0 < hl <= layout.MAX_HEADER:
        return f"frame header length {hl} outside 1..{layout.MAX_HEADER}"
    if pl > layout.MAX_PAYLOAD:
        return f"frame announces a {pl}-byte payload > MAX_PAYLOAD {layout.MAX_PAYLOAD}"
    return None


# ---------------------------------------------------------------- field checks


def _u64(frame: str, name: str, v: object) -> int:
    # bool is an int subclass in Python; on the wire it is another msgpack type.
    if not isinstance(v, int) or isinstance(v, bool):
        raise ProtocolError(_NOT_TYPE.format(name, frame, "an int", type(v).__name__))
    if not 0 <= v < _U64_LIMIT:
        raise ProtocolError(f"field {name!r} of {frame} out of u64 range: {v}")
    return v


def _bool(frame: str, name: str, v: object) -> bool:
    if not isinstance(v, bool):
        raise ProtocolError(_NOT_TYPE.format(name, frame, "a bool", type(v).__name__))
    return v


def _bytes(frame: str, name: str, v: object, hi: int, *, lo: int = 1) -> bytes:
    if not isinstance(v, bytes):
        raise ProtocolError(_NOT_TYPE.format(name, frame, "bytes", type(v).__name__))
    if not lo <= len(v) <= hi:
        raise ProtocolError(f"field {name!r} of {frame} must be {lo}..{hi} bytes, got {len(v)}")
    return v


def _str(frame: str, name: str, v: object, lo: int, hi: int) -> str:
    if not isinstance(v, str):
        raise ProtocolError(_NOT_TYPE.format(name, frame, "a str", type(v).__name__))
    if not lo <= len(v) <= hi:
        raise ProtocolError(f"field {name!r} of {frame} must be {lo}..{hi} chars, got {len(v)}")
    return v


def _enum(frame: str, name: str, v: object, table: dict[int, Any]) -> Any:
    found = table.get(v) if type(v) is int else None  # type: ignore[call-overload]
    if found is None:
        raise ProtocolError(f"{frame} frame has unknown {name} {v!r}")
    return found


def _check(ev: Event) -> None:
    """Send side: the wire-type checks the receiver applies to a decoded frame."""
    if isinstance(ev, Request):
        for name in ("id", "offset", "count"):
            _u64("Request", name, getattr(ev, name))
    elif isinstance(ev, Pages):
        for name in ("id", "offset", "count"):
            _u64("Pages", name, getattr(ev, name))
        if not isinstance(ev.kind, PageKind):
            raise ProtocolError(f"field 'kind' of Pages must be a PageKind, got {ev.kind!r}")
    elif isinstance(ev, Hello):
        _u64("Hello", "version", ev.version)
        if not isinstance(ev.channel, Channel):
            raise ProtocolError(f"field 'channel' of Hello must be a Channel, got {ev.channel!r}")
        if ev.session is not None:
            _bytes("Hello", "session", ev.session, layout.MAX_SESSION)
        _u64("Hello", "page_size", ev.page_size)
        _bool("Hello", "want_poison_list", ev.want_poison_list)
        if ev.auth is not None:
            _bytes("Hello", "auth", ev.auth, layout.MAX_AUTH, lo=0)
    elif isinstance(ev, Welcome):
        _bytes("Welcome", "session", ev.session, layout.MAX_SESSION)
        for name in ("version", "page_size", "memory_size", "huge_page_size", "poisoned_count"):
            _u64("Welcome", name, getattr(ev, name))
    elif isinstance(ev, Error):
        if ev.id is not None:
            _u64("Error", "id", ev.id)
        _str("Error", "code", ev.code, 1, layout.MAX_CODE)
        _str("Error", "message", ev.message, 0, layout.MAX_MESSAGE)
    elif not isinstance(ev, Done):
        raise ProtocolError(f"not a protocol event: {type(ev).__name__}")


# ---------------------------------------------------------------- encode


def payload_of(ev: Event) -> memoryview | None:
    """The event's payload as a flat byte view (no copy), or None."""
    if isinstance(ev, Pages):
        v: object = ev.data
    elif isinstance(ev, Request):
        v = ev.digests
    elif isinstance(ev, Welcome):
        v = ev.poison_list
    else:
        return None
    if v is None:
        return None
    try:
        mv = v if isinstance(v, memoryview) else memoryview(v)  # type: ignore[arg-type]
    except TypeError:
        raise ProtocolError(f"payload of {type(ev).__name__} must be a buffer") from None
    if not mv.c_contiguous:
        raise ProtocolError(f"payload of {type(ev).__name__} is not a contiguous buffer")
    return mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")


def encode(ev: Event, payload: memoryview | None) -> list[bytes | memoryview]:
    """Prefix + header bytes, then the payload (if any) as the caller's own view: write them
    in order, never joined (page data is not copied)."""
    _check(ev)
    pl = 0 if payload is None else payload.nbytes
    if pl > layout.MAX_PAYLOAD:  # the receiver would refuse the frame at its prefix
        raise ProtocolError(f"{type(ev).__name__} payload is {pl} bytes > MAX_PAYLOAD")
    if isinstance(ev, Request):
        r1, r2, r3 = _REQ_RUNS
        head = _REQ.pack(
            layout.MAGIC, layout.REQUEST.size, pl, r1, ev.id, r2, ev.offset, r3, ev.count
        )
    elif isinstance(ev, Pages):
        p1, p2, p3, p4 = _PAGES_RUNS
        head = _PAGES.pack(
            layout.MAGIC, layout.PAGES.size, pl, p1, ev.id, p2, ev.kind, p3, ev.offset, p4, ev.count
        )
    else:
        header = _packer.pack(_control_map(ev))
        if len(header) > layout.MAX_HEADER:
            raise ProtocolError(f"{type(ev).__name__} header is {len(header)} bytes > MAX_HEADER")
        head = PREFIX.pack(layout.MAGIC, len(header), pl) + header
    return [head] if not pl else [head, payload]  # type: ignore[list-item]


def _control_map(ev: Event) -> dict[str, object]:
    if isinstance(ev, Hello):
        h: dict[str, object] = {
            "t": layout.T_HELLO,
            "v": ev.version,
            "c": int(ev.channel),
            "s": ev.session,
            "p": ev.page_size,
            "w": ev.want_poison_list,
        }
        if ev.auth is not None:
            h["a"] = ev.auth
        return h
    if isinstance(ev, Welcome):
        return {
            "t": layout.T_WELCOME,
            "v": ev.version,
            "s": ev.session,
            "p": ev.page_size,
            "m": ev.memory_size,
            "h": ev.huge_page_size,
            "n": ev.poisoned_count,
            "l": ev.poison_list is not None,
        }
    if isinstance(ev, Error):
        return {"t": layout.T_ERROR, "i": ev.id, "c": ev.code, "m": ev.message}
    return {"t": layout.T_DONE}


# ---------------------------------------------------------------- decode


def decode(header: bytes, payload: memoryview | None) -> Event:
    """The event of one received frame; ``ProtocolError`` naming what is wrong."""
    hl = len(header)
    if hl == layout.REQUEST.size and header[3] == layout.T_REQUEST:
        r1, rid, r2, off, r3, n = _REQ_H.unpack(header)
        if (r1, r2, r3) == _REQ_RUNS:
            return Request(rid, off, n, payload)
    elif hl == layout.PAGES.size and header[3] == layout.T_PAGES:
        p1, rid, p2, k, p3, off, p4, n = _PAGES_H.unpack(header)
        if (p1, p2, p3, p4) == _PAGES_RUNS and k < 0x80:
            return Pages(rid, _enum("Pages", "kind", k, _KINDS), off, n, payload)
    h = _decode_map(header)
    if "t" not in h:
        raise ProtocolError("frame lacks its type (key 't')")
    t = h["t"]
    if type(t) is not int:
        raise ProtocolError(f"frame type must be an int, got {type(t).__name__}")
    if t in (layout.T_REQUEST, layout.T_PAGES):
        name = "Request" if t == layout.T_REQUEST else "Pages"
        raise ProtocolError(
            f"{name} frame is not in its fixed encoding (docs/PROTOCOL.md, 'Fixed layouts')"
        )
    if t == layout.T_HELLO:
        _no_payload("Hello", payload)
        session = _field(h, "s", "Hello")
        auth = h.get("a")
        return Hello(
            _u64("Hello", "version", _field(h, "v", "Hello")),
            _enum("Hello", "channel", _field(h, "c", "Hello"), _CHANNELS),
            None if session is None else _bytes("Hello", "session", session, layout.MAX_SESSION),
            _u64("Hello", "page_size", _field(h, "p", "Hello")),
            _bool("Hello", "want_poison_list", _field(h, "w", "Hello")),
            None if auth is None else _bytes("Hello", "auth", auth, layout.MAX_AUTH, lo=0),
        )
    if t == layout.T_WELCOME:
        has_list = _bool("Welcome", "has_poison_list", _field(h, "l", "Welcome"))
        if not has_list:
            _no_payload("Welcome without a poison list", payload)
        return Welcome(
            _u64("Welcome", "version", _field(h, "v", "Welcome")),
            _bytes("Welcome", "session", _field(h, "s", "Welcome"), layout.MAX_SESSION),
            _u64("Welcome", "page_size", _field(h, "p", "Welcome")),
            _u64("Welcome", "memory_size", _field(h, "m", "Welcome")),
            _u64("Welcome", "huge_page_size", _field(h, "h", "Welcome")),
            _u64("Welcome", "poisoned_count", _field(h, "n", "Welcome")),
            (payload if payload is not None else memoryview(b"")) if has_list else None,
        )
    if t == layout.T_ERROR:
        _no_payload("Error", payload)
        rid = _field(h, "i", "Error")
        return Error(
            None if rid is None else _u64("Error", "id", rid),
            _str("Error", "code", _field(h, "c", "Error"), 1, layout.MAX_CODE),
            _str("Error", "message", _field(h, "m", "Error"), 0, layout.MAX_MESSAGE),
        )
    if t == layout.T_DONE:
        _no_payload("Done", payload)
        return Done()
    raise ProtocolError(f"unknown frame type {t}")


def _decode_map(header: bytes) -> dict[str, object]:
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


def _field(h: dict[str, object], key: str, frame: str) -> object:
    try:
        return h[key]
    except KeyError:
        raise ProtocolError(f"{frame} frame lacks field {key!r}") from None


def _no_payload(frame: str, payload: memoryview | None) -> None:
    if payload is not None:
        raise ProtocolError(f"{frame} frame must carry no payload, got {len(payload)} bytes")
