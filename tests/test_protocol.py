"""Tests of the sans-IO wire protocol: round trips, every malformed frame, properties."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from uffdpoison import protocol as p

PS = 4096
MEM = 64 * PS
SESSION = b"s" * 16
URGENT, BULK = p.Channel.URGENT, p.Channel.BULK
# Control frame headers as msgpack maps, for frames built by hand.
HELLO = {"t": 1, "v": p.PROTOCOL_VERSION, "c": 1, "s": None, "p": 0, "w": True, "a": None}
WELCOME = {
    "t": 2,
    "v": p.PROTOCOL_VERSION,
    "s": SESSION,
    "p": PS,
    "m": MEM,
    "h": 0,
    "n": 0,
    "l": False,
}


# ---------------------------------------------------------------------------- helpers


def raw_frame(header: Any, payload: bytes = b"", magic: bytes = p.MAGIC) -> bytes:
    """A frame built by hand, bypassing every send-side check."""
    h = header if isinstance(header, bytes) else msgpack.packb(header, use_bin_type=True)
    return struct.pack(">2sHI", magic, len(h), len(payload)) + h + payload


def u64s(*offsets: int) -> memoryview:
    return memoryview(struct.pack(f"<{len(offsets)}Q", *offsets))


def wire(parts: list[bytes | memoryview]) -> bytes:
    return b"".join(bytes(part) for part in parts)


def drain(conn: p.Connection) -> list[p.Event]:
    out: list[p.Event] = []
    while True:
        ev = conn.next_event()
        if ev is p.NEED_DATA or ev is p.CLOSED:
            return out
        out.append(ev)  # type: ignore[arg-type]


def deliver(sender: p.Connection, receiver: p.Connection, event: p.Event) -> p.Event:
    receiver.receive_data(wire(sender.send(event)))
    got = receiver.next_event()
    assert receiver.next_event() is p.NEED_DATA
    return got  # type: ignore[return-value]


def handshake(
    channel: p.Channel = URGENT,
    page_size: int = PS,
    memory: int = MEM,
    poison: memoryview | None = None,
    want_list: bool = True,
) -> tuple[p.Connection, p.Connection]:
    src, dst = p.Connection(p.Side.SOURCE, channel), p.Connection(p.Side.DESTINATION, channel)
    hello = p.Hello(
        p.PROTOCOL_VERSION, channel, SESSION if channel is BULK else None, 0, want_list, None
    )
    assert deliver(dst, src, hello) == hello
    n = 0 if poison is None else len(poison) // 8
    welcome = p.Welcome(p.PROTOCOL_VERSION, SESSION, page_size, memory, 0, n, poison)
    assert deliver(src, dst, welcome) == welcome
    return src, dst


def snapshot(c: p.Connection) -> tuple[Any, ...]:
    return (
        c.state,
        c.outstanding,
        c.page_size,
        c.memory_size,
        c.session,
        c.hello,
        c.welcome,
        c.our_done,
        c.their_done,
        {k: (v.next, v.end) for k, v in c._out.items()},
    )


def assert_rejected(conn: p.Connection, data: bytes, *words: str, eof: bool = False) -> None:
    """Feeding data raises a ProtocolError naming the problem, with the state untouched."""
    before = snapshot(conn)
    conn.receive_data(data)
    if eof:
        conn.receive_data(b"")
    with pytest.raises(p.ProtocolError) as info:
        drain(conn)
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    assert snapshot(conn) == before
    # The failure is sticky: the connection never resynchronises on garbage.
    with pytest.raises(p.ProtocolError):
        conn.next_event()
    assert conn.failed is not None


def assert_send_rejected(conn: p.Connection, event: Any, *words: str) -> None:
    before = snapshot(conn)
    with pytest.raises(p.ProtocolError) as info:
        conn.send(event)
    for w in words:
        assert w in str(info.value), f"{w!r} not in {info.value!s}"
    assert snapshot(conn) == before


def pages_hdr(id: Any, kind: Any, off: Any, n: Any, **extra: Any) -> dict[str, Any]:
    """A Pages header as a msgpack map: not the fixed encoding, so never valid."""
    return {"t": 4, "i": id, "k": kind, "o": off, "n": n, **extra}


def pages_frame(rid: int, kind: int, off: int, n: int, payload: bytes = b"") -> bytes:
    """A Pages frame in its fixed encoding (layout.PAGES), bypassing send()'s checks."""
    p1, p2, p3, p4 = (c for c, _ in p.layout.PAGES.parts())
    head = p.codec._PAGES.pack(p.MAGIC, p.layout.PAGES.size, len(payload),
                               p1, rid, p2, kind, p3, off, p4, n)  # fmt: skip
    return head + payload


def body(ev: object) -> bytes:
    """An event's payload (Pages data, Request digests, Welcome poison list); b"" if none."""
    mv = p.codec.payload_of(ev)  # type: ignore[arg-type]
    return b"" if mv is None else bytes(mv)


def offsets(ev: object) -> list[int]:
    """A Welcome's poison list as offsets."""
    return list(memoryview(body(ev)).cast("Q"))


def req_frame(rid: int, off: int, n: int, payload: bytes = b"") -> bytes:
    """A Request frame in its fixed encoding (layout.REQUEST), bypassing send()'s checks."""
    r1, r2, r3 = (c for c, _ in p.layout.REQUEST.parts())
    head = p.codec._REQ.pack(p.MAGIC, p.layout.REQUEST.size, len(payload), r1, rid, r2, off, r3, n)
    return head + payload


# ---------------------------------------------------------------------------- round trips


def test_handshake_sets_state() -> None:
    src, dst = handshake(URGENT)
    for c in (src, dst):
        assert c.state is p.State.OPEN
        assert (c.page_size, c.memory_size, c.session) == (PS, MEM, SESSION)
        assert c.max_data_pages == p.MAX_PAYLOAD // PS


