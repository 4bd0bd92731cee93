"""The kernel boundary's raw calls, for the tests that pin down what the kernel does
(/work/shared/KERNEL-FACTS.md): the placement ioctls and reading userfaultfd events.

Test support, not product: in the product only the page ledger places pages (the kernel lets
COPY, CONTINUE and shmem ZEROPAGE erase a poison marker) and only a session's data plane reads
its userfaultfd. Each placement returns the bytes done: the whole length, or fewer on partial
progress (EAGAIN with bytes done); any other failure raises the matching ``UffdError``.
"""

from __future__ import annotations

import enum
import errno
from collections.abc import Iterator
from typing import Any, NamedTuple

from uffdpoison._native import ffi, lib

from uffdpoison.kernel import UffdError, Userfaultfd
from uffdpoison.kernel.errors import error_for


def _done(op: str, rc: int, prog: int, start: int, length: int) -> int:
    if rc == 0:
        return length
    if rc == -errno.EAGAIN and prog > 0:
        return prog
    raise error_for(-rc, op, start, length, prog)


def _call(fn: object, op: str, uffd: Userfaultfd, start: int, length: int, *args: int) -> int:
    prog = ffi.new("int64_t *")
    try:
        rc = fn(uffd.fileno(), *args, prog)  # type: ignore[operator]
    except OverflowError as e:
        raise ValueError(f"addresses and lengths must be unsigned 64-bit integers: {e}") from e
    return _done(op, rc, prog[0], start, length)


def copy(uffd: Userfaultfd, dst: int, src: int, length: int, *, wake: bool = True) -> int:
    """UFFDIO_COPY from address ``src``."""
    return _call(lib.up_uffd_copy, "UFFDIO_COPY", uffd, dst, length, dst, src, length, 1 - wake)


def zeropage(uffd: Userfaultfd, start: int, length: int, *, wake: bool = True) -> int:
    return _call(lib.up_uffd_zeropage, "UFFDIO_ZEROPAGE", uffd, start, length, start, length,
                 1 - wake)  # fmt: skip


def continue_(uffd: Userfaultfd, start: int, length: int, *, wake: bool = True) -> int:
    return _call(lib.up_uffd_continue, "UFFDIO_CONTINUE", uffd, start, length, start, length,
                 1 - wake)  # fmt: skip


def poison(uffd: Userfaultfd, start: int, length: int, *, wake: bool = True) -> int:
    return _call(lib.up_uffd_poison, "UFFDIO_POISON", uffd, start, length, start, length,
                 1 - wake)  # fmt: skip


def move(
    uffd: Userfaultfd, dst: int, src: int, length: int, *, wake: bool = True, holes: bool = False
) -> int:
    mode = (0 if wake else 1) | (2 if holes else 0)
    return _call(lib.up_uffd_move, "UFFDIO_MOVE", uffd, dst, length, dst, src, length, mode)


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


def read_events(uffd: Userfaultfd, batch: EventBatch) -> int:
    """Read every pending message that fits into ``batch``; 0 when nothing is pending."""
    n = lib.up_uffd_read_events(uffd.fileno(), batch.raw, batch.capacity)
    if n < 0:
        batch.count = 0
        raise UffdError(-n, "read(userfaultfd)")
    batch.count = n
    return n
