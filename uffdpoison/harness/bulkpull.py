"""The C reference's background stream (e): :class:`BulkPuller` (``csrc/harness/bulkpull.c``)
pulls a whole region from a :class:`~uffdpoison.harness.cref.PageSource` in chunks over its own
connection and places each run with one range ioctl (resuming after partial progress, stepping
over pages placed first by the demand handler), optionally capped at a byte rate.

Same wire format, ownership rules and C-thread handle as :mod:`uffdpoison.harness.cref`.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any, ClassVar

from uffdpoison.harness._ffi import lib
from uffdpoison.harness.cref import _blocking_fd, _check_geometry, _cpu, _CThread, _names

__all__ = ["BulkPuller", "BulkStats"]


@dataclass(frozen=True)
class BulkStats:
    requests: int
    bytes: int  # page data received
    placed: int  # pages placed by the puller
    skipped: int  # pages the demand handler had placed first
    errors: int
    last_errno: int
    cpu: int
    done: bool
    elapsed_ns: int  # start to done (to now while running)
    _CTYPE: ClassVar[str] = "up_cref_bulk_stats"

    @classmethod
    def _from_c(cls, st: Any) -> BulkStats:
        fields: dict[str, Any] = {
            f: (bool if f == "done" else int)(getattr(st, f)) for f in _names(cls)
        }
        return cls(**fields)


class BulkPuller(_CThread[BulkStats]):
    """(e) Pull ``[base, base+size)`` from a :class:`PageSource` over ``sock`` (a connection
    dedicated to it; shut down by :meth:`stop`, not closed) in ``chunk_pages`` requests and
    place every page; ``rate`` caps page data at bytes/s (None: uncapped). Starts at once.
    """

    _HANDLE, _STATS, _WHAT = "up_cref_bulk", BulkStats, "bulk puller"

    def __init__(
        self,
        uffd: int,
        base: int,
        size: int,
        *,
        sock: socket.socket | int,
        page_size: int = 4096,
        chunk_pages: int = 16,
        rate: int | None = None,
        cpu: int | None = None,
    ) -> None:
        _check_geometry(base, size, page_size)
        if chunk_pages < 1 or chunk_pages * page_size > 1 << 30:
            raise ValueError(f"chunk_pages must be within 1..{(1 << 30) // page_size}")
        if rate is not None and rate <= 0:
            raise ValueError(f"rate must be positive bytes/s or None, got {rate}")
        self._sock = sock
        fd = _blocking_fd(sock)
        geometry = (uffd, base, size, page_size)
        self._start("up_cref_bulk_start", *geometry, fd, chunk_pages, rate or 0, _cpu(cpu))

    def wait(self, timeout: float | None = None) -> bool:
        """Wait (GIL released) up to ``timeout`` s for the whole region; True when done."""
        if self._c is None:
            return bool(self._final and self._final.done)
        ms = -1 if timeout is None else max(0, int(timeout * 1000))
        return bool(lib.up_cref_bulk_wait(self._c, ms))
