"""The source's URGENT fast path (``csrc/urgent.c``): demand Requests answered in C.

A demand fault is a vCPU waiting; the Python reference path costs it tens of microseconds of
interpreter time per request. While :meth:`UrgentResponder.serve` runs (in a worker thread: cffi
drops the GIL for the call), a C loop is the only reader and writer of the connection and
answers the common case exactly as ``uffdpoison.protocol`` would: fast-encoded urgent Requests
without digests, for pages it can read or already knows are poisoned. It returns, *before
sending any byte of a reply*, at the first frame it does not serve, handing that frame (and
whatever followed it) back for the Python path to serve or reject. So there is one set of error
messages and one rule for classifying an unreadable page: Python's.

Shared state, never copied: the backend's poison bitmap (read here; Python sets bits), the
session's offered bitmap (bits set here with atomic OR), the latest-demand hint.
"""

from __future__ import annotations

import contextlib
import enum
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from uffdpoison.kernel._ffi import ffi, lib

__all__ = ["FAST_MAX_BYTES", "FAST_MAX_UNITS", "Outcome", "ReadLayout", "UrgentResponder"]

# The largest request answered in C, in bytes (or one unit, if bigger) and units: bigger ones
# are rare and go to Python, which sends them in pieces.
FAST_MAX_BYTES = 1 << 20
FAST_MAX_UNITS: int = lib.UP_URG_MAX_UNITS
_IN_CAP = 1 << 16
_COUNTERS = ("requests", "pages", "data_pages", "zero_pages", "poisoned_pages", "bytes_sent")


class Outcome(enum.IntEnum):
    STOPPED = lib.UP_URG_STOPPED  # stop() was called
    EOF = lib.UP_URG_EOF  # the peer closed
    HANDOFF = lib.UP_URG_HANDOFF  # a frame for the Python path
    ERROR = lib.UP_URG_ERROR  # socket error, no reply half sent
    BROKEN = lib.UP_URG_BROKEN  # a reply was cut short: the stream is unusable


@dataclass(frozen=True, slots=True)
class ReadLayout:
    """Where guest bytes come from: ``mem`` (an in-memory guest), or ``pread`` on ``data_fd``
    through ``ranges`` of (guest offset, fd offset, length)."""

    data_fd: int = -1
    ranges: Sequence[tuple[int, int, int]] = ()
    mem: memoryview | None = None


class UrgentResponder:
    """The C loop for one URGENT connection. The socket, bitmaps and layout stay owned by the
    caller and must outlive it; it owns only its buffers and its stop eventfd. Close it (or use
    it as a context manager) once its last ``serve()`` has returned."""

    def __init__(
        self,
        sock_fd: int,
        layout: ReadLayout,
        *,
        size: int,
        base_page_size: int,
        unit: int,
        poison_bits: bytearray,
        offered_bits: bytearray,
        partial_timeout: float = 30.0,
        nice: int | None = None,
    ) -> None:
        """``partial_timeout``: once part of a reply is on the wire, how long (s) the peer may
        take to accept the rest before ``serve()`` gives up with BROKEN. ``nice``: the CPU
        priority ``serve()`` sets on the thread it runs in (None: leave it)."""
        if unit % base_page_size or unit & (unit - 1):
            raise ValueError(f"unit {unit} is not a power-of-two multiple of {base_page_size}")
        if len(poison_bits) * 8 < size // base_page_size or len(offered_bits) * 8 < size // unit:
            raise ValueError("bitmap shorter than the guest memory")
        if (layout.mem is None) == (layout.data_fd < 0):
            raise ValueError("a ReadLayout needs exactly one of mem and data_fd")
        self._nice = nice
        self._stopfd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        max_bytes = max(FAST_MAX_BYTES, unit)
        u = ffi.new("up_urgent *")
        # Buffers borrowed from Python objects, released in close(): never left to the garbage
        # collector, which may free the exporting memoryview first when both sit in a cycle.
        self._borrowed: list[Any] = []

        def buf(obj: Any) -> Any:
            p = ffi.from_buffer(obj)
            self._borrowed.append(p)
            return p

        u.sock = sock_fd
        u.stopfd = self._stopfd
        u.data_fd = layout.data_fd
        u.mem = buf(layout.mem) if layout.mem is not None else ffi.NULL
        u.size = size
        u.base_ps = base_page_size
        u.unit = unit
        u.poison = buf(poison_bits)
        u.offered = buf(offered_bits)
        self._ranges = ffi.new("uint64_t[]", [v for r in layout.ranges for v in r] or [0])
        u.nranges = len(layout.ranges)
        u.ranges = self._ranges
        u.max_bytes = max_bytes
        u.partial_timeout_ms = max(1, round(partial_timeout * 1000))
        if layout.mem is None:
            self._buf = ffi.new("uint8_t[]", max_bytes)
            u.buf = self._buf
        self._in = ffi.new("uint8_t[]", _IN_CAP)
        u.inbuf = self._in
        u.in_cap = _IN_CAP
        self._u = u

    def serve(self) -> tuple[Outcome, bytes]:
        """Answer Requests until a frame for Python, EOF, an error or ``stop()``. Blocking: run
        it in a worker thread. Returns the outcome and the bytes received but not consumed
        (they start with the frame handed back)."""
        u = self._u
        if self._stopfd < 0:
            raise ValueError("UrgentResponder is closed")
        if self._nice is not None:
            tid = threading.get_native_id()
            with contextlib.suppress(OSError):  # raising it back needs CAP_SYS_NICE
                if os.getpriority(os.PRIO_PROCESS, tid) != self._nice:
                    os.setpriority(os.PRIO_PROCESS, tid, self._nice)
        rc = Outcome(lib.up_urgent_serve(u))
        left = bytes(ffi.buffer(self._in, u.in_len))
        u.in_len = 0
        return rc, left

    def stop(self) -> None:
        """Make a running (or the next) ``serve()`` return STOPPED. Any thread."""
        os.eventfd_write(self._stopfd, 1)

    def clear_stop(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._stopfd)

    @property
    def errno(self) -> int:
        return int(self._u.err)

    def take_hint(self) -> int | None:
        """Unit index just past the latest demand answered here since the last call."""
        h = int(lib.up_urgent_take_hint(self._u))
        return h - 1 if h else None

    def take_counters(self) -> dict[str, int]:
        """Counters since the last call (call between ``serve()`` runs, not during one)."""
        u = self._u
        out = {k: int(getattr(u, k)) for k in _COUNTERS}
        for k in _COUNTERS:
            setattr(u, k, 0)
        return out

    def close(self) -> None:
        """Release the borrowed buffers and the eventfd. Never while ``serve()`` runs."""
        u = self._u
        u.mem = u.poison = u.offered = ffi.NULL
        for p in self._borrowed:
            ffi.release(p)
        self._borrowed.clear()
        if self._stopfd >= 0:
            os.close(self._stopfd)
            self._stopfd = -1

    def __enter__(self) -> UrgentResponder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
