"""One frame ⇄ one event, with the wire-type checks of every field (docs/PROTOCOL.md).

Request and Pages have exactly one encoding, the fixed layouts of ``layout``; any other
encoding of them is a ``ProtocolError``. Hello, Welcome, Error and Done are msgpack maps in any
valid encoding, described once each by ``_FIELDS``: the decoder, the send-side type checks and
the encoder all read that table. Connection rules (who may send what, when) are
``connection``'s.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from uffdpoison.protocol import events, layout
from uffdpoison.protocol.events import ProtocolError

PREFIX = struct.Struct(">2sHI")
_REQ = struct.Struct(">2sHI" + layout.REQUEST.header_format)
_PAGES = struct.Struct(">2sHI" + layout.PAGES.header_format)
_REQ_H = struct.Struct(">" + layout.REQUEST.header_format)
_PAGES_H = struct.Struct(">" + layout.PAGES.header_format)
_REQ_SIZE, _PAGES_SIZE = layout.REQUEST.size, layout.PAGES.size  # computed once: decode is hot
_REQ_RUNS = tuple(c for c, _ in layout.REQUEST.parts())
_PAGES_RUNS = tuple(c for c, _ in layout.PAGES.parts())
_packer = msgpack.Packer(use_bin_type=True)

# A field: (key, attribute, kind, lo, hi). Kinds: u64; bool; bytes and str (lo..hi long);
# channel; a trailing "?" allows nil. Keys the table does not list are ignored on receive.
_Field = tuple[str, str, str, int, int]
_FIELDS: dict[type, tuple[int, tuple[_Field, ...]]] = {
    events.Hello: (layout.T_HELLO, (
        ("v", "version", "u64", 0, 0),
        ("c", "channel", "channel", 0, 0),
        ("s", "session", "bytes?", 1, layout.MAX_SESSION),
        ("p", "page_size", "u64", 0, 0),
        ("w", "want_poison_list", "bool", 0, 0),
        ("a", "auth", "bytes?", 0, layout.MAX_AUTH),  # optional key: absent is nil
        ("r", "resume", "bool", 0, 0),  # optional key: absent is false
        ("e", "epoch", "bytes?", 0, layout.EPOCH),  # optional key: absent is nil
    )),
    events.Welcome: (layout.T_WELCOME, (
        ("v", "version", "u64", 0, 0),
        ("s", "session", "bytes", 1, layout.MAX_SESSION),
        ("p", "page_size", "u64", 0, 0),
        ("m", "memory_size", "u64", 0, 0),
        ("h", "huge_page_size", "u64", 0, 0),
        ("n", "poisoned_count", "u64", 0, 0),
        ("l", "poison_list", "bool", 0, 0),  # whether the payload is the poison list
        ("e", "epoch", "bytes?", layout.EPOCH, layout.EPOCH),  # optional key: absent is nil
    )),
    events.Error: (layout.T_ERROR, (
        ("i", "id", "u64?", 0, 0),
        ("c", "code", "str", 1, layout.MAX_CODE),
        ("m", "message", "str", 0, layout.MAX_MESSAGE),
    )),
    events.Done: (layout.T_DONE, ()),
    events.Challenge: (layout.T_CHALLENGE, (
        ("n", "nonce", "bytes", layout.AUTH_NONCE, layout.AUTH_NONCE),
        ("m", "mac", "bytes", layout.AUTH_MAC, layout.AUTH_MAC),
    )),
    events.Proof: (layout.T_PROOF, (
        ("m", "mac", "bytes", layout.AUTH_MAC, layout.AUTH_MAC),
    )),
    events.Have: (layout.T_HAVE, (
        ("p", "poisoned", "bool", 0, 0),
        ("o", "offset", "u64", 0, 0),
        ("n", "count", "u64", 0, 0),
        ("f", "final", "bool", 0, 0),
    )),
}  # fmt: skip
# Keys a frame may leave out, and what their absence means (sent only when they say more).
_OPTIONAL: dict[str, object] = {"a": None, "r": False, "e": None}
_BY_TYPE = {t: (cls, fields) for cls, (t, fields) in _FIELDS.items()}
_PAYLOAD_ATTR = {events.Pages: "data", events.Request: "digests", events.Welcome: "poison_list",
                 events.Have: "bits"}  # fmt: skip


def prefix_problem(magic: bytes, hl: int, pl: int) -> str | None:
    """What is wrong with a frame prefix, or None."""
    if magic != layout.MAGIC:
        return f"bad frame magic {bytes(magic)!r} (expected {layout.MAGIC!r})"
    if not 0 < hl <= layout.MAX_HEADER:
        return f"frame header length {hl} outside 1..{layout.MAX_HEADER}"
    if pl > layout.MAX_PAYLOAD:
        return f"frame announces a {pl}-byte payload > MAX_PAYLOAD {layout.MAX_PAYLOAD}"
    return None


def _value(frame: str, field: _Field, v: object, *, sending: bool = False) -> Any:
    """``v`` checked against one field of the table (send and receive alike)."""
    _, name, kind, lo, hi = field
    if v is None and kind.endswith("?"):
        return None
    kind = kind.rstrip("?")
    if kind == "u64":
        # bool is an int subclass in Python; on the wire it is another msgpack type.
        if not isinstance(v, int) or isinstance(v, bool):
            raise ProtocolError(f"field {name!r} of {frame} must be an int, got {type(v).__name__}")
        if not 0 <= v < 1 << 64:
            raise ProtocolError(f"field {name!r} of {frame} out of u64 range: {v}")
    elif kind == "channel":
        if sending and not isinstance(v, events.Channel):
            raise ProtocolError(f"field 'channel' of {frame} must be a Channel, got {v!r}")
        if (
            not isinstance(v, int)
            or isinstance(v, bool)
            or v not in events.Channel._value2member_map_
        ):
            raise ProtocolError(f"{frame} frame has unknown channel {v!r}")
        return events.Channel(v)
    elif kind == "bool":
        if not isinstance(v, bool):
            raise ProtocolError(f"field {name!r} of {frame} must be a bool, got {type(v).__name__}")
    else:
        want = bytes if kind == "bytes" else str
        if not isinstance(v, want):
            what = "bytes" if want is bytes else "a str"
            raise ProtocolError(f"field {name!r} of {frame} must be {what}, got {type(v).__name__}")
        if not lo <= len(v) <= hi:
            unit = "bytes" if want is bytes else "chars"
            raise ProtocolError(
                f"field {name!r} of {frame} must be {lo}..{hi} {unit}, got {len(v)}"
            )
    return v


# ---------------------------------------------------------------- encode


def payload_of(ev: events.Event) -> memoryview | None:
    """The event's payload as a flat byte view (no copy), or None."""
    v: object = getattr(ev, _PAYLOAD_ATTR.get(type(ev), "_"), None)
    if v is None:
        return None
    try:
        mv = v if isinstance(v, memoryview) else memoryview(v)  # type: ignore[arg-type]
    except TypeError:
        raise ProtocolError(f"payload of {type(ev).__name__} must be a buffer") from None
    if not mv.c_contiguous:
        raise ProtocolError(f"payload of {type(ev).__name__} is not a contiguous buffer")
    return mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")


