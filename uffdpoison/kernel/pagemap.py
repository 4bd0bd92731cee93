"""What /proc/PID/pagemap says of a range of a process's memory, without touching it: which
pages hold a userfaultfd poison marker, and whether any page is populated at all.

Documentation/admin-guide/mm/pagemap.rst: one u64 a page; bit 63 present, bit 62 swapped
(a swap entry, which a PTE marker shows as), bits 0-4 swap type, bits 5-54 swap offset. A uffd
poison marker is PTE marker type 31, offset 2 (PTE_MARKER_POISONED): the low 55 bits read
exactly 0x5f, bit 63 clear (bit 55, soft-dirty, and bits 56-61 may vary). Seeing markers needs
CAP_SYS_ADMIN. Entries are matched as raw little-endian bytes, so scanning millions of them
runs in C (the ``re`` module), never a Python loop per page.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import re
import struct
import sys
from collections.abc import Iterator

_POISON_RE = re.compile(rb"\x5f\x00\x00\x00\x00\x00[\x00\x80][\x40-\x7f]", re.DOTALL)
_POPULATED_RE = re.compile(rb"[\x40-\xff]")  # in an entry's top byte: present or swapped
_CHUNK = 1 << 16  # entries read at once

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class ProcessGone(OSError):
    """The process exited while its pagemap was read."""


def _entries(fd: int, addr: int, length: int) -> Iterator[tuple[int, bytes]]:
    """(index of the first page, raw entries) for [addr, addr + length), a chunk at a time."""
    if sys.byteorder != "little":  # pragma: no cover - the patterns are little-endian
        raise OSError("pagemap scanning assumes a little-endian machine")
    vpn0, npages, done = addr // PAGE_SIZE, length // PAGE_SIZE, 0
    while done < npages:
        data = os.pread(fd, min(_CHUNK, npages - done) * 8, (vpn0 + done) * 8)
        if not data:
            raise ProcessGone("the process exited")
        yield done, data
        done += len(data) // 8


def poison_markers(fd: int, addr: int, length: int) -> Iterator[int]:
    """Indexes (in system pages from ``addr``) of the pages holding a poison marker."""
    for first, data in _entries(fd, addr, length):
        for m in _POISON_RE.finditer(data):
            if m.start() % 8 == 0:
                yield first + m.start() // 8


def populated(fd: int, addr: int, length: int) -> bool:
    """Whether any page of the range is present, swapped out or holds a marker."""
    return any(_POPULATED_RE.search(data[7::8]) for _, data in _entries(fd, addr, length))


@functools.cache
def soft_dirty_works() -> bool:
    """Whether this kernel tracks soft-dirty bits (CONFIG_MEM_SOFT_DIRTY): a page this process
    just wrote must show pagemap bit 55. Without it ``4 > clear_refs`` is accepted and bit 55
    reads 0 for every page, written or not: a source must then not trust it."""
    with mmap.mmap(-1, PAGE_SIZE) as m:
        m[0] = 1
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        try:
            with open("/proc/self/pagemap", "rb") as f:
                (entry,) = struct.unpack("<Q", os.pread(f.fileno(), 8, addr // PAGE_SIZE * 8))
        finally:
            del addr  # the buffer export ends before the mapping is closed
        return bool(entry >> 55 & 1)