def test_round_trip_every_kind() -> None:
    src, dst = handshake(URGENT)
    data = memoryview(bytes(range(256)) * (2 * PS // 256))
    digests = u64s(1, 2, 3, 4, 5)
    req = p.Request(7, 0, 5, digests)
    got = deliver(dst, src, req)
    assert got == req and body(got) == bytes(digests)
    assert src.outstanding == dst.outstanding == 1
    replies = [
        p.Pages(7, p.PageKind.DATA, 0, 2, data),
        p.Pages(7, p.PageKind.ZERO, 2 * PS, 1),
        p.Pages(7, p.PageKind.POISONED, 3 * PS, 1),
        p.Pages(7, p.PageKind.CLEAN, 4 * PS, 1),
    ]
    for r in replies:
        assert deliver(src, dst, r) == r
    assert src.outstanding == dst.outstanding == 0
    req2 = p.Request(8, 8 * PS, 3)
    deliver(dst, src, req2)
    err = p.Error(8, "read-failed", "pread: EIO not poison")
    assert deliver(src, dst, err) == err
    assert src.outstanding == dst.outstanding == 0


def test_bulk_push_done_and_close() -> None:
    src, dst = handshake(BULK)
    push = p.Pages(p.PUSH_ID, p.PageKind.DATA, 4 * PS, 1, memoryview(b"x" * PS))
    assert deliver(src, dst, push) == push
    poisoned = p.Pages(p.PUSH_ID, p.PageKind.POISONED, 0, 1)
    assert deliver(src, dst, poisoned) == poisoned
    assert deliver(src, dst, p.Done()) == p.Done()
    assert src.our_done and dst.their_done and src.state is p.State.OPEN
    # After its Done the source pushes nothing more.
    assert_send_rejected(src, p.Pages(p.PUSH_ID, p.PageKind.ZERO, 0, 1), "after its Done")
    assert deliver(dst, src, p.Done()) == p.Done()
    assert src.state is p.State.DONE and dst.state is p.State.DONE
    assert_send_rejected(dst, p.Done(), "after its Done")
    src.receive_data(b"")
    assert src.next_event() is p.CLOSED
    assert src.state is p.State.CLOSED
    assert src.next_event() is p.CLOSED


def test_welcome_poison_list_round_trip() -> None:
    plist = u64s(0, 5 * PS, 63 * PS)
    _, dst = handshake(BULK, poison=plist)
    assert dst.welcome is not None and dst.welcome.poisoned_count == 3
    assert body(dst.welcome) == bytes(plist)
    # An empty list (nothing poisoned) is still a list, distinct from "not sent".
    _, dst = handshake(URGENT, poison=memoryview(b""))
    assert dst.welcome is not None and dst.welcome.poison_list is not None
    assert len(dst.welcome.poison_list) == 0


def test_hugetlb_page_size() -> None:
    huge = 2 << 20
    src, dst = p.Connection(p.Side.SOURCE, URGENT), p.Connection(p.Side.DESTINATION, URGENT)
    deliver(dst, src, p.Hello(p.PROTOCOL_VERSION, URGENT, None, page_size=huge))
    deliver(src, dst, p.Welcome(p.PROTOCOL_VERSION, SESSION, huge, 8 * huge, huge, 0, None))
    assert dst.page_size == huge and dst.max_data_pages == p.MAX_PAYLOAD // huge
    deliver(dst, src, p.Request(1, huge, 2))
    assert_send_rejected(dst, p.Request(2, PS, 1), "not aligned")
    assert_send_rejected(src, p.Pages(1, p.PageKind.DATA, huge, 1, memoryview(b"x" * PS)), "DATA")


def test_welcome_must_honour_requested_page_size() -> None:
    src, dst = p.Connection(p.Side.SOURCE, URGENT), p.Connection(p.Side.DESTINATION, URGENT)
    deliver(dst, src, p.Hello(p.PROTOCOL_VERSION, URGENT, None, page_size=2 << 20))
    bad = p.Welcome(p.PROTOCOL_VERSION, SESSION, PS, MEM, 0, 0, None)
    assert_send_rejected(src, bad, "page_size")
    frame = raw_frame(WELCOME)
    assert_rejected(dst, frame, "page_size")


def test_source_may_refuse_hello_with_error() -> None:
    src, dst = p.Connection(p.Side.SOURCE, BULK), p.Connection(p.Side.DESTINATION, BULK)
    deliver(dst, src, p.Hello(p.PROTOCOL_VERSION, BULK, b"nope"))
    err = p.Error(None, "unknown-session", "no session b'nope'")
    assert deliver(src, dst, err) == err
    assert src.state is p.State.ABORTED and dst.state is p.State.ABORTED
    assert_send_rejected(src, p.Welcome(p.PROTOCOL_VERSION, b"nope", PS, MEM, 0, 0, None), "fatal")
    assert_rejected(dst, raw_frame({"t": 6}), "after its fatal Error")


def test_send_keeps_payload_apart_and_uncopied() -> None:
    _, dst = handshake(URGENT)
    buf = bytearray(4 * PS)
    parts = dst.send(p.Request(1, 0, 4, memoryview(bytearray(32))))
    assert len(parts) == 2 and isinstance(parts[0], bytes) and len(parts[1]) == 32
    src2, dst2 = handshake(URGENT)
    deliver(dst2, src2, p.Request(1, 0, 4))
    parts = src2.send(p.Pages(1, p.PageKind.DATA, 0, 4, memoryview(buf)))
    assert len(parts) == 2
    assert isinstance(parts[1], memoryview) and parts[1].obj is buf  # no copy
    assert len(parts[0]) < 64


def test_received_payload_is_one_buffer() -> None:
    src, dst = handshake(URGENT)
    deliver(dst, src, p.Request(1, 0, 2))
    deliver(dst, src, p.Request(2, 2 * PS, 1))
    data = bytes(range(256)) * (2 * PS // 256)
    stream = wire(src.send(p.Pages(1, p.PageKind.DATA, 0, 2, memoryview(data))))
    stream += wire(src.send(p.Pages(2, p.PageKind.DATA, 2 * PS, 1, memoryview(data[:PS]))))
    # Both frames in one chunk, then each split in the middle of its payload.
    for chunks in ([stream], [stream[:100], stream[100:5000], stream[5000:]]):
        _, d = handshake(URGENT)
        d.send(p.Request(1, 0, 2))
        d.send(p.Request(2, 2 * PS, 1))
        for c in chunks:
            d.receive_data(c)
        got = drain(d)
        assert [body(e) for e in got] == [data, data[:PS]]
        assert all(isinstance(e.data, memoryview) for e in got)  # type: ignore[union-attr]
        assert d.outstanding == 0


def test_bytes_wanted_hint() -> None:
    src, dst = handshake(URGENT)
    deliver(dst, src, p.Request(1, 0, 1))
    frame = wire(src.send(p.Pages(1, p.PageKind.DATA, 0, 1, memoryview(b"a" * PS))))
    assert dst.bytes_wanted == p.PREFIX_SIZE
    dst.receive_data(frame[:3])
    assert dst.bytes_wanted == p.PREFIX_SIZE - 3
    dst.receive_data(frame[3:20])
    assert dst.bytes_wanted == len(frame) - 20
    assert dst.next_event() is p.NEED_DATA
    assert dst.bytes_wanted == len(frame) - 20
    dst.receive_data(frame[20:])
    assert isinstance(dst.next_event(), p.Pages)


def test_idle_at_frame_boundaries() -> None:
    """What a socket handed to a data plane relies on: nothing half-read is left behind."""
    src, dst = handshake(URGENT)
    assert src.idle
    frame = wire(dst.send(p.Request(1, 0, 1)))
    src.receive_data(frame[:10])
    assert not src.idle and src.next_event() is p.NEED_DATA
    src.receive_data(frame[10:])
    assert not src.idle  # a whole frame not yet returned
    assert isinstance(src.next_event(), p.Request) and src.idle
    src.receive_data(b"")
    assert not src.idle  # EOF is news for next_event


def test_unknown_map_keys_of_control_frames_are_ignored() -> None:
    _, dst = handshake(BULK)
    dst.receive_data(raw_frame({"t": 6, "future": "x", "z": [1, 2]}))
    assert drain(dst) == [p.Done()]


def test_delegated_connection_judges_control_frames_only() -> None:
    """After the handshake a data plane carries the data frames: the Connection refuses them
    and checks Error ids against nothing it could see."""
    src, dst = handshake(URGENT)
    src.delegate_data()
    dst.delegate_data()
    assert_send_rejected(dst, p.Request(1, 0, 1), "data plane")
    assert_send_rejected(src, p.Pages(1, p.PageKind.ZERO, 0, 1), "data plane")
    assert deliver(src, dst, p.Error(7, "read-failed", "x")) == p.Error(7, "read-failed", "x")
    assert_rejected(dst, req_frame(1, 0, 1), "data plane")
    with pytest.raises(p.ProtocolError, match="open"):
        p.Connection(p.Side.DESTINATION, URGENT).delegate_data()


def test_open_pair_helper() -> None:
    src, dst = p.open_pair(BULK)
    assert src.state is dst.state is p.State.OPEN


# ---------------------------------------------------------------------------- malformed frames


def test_eof_at_boundary_is_closed_mid_frame_is_error() -> None:
    src, dst = handshake(URGENT)
    deliver(dst, src, p.Request(1, 0, 1))
    frame = wire(src.send(p.Pages(1, p.PageKind.DATA, 0, 1, memoryview(b"z" * PS))))
    header_end = len(frame) - PS
    for cut, word in ((3, "prefix"), (p.PREFIX_SIZE + 2, "header"), (header_end + 10, "payload")):
        _, d = handshake(URGENT)
        d.send(p.Request(1, 0, 1))
        assert_rejected(d, frame[:cut], "truncated", word, eof=True)
        assert d.outstanding == 1


def test_truncated_payload_after_partial_fill() -> None:
    src, dst = handshake(URGENT)
    deliver(dst, src, p.Request(1, 0, 2))
    frame = wire(src.send(p.Pages(1, p.PageKind.DATA, 0, 2, memoryview(b"z" * 2 * PS))))
    dst.receive_data(frame[:100])
    assert dst.next_event() is p.NEED_DATA
    dst.receive_data(frame[100:5000])
    assert_rejected(dst, b"", "truncated", "payload", eof=True)
    assert dst.outstanding == 1


def test_data_after_eof() -> None:
    _, dst = handshake(URGENT)
    dst.receive_data(b"")
    with pytest.raises(p.ProtocolError, match="after EOF"):
        dst.receive_data(b"x")


def test_a_failed_connection_buffers_nothing_more() -> None:
    """Found by the fuzzer (uffdpoison.bench.fuzz, protocol target, seed 1, input 24): a frame
    that fails its check (here a Done before the Welcome) fails the connection, and what the
    peer streams after it was still split and queued, without bound. Now it is dropped."""
    dst = p.Connection(p.Side.DESTINATION, BULK)
    dst.send(p.Hello(p.PROTOCOL_VERSION, BULK, SESSION))
    dst.receive_data(bytes.fromhex("755000040000000081a17406"))  # {"t": 6}: Done, too early
    with pytest.raises(p.ProtocolError, match="before the handshake") as first:
        dst.next_event()
    push = pages_frame(0, 1, 0, 3, b"\xb3" * 3 * PS)
    for _ in range(100):
        dst.receive_data(push)
    assert dst.idle  # nothing buffered
    with pytest.raises(p.ProtocolError) as again:
        dst.next_event()
    assert again.value is first.value


def test_bad_magic() -> None:
    _, dst = handshake(URGENT)
    assert_rejected(dst, raw_frame({"t": 6}, magic=b"GE"), "magic")


def test_oversize_header() -> None:
    _, dst = handshake(URGENT)
    assert_rejected(dst, struct.pack(">2sHI", p.MAGIC, p.MAX_HEADER + 1, 0), "header length")
    _, dst = handshake(URGENT)
    assert_rejected(dst, struct.pack(">2sHI", p.MAGIC, 0, 0), "header length")


def test_oversize_payload_rejected_before_buffering() -> None:
    _, dst = handshake(URGENT)
    # Only the prefix arrived: the announced size alone condemns the frame.
    assert_rejected(dst, struct.pack(">2sHI", p.MAGIC, 10, p.MAX_PAYLOAD + 1), "MAX_PAYLOAD")


def test_header_not_msgpack() -> None:
    _, dst = handshake(URGENT)
    assert_rejected(dst, raw_frame(b"\xc1\xc1"), "not valid msgpack")
    _, dst = handshake(URGENT)
    assert_rejected(dst, raw_frame(msgpack.packb({"t": 6}) + b"\x00"), "not valid msgpack")
    _, dst = handshake(URGENT)
    assert_rejected(dst, raw_frame(b"\x81\xa1t"), "not valid msgpack")  # map cut short


def test_header_not_a_map() -> None:
    _, dst = handshake(URGENT)
    assert_rejected(dst, raw_frame([4, 1, 2]), "must be a msgpack map", "list")
    _, dst = handshake(URGENT)
    assert_rejected(dst, raw_frame(7), "must be a msgpack map", "int")


def test_header_map_with_non_str_keys() -> None:
    _, dst = handshake(URGENT)
    assert_rejected(dst, raw_frame({b"t": 6}), "keys must be str")
    _, dst = handshake(URGENT)
    assert_rejected(dst, raw_frame({1: 6}), "not valid msgpack")  # strict_map_key


def test_unknown_frame_type() -> None:
    _, dst = handshake(URGENT)
    assert_rejected(dst, raw_frame({"t": 99}), "unknown frame type 99")
    _, dst = handshake(URGENT)
    assert_rejected(dst, raw_frame({"t": "pages"}), "frame type must be an int")
    _, dst = handshake(URGENT)
    assert_rejected(dst, raw_frame({"x": 1}), "lacks its type")


def _dst_with_request(id: int = 1, off: int = 0, n: int = 2, digests: bool = False) -> p.Connection:
    src, dst = handshake(URGENT)
    d = u64s(*range(n)) if digests else None
    deliver(dst, src, p.Request(id, off, n, d))
    return dst


@pytest.mark.parametrize(
    "header",
    [
        pages_hdr(1, 2, 0, 1),  # the same map, minimally encoded
        pages_hdr(True, 2, 0, 1),
        pages_hdr(1, 2, 0.0, 1),
        {"t": 4, "i": 1, "k": 2, "o": 0},
        {"t": 3, "i": 1, "o": 0, "n": 1},
        {"t": 3, "i": 1, "o": 0, "n": 1, "u": True},  # version 1's Request
    ],
)
def test_data_frames_have_one_encoding(header: dict[str, Any]) -> None:
    """Request and Pages are the fixed layouts only: any other msgpack encoding of them is a
    protocol error naming it (protocol version 2)."""
    dst = _dst_with_request()
    assert_rejected(dst, raw_frame(header), "fixed encoding")
    assert dst.outstanding == 1


@pytest.mark.parametrize(
    ("header", "words"),
    [
        ({"t": 5, "i": 1, "c": b"busy", "m": "x"}, ("'code'", "str", "bytes")),
        ({"t": 5, "i": 1, "c": "busy", "m": None}, ("'message'", "str")),
        ({"t": 5, "i": 1, "c": "", "m": ""}, ("'code'", "1..")),
        ({"t": 5, "i": 1, "c": "x"}, ("lacks field 'm'",)),
        ({"t": 5, "i": True, "c": "x", "m": ""}, ("'id'", "bool")),
        ({"t": 5, "i": -1, "c": "x", "m": ""}, ("'id'", "u64")),
    ],
)
def test_wrong_field_types_and_missing_fields(header: dict[str, Any], words: tuple[str]) -> None:
    dst = _dst_with_request()
    assert_rejected(dst, raw_frame(header), *words)
    assert dst.outstanding == 1


def test_misaligned_zero_count_and_out_of_range() -> None:
    src, dst = handshake(URGENT)
    for req, word in (
        (p.Request(1, 100, 1), "not aligned"),
        (p.Request(1, 0, 0), "count 0"),
        (p.Request(1, 0, p.MAX_PAGES + 1), "count"),
        (p.Request(1, MEM - PS, 2), "past memory_size"),
        (p.Request(1, MEM, 1), "past memory_size"),
    ):
        assert_send_rejected(dst, req, word)
        assert_rejected(_fresh_src(), req_frame(req.id, req.offset, req.count), word)
    assert src.outstanding == dst.outstanding == 0


def _fresh_src(channel: p.Channel = URGENT) -> p.Connection:
    src, _ = handshake(channel)
    return src


def test_data_length_mismatch() -> None:
    dst = _dst_with_request(n=2)
    assert_rejected(dst, pages_frame(1, 1, 0, 2, b"x" * (2 * PS - 1)), "DATA payload")
    dst = _dst_with_request(n=2)
    assert_rejected(dst, pages_frame(1, 1, 0, 1), "DATA payload is 0 bytes")
    src, dst = handshake(URGENT)
    deliver(dst, src, p.Request(1, 0, 2))
    assert_send_rejected(src, p.Pages(1, p.PageKind.DATA, 0, 2, memoryview(b"x" * PS)), "DATA")
    assert_send_rejected(src, p.Pages(1, p.PageKind.DATA, 0, 2), "DATA payload is 0 bytes")


def test_payload_on_non_data_kinds() -> None:
    for kind in (p.PageKind.ZERO, p.PageKind.POISONED, p.PageKind.CLEAN):
        dst = _dst_with_request(digests=True)
        assert_rejected(dst, pages_frame(1, int(kind), 0, 1, b"x" * PS), "no payload")
    src, dst = handshake(URGENT)
    deliver(dst, src, p.Request(1, 0, 1))
    assert_send_rejected(src, p.Pages(1, p.PageKind.ZERO, 0, 1, memoryview(b"x")), "no payload")
    for header in ({"t": 6}, {"t": 5, "i": None, "c": "x", "m": ""}):
        _, d = handshake(BULK)
        assert_rejected(d, raw_frame(header, b"junk"), "no payload")


def test_digest_length_mismatch() -> None:
    src = _fresh_src()
    assert_rejected(src, req_frame(1, 0, 2, b"d" * 8), "digests", "8 * count")
    _, dst = handshake(URGENT)
    assert_send_rejected(dst, p.Request(1, 0, 2, memoryview(b"d" * 24)), "digests")
    assert_send_rejected(dst, p.Request(1, 0, 2, memoryview(b"")), "digests")


def test_clean_needs_digests() -> None:
    dst = _dst_with_request(digests=False)
    assert_rejected(dst, pages_frame(1, int(p.PageKind.CLEAN), 0, 1), "CLEAN", "digests")


def test_unknown_request_id() -> None:
    dst = _dst_with_request(id=1)
    assert_rejected(dst, pages_frame(2, 2, 0, 1), "unknown request id 2")
    dst = _dst_with_request(id=1)
    assert_rejected(dst, raw_frame({"t": 5, "i": 2, "c": "x", "m": "y"}), "unknown request id 2")
    src, _ = handshake(URGENT)
    assert_send_rejected(src, p.Pages(5, p.PageKind.ZERO, 0, 1), "unknown request id 5")


def test_overlapping_out_of_order_and_overlong_replies() -> None:
    src, dst = handshake(URGENT)
    deliver(dst, src, p.Request(1, 4 * PS, 4))
    deliver(src, dst, p.Pages(1, p.PageKind.ZERO, 4 * PS, 2))
    assert dst.outstanding == 1
    for frame, word in (
        (pages_frame(1, 2, 5 * PS, 1), "overlaps"),
        (pages_frame(1, 2, 4 * PS, 1), "overlaps"),
        (pages_frame(1, 2, 7 * PS, 1), "skips"),
        (pages_frame(1, 2, 6 * PS, 3), "past the end"),
    ):
        d2 = _clone_dst_state(dst)
        assert_rejected(d2, frame, word)
        assert d2.outstanding == 1 and d2._out[1].next == 6 * PS
    assert_send_rejected(src, p.Pages(1, p.PageKind.ZERO, 5 * PS, 1), "overlaps")
    assert_send_rejected(src, p.Pages(1, p.PageKind.ZERO, 6 * PS, 3), "past the end")


def _clone_dst_state(dst: p.Connection) -> p.Connection:
    """A fresh destination whose requests await the same bytes (a failed connection stays
    failed, so each malformed case needs its own)."""
    src, d = handshake(URGENT)
    for id, out in dst._out.items():
        deliver(d, src, p.Request(id, out.next, (out.end - out.next) // PS))
    return d


def test_duplicate_request_id() -> None:
    src, dst = handshake(URGENT)
    deliver(dst, src, p.Request(1, 0, 1))
    assert_send_rejected(dst, p.Request(1, PS, 1), "duplicate request id 1")
    assert_rejected(src, req_frame(1, PS, 1), "duplicate request id 1")
    assert src.outstanding == dst.outstanding == 1


def test_frames_before_handshake() -> None:
    src = p.Connection(p.Side.SOURCE, URGENT)
    assert_rejected(src, req_frame(1, 0, 1), "before the handshake", "Hello")
    dst = p.Connection(p.Side.DESTINATION, URGENT)
    assert_send_rejected(dst, p.Request(1, 0, 1), "before the handshake")
    src = p.Connection(p.Side.SOURCE, URGENT)
    assert_send_rejected(
        src, p.Welcome(p.PROTOCOL_VERSION, SESSION, PS, MEM, 0, 0, None), "before the Hello"
    )
    # Welcome arrives but the Hello was never sent.
    dst = p.Connection(p.Side.DESTINATION, URGENT)
    assert_rejected(dst, raw_frame(WELCOME), "Welcome before the Hello")
    # Destination got its Hello out, then receives Pages instead of a Welcome.
    src, dst = p.Connection(p.Side.SOURCE, URGENT), p.Connection(p.Side.DESTINATION, URGENT)
    deliver(dst, src, p.Hello(p.PROTOCOL_VERSION, URGENT, None))
    assert_rejected(dst, pages_frame(1, 2, 0, 1), "before the handshake", "Welcome")
    assert dst.state is p.State.HANDSHAKE


def test_duplicate_hello_and_welcome() -> None:
    src, dst = handshake(URGENT)
    assert_rejected(src, raw_frame(HELLO), "duplicate Hello")
    assert_send_rejected(dst, p.Hello(p.PROTOCOL_VERSION, URGENT, None), "duplicate Hello")
    assert_rejected(dst, raw_frame(WELCOME), "duplicate Welcome")


def test_hello_from_wrong_side_and_wrong_channel() -> None:
    dst = p.Connection(p.Side.DESTINATION, URGENT)
    hello = HELLO
    assert_rejected(dst, raw_frame(HELLO), "Hello sent by the source")
    src = p.Connection(p.Side.SOURCE, BULK)
    assert_rejected(src, raw_frame({**hello, "s": SESSION}), "URGENT channel on the BULK")
    src = p.Connection(p.Side.SOURCE, BULK)
    assert_rejected(src, raw_frame({**hello, "c": 2}), "must carry a session")
    src = p.Connection(p.Side.SOURCE, URGENT)
    assert_rejected(src, raw_frame({**hello, "s": SESSION}), "session None")
    src = p.Connection(p.Side.SOURCE, URGENT)
    assert_rejected(src, raw_frame({**hello, "c": 3}), "unknown channel")
    src = p.Connection(p.Side.SOURCE, URGENT)
    assert_rejected(src, raw_frame({**hello, "p": 5000}), "page_size", "power of two")
    src = p.Connection(p.Side.SOURCE, URGENT)
    assert_rejected(src, raw_frame({**hello, "w": 1}), "want_poison_list", "bool")
    src = p.Connection(p.Side.SOURCE, BULK)
    assert_rejected(src, raw_frame({**hello, "c": 2, "s": "tok"}), "'session'", "bytes", "str")
    src = p.Connection(p.Side.SOURCE, URGENT)
    assert_rejected(src, raw_frame({**hello, "a": "pw"}), "'auth'", "bytes", "str")
    src = p.Connection(p.Side.SOURCE, URGENT)
    assert_rejected(src, raw_frame({**hello, "v": 1.0}), "'version'", "float")
    assert src.hello is None


def test_version_mismatch() -> None:
    hello = {**HELLO, "v": p.PROTOCOL_VERSION + 1}
    src = p.Connection(p.Side.SOURCE, URGENT)
    assert_rejected(src, raw_frame(hello), "version mismatch")
    assert src.hello is None and src.state is p.State.HANDSHAKE
    dst = p.Connection(p.Side.DESTINATION, URGENT)
    assert_send_rejected(dst, p.Hello(p.PROTOCOL_VERSION + 1, URGENT, None), "version mismatch")
    src, dst = p.Connection(p.Side.SOURCE, URGENT), p.Connection(p.Side.DESTINATION, URGENT)
    deliver(dst, src, p.Hello(p.PROTOCOL_VERSION, URGENT, None))
    w = {**WELCOME, "v": 1}
    assert_rejected(dst, raw_frame(w), "version mismatch")
    assert dst.page_size == 0


def test_bad_welcome_fields() -> None:
    base = WELCOME
    cases: list[tuple[dict[str, Any], bytes | memoryview, str]] = [
        ({"m": MEM + 1}, b"", "multiple of"),
        ({"m": 0}, b"", "multiple of"),
        ({"p": 3 * PS}, b"", "power of two"),
        ({"s": ""}, b"", "'session'"),
        ({"s": None}, b"", "'session'"),
        ({"n": 65}, b"", "poisoned_count"),
        ({"n": 2, "l": True}, u64s(0), "8 * poisoned_count"),
        ({"n": 2, "l": True}, u64s(PS, 0), "above the previous"),
        ({"n": 1, "l": True}, u64s(100), "not aligned"),
        ({"n": 1, "l": True}, u64s(MEM), "past memory_size"),
        ({"n": 1, "l": False}, u64s(0), "no payload"),
        ({"h": 1000}, b"", "huge_page_size"),
    ]
    for changes, payload, word in cases:
        src, dst = p.Connection(p.Side.SOURCE, URGENT), p.Connection(p.Side.DESTINATION, URGENT)
        deliver(dst, src, p.Hello(p.PROTOCOL_VERSION, URGENT, None))
        assert_rejected(dst, raw_frame({**base, **changes}, bytes(payload)), word)
        assert dst.state is p.State.HANDSHAKE and dst.page_size == 0


def test_poison_list_not_wanted() -> None:
    src, dst = p.Connection(p.Side.SOURCE, URGENT), p.Connection(p.Side.DESTINATION, URGENT)
    deliver(dst, src, p.Hello(p.PROTOCOL_VERSION, URGENT, None, want_poison_list=False))
    w = p.Welcome(p.PROTOCOL_VERSION, SESSION, PS, MEM, 0, 1, u64s(0))
    assert_send_rejected(src, w, "did not want")


def test_bulk_session_must_match() -> None:
    src, dst = p.Connection(p.Side.SOURCE, BULK), p.Connection(p.Side.DESTINATION, BULK)
    deliver(dst, src, p.Hello(p.PROTOCOL_VERSION, BULK, SESSION))
    assert_send_rejected(
        src, p.Welcome(p.PROTOCOL_VERSION, b"other", PS, MEM, 0, 0, None), "another session"
    )


def test_channel_rules() -> None:
    # requests and replies only on URGENT
    src_b, dst_b = handshake(BULK)
    assert_send_rejected(dst_b, p.Request(1, 0, 1), "Request on the BULK")
    assert_rejected(src_b, req_frame(1, 0, 1), "Request on the BULK")
    src_b, dst_b = handshake(BULK)
    assert_rejected(dst_b, pages_frame(1, 2, 0, 1), "reply (id 1) on the BULK")
    # the push and Done only on BULK
    src_u, dst_u = handshake(URGENT)
    assert_send_rejected(src_u, p.Pages(p.PUSH_ID, p.PageKind.ZERO, 0, 1), "push", "URGENT")
    assert_rejected(dst_u, pages_frame(p.PUSH_ID, 2, 0, 1), "push", "URGENT")
    src_u, dst_u = handshake(URGENT)
    assert_send_rejected(src_u, p.Done(), "Done on the URGENT")
    assert_rejected(dst_u, raw_frame({"t": 6}), "Done on the URGENT")
    # a CLEAN push makes no sense (nothing was asked); request id 0 is the push's
    src_b, dst_b = handshake(BULK)
    assert_rejected(dst_b, pages_frame(p.PUSH_ID, 4, 0, 1), "cannot be CLEAN")
    src_u, dst_u = handshake(URGENT)
    assert_send_rejected(dst_u, p.Request(p.PUSH_ID, 0, 1), "reserved for the push")
    assert_rejected(src_u, req_frame(p.PUSH_ID, 0, 1), "reserved for the push")


def test_wrong_direction() -> None:
    src, dst = handshake(BULK)
    assert_send_rejected(src, p.Request(1, 0, 1), "sent by the source")
    assert_send_rejected(dst, p.Pages(p.PUSH_ID, p.PageKind.ZERO, 0, 1), "sent by the destination")
    assert_send_rejected(dst, p.Error(1, "x", ""), "sent by the destination")
    assert_rejected(src, pages_frame(p.PUSH_ID, 2, 0, 1), "sent by the destination")


def test_frames_after_done() -> None:
    src, dst = handshake(BULK)
    deliver(src, dst, p.Done())
    assert_rejected(dst, pages_frame(p.PUSH_ID, 2, 0, 1), "after its Done")
    src, dst = handshake(BULK)
    deliver(dst, src, p.Done())
    assert_rejected(src, raw_frame({"t": 6}), "after its Done")


def test_send_type_checks() -> None:
    src, dst = handshake(URGENT)
    assert_send_rejected(dst, p.Request(True, 0, 1), "'id'", "bool")  # type: ignore[arg-type]
    assert_send_rejected(dst, p.Request(1, 0, 1, 1), "buffer")  # type: ignore[arg-type]
    assert_send_rejected(dst, p.Request(1, 0.0, 1), "'offset'")  # type: ignore[arg-type]
    assert_send_rejected(dst, p.Request(1, 0, 1, "digests"), "buffer")  # type: ignore[arg-type]
    assert_send_rejected(dst, "Request", "not a protocol event")
    deliver(dst, src, p.Request(1, 0, 1))
    assert_send_rejected(src, p.Pages(1, 2, 0, 1), "PageKind")  # type: ignore[arg-type]
    assert_send_rejected(src, p.Error(1, "x", "m" * 5000), "'message'")
    assert_send_rejected(src, p.Error(1, "x" * 100, ""), "'code'")


# ---------------------------------------------------------------------------- properties


def _chunks(draw: Callable[..., Any], data: bytes) -> list[bytes]:
    out = []
    i = 0
    while i < len(data):
        n = draw(st.integers(1, max(1, min(len(data) - i, 3 * PS))))
        out.append(data[i : i + n])
        i += n
    return out


@st.composite
def scenarios(draw: Callable[..., Any]) -> tuple[p.Channel, int, list[tuple[p.Side, p.Event]]]:
    """A valid conversation on one channel, as (sender, event) in the order they are sent."""
    channel = draw(st.sampled_from([URGENT, BULK]))
    ps = draw(st.sampled_from([PS, 4 * PS]))
    npages = draw(st.integers(1, 40))
    mem = npages * ps
    plist = sorted(draw(st.sets(st.integers(0, npages - 1), max_size=5)))
    want = draw(st.booleans())
    poison = u64s(*(i * ps for i in plist)) if want and draw(st.booleans()) else None
    hello = p.Hello(
        p.PROTOCOL_VERSION,
        channel,
        SESSION if channel is BULK else None,
        draw(st.sampled_from([0, ps])),
        want,
    )
    welcome = p.Welcome(p.PROTOCOL_VERSION, SESSION, ps, mem, draw(st.sampled_from([0, ps])),
                      len(plist), poison)  # fmt: skip
    evs: list[tuple[p.Side, p.Event]] = [(p.Side.DESTINATION, hello), (p.Side.SOURCE, welcome)]
    out: dict[int, list[Any]] = {}  # id -> [next, end, has_digests]
    next_id = draw(st.integers(1, 2**64 - 100))
    src_done = dst_done = False
    for _ in range(draw(st.integers(0, 12))):
        choices = []
        if channel is URGENT:
            choices.append("request")
        if out:
            choices += ["reply", "reply", "error"]
        if channel is BULK and not src_done:
            choices += ["push", "src_done"]
        if channel is BULK and not dst_done:
            choices.append("dst_done")
        if not choices:
            break
        what = draw(st.sampled_from(choices))
        if what == "request":
            off = draw(st.integers(0, npages - 1))
            n = draw(st.integers(1, npages - off))
            dig = (
                memoryview(draw(st.binary(min_size=8 * n, max_size=8 * n)))
                if draw(st.booleans())
                else None
            )
            evs.append((p.Side.DESTINATION, p.Request(next_id, off * ps, n, dig)))
            out[next_id] = [off * ps, (off + n) * ps, dig is not None]
            next_id += 1
        elif what == "reply":
            rid = draw(st.sampled_from(sorted(out)))
            nxt, end, dig = out[rid]
            n = draw(st.integers(1, (end - nxt) // ps))
            kinds = [p.PageKind.DATA, p.PageKind.ZERO, p.PageKind.POISONED]
            kind = draw(st.sampled_from([*kinds, p.PageKind.CLEAN] if dig else kinds))
            data = (
                memoryview(draw(st.binary(min_size=n * ps, max_size=n * ps)))
                if kind is p.PageKind.DATA
                else None
            )
            evs.append((p.Side.SOURCE, p.Pages(rid, kind, nxt, n, data)))
            out[rid][0] += n * ps
            if out[rid][0] == end:
                del out[rid]
        elif what == "error":
            rid = draw(st.sampled_from(sorted(out)))
            evs.append((p.Side.SOURCE, p.Error(rid, draw(st.sampled_from(["busy", "x"])), "m")))
            del out[rid]
        elif what == "push":
            off = draw(st.integers(0, npages - 1))
            n = draw(st.integers(1, npages - off))
            kind = draw(st.sampled_from([p.PageKind.DATA, p.PageKind.ZERO, p.PageKind.POISONED]))
            data = memoryview(bytes([off % 256]) * (n * ps)) if kind is p.PageKind.DATA else None
            evs.append((p.Side.SOURCE, p.Pages(p.PUSH_ID, kind, off * ps, n, data)))
        elif what == "src_done":
            evs.append((p.Side.SOURCE, p.Done()))
            src_done = True
        else:
            evs.append((p.Side.DESTINATION, p.Done()))
            dst_done = True
    return channel, ps, evs


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.data())
def test_valid_conversations_survive_encode_decode(
    scenario: tuple[p.Channel, int, list[tuple[p.Side, p.Event]]], data: st.DataObject
) -> None:
    channel, _, evs = scenario
    src, dst = p.Connection(p.Side.SOURCE, channel), p.Connection(p.Side.DESTINATION, channel)
    to_src: list[p.Event] = []
    to_dst_stream = bytearray()
    to_dst: list[p.Event] = []
    for sender, ev in evs:
        if sender is p.Side.DESTINATION:
            # The source must see each request before it can reply: deliver now, in chunks.
            for chunk in _chunks(data.draw, wire(dst.send(ev))):
                src.receive_data(chunk)
            to_src += drain(src)
        elif isinstance(ev, p.Welcome):
            # The destination needs the Welcome (page size) before its first request.
            assert deliver(src, dst, ev) == ev
        else:
            to_dst_stream += wire(src.send(ev))
            to_dst.append(ev)
    assert to_src == [ev for s, ev in evs if s is p.Side.DESTINATION]
    # Byte by byte for small streams, otherwise random chunks; then EOF at a frame boundary.
    if len(to_dst_stream) < 2000 and data.draw(st.booleans()):
        pieces = [bytes(to_dst_stream[i : i + 1]) for i in range(len(to_dst_stream))]
    else:
        pieces = _chunks(data.draw, bytes(to_dst_stream))
    got: list[p.Event] = []
    for piece in pieces:
        dst.receive_data(bytes(piece))
        got += drain(dst)
    dst.receive_data(b"")
    assert dst.next_event() is p.CLOSED
    assert got == to_dst
    assert dst.outstanding == src.outstanding
    assert dst.our_done == src.their_done and dst.their_done == src.our_done


_keys = st.sampled_from([*"tikonusvcpwamhl", "x"])
_values = st.one_of(
    st.integers(-3, 10),
    st.integers(-(2**63), 2**64 - 1),
    st.sampled_from([0, PS, 2 * PS, MEM, MEM - PS]),
    st.booleans(),
    st.none(),
    st.binary(max_size=70),
    st.text(max_size=5),
    st.floats(allow_nan=False),
    st.lists(st.integers(-(2**63), 2**64 - 1), max_size=2),
)


@st.composite
def noise_frames(draw: Callable[..., Any]) -> bytes:
    """Frames whose headers are plausible maps of the right keys with arbitrary values."""
    h = draw(st.dictionaries(_keys, _values, max_size=8))
    if draw(st.booleans()):
        h["t"] = draw(st.integers(0, 7))
    payload = draw(st.sampled_from([b"", b"\0" * 8, b"\0" * PS, b"\0" * 16]))
    return raw_frame(h, payload)


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(list(p.Side)),
    st.sampled_from(list(p.Channel)),
    st.booleans(),
    st.lists(st.one_of(st.binary(max_size=64), noise_frames()), max_size=6),
    st.booleans(),
)
def test_arbitrary_bytes_decode_or_protocol_error(
    side: p.Side, channel: p.Channel, shake: bool, blobs: list[bytes], eof: bool
) -> None:
    if shake:
        src, dst = handshake(channel)
        if channel is URGENT:
            deliver(dst, src, p.Request(1, 0, 2, u64s(1, 2)))
        conn = src if side is p.Side.SOURCE else dst
    else:
        conn = p.Connection(side, channel)
    try:
        for b in blobs:
            conn.receive_data(b)
            drain(conn)
        if eof:
            conn.receive_data(b"")
            drain(conn)
    except p.ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([URGENT, BULK]), st.data())
def test_mutated_valid_stream_decodes_or_protocol_error(
    channel: p.Channel, data: st.DataObject
) -> None:
    src, dst = handshake(channel)
    if channel is URGENT:
        deliver(dst, src, p.Request(1, 0, 3, u64s(1, 2, 3)))
        events: tuple[p.Event, ...] = (
            p.Pages(1, p.PageKind.DATA, 0, 1, memoryview(b"d" * PS)),
            p.Pages(1, p.PageKind.CLEAN, PS, 1),
            p.Error(1, "read-failed", "x"),
        )
    else:
        events = (
            p.Pages(p.PUSH_ID, p.PageKind.DATA, 2 * PS, 1, memoryview(b"d" * PS)),
            p.Pages(p.PUSH_ID, p.PageKind.POISONED, 5 * PS, 2),
            p.Done(),
        )
    stream = bytearray()
    for ev in events:
        stream += wire(src.send(ev))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(stream) - 1))
        stream[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(stream)))
    try:
        dst.receive_data(bytes(stream[:cut]))
        drain(dst)
        dst.receive_data(b"")
        drain(dst)
    except p.ProtocolError:
        pass


# ---------------------------------------------------------------------------- fixed layouts


def test_fixed_layouts_are_plain_msgpack() -> None:
    """Any msgpack reader decodes the fixed layouts; the bytes are layout.py's table."""
    src, dst = handshake(URGENT)
    parts = dst.send(p.Request(5, 3 * PS, 2, u64s(9, 8)))
    head = bytes(parts[0])
    assert head == req_frame(5, 3 * PS, 2, bytes(16))[: len(head)]
    assert len(head) == p.PREFIX_SIZE + p.layout.REQUEST.size == p.PREFIX_SIZE + 37
    assert msgpack.unpackb(head[p.PREFIX_SIZE :]) == {"t": 3, "i": 5, "o": 3 * PS, "n": 2}
    src.receive_data(wire(parts))
    assert drain(src) == [p.Request(5, 3 * PS, 2, u64s(9, 8))]
    parts = src.send(p.Pages(5, p.PageKind.ZERO, 3 * PS, 1))
    head = bytes(parts[0])
    assert len(head) == p.PREFIX_SIZE + p.layout.PAGES.size == p.PREFIX_SIZE + 40
    assert msgpack.unpackb(head[p.PREFIX_SIZE :]) == {"t": 4, "i": 5, "k": 2, "o": 3 * PS, "n": 1}
    assert head[p.PREFIX_SIZE :] == bytes.fromhex("85a17404a169cf") + (5).to_bytes(8, "big") + (
        bytes.fromhex("a16b02a16fcf") + (3 * PS).to_bytes(8, "big") + bytes.fromhex("a16ecf")
    ) + (1).to_bytes(8, "big")


@pytest.mark.parametrize(
    ("frame", "words"),
    [
        (pages_frame(2, 2, 0, 1), ("unknown request id 2",)),
        (pages_frame(1, 2, PS, 1), ("skips",)),
        (pages_frame(1, 2, 0, 3), ("past the end",)),
        (pages_frame(1, 2, 0, 0), ("count 0",)),
        (pages_frame(1, 9, 0, 1), ("unknown kind",)),
        (pages_frame(1, 4, 0, 1), ("CLEAN", "digests")),
        (pages_frame(1, 1, 0, 1, b"x" * (PS - 1)), ("DATA payload",)),
        (pages_frame(1, 1, 0, 1), ("DATA payload is 0 bytes",)),
        (pages_frame(1, 2, 0, 1, b"x" * 8), ("no payload",)),
        (pages_frame(1, 2, 100, 1), ("not aligned",)),
        (pages_frame(1, 2, 2**64 - PS, 1), ("past memory_size",)),
        (pages_frame(1, 0xC3, 0, 1), ("fixed encoding",)),  # not a positive fixint
    ],
)
def test_malformed_reply_is_named(frame: bytes, words: tuple[str]) -> None:
    dst = _dst_with_request(id=1, off=0, n=2)
    assert_rejected(dst, frame, *words)
    assert dst.outstanding == 1 and dst._out[1].next == 0


@pytest.mark.parametrize(
    ("frame", "words"),
    [
        (req_frame(1, PS, 1), ("duplicate request id 1",)),
        (req_frame(2, PS, 2, b"d" * 8), ("digests", "8 * count")),
        (req_frame(2, PS + 1, 1), ("not aligned",)),
        (req_frame(2, MEM, 1), ("past memory_size",)),
        (req_frame(2, 0, 0), ("count 0",)),
        (req_frame(2, 0, p.MAX_PAGES + 1), ("count",)),
    ],
)
def test_malformed_request_is_named(frame: bytes, words: tuple[str]) -> None:
    src, dst = handshake(URGENT)
    deliver(dst, src, p.Request(1, 0, 1))
    assert_rejected(src, frame, *words)
    assert src.outstanding == 1


def test_receive_data_accepts_any_buffer_shape() -> None:
    src, dst = handshake(URGENT)
    deliver(dst, src, p.Request(1, 0, 2))
    frame = wire(src.send(p.Pages(1, p.PageKind.DATA, 0, 1, memoryview(b"q" * PS))))
    frame += wire(src.send(p.Pages(1, p.PageKind.ZERO, PS, 1)))
    # The stream's tail, spanning the payload's end, as a u64-formatted view: the receiver
    # must count it in bytes.
    k = len(frame) - PS // 2
    k -= (len(frame) - k) % 8
    dst.receive_data(frame[:k])
    assert dst.next_event() is p.NEED_DATA
    dst.receive_data(memoryview(frame[k:]).cast("Q"))
    assert drain(dst) == [
        p.Pages(1, p.PageKind.DATA, 0, 1, memoryview(b"q" * PS)),
        p.Pages(1, p.PageKind.ZERO, PS, 1),
    ]


def test_received_data_is_not_kept_by_reference() -> None:
    """A transport may reuse its receive buffer (recv_into) right after receive_data."""
    src, dst = handshake(URGENT)
    deliver(dst, src, p.Request(1, 0, 3))
    stream = wire(src.send(p.Pages(1, p.PageKind.DATA, 0, 1, memoryview(b"a" * PS))))
    stream += wire(src.send(p.Pages(1, p.PageKind.DATA, PS, 2, memoryview(b"b" * 2 * PS))))
    rx = bytearray(5000)
    for i in range(0, len(stream), len(rx)):
        piece = stream[i : i + len(rx)]
        rx[: len(piece)] = piece
        dst.receive_data(memoryview(rx)[: len(piece)])
        rx[:] = b"\xff" * len(rx)  # the transport scribbles over its buffer
    got = drain(dst)
    assert [body(e) for e in got] == [b"a" * PS, b"b" * 2 * PS]
    assert got[0].data.obj is not got[1].data.obj  # type: ignore[union-attr]


def test_frames_before_a_framing_error_are_delivered_first() -> None:
    src, dst = handshake(URGENT)
    deliver(dst, src, p.Request(1, 0, 2))
    good = wire(src.send(p.Pages(1, p.PageKind.ZERO, 0, 1)))
    dst.receive_data(good + b"GET / HTTP/1.1\r\n\r\n")
    assert dst.next_event() == p.Pages(1, p.PageKind.ZERO, 0, 1)
    assert dst.outstanding == 1
    with pytest.raises(p.ProtocolError, match="magic"):
        dst.next_event()
    assert dst.outstanding == 1
    dst.receive_data(wire(src.send(p.Pages(1, p.PageKind.ZERO, PS, 1))))  # dropped: stream is dead
    with pytest.raises(p.ProtocolError, match="magic"):
        dst.next_event()


# ---------------------------------------------------------------------------- the push


def test_push_round_trip() -> None:
    src, dst = handshake(BULK)
    data = memoryview(bytes(range(256)) * (2 * PS // 256))
    parts = src.send(p.Pages(p.PUSH_ID, p.PageKind.DATA, 3 * PS, 2, data))
    assert parts[1] is data  # the payload is not copied
    assert bytes(parts[0]) == pages_frame(p.PUSH_ID, 1, 3 * PS, 2, bytes(2 * PS))[:48]
    dst.receive_data(wire(parts))
    assert drain(dst) == [p.Pages(p.PUSH_ID, p.PageKind.DATA, 3 * PS, 2, data)]
    for kind in (p.PageKind.ZERO, p.PageKind.POISONED):
        parts = src.send(p.Pages(p.PUSH_ID, kind, MEM - PS, 1))
        assert len(parts) == 1 and len(parts[0]) == p.PREFIX_SIZE + 40
        dst.receive_data(wire(parts))
        assert drain(dst) == [p.Pages(p.PUSH_ID, kind, MEM - PS, 1)]
    assert dst.outstanding == 0 and src.outstanding == 0


def test_bad_pushes_are_refused_on_send() -> None:
    src, _ = handshake(BULK)
    assert_send_rejected(src, p.Pages(p.PUSH_ID, p.PageKind.CLEAN, 0, 1), "CLEAN")
    assert_send_rejected(src, p.Pages(p.PUSH_ID, p.PageKind.ZERO, 100, 1), "not aligned")
    assert_send_rejected(src, p.Pages(p.PUSH_ID, p.PageKind.ZERO, MEM, 1), "past memory_size")
    assert_send_rejected(src, p.Pages(p.PUSH_ID, p.PageKind.ZERO, 0, 0), "count 0")
    assert_send_rejected(
        src, p.Pages(p.PUSH_ID, p.PageKind.DATA, 0, 1, memoryview(b"x" * 10)), "DATA payload"
    )
    assert_send_rejected(
        src, p.Pages(p.PUSH_ID, p.PageKind.ZERO, 0, 1, memoryview(b"x")), "no payload"
    )


@pytest.mark.parametrize(
    ("frame", "words"),
    [
        (pages_frame(p.PUSH_ID, 4, 0, 1), ("CLEAN",)),
        (pages_frame(p.PUSH_ID, 9, 0, 1), ("unknown kind",)),
        (pages_frame(p.PUSH_ID, 2, 100, 1), ("not aligned",)),
        (pages_frame(p.PUSH_ID, 2, MEM, 1), ("past memory_size",)),
        (pages_frame(p.PUSH_ID, 2, 2**64 - PS, 1), ("past memory_size",)),
        (pages_frame(p.PUSH_ID, 2, 0, 0), ("count 0",)),
        (pages_frame(p.PUSH_ID, 2, 0, p.MAX_PAGES + 1), ("count",)),
        (pages_frame(p.PUSH_ID, 1, 0, 1, b"x" * (PS - 1)), ("DATA payload",)),
        (pages_frame(p.PUSH_ID, 1, 0, 1), ("DATA payload is 0 bytes",)),
        (pages_frame(p.PUSH_ID, 3, 0, 1, b"x" * 8), ("no payload",)),
    ],
)
def test_malformed_push_is_named(frame: bytes, words: tuple[str]) -> None:
    _, dst = handshake(BULK)
    assert_rejected(dst, frame, *words)


def test_a_payload_over_max_payload_is_refused_on_send() -> None:
    """The receiver refuses such a frame at its prefix: the sender must not write it."""
    src, dst = handshake(URGENT, page_size=2 << 20, memory=1 << 30)
    n = p.MAX_PAYLOAD // (2 << 20) + 1
    deliver(dst, src, p.Request(1, 0, n))
    before = snapshot(src)
    assert_send_rejected(
        src, p.Pages(1, p.PageKind.DATA, 0, n, memoryview(bytes(n << 21))), "MAX_PAYLOAD"
    )
    assert snapshot(src) == before