def encode(ev: events.Event, payload: memoryview | None) -> list[bytes | memoryview]:
    """Prefix + header bytes, then the payload (if any) as the caller's own view: write them
    in order, never joined (page data is not copied)."""
    pl = 0 if payload is None else payload.nbytes
    if pl > layout.MAX_PAYLOAD:  # the receiver would refuse the frame at its prefix
        raise ProtocolError(f"{type(ev).__name__} payload is {pl} bytes > MAX_PAYLOAD")
    if isinstance(ev, events.Request | events.Pages):
        name = type(ev).__name__
        for attr in ("id", "offset", "count"):
            _value(name, ("", attr, "u64", 0, 0), getattr(ev, attr), sending=True)
        if isinstance(ev, events.Request):
            r1, r2, r3 = _REQ_RUNS
            head = _REQ.pack(layout.MAGIC, _REQ_SIZE, pl, r1, ev.id, r2, ev.offset, r3,
                             ev.count)  # fmt: skip
        else:
            if not isinstance(ev.kind, events.PageKind):
                raise ProtocolError(f"field 'kind' of Pages must be a PageKind, got {ev.kind!r}")
            p1, p2, p3, p4 = _PAGES_RUNS
            head = _PAGES.pack(layout.MAGIC, _PAGES_SIZE, pl, p1, ev.id, p2, ev.kind, p3,
                               ev.offset, p4, ev.count)  # fmt: skip
        return [head] if not pl else [head, payload]  # type: ignore[list-item]
    if type(ev) not in _FIELDS:
        raise ProtocolError(f"not a protocol event: {type(ev).__name__}")
    t, fields = _FIELDS[type(ev)]
    h: dict[str, object] = {"t": t}
    for field in fields:
        key, attr = field[0], field[1]
        v = getattr(ev, attr)
        if isinstance(ev, events.Welcome) and key == "l":
            v = v is not None
        elif key in _OPTIONAL and v == _OPTIONAL[key] and type(v) is type(_OPTIONAL[key]):
            continue  # an optional key that would say nothing
        v = _value(type(ev).__name__, field, v, sending=True)
        h[key] = int(v) if isinstance(v, events.Channel) else v
    header = _packer.pack(h)
    if len(header) > layout.MAX_HEADER:
        raise ProtocolError(f"{type(ev).__name__} header is {len(header)} bytes > MAX_HEADER")
    head = PREFIX.pack(layout.MAGIC, len(header), pl) + header
    return [head] if not pl else [head, payload]  # type: ignore[list-item]


