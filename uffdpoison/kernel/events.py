"""Batched userfaultfd events: messages are decoded in C into a reusable flat array."""

from __future__ import annotations

import enum
from collections.abc import Iterator
from typing import Any, NamedTuple

from uffdpoison.kernel._ffi import ffi

FLAG_WRITE = 1  # UFFD_PAGEFAULT_FLAG_WRITE
FLAG_WP = 2  # UFFD_PAGEFAULT_FLAG_WP
FLAG_MINOR = 4  # UFFD_PAGEFAULT_FLAG_MINOR


class EventKind(enum.IntEnum):
    PAGEFAULT = 0x12
    FORK = 0x13
    REMAP = 0x14
    REMOVE = 0x15
    UNMAP = 0x16


class Event(NamedTuple):
    """One decoded message (for inspection and tests; hot loops read ``EventBatch.raw``)."""

    kind: EventKind
    flags: int
    tid: int
    address: int
    start: int
    end: int
    from_: int
    to: int
    len: int
    fork_fd: int

    @property
    def write(self) -> bool:
        return bool(self.flags & FLAG_WRITE)

    @property
    def minor(self) -> bool:
        return bool(self.flags & FLAG_MINOR)

    @property
    def wp(self) -> bool:
        return bool(self.flags & FLAG_WP)


class EventBatch:
    """A reusable C array of ``up_event``; ``Userfaultfd.read_events`` fills it."""

    __slots__ = ("capacity", "count", "raw")

    def __init__(self, capacity: int = 64) -> None:
        if capacity < 1:
            raise ValueError(f"EventBatch capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.count = 0
        self.raw: Any = ffi.new("up_event[]", capacity)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> Event:
        if i < 0:
            i += self.count
        if not 0 <= i < self.count:
            raise IndexError(f"event {i} of {self.count}")
        e = self.raw[i]
        return Event(
            EventKind(e.kind),
            e.flags,
            e.tid,
            e.address,
            e.start,
            e.end,
            e.from_,
            e.to,
            e.len,
            e.fork_fd,
        )

    def __iter__(self) -> Iterator[Event]:
        return (self[i] for i in range(self.count))
