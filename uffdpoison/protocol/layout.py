"""The wire's fixed facts, each defined once: limits, numbers, and the fixed-layout frames.

Everything else derives from this table: the Python codec builds its structs from it,
``csrc/wire.h`` is generated from it at build time (``csrc/gen_wire.py``), and the layout
tables of docs/PROTOCOL.md are generated from it (``python csrc/gen_wire.py --doc`` prints
them; tests/test_wire.py checks the document). Standard library only: the C build loads this
file by path, before the package (or msgpack) can be imported.
"""

from __future__ import annotations

from dataclasses import dataclass

# ---------------------------------------------------------------- protocol numbers and limits

PROTOCOL_VERSION = 3  # major: peers must agree exactly (docs/PROTOCOL.md "Versioning")
MAGIC = b"uP"
PREFIX_SIZE = 8  # magic, u16 header length, u32 payload length, big-endian
MAX_HEADER = 4096  # a frame's msgpack header
MAX_PAYLOAD = 64 << 20  # a frame's payload; refused from the prefix before buffering
BASE_PAGE_SIZE = 4096
MAX_PAGES = MAX_PAYLOAD // BASE_PAGE_SIZE  # `count` of one Request or Pages frame
MAX_SESSION = 64  # session token bytes
MAX_AUTH = 1024  # Hello `a` bytes
AUTH_NONCE = 32  # the nonce each side contributes to an authenticated handshake
AUTH_MAC = 32  # HMAC-SHA256
EPOCH = 16  # a precopy epoch token (MINOR mode: what a source vouches changes since)
MAX_CODE = 64  # Error `c` chars
MAX_MESSAGE = 1024  # Error `m` chars
PUSH_ID = 0  # Pages with this id are the source's unsolicited push (BULK); requests use 1..

# Frame types (`t`), page kinds (`k`), channels (Hello `c`).
T_HELLO, T_WELCOME, T_REQUEST, T_PAGES, T_ERROR, T_DONE, T_HAVE = 1, 2, 3, 4, 5, 6, 7
T_CHALLENGE, T_PROOF = 8, 9
KIND_DATA, KIND_ZERO, KIND_POISONED, KIND_CLEAN = 1, 2, 3, 4
CHANNEL_URGENT, CHANNEL_BULK = 1, 2

# ---------------------------------------------------------------- implementation limits
# Not part of the wire contract, but shared by both languages and both sides, so also here.

IOV_MAX = 1024  # buffers per sendmsg (Linux UIO_MAXIOV)
PLACE_SLICE = 64 << 10  # bytes one placement holds the ledger lock for (at least one page)
RECV_PIECE = 256 << 10  # bytes the destination reads from BULK per unit of work
PUSH_CHUNK = 1 << 20  # bytes the source reads for one push frame (at least one page)
DEMAND_PIECE = 8 << 20  # bytes the source reads at once for one demand request


# ---------------------------------------------------------------- fixed-layout frames


@dataclass(frozen=True)
class Field:
    key: str  # one-letter msgpack key
    name: str  # the event attribute
    kind: str  # "u64": 0xcf + 8 bytes big-endian; "u8": a positive fixint (one byte < 0x80)


@dataclass(frozen=True)
class Fixed:
    """A frame type with exactly one encoding: a msgpack map ``{"t": type, <fields>}`` in this
    key order, each key a one-letter fixstr, ``t`` and u8 values positive fixints, u64 values
    uint64 (0xcf). Any other encoding of these types is a protocol error."""

    name: str
    type: int
    fields: tuple[Field, ...]

    def parts(self) -> list[tuple[bytes, Field]]:
        """The header as (constant bytes, the value that follows them) pairs, in order."""
        out: list[tuple[bytes, Field]] = []
        const = bytes([0x80 | (len(self.fields) + 1), 0xA1, ord("t"), self.type])
        for f in self.fields:
            const += bytes([0xA1, ord(f.key)]) + (b"\xcf" if f.kind == "u64" else b"")
            out.append((const, f))
            const = b""
        return out

    @property
    def template(self) -> bytes:
        """The header with every value zero."""
        return b"".join(c + bytes(_width(f)) for c, f in self.parts())

    @property
    def constant(self) -> bytes:
        """Per header byte: 0xff where the byte is fixed, 0 where it holds a value."""
        return b"".join(b"\xff" * len(c) + bytes(_width(f)) for c, f in self.parts())

    @property
    def size(self) -> int:
        return len(self.template)

    def offset(self, name: str) -> int:
        """Byte offset of field ``name``'s value in the header."""
        pos = 0
        for c, f in self.parts():
            pos += len(c)
            if f.name == name:
                return pos
            pos += _width(f)
        raise KeyError(name)

    @property
    def header_format(self) -> str:
        """The header as a ``struct`` format (after ``>``): constant runs ``Ns``, values Q / B."""
        return "".join(f"{len(c)}s" + ("Q" if f.kind == "u64" else "B") for c, f in self.parts())


def _width(f: Field) -> int:
    return 8 if f.kind == "u64" else 1