# ---------------------------------------------------------------- decode


def decode(header: bytes, payload: memoryview | None) -> events.Event:
    """The event of one received frame; ``ProtocolError`` naming what is wrong."""
    hl = len(header)
    if hl == _REQ_SIZE and header[3] == layout.T_REQUEST:
        r1, rid, r2, off, r3, n = _REQ_H.unpack(header)
        if (r1, r2, r3) == _REQ_RUNS:
            return events.Request(rid, off, n, payload)
    elif hl == _PAGES_SIZE and header[3] == layout.T_PAGES:
        p1, rid, p2, k, p3, off, p4, n = _PAGES_H.unpack(header)
        if (p1, p2, p3, p4) == _PAGES_RUNS and k < 0x80:
            if k not in events.PageKind._value2member_map_:
                raise ProtocolError(f"Pages frame has unknown kind {k!r}")
            return events.Pages(rid, events.PageKind(k), off, n, payload)
    h = _decode_map(header)
    if "t" not in h:
        raise ProtocolError("frame lacks its type (key 't')")
    t = h["t"]
    if type(t) is not int:
        raise ProtocolError(f"frame type must be an int, got {type(t).__name__}")
    if t in (layout.T_REQUEST, layout.T_PAGES):
        name = "Request" if t == layout.T_REQUEST else "Pages"
        raise ProtocolError(f"{name} frame is not in its fixed encoding (docs/PROTOCOL.md)")
    if t not in _BY_TYPE:
        raise ProtocolError(f"unknown frame type {t}")
    cls, fields = _BY_TYPE[t]
    frame = cls.__name__
    args: dict[str, Any] = {}
    for field in fields:
        key = field[0]
        if key not in h and key not in _OPTIONAL:
            raise ProtocolError(f"{frame} frame lacks field {key!r}")
        args[field[1]] = _value(frame, field, h.get(key, _OPTIONAL.get(key)))
    if cls is events.Welcome and args["poison_list"]:
        args["poison_list"] = payload if payload is not None else memoryview(b"")
    elif cls is events.Have:
        args["bits"] = payload
    elif payload is not None:
        what = "Welcome without a poison list" if cls is events.Welcome else frame
        raise ProtocolError(f"{what} frame must carry no payload, got {len(payload)} bytes")
    elif cls is events.Welcome:
        args["poison_list"] = None
    return cls(**args)


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
