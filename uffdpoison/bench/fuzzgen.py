"""Fuzz inputs: valid frame streams for one receiver, then mutated (``uffdpoison.bench.fuzz``).

A ``Case`` is what one receiver (a side, a channel) is fed: the byte stream, where it is cut
into chunks, whether EOF follows, and what the receiver itself did first (the destination's
requests, the handshake's poison list). Each case is a pure function of (target, seed,
index): ``make_case`` draws it from its own ``random.Random``, so any input can be made again
from its number.

Streams start valid: a handshake (protocol target only; the data planes get the stream after
it), then Requests, Pages of every kind, Error, Done, as that side and channel would receive
them. Then 0..4 mutations, structure-aware (a fixed-layout field set to a u64 boundary, a page
kind, the prefix's lengths, a control header re-encoded with a field of another msgpack type,
frames dropped, duplicated, swapped, inserted from the other side or channel) or on the bytes
(bit flips, interesting bytes, splices, truncation).
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import msgpack

from uffdpoison.protocol import codec, events, layout
from uffdpoison.protocol.events import (
    Challenge,
    Channel,
    Done,
    Error,
    Have,
    Hello,
    PageKind,
    Pages,
    Proof,
    Request,
    Welcome,
)

PS = layout.BASE_PAGE_SIZE
V = layout.PROTOCOL_VERSION
SESSION = b"fuzz-session"
TARGETS = ("protocol", "dest", "source")
SOURCE, DESTINATION = events.Side.SOURCE.value, events.Side.DESTINATION.value

# The protocol target's guest: MEM_PAGES pages, for both sides.
MEM_PAGES = 64
# The destination data plane's guest: memory_size DEST_MEM_PAGES pages; one region maps pages
# [REGION_FIRST, REGION_FIRST + REGION_PAGES) (the rest no region maps); POISON_MAX of them
# at most are in the handshake's poison list.
DEST_MEM_PAGES, REGION_FIRST, REGION_PAGES = 64, 8, 48
# The source data plane's guest: SRC_PAGES pages, some poisoned, some zero.
SRC_PAGES = 32
SRC_POISONED = (3, 17, 31)
SRC_ZERO = (5, 6, 7, 20)

_U64_EDGES = (
    0,
    1,
    2,
    7,
    (1 << 32) - 1,
    1 << 32,
    (1 << 63) - 1,
    1 << 63,
    (1 << 64) - 2,
    (1 << 64) - 1,
)
_U32_EDGES = (0, 1, 7, 8, 0x7FFF, 0xFFFF, 0x10000, (1 << 31) - 1, 1 << 31, (1 << 32) - 1)
_BYTES = (0x00, 0x01, 0x7F, 0x80, 0xFF, 0xC0, 0xC1, 0xC2, 0xC3, 0xCF, 0xD3, 0xA1, 0x85, 0xDE)
# msgpack values of every type, for a control header's field: the type confusions.
_CONFUSED: tuple[Any, ...] = (
    None,
    True,
    False,
    -1,
    0,
    1,
    2,
    1 << 63,
    (1 << 64) - 1,
    -(1 << 63),
    1.5,
    float("nan"),
    "",
    "x",
    "s" * 65,
    "m" * 1025,
    b"",
    b"x",
    b"s" * 65,
    b"a" * 1025,
    [],
    [1],
    {},
    {"t": 1},
    msgpack.ExtType(1, b"x"),
)
_CONTROL_KEYS = "tvcspwalmhnic"
_PREFIX = layout.PREFIX_SIZE
_REQ, _PAGES = layout.REQUEST, layout.PAGES
_REQ_SIZE, _PAGES_SIZE = _REQ.size, _PAGES.size
_KIND_AT = _PREFIX + _PAGES.offset("kind")
_U64_AT = {  # where each u64 of a fixed-layout frame is, from the frame's start
    fx.type: [_PREFIX + fx.offset(f.name) for f in fx.fields if f.kind == "u64"]
    for fx in (_REQ, _PAGES)
}
_REQ_HEAD = struct.Struct(">2sHI" + _REQ.header_format)
_PAGES_HEAD = struct.Struct(">2sHI" + _PAGES.header_format)
_REQ_RUNS = [c for c, _ in _REQ.parts()]
_PAGES_RUNS = [c for c, _ in _PAGES.parts()]


@dataclass
class Case:
    """One input: ``stream`` fed to a ``side`` on ``channel`` in chunks ending at ``cuts``."""

    target: str
    side: str  # the receiver: "source" or "destination"
    channel: int
    stream: bytes = b""
    cuts: list[int] = field(default_factory=list)  # chunk ends, ascending, the last = len
    eof: bool = True
    # destination receivers: what it asked before the stream (protocol target: (id, offset,
    # count, with digests) sent after the Welcome; dest target: (first page, count) of the
    # region, through the plane, ids 1..n in order)
    requests: list[tuple[int, int, int, bool]] = field(default_factory=list)
    want_poison_list: bool = True  # protocol target, destination: its Hello's
    poison: list[int] = field(default_factory=list)  # dest target: the handshake's list (pages)
    # dest target: MINOR mode, a shmem region whose page cache holds cached_page(p), its
    # requests carrying those pages' digests (CLEAN may answer them)
    minor: bool = False
    mutations: list[str] = field(default_factory=list)

    def chunks(self) -> list[bytes]:
        out, start = [], 0
        for end in self.cuts:
            out.append(self.stream[start:end])
            start = end
        return out

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["stream"] = self.stream.hex()
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Case:
        d = dict(d)
        d["stream"] = bytes.fromhex(d["stream"])
        d["requests"] = [tuple(r) for r in d["requests"]]
        return cls(**d)

    def dumps(self) -> str:
        return json.dumps(self.to_json())


# ---------------------------------------------------------------- frames


_FRAMES: dict[events.Event, bytes] = {}


def frame(ev: events.Event) -> bytes:
    """A valid frame, encoded as the protocol sends it (those without payload made once)."""
    f = _FRAMES.get(ev) if not isinstance(ev, (Welcome, Request, Pages)) else None
    if f is None:
        f = b"".join(bytes(p) for p in codec.encode(ev, codec.payload_of(ev)))
        if not isinstance(ev, (Welcome, Request, Pages)) and len(_FRAMES) < 4096:
            _FRAMES[ev] = f
    return f


def raw(header: Any, payload: bytes = b"") -> bytes:
    """A frame around any header (a msgpack object, or bytes as they are)."""
    h = header if isinstance(header, bytes) else msgpack.packb(header, use_bin_type=True)
    return codec.PREFIX.pack(layout.MAGIC, len(h) & 0xFFFF, len(payload)) + h + payload


def _pages_data(rng: random.Random, n: int, ps: int) -> bytes:
    return bytes([rng.randrange(1, 256)]) * (n * ps)


def _u64s(values: list[int]) -> memoryview:
    return memoryview(struct.pack(f"<{len(values)}Q", *values))


class _Gen:
    """The valid streams of one case, and its mutations."""

    def __init__(self, rng: random.Random, case: Case, digests: list[int]) -> None:
        self.rng = rng
        self.case = case
        self.digests = digests  # the source target's guest: each page's XXH64
        self.ps = PS

    # -- valid streams -------------------------------------------------------------------

    def runs(
        self, off: int, n: int, kinds: tuple[PageKind, ...]
    ) -> list[tuple[PageKind, int, int]]:
        """[off, off + n pages) split into runs of one kind each."""
        out: list[tuple[PageKind, int, int]] = []
        while n:
            k = self.rng.randint(1, n)
            out.append((self.rng.choice(kinds), off, k))
            off += k * self.ps
            n -= k
        return out

    def pages(self, rid: int, kind: PageKind, off: int, n: int) -> bytes:
        data = _pages_data(self.rng, n, self.ps) if kind is PageKind.DATA else b""
        p1, p2, p3, p4 = _PAGES_RUNS
        return (
            _PAGES_HEAD.pack(
                layout.MAGIC, _PAGES_SIZE, len(data), p1, rid, p2, kind, p3, off, p4, n
            )
            + data
        )

    def to_destination(self, mem_pages: int, handshake: bool) -> list[bytes]:
        """What a source sends: Welcome, then replies (URGENT) or the push (BULK)."""
        rng, case, ps = self.rng, self.case, self.ps
        out: list[bytes] = []
        if handshake:
            plist = None
            if case.want_poison_list and rng.random() < 0.7:
                pages = sorted(rng.sample(range(mem_pages), rng.randint(0, 4)))
                plist = _u64s([p * ps for p in pages])
            n = 0 if plist is None else len(plist) // 8
            out.append(frame(Welcome(V, SESSION, ps, mem_pages * ps, 0, n, plist)))
        if case.channel == Channel.URGENT:
            replies: list[list[bytes]] = []
            kinds = (PageKind.DATA, PageKind.ZERO, PageKind.POISONED)
            for rid, off, n, digests in self.requests():
                runs = self.runs(off, n, (*kinds, PageKind.CLEAN) if digests else kinds)
                frames = [self.pages(rid, k, o, c) for k, o, c in runs]
                if rng.random() < 0.15:  # answered in part, then refused
                    frames = frames[: rng.randrange(len(frames))]
                    frames.append(frame(Error(rid, "read-failed", "fuzz")))
                replies.append(frames)
            while any(replies):  # interleaved, each request's replies in order
                r = rng.choice([r for r in replies if r])
                out.append(r.pop(0))
        else:
            for _ in range(rng.randint(0, 4)):
                first = rng.randrange(mem_pages)
                n = rng.randint(1, min(8, mem_pages - first))
                kind = rng.choice((PageKind.DATA, PageKind.ZERO, PageKind.POISONED))
                out.append(self.pages(layout.PUSH_ID, kind, first * ps, n))
            if rng.random() < 0.6:
                out.append(frame(Done()))
        if rng.random() < 0.1:
            out.append(frame(Error(None, "shutdown", "fuzz")))
        return out

    def requests(self) -> list[tuple[int, int, int, bool]]:
        """The destination's own requests (case.requests), as (id, offset, count, digests)."""
        case = self.case
        if case.target == "dest":
            base = REGION_FIRST * self.ps
            return [
                (i, base + f * self.ps, n, d) for i, (f, n, _, d) in enumerate(case.requests, 1)
            ]
        return case.requests

    def plan_requests(self, mem_pages: int) -> None:
        """case.requests: disjoint ranges (dest target: of the region, none poisoned)."""
        rng, case = self.rng, self.case
        free = [p for p in range(REGION_PAGES) if p not in case.poison]
        if case.target == "protocol":
            free = list(range(mem_pages))
        taken: set[int] = set()
        ids = rng.sample((1, 2, 3, 4, 9, 1 << 32, (1 << 64) - 1), 4)
        for k in range(rng.randint(0, 4)):
            first = rng.choice(free)
            n = 1
            while n < 6 and first + n in free and first + n not in taken and rng.random() < 0.7:
                n += 1
            if any(p in taken for p in range(first, first + n)):
                continue
            taken.update(range(first, first + n))
            if case.target == "dest":
                case.requests.append((first, n, 0, case.minor))
            else:
                case.requests.append((ids[k], first * self.ps, n, rng.random() < 0.3))

    def to_source(self, mem_pages: int, handshake: bool) -> list[bytes]:
        """What a destination sends: Hello, then Requests (URGENT) or Done (BULK)."""
        rng, case, ps = self.rng, self.case, self.ps
        out: list[bytes] = []
        ch = Channel(case.channel)
        resume = ch is Channel.BULK and rng.random() < 0.3
        if handshake:
            session = SESSION if ch is Channel.BULK else None
            auth = rng.choice((None, None, rng.randbytes(32), b"short nonce"))
            epoch = (
                rng.choice((None, None, b"", rng.randbytes(16))) if ch is Channel.URGENT else None
            )
            hello = Hello(V, ch, session, rng.choice((0, 0, ps)), rng.random() < 0.5, auth, resume,
                          epoch)  # fmt: skip
            out.append(frame(hello))
            if auth is not None:  # the Proof that answers the source's Challenge
                out.append(frame(Proof(rng.randbytes(32))))
        if resume:  # a resuming destination's bitmaps: what not to push, what is poisoned
            for k in range(rng.randint(1, 3)):
                first = rng.randrange(mem_pages)
                n = rng.randint(1, mem_pages - first)
                bits = memoryview(rng.randbytes((n + 7) // 8))
                out.append(frame(Have(rng.random() < 0.5, first * ps, n, bits, k == 2)))
        if ch is Channel.URGENT:
            ids = rng.sample(range(1, 40), 6)
            for rid in ids[: rng.randint(0, 6)]:
                first = rng.randrange(mem_pages)
                n = rng.randint(1, min(8, mem_pages - first))
                digests = None
                if rng.random() < 0.3:  # MINOR mode: some match the source's pages
                    digests = _u64s(
                        [
                            self.digests[p]
                            if p < len(self.digests) and rng.random() < 0.6
                            else rng.getrandbits(64)
                            for p in range(first, first + n)
                        ]
                    )
                r1, r2, r3 = _REQ_RUNS
                pl = b"" if digests is None else bytes(digests)
                out.append(
                    _REQ_HEAD.pack(layout.MAGIC, _REQ_SIZE, len(pl), r1, rid, r2, first * ps, r3, n)
                    + pl
                )
        elif rng.random() < 0.6:
            out.append(frame(Done()))
        if rng.random() < 0.1:
            out.append(frame(Error(None, "internal", "fuzz")))
        return out

    # -- mutations -----------------------------------------------------------------------

    def dictionary(self) -> bytes:
        """A frame from anywhere: the other side's, the other channel's, the handshake's, a
        data frame in another encoding, a control frame with a confused field, garbage."""
        rng, ps = self.rng, self.ps
        pick = rng.randrange(9)
        if pick == 0:
            return frame(Hello(V, rng.choice(list(Channel)), rng.choice((None, SESSION)), 0, True))
        if pick == 1:
            return frame(Welcome(V, SESSION, ps, MEM_PAGES * ps, 0, 0, None))
        if pick == 2:
            return frame(Request(rng.choice((0, 1, 2, 5)), rng.randrange(8) * ps, 1))
        if pick == 3:
            kind = rng.choice(list(PageKind))
            return self.pages(rng.choice((0, 1, 2)), kind, rng.randrange(8) * ps, 1)
        if pick == 4:
            have = Have(False, 0, 8, memoryview(b"\xff"), True)
            auth = (Challenge(rng.randbytes(32), rng.randbytes(32)), Proof(rng.randbytes(32)))
            pick_from = (Done(), Error(None, "busy", ""), Error(1, "x", "y"), have, *auth)
            return frame(rng.choice(pick_from))
        if pick == 5:  # a data frame as a general msgpack map
            h = {"t": rng.choice((3, 4)), "i": 1, "k": 1, "o": 0, "n": 1}
            return raw(h, _pages_data(rng, 1, ps) if rng.random() < 0.5 else b"")
        if pick == 6:
            return self.confused()
        if pick == 7:
            return rng.randbytes(rng.randrange(1, 64))
        return raw(rng.randbytes(rng.randrange(1, 48)))  # a prefix around garbage

    def confused(self) -> bytes:
        """A control frame whose header has a field of another type, a key missing or added,
        or a key that is not a str."""
        rng = self.rng
        h: dict[Any, Any] = dict(rng.choice(_CONTROL_HEADERS))
        what = rng.randrange(4)
        if what == 0:
            h[rng.choice(list(h))] = rng.choice(_CONFUSED)
        elif what == 1 and len(h) > 1:
            del h[rng.choice([k for k in h if k != "t"] or ["t"])]
        elif what == 2:
            h[rng.choice(_CONTROL_KEYS) * rng.randint(1, 2)] = rng.choice(_CONFUSED)
        else:
            h[rng.choice((1, b"t", None, 2.5))] = 1
        try:
            header = msgpack.packb(h, use_bin_type=True, strict_types=False)
        except (TypeError, ValueError, OverflowError):  # pragma: no cover - every value packs
            header = b"\x80"
        payload = b"" if rng.random() < 0.8 else rng.randbytes(rng.choice((1, 8, 16)))
        return raw(header, payload)

    def mutate(self, frames: list[bytes]) -> bytes:
        rng = self.rng
        for _ in range(rng.choice((0, 1, 1, 1, 2, 2, 3, 4))):
            if frames and rng.random() < 0.7:
                op = rng.choice(_FRAME_OPS)
                op(self, frames)
            else:
                bop = rng.choice(_BYTE_OPS)
                stream = bop(self, b"".join(frames))
                frames = [stream] if stream else []
                op = bop  # type: ignore[assignment]
            self.case.mutations.append(op.__name__.lstrip("_"))
        return b"".join(frames)

    def cut(self, stream: bytes) -> list[int]:
        rng, n = self.rng, len(stream)
        if n == 0:
            return []
        r = rng.random()
        if r < 0.5:
            return [n]
        if r < 0.55 and n <= 512:  # a byte at a time
            return list(range(1, n + 1))
        cuts = sorted(set(rng.sample(range(1, n), min(n - 1, rng.randint(1, 8)))))
        return [*cuts, n]


_CONTROL_HEADERS: tuple[dict[str, Any], ...] = (
    {"t": 1, "v": 2, "c": 1, "s": None, "p": 0, "w": True},
    {"t": 1, "v": 2, "c": 2, "s": SESSION, "p": PS, "w": False, "a": b"x"},
    {"t": 2, "v": 2, "s": SESSION, "p": PS, "m": MEM_PAGES * PS, "h": 0, "n": 0, "l": False},
    {"t": 5, "i": None, "c": "bad-request", "m": "fuzz"},
    {"t": 5, "i": 1, "c": "read-failed", "m": ""},
    {"t": 6},
)


# Frame-level mutations: each changes `frames` in place.


def _fixed_field(g: _Gen, frames: list[bytes]) -> None:
    """A u64 of a fixed-layout frame set to a boundary value (or near the geometry's)."""
    k = g.rng.randrange(len(frames))
    f = frames[k]
    if len(f) < _PREFIX + _REQ_SIZE or f[_PREFIX + 3] not in _U64_AT:
        return
    pos = g.rng.choice(_U64_AT[f[_PREFIX + 3]])
    old = int.from_bytes(f[pos : pos + 8], "big")
    near = (old + 1, old - 1, old + g.ps, old ^ (1 << g.rng.randrange(64)), g.ps - 1)
    v = g.rng.choice((*_U64_EDGES, *near, MEM_PAGES * g.ps, layout.MAX_PAGES, layout.MAX_PAGES + 1))
    frames[k] = f[:pos] + (v % (1 << 64)).to_bytes(8, "big") + f[pos + 8 :]


def _kind(g: _Gen, frames: list[bytes]) -> None:
    k = g.rng.randrange(len(frames))
    if len(frames[k]) > _KIND_AT:
        v = g.rng.choice((0, 1, 2, 3, 4, 5, 6, 0x7F, 0x80, 0xFF))
        frames[k] = frames[k][:_KIND_AT] + bytes([v]) + frames[k][_KIND_AT + 1 :]


def _lengths(g: _Gen, frames: list[bytes]) -> None:
    """The prefix's header or payload length edited: off by one, zero, at or over a limit."""
    k = g.rng.randrange(len(frames))
    f = bytearray(frames[k])
    if len(f) < layout.PREFIX_SIZE:
        return
    magic, hl, pl = codec.PREFIX.unpack_from(f)
    if g.rng.random() < 0.5:
        hl = (
            g.rng.choice(
                (0, 1, hl - 1, hl + 1, layout.MAX_HEADER, layout.MAX_HEADER + 1, *_U32_EDGES[:6])
            )
            & 0xFFFF
        )
    else:
        big = g.rng.random() < 0.005  # announcing the most a frame may: rare, it is buffered
        pl = g.rng.choice(
            (layout.MAX_PAYLOAD,)
            if big
            else (0, 1, pl - 1, pl + 1, pl + 8, 2 * pl, layout.MAX_PAYLOAD + 1, *_U32_EDGES[5:])
        )
        pl &= 0xFFFFFFFF
    codec.PREFIX.pack_into(f, 0, magic, hl, pl)
    frames[k] = bytes(f)


def _truncate_frame(g: _Gen, frames: list[bytes]) -> None:
    k = g.rng.randrange(len(frames))
    frames[k] = frames[k][: g.rng.randrange(len(frames[k]) + 1)]


def _payload(g: _Gen, frames: list[bytes]) -> None:
    """A payload grown or shrunk, with the prefix told (or not)."""
    k = g.rng.randrange(len(frames))
    f = frames[k]
    if len(f) < layout.PREFIX_SIZE:
        return
    magic, hl, pl = codec.PREFIX.unpack_from(f)
    body = f[layout.PREFIX_SIZE + hl :]
    if g.rng.random() < 0.5:
        body += g.rng.randbytes(g.rng.choice((1, 7, 8, g.ps)))
    else:
        body = body[: g.rng.randrange(len(body) + 1)]
    if g.rng.random() < 0.7:
        pl = len(body)
    frames[k] = (
        codec.PREFIX.pack(magic, hl, pl) + f[layout.PREFIX_SIZE : layout.PREFIX_SIZE + hl] + body
    )


def _duplicate(g: _Gen, frames: list[bytes]) -> None:
    k = g.rng.randrange(len(frames))
    frames.insert(g.rng.randrange(len(frames) + 1), frames[k])


def _drop(g: _Gen, frames: list[bytes]) -> None:
    del frames[g.rng.randrange(len(frames))]


def _swap(g: _Gen, frames: list[bytes]) -> None:
    i, j = g.rng.randrange(len(frames)), g.rng.randrange(len(frames))
    frames[i], frames[j] = frames[j], frames[i]


def _insert(g: _Gen, frames: list[bytes]) -> None:
    frames.insert(g.rng.randrange(len(frames) + 1), g.dictionary())


def _confuse(g: _Gen, frames: list[bytes]) -> None:
    frames[g.rng.randrange(len(frames))] = g.confused()


_FRAME_OPS: tuple[Callable[[_Gen, list[bytes]], None], ...] = (
    _fixed_field,
    _fixed_field,
    _kind,
    _lengths,
    _lengths,
    _truncate_frame,
    _payload,
    _duplicate,
    _drop,
    _swap,
    _insert,
    _insert,
    _confuse,
)


# Byte-level mutations: the joined stream in, the new stream out.


def _flip(g: _Gen, s: bytes) -> bytes:
    if not s:
        return s
    b = bytearray(s)
    for _ in range(g.rng.choice((1, 1, 2, 4))):
        b[g.rng.randrange(len(b))] ^= 1 << g.rng.randrange(8)
    return bytes(b)


def _byte(g: _Gen, s: bytes) -> bytes:
    if not s:
        return s
    i = g.rng.randrange(len(s))
    return s[:i] + bytes([g.rng.choice(_BYTES)]) + s[i + 1 :]


def _splice(g: _Gen, s: bytes) -> bytes:
    """A range of the stream copied elsewhere in it (or over it)."""
    if not s:
        return s
    i = g.rng.randrange(len(s))
    piece = s[i : i + g.rng.randint(1, 64)]
    j = g.rng.randrange(len(s) + 1)
    if g.rng.random() < 0.5:
        return s[:j] + piece + s[j:]
    return s[:j] + piece + s[j + len(piece) :]


def _cut_bytes(g: _Gen, s: bytes) -> bytes:
    """A range deleted, or the stream truncated."""
    if not s:
        return s
    i = g.rng.randrange(len(s))
    if g.rng.random() < 0.5:
        return s[:i]
    return s[:i] + s[i + g.rng.randint(1, 16) :]


def _garbage(g: _Gen, s: bytes) -> bytes:
    i = g.rng.randrange(len(s) + 1)
    return s[:i] + g.rng.randbytes(g.rng.randint(1, 24)) + s[i:]


_BYTE_OPS: tuple[Callable[[_Gen, bytes], bytes], ...] = (
    _flip,
    _flip,
    _byte,
    _splice,
    _cut_bytes,
    _garbage,
)


# ---------------------------------------------------------------- cases


def source_image() -> bytes:
    """The source target's guest: page p holds p + 1 in every byte, but the zero pages."""
    return b"".join(bytes(PS) if p in SRC_ZERO else bytes([p + 1]) * PS for p in range(SRC_PAGES))


def case_rng(seed: int, target: str, index: int) -> random.Random:
    return random.Random((seed << 40) ^ (TARGETS.index(target) << 36) ^ index)


def cached_page(p: int, page_size: int) -> bytes:
    """What a MINOR-mode dest case's page cache holds for region page ``p``."""
    return bytes([(p * 7 + 1) & 0xFF]) * page_size


def make_case(target: str, seed: int, index: int, digests: list[int] | None = None) -> Case:
    """Input number ``index`` of ``target`` for ``seed``. ``digests``: the source target's
    guest pages' XXH64 (some Requests carry the right ones)."""
    rng = case_rng(seed, target, index)
    if target == "protocol":
        side = rng.choice((SOURCE, DESTINATION))
    else:
        side = DESTINATION if target == "dest" else SOURCE
    case = Case(target, side, int(rng.choice(list(Channel))))
    case.want_poison_list = rng.random() < 0.7
    g = _Gen(rng, case, digests or [])
    handshake = target == "protocol"
    if side == DESTINATION:
        mem = MEM_PAGES if handshake else DEST_MEM_PAGES
        if target == "dest":
            case.poison = sorted(rng.sample(range(REGION_PAGES), rng.randint(0, 3)))
            case.minor = rng.random() < 0.3
        if case.channel == Channel.URGENT:
            g.plan_requests(mem)
        frames = g.to_destination(mem, handshake)
    else:
        frames = g.to_source(MEM_PAGES if handshake else SRC_PAGES, handshake)
    case.stream = g.mutate(frames)
    case.cuts = g.cut(case.stream)
    case.eof = target != "protocol" or rng.random() < 0.7
    return case
