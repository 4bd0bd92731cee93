"""The C reference that benchmarks compare against ("the floor"): plain C threads, no Python.

* :class:`LocalHandler` (a): a userfaultfd handler thread that resolves each fault with
  ``UFFDIO_COPY`` of the matching page of a source buffer, or ``UFFDIO_POISON`` where a poison
  bitmap says so.
* :class:`PageSource` (b): a minimal TCP page source on a listening socket (its own on
  127.0.0.1:0 by default) serving a memory buffer with a poison bitmap.
* :class:`RemoteHandler` (c): a userfaultfd handler thread that asks a :class:`PageSource` for
  one page per fault and places DATA / ZERO / POISONED with COPY / ZEROPAGE / POISON.
* :func:`pingpong` (d): N request/reply round trips of fixed sizes, timed per round trip in C.
* :class:`~uffdpoison.harness.bulkpull.BulkPuller` (e, ``csrc/harness/bulkpull.c``, in
  :mod:`uffdpoison.harness.bulkpull`): the reference's background stream.

Wire format of the reference source (little-endian, TCP_NODELAY)::

    request  16 bytes {u64 offset, u32 count, u32 flags}  + (flags >> 16) padding bytes
    reply    runs covering the pages in order: 16 bytes {u64 offset, u32 count, u32 kind}
             + count * page_size bytes when kind is DATA

``flags`` bit 0 (:data:`FLAG_ZERO_DETECT`) makes the source answer all-zero pages with ZERO.
A request outside the buffer is answered with one ERROR header (count 0).

Every object owns the C memory it hands to its thread (bitmaps, buffers) and keeps buffers given
as Python objects alive; file descriptors given to it are never closed by it. Use them as
context managers, or call :meth:`stop`.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import struct
from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Self, TypeVar

from uffdpoison.harness._ffi import ffi, lib

__all__ = [
    "FLAG_ZERO_DETECT",
    "KIND_DATA",
    "KIND_ERROR",
    "KIND_POISONED",
    "KIND_ZERO",
    "CrefStats",
    "LocalHandler",
    "PageSource",
    "RemoteHandler",
    "pingpong",
    "poison_bitmap",
    "request_bytes",
    "uffd_open",
    "uffd_register",
]

KIND_DATA = 0
KIND_ZERO = 1
KIND_POISONED = 2
KIND_ERROR = 3
FLAG_ZERO_DETECT = 1

REQUEST = struct.Struct("<QII")  # offset, count, flags
REPLY = struct.Struct("<QII")  # offset, count, kind


def _check(rc: int, what: str) -> int:
    if rc < 0:
        raise OSError(-rc, f"{what}: {os.strerror(-rc)}")
    return rc


def uffd_open() -> int:
    """A userfaultfd (O_CLOEXEC|O_NONBLOCK, UFFDIO_API done, POISON requested). Caller closes."""
    return _check(lib.up_cref_uffd_open(), "userfaultfd")


def uffd_register(uffd: int, base: int, length: int) -> None:
    """UFFDIO_REGISTER ``[base, base+length)`` in MISSING mode."""
    _check(lib.up_cref_uffd_register(uffd, base, length), f"UFFDIO_REGISTER {base:#x}+{length:#x}")


def poison_bitmap(pages: int, poisoned: Iterable[int]) -> bytearray:
    """A bitmap of ``pages`` bits (bit i = page i, LSB first) with ``poisoned`` set."""
    bm = bytearray((pages + 7) // 8)
    for i in poisoned:
        if not 0 <= i < pages:
            raise ValueError(f"poisoned page index {i} outside 0..{pages - 1}")
        bm[i >> 3] |= 1 << (i & 7)
    return bm


def request_bytes(offset: int, count: int = 1, flags: int = 0, *, pad: int = 0) -> bytes:
    """One request of ``16 + pad`` bytes for :class:`PageSource`."""
    if not 0 <= pad < 1 << 16:
        raise ValueError(f"pad must be within 0..65535, got {pad}")
    return REQUEST.pack(offset, count, (flags & 0xFFFF) | (pad << 16)) + bytes(pad)


@dataclass(frozen=True)
class CrefStats:
    faults: int
    copies: int
    zeropages: int
    poisons: int
    eexist: int
    errors: int
    requests: int
    pages: int
    connections: int
    last_errno: int
    cpu: int  # the CPU the thread started on (-1 before it ran)
    _CTYPE: ClassVar[str] = "up_cref_stats"

    @classmethod
    def _from_c(cls, st: Any) -> CrefStats:
        return cls(**{f: int(getattr(st, f)) for f in _names(cls)})


def _names(cls: Any) -> list[str]:
    """The fields of a counters dataclass (its C struct's, by name)."""
    return [f.name for f in dataclasses.fields(cls)]


def _address(obj: int | Any, keep: list[Any]) -> tuple[int, int | None]:
    """(address, length or None) of an int address or a buffer object (kept alive in ``keep``)."""
    if isinstance(obj, int):
        return obj, None
    cbuf = ffi.from_buffer(obj)
    keep.append(cbuf)
    return int(ffi.cast("uintptr_t", cbuf)), len(cbuf)


def _bitmap(poison: bytes | bytearray | None, pages: int, keep: list[Any]) -> Any:
    if poison is None:
        return ffi.NULL
    need = (pages + 7) // 8
    if len(poison) < need:
        raise ValueError(f"poison bitmap has {len(poison)} bytes, {pages} pages need {need}")
    c = ffi.new("uint8_t[]", bytes(poison[:need]))
    keep.append(c)
    return c


def _blocking_fd(sock: socket.socket | int) -> int:
    """The fd a C thread does blocking I/O on; the socket object stays the caller's."""
    if isinstance(sock, int):
        return sock
    sock.setblocking(True)
    return sock.fileno()


def _cpu(cpu: int | None) -> int:
    return -1 if cpu is None else cpu  # C: not pinned


def _check_geometry(base: int, size: int, page_size: int) -> None:
    if page_size <= 0 or page_size & (page_size - 1):
        raise ValueError(f"page_size must be a power of two, got {page_size}")
    if size <= 0 or size % page_size or base % page_size:
        raise ValueError(
            f"region {base:#x}+{size:#x} must be non-empty and aligned to page_size {page_size}"
        )


S = TypeVar("S")


class _CThread(Generic[S]):
    """A C thread owned through an opaque handle: counters while it runs, ``stop()`` (join,
    final counters; idempotent), context manager, and a stop without counters if collected."""

    _HANDLE: str  # the C type of the handle; its functions: _HANDLE + "_stats_get", "_stop"
    _STATS: Any  # the counters' dataclass: _CTYPE names its C struct, _from_c converts one
    _WHAT: str
    _c: Any = None
    _final: S | None = None

    def _start(self, fn: str, *args: Any) -> None:
        """``fn(&handle, *args)`` starts the C thread."""
        out = ffi.new(f"{self._HANDLE} **")
        _check(getattr(lib, fn)(out, *args), f"starting {self._WHAT}")
        self._c = out[0]

    def stats(self) -> S:
        if self._c is None:
            if self._final is None:
                raise RuntimeError(f"{self._WHAT} not running")
            return self._final
        st = ffi.new(f"{self._STATS._CTYPE} *")
        getattr(lib, f"{self._HANDLE}_stats_get")(self._c, st)
        return self._STATS._from_c(st)

    def stop(self) -> S:
        """Stop and join the thread; returns the final counters. Idempotent."""
        if self._c is not None:
            st = ffi.new(f"{self._STATS._CTYPE} *")
            c, self._c = self._c, None
            _check(getattr(lib, f"{self._HANDLE}_stop")(c, st), f"stopping {self._WHAT}")
            self._final = self._STATS._from_c(st)
        assert self._final is not None
        return self._final

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __del__(self) -> None:
        if getattr(self, "_c", None) is not None:
            getattr(lib, f"{self._HANDLE}_stop")(self._c, ffi.NULL)
            self._c = None


class _Handler(_CThread[CrefStats]):
    _HANDLE, _STATS, _WHAT = "up_cref_handler", CrefStats, "handler"


class LocalHandler(_Handler):
    """(a) Resolve faults of ``[base, base+size)`` on ``uffd`` from ``src`` (address or buffer
    of at least ``size`` bytes); pages whose bit is set in ``poison`` get UFFDIO_POISON.

    Starts at once; ``cpu`` pins the thread.
    """

    def __init__(
        self,
        uffd: int,
        base: int,
        size: int,
        *,
        src: int | Any,
        page_size: int = 4096,
        poison: bytes | bytearray | None = None,
        cpu: int | None = None,
    ) -> None:
        _check_geometry(base, size, page_size)
        self._keep: list[Any] = []
        src_addr, src_len = _address(src, self._keep)
        if src_len is not None and src_len < size:
            raise ValueError(f"src buffer has {src_len} bytes, the region needs {size}")
        bm = _bitmap(poison, size // page_size, self._keep)
        self._start("up_cref_local_start", uffd, base, size, page_size, src_addr, bm, _cpu(cpu))


class RemoteHandler(_Handler):
    """(c) Resolve each fault of ``[base, base+size)`` by asking a :class:`PageSource` (or any
    server of the same wire format) over ``sock`` (connected socket or fd; not closed here) for
    that one page, with zero detection on. Starts at once; ``cpu`` pins the thread.

    (c') MINOR mode, with ``alias``: ``[base, base+size)`` maps a file registered
    MISSING|MINOR, ``alias`` an unregistered mapping of the same pages, their cache filled.
    Each fault asks with the cached copy's digest (``digests``, one u64 a page, kept at
    precopy; None: hashed at the fault) and maps the page with CONTINUE (after writing new
    bytes through the alias).
    """

    def __init__(
        self,
        uffd: int,
        base: int,
        size: int,
        *,
        sock: socket.socket | int,
        page_size: int = 4096,
        cpu: int | None = None,
        alias: int = 0,
        digests: Any = None,
    ) -> None:
        _check_geometry(base, size, page_size)
        self._sock = sock  # kept alive: the C thread uses its fd
        fd = _blocking_fd(sock)
        if not alias:
            self._start("up_cref_remote_start", uffd, base, size, page_size, fd, _cpu(cpu))
            return
        dg = ffi.NULL if digests is None else ffi.cast("uint64_t *", ffi.from_buffer(digests))
        self._keep = [digests, dg]
        self._start("up_cref_minor_start", uffd, base, size, page_size, fd, alias, dg,
                    _cpu(cpu))  # fmt: skip


class PageSource(_CThread[CrefStats]):
    """(b) Serve ``buf`` (address with ``size``, or a buffer object) over TCP; pages whose bit
    is set in ``poison`` are answered POISONED. ``listen``: a listening socket to accept on
    (not closed here); default binds 127.0.0.1:0 (see :attr:`port`). Starts at once.

    ``threaded``: serve each connection on a thread of its own (pinned to ``cpu`` too), so a
    request on one connection never waits behind a reply on another (demand behind bulk);
    default: one thread serving every connection in turn. ``vouch`` (MINOR): the buffer is
    what the requester's cache was filled from, so a page asked for with a digest is CLEAN
    unhashed.
    """

    _HANDLE, _STATS, _WHAT = "up_cref_source", CrefStats, "page source"  # stop closes its conns

    def __init__(
        self,
        buf: int | Any,
        size: int | None = None,
        *,
        page_size: int = 4096,
        poison: bytes | bytearray | None = None,
        listen: socket.socket | None = None,
        cpu: int | None = None,
        threaded: bool = False,
        vouch: bool = False,
    ) -> None:
        self._keep: list[Any] = []
        addr, length = _address(buf, self._keep)
        if size is None:
            if length is None:
                raise ValueError("size is required when buf is an address")
            size = length
        elif length is not None and length < size:
            raise ValueError(f"buf has {length} bytes, size says {size}")
        _check_geometry(0, size, page_size)
        self.size = size
        self.page_size = page_size
        bm = _bitmap(poison, size // page_size, self._keep)
        self._listen = listen
        lfd = -1 if listen is None else listen.fileno()
        flags = (lib.UP_CREF_SOURCE_THREADED if threaded else 0) | (
            lib.UP_CREF_SOURCE_VOUCH if vouch else 0
        )
        self._start("up_cref_source_start_ex", lfd, addr, size, page_size, bm, _cpu(cpu), flags)
        self.port: int = int(lib.up_cref_source_port(self._c))

    def connect(self) -> socket.socket:
        """A new blocking TCP connection to this source (caller closes it)."""
        s = socket.create_connection(("127.0.0.1", self.port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s


def pingpong(sock: socket.socket | int, request: bytes, reply_len: int, n: int) -> array:
    """(d) ``n`` round trips on a connected stream: send ``request``, read ``reply_len`` bytes.

    Returns ``array('Q')`` of per-round-trip ns, measured in C (GIL released for the loop).
    """
    if n < 0 or reply_len < 0:
        raise ValueError(f"n and reply_len must be >= 0, got {n}, {reply_len}")
    fd = sock if isinstance(sock, int) else sock.fileno()
    ns = ffi.new("uint64_t[]", max(n, 1))
    _check(lib.up_cref_pingpong(fd, request, len(request), reply_len, n, ns), "ping-pong")
    out = array("Q")
    out.frombytes(ffi.buffer(ns, n * 8))
    return out
