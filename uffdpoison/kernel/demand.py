"""The destination's demand engine in C (csrc/demand.c): faults → Request → Pages → ledger.

``DemandEngine.run()`` blocks in C with the GIL released (run it in a worker thread); while it
runs it is the only reader of the userfaultfd and the only user of the URGENT socket. It returns
a ``RunResult`` code when stopped or when something needs Python (a frame that is not the exact
fast encoding, the source's EOF, a kernel error). Page state stays in the ledgers.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from uffdpoison.kernel._ffi import ffi, lib
from uffdpoison.kernel.pagestates import PageStates

__all__ = ["BulkState", "DemandEngine", "DemandRegion", "RunResult", "encode_request"]

REQUEST_SIZE = 48


class RunResult(enum.IntEnum):
    """Why ``DemandEngine.run`` returned."""

    STOPPED = lib.UP_DEMAND_STOPPED
    FOREIGN = lib.UP_DEMAND_FOREIGN  # a frame only Python's generic decoder can judge
    EOF = lib.UP_DEMAND_EOF
    SOCK_ERROR = lib.UP_DEMAND_SOCK_ERROR
    TARGET_GONE = lib.UP_DEMAND_TARGET_GONE
    PLACE_ERROR = lib.UP_DEMAND_PLACE_ERROR
    UFFD_ERROR = lib.UP_DEMAND_UFFD_ERROR
    NOMEM = lib.UP_DEMAND_NOMEM


class BulkState(enum.IntEnum):
    """Who reads the BULK socket (``DemandEngine.attach_bulk``)."""

    NONE = lib.UP_BULK_NONE  # never attached: Python
    ENGINE = lib.UP_BULK_ENGINE  # the engine, between faults
    RETURNED = lib.UP_BULK_RETURNED  # handed back at a frame boundary: Python, leftover first


@dataclass(frozen=True, slots=True)
class DemandRegion:
    """One registered region: host ``base``, ``size``, guest ``offset``, its page states."""

    base: int
    size: int
    offset: int
    states: PageStates


_STAT_FIELDS = tuple(
    name
    for name, _ in ffi.typeof("up_demand_stats").fields
    if name not in ("last_errno", "last_fault")
)


def encode_request(rid: int, offset: int, count: int) -> bytes:
    """The 48-byte urgent Request frame the engine sends (protocol.py's fast encoding)."""
    buf = ffi.new("uint8_t[48]")
    lib.up_demand_encode_request(buf, rid, offset, count)
    return bytes(ffi.buffer(buf, REQUEST_SIZE))


class DemandEngine:
    """Owns one ``up_demand``. Borrows the fds and the page states (keep them open while it
    lives; close it first)."""

    def __init__(
        self,
        uffd: int,
        sock: int,
        page_size: int,
        memory_size: int,
        next_id: int,
        regions: Sequence[DemandRegion],
    ) -> None:
        if not regions:
            raise ValueError("a demand engine needs at least one region")
        bases = [r.base for r in regions]
        if bases != sorted(bases):
            raise ValueError("demand engine regions must be sorted by base address")
        self._states = [r.states for r in regions]  # keep the ledgers alive
        arr = ffi.new("up_demand_region[]", len(regions))
        for k, r in enumerate(regions):
            arr[k].base = r.base
            arr[k].size = r.size
            arr[k].offset = r.offset
            arr[k].ledger = r.states.raw
        ptr = lib.up_demand_new(uffd, sock, page_size, memory_size, next_id, arr, len(regions))
        if ptr == ffi.NULL:
            err = ffi.errno
            raise OSError(err, f"demand engine: {os.strerror(err)}")
        self._e: Any = ptr
        self._stats = ffi.new("up_demand_stats *")
        self.progress_fd: int = lib.up_demand_progress_fd(ptr)

    def _raw(self) -> Any:
        if self._e is None:
            raise ValueError("demand engine is closed")
        return self._e

    def run(self) -> RunResult:
        """Serve until ``stop()`` or until something needs Python. Blocks (GIL released)."""
        rc = lib.up_demand_run(self._raw())
        if rc < 0:
            raise OSError(-rc, f"demand engine run: {os.strerror(-rc)}")
        return RunResult(rc)

    def stop(self) -> None:
        """Make ``run`` return ``STOPPED`` (from any thread; also before ``run`` started)."""
        if self._e is not None:
            lib.up_demand_stop(self._e)

    def release_socket(self) -> None:
        """Shut the URGENT socket down (the source sees EOF); the engine keeps serving what
        needs no source. Close the socket only after ``run`` returned."""
        lib.up_demand_release_socket(self._raw())

    def notify(self, delta: int) -> None:
        """+1 while a waiter wants to hear of every placement (progress_fd), -1 after."""
        lib.up_demand_notify(self._raw(), delta)

    def request(self, region: int, first: int, count: int, max_run: int = 0) -> int:
        """Claim pages [first, first+count) of region ``region`` and request what is missing
        (runs of at most ``max_run`` pages; 0 = the protocol's limit); removed pages are
        zeroed. Thread-safe. 0, or -errno (-EAGAIN: retry after a moment)."""
        return int(lib.up_demand_request(self._raw(), region, first, count, max_run))

    def attach_bulk(self, fd: int) -> None:
        """The engine reads the source's push from ``fd`` (the BULK socket, at a frame
        boundary) from now on, between faults; keep the fd open until it is handed back or
        ``run`` returned. It hands BULK back (``bulk_state``, progress_fd) at the first frame
        that is not a push in the fixed encoding, or at EOF."""
        rc = lib.up_demand_attach_bulk(self._raw(), fd)
        if rc < 0:
            raise OSError(-rc, f"demand engine: attach BULK: {os.strerror(-rc)}")

    @property
    def bulk_state(self) -> BulkState:
        return BulkState(lib.up_demand_bulk_state(self._raw()))

    def detach_bulk(self) -> int:
        """Take BULK back: 0 once it is Python's (the frame being placed is finished first;
        the engine must have returned unless it handed BULK back itself); -EAGAIN: a pending
        event met that placement, call again after it was read; > 0: a ``RunResult``
        failure code of that placement."""
        return int(lib.up_demand_bulk_detach(self._raw()))

    def bulk_leftover(self) -> tuple[bytes, bool]:
        """After BULK was handed back: the bytes received and not consumed, and whether the
        peer's EOF followed them."""
        p = ffi.new("const uint8_t **")
        eof = ffi.new("int *")
        n = lib.up_demand_bulk_leftover(self._raw(), p, eof)
        return (bytes(ffi.buffer(p[0], n)) if n else b""), bool(eof[0])

    @property
    def running(self) -> bool:
        return self._e is not None and bool(lib.up_demand_running(self._e))

    @property
    def next_id(self) -> int:
        return int(lib.up_demand_next_id(self._raw()))

    @property
    def last_errno(self) -> int:
        lib.up_demand_get_stats(self._raw(), self._stats)
        return int(self._stats.last_errno)

    def stats(self) -> dict[str, int]:
        """Counters, named as ``placement.Stats``."""
        s = self._stats
        lib.up_demand_get_stats(self._raw(), s)
        return {name: getattr(s, name) for name in _STAT_FIELDS}

    @property
    def last_fault(self) -> int:
        """Address of the latest fault it only counted (no region, MINOR)."""
        s = self._stats
        lib.up_demand_get_stats(self._raw(), s)
        return int(s.last_fault)

    def outstanding(self) -> list[tuple[int, int, int]]:
        """(id, next offset expected, end offset) of every request not fully answered."""
        e = self._raw()
        n = lib.up_demand_outstanding(e, ffi.NULL, ffi.NULL, ffi.NULL, 0)
        ids, nxt, end = (ffi.new("uint64_t[]", max(n, 1)) for _ in range(3))
        n = min(n, lib.up_demand_outstanding(e, ids, nxt, end, n))
        return [(ids[k], nxt[k], end[k]) for k in range(n)]

    def leftover(self) -> bytes:
        """Bytes received and not consumed (the frame ``run`` returned ``FOREIGN`` on, on)."""
        p = ffi.new("const uint8_t **")
        n = lib.up_demand_leftover(self._raw(), p)
        return bytes(ffi.buffer(p[0], n)) if n else b""

    def unsent(self) -> bytes:
        """Bytes queued for the socket that the kernel did not take yet."""
        p = ffi.new("const uint8_t **")
        n = lib.up_demand_unsent(self._raw(), p)
        return bytes(ffi.buffer(p[0], n)) if n else b""

    def close(self) -> None:
        """Free the engine; it must not be running."""
        if self._e is not None:
            if lib.up_demand_running(self._e):
                raise RuntimeError("demand engine still running: stop it and wait first")
            lib.up_demand_free(self._e)
            self._e = None

    def __del__(self) -> None:
        e = getattr(self, "_e", None)
        if e is not None and not lib.up_demand_running(e):
            lib.up_demand_free(e)
            self._e = None