REQUEST = Fixed(
    "REQUEST",
    T_REQUEST,
    (Field("i", "id", "u64"), Field("o", "offset", "u64"), Field("n", "count", "u64")),
)
PAGES = Fixed(
    "PAGES",
    T_PAGES,
    (
        Field("i", "id", "u64"),
        Field("k", "kind", "u8"),
        Field("o", "offset", "u64"),
        Field("n", "count", "u64"),
    ),
)
FIXED = (REQUEST, PAGES)

LIMITS = {
    "VERSION": PROTOCOL_VERSION,
    "PREFIX_SIZE": PREFIX_SIZE,
    "MAX_HEADER": MAX_HEADER,
    "MAX_PAYLOAD": MAX_PAYLOAD,
    "BASE_PAGE_SIZE": BASE_PAGE_SIZE,
    "MAX_PAGES": MAX_PAGES,
    "MAX_SESSION": MAX_SESSION,
    "PUSH_ID": PUSH_ID,
    "T_REQUEST": T_REQUEST,
    "T_PAGES": T_PAGES,
    "KIND_DATA": KIND_DATA,
    "KIND_ZERO": KIND_ZERO,
    "KIND_POISONED": KIND_POISONED,
    "KIND_CLEAN": KIND_CLEAN,
    "CHANNEL_URGENT": CHANNEL_URGENT,
    "CHANNEL_BULK": CHANNEL_BULK,
    "IOV_MAX": IOV_MAX,
    "PLACE_SLICE": PLACE_SLICE,
    "RECV_PIECE": RECV_PIECE,
    "PUSH_CHUNK": PUSH_CHUNK,
    "DEMAND_PIECE": DEMAND_PIECE,
}


# ---------------------------------------------------------------- derived texts


def c_header() -> str:
    """The text of csrc/wire.h."""
    lines = [
        "/* GENERATED by csrc/gen_wire.py from uffdpoison/protocol/layout.py: do not edit. */",
        "#ifndef UP_WIRE_H",
        "#define UP_WIRE_H",
        "#include <stdint.h>",
        "",
        f"#define UP_WIRE_MAGIC0 0x{MAGIC[0]:02x}",
        f"#define UP_WIRE_MAGIC1 0x{MAGIC[1]:02x}",
    ]
    lines += [f"#define UP_WIRE_{k} {v}" for k, v in LIMITS.items()]
    for fx in FIXED:
        n = fx.name
        lines += ["", f"/* {fx.name.title()}: {doc_encoding(fx)} */"]
        lines.append(f"#define UP_WIRE_{n}_HEADER {fx.size}")
        lines += [f"#define UP_WIRE_{n}_{f.name.upper()} {fx.offset(f.name)}" for f in fx.fields]
        lines.append(
            f"static const uint8_t UP_WIRE_{n}_TEMPLATE[{fx.size}] = {{"
            + ", ".join(f"0x{b:02x}" for b in fx.template)
            + "};"
        )
        lines.append(
            f"static const uint8_t UP_WIRE_{n}_CONSTANT[{fx.size}] = {{"
            + ", ".join(f"0x{b:02x}" for b in fx.constant)
            + "};"
        )
    lines += ["", "#endif", ""]
    return "\n".join(lines)


def doc_encoding(fx: Fixed) -> str:
    fields = ", ".join(f'"{f.key}":{f.name}' for f in fx.fields)
    return f'{{"t":{fx.type}, {fields}}}, {fx.size} bytes'


def doc_tables() -> str:
    """The generated part of docs/PROTOCOL.md (between its GENERATED markers)."""
    out = ["| limit | value |", "|---|---|"]
    for k in ("MAX_HEADER", "MAX_PAYLOAD", "MAX_PAGES", "MAX_SESSION", "PUSH_ID"):
        out.append(f"| `{k}` | {LIMITS[k]} |")
    out += [f"| `MAX_AUTH` | {MAX_AUTH} |", f"| `MAX_CODE` | {MAX_CODE} |"]
    out += [f"| `MAX_MESSAGE` | {MAX_MESSAGE} |"]
    for fx in FIXED:
        out += ["", f"{fx.name.title()} header ({doc_encoding(fx)}):", ""]
        out += ["| bytes | content |", "|---|---|"]
        pos = 0
        for const, f in fx.parts():
            out.append(f"| {pos}..{pos + len(const) - 1} | `{const.hex(' ')}` |")
            pos += len(const)
            what = "u64 big-endian" if f.kind == "u64" else "one byte, a positive fixint"
            out.append(f"| {pos}..{pos + _width(f) - 1} | `{f.name}`: {what} |")
            pos += _width(f)
    out += ["", "Implementation limits (both languages, both sides):", ""]
    out += ["| name | value |", "|---|---|"]
    for k in ("IOV_MAX", "PLACE_SLICE", "RECV_PIECE", "PUSH_CHUNK", "DEMAND_PIECE"):
        out.append(f"| `{k}` | {LIMITS[k]} |")
    return "\n".join(out)
