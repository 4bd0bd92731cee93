"""The raw placement ioctls, for tests that pin down what the kernel does (KERNEL-FACTS).

Private on purpose: in the product only the page ledger places pages (``uffdpoison.kernel.ledger``),
because the kernel lets COPY, CONTINUE and shmem ZEROPAGE erase a poison marker. Each returns
the bytes done: the whole length, or fewer on partial progress (EAGAIN with bytes done); any
other failure raises the matching ``UffdError`` carrying the bytes done.
"""

from __future__ import annotations

import errno

from uffdpoison.kernel._ffi import ffi, lib
from uffdpoison.kernel.errors import error_for
from uffdpoison.kernel.uffd import Userfaultfd


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
