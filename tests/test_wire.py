"""One table of the wire (uffdpoison/protocol/layout.py), and C and Python agreeing on it.

csrc/wire.h and the layout tables of docs/PROTOCOL.md are derived from the table; the C data
planes' encoders and their one frame check (csrc/frame.c) must say what the Python protocol
says, byte for byte and verdict for verdict.
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st
from test_protocol import pages_frame, req_frame, u64s

from uffdpoison.kernel._ffi import ffi, lib
from uffdpoison.protocol import (
    PUSH_ID,
    Channel,
    Connection,
    PageKind,
    Pages,
    ProtocolError,
    Request,
    Side,
    layout,
    open_pair,
)

ROOT = Path(__file__).resolve().parent.parent
PS = 4096
MEM = 64 * PS


def test_generated_header_is_the_table() -> None:
    assert (ROOT / "csrc" / "wire.h").read_text() == layout.c_header()


def test_protocol_document_carries_the_table() -> None:
    doc = (ROOT / "docs" / "PROTOCOL.md").read_text()
    start = doc.index("<!-- GENERATED from uffdpoison/protocol/layout.py -->\n")
    end = doc.index("<!-- END GENERATED -->")
    generated = doc[start:end].split("\n", 1)[1].strip()
    assert generated == layout.doc_tables().strip(), (
        "docs/PROTOCOL.md is stale: paste `python csrc/gen_wire.py --doc` between its "
        "GENERATED markers"
    )


def test_c_encoders_write_what_python_sends() -> None:
    rng = random.Random(5)
    src, dst = open_pair(Channel.URGENT, memory_size=1 << 40)
    out = ffi.new("uint8_t[]", 64)
    for _ in range(200):
        rid = rng.randrange(1, 2**64)
        off, n = rng.randrange(1 << 20) * PS, rng.randrange(1, 64)
        lib.up_frame_put_request(out, rid, off, n, 0)
        want = b"".join(bytes(b) for b in dst.send(Request(rid, off, n)))
        assert bytes(ffi.buffer(out, len(want))) == want
        src.receive_data(want)
        assert src.next_event() == Request(rid, off, n)
        kind = rng.choice([PageKind.ZERO, PageKind.POISONED])
        lib.up_frame_put_pages(out, rid, kind, off, n, 0)
        want = b"".join(bytes(b) for b in src.send(Pages(rid, kind, off, n)))
        assert bytes(ffi.buffer(out, len(want))) == want


def _c_verdict(frame: bytes, channel: Channel, page_size: int, memory: int) -> str | None:
    """What the C data plane makes of one whole frame: None (a valid data frame), "control"
    (not a fixed-layout data frame: for trio to judge), or its reason."""
    why = ffi.new("char[]", 160)
    hl, pl = ffi.new("uint32_t *"), ffi.new("uint32_t *")
    if lib.up_frame_prefix(frame, hl, pl, why):
        return ffi.string(why).decode()
    f = ffi.new("up_frame *")
    f.hl, f.pl = hl[0], pl[0]
    lib.up_frame_decode(frame[layout.PREFIX_SIZE :], f)
    if f.type == 0:
        return "control"
    if lib.up_frame_check(f, page_size, memory, int(channel), why):
        return ffi.string(why).decode()
    return None


def _py_verdict(frame: bytes, side: Side, channel: Channel) -> str | None:
    """The Python protocol's verdict on the same frame, received by ``side`` on a fresh
    handshaken ``channel`` (no request outstanding: requests and pushes need none)."""
    src, dst = open_pair(channel, memory_size=MEM, page_size=PS)
    conn = src if side is Side.SOURCE else dst
    conn.receive_data(frame)
    try:
        conn.next_event()
    except ProtocolError as e:
        return str(e)
    return None


@st.composite
def data_frames(draw: st.DrawFn) -> tuple[bytes, Side, Channel]:
    """Requests (to the source) and pushes (to the destination), valid or not."""
    off = draw(st.one_of(st.integers(0, 80) .map(lambda p: p * PS),
                         st.integers(0, 2**64 - 1)))  # fmt: skip
    n = draw(st.one_of(st.integers(0, 70), st.integers(0, 2**64 - 1)))
    channel = draw(st.sampled_from(list(Channel)))
    if draw(st.booleans()):
        rid = draw(st.sampled_from([1, 7, PUSH_ID]))
        payload = draw(st.sampled_from([b"", b"d" * 8, b"d" * 16, bytes(8 * min(n, 70))]))
        return req_frame(rid, off, n, payload), Side.SOURCE, channel
    kind = draw(st.integers(0, 6))
    size = draw(st.sampled_from([0, PS, 2 * PS, min(n, 70) * PS, 3]))
    return pages_frame(PUSH_ID, kind, off, n, b"x" * size), Side.DESTINATION, channel


@settings(max_examples=2000, deadline=None)
@given(data_frames())
def test_c_and_python_judge_data_frames_alike(case: tuple[bytes, Side, Channel]) -> None:
    frame, side, channel = case
    c = _c_verdict(frame, channel, PS, MEM)
    py = _py_verdict(frame, side, channel)
    if c == "control":  # not the fixed layout: Python must refuse it too (or judge it)
        assert py is not None
        return
    if side is Side.DESTINATION and c is None and frame[8 + 17] >= 0x80:  # pragma: no cover
        pytest.fail("a kind byte >= 0x80 is not a fixed layout")
    assert (c is None) == (py is None), (c, py)


@pytest.mark.parametrize(
    "frame",
    [
        b"GET / HTTP/1.1\r\n",
        struct.pack(">2sHI", b"uP", 0, 0),
        struct.pack(">2sHI", b"uP", layout.MAX_HEADER + 1, 0),
        struct.pack(">2sHI", b"uP", 10, layout.MAX_PAYLOAD + 1),
    ],
)
def test_c_and_python_refuse_the_same_prefixes(frame: bytes) -> None:
    assert _c_verdict(frame + bytes(8), Channel.URGENT, PS, MEM) not in (None, "control")
    assert _py_verdict(frame, Side.DESTINATION, Channel.URGENT) is not None


def test_a_request_with_digests_is_judged_alike() -> None:
    frame = req_frame(3, PS, 2, bytes(u64s(1, 2)))
    assert _c_verdict(frame, Channel.URGENT, PS, MEM) is None
    assert _py_verdict(frame, Side.SOURCE, Channel.URGENT) is None
    conn = Connection(Side.SOURCE, None)
    assert conn.channel is None
