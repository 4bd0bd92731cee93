"""Where the source's guest memory comes from: a snapshot image, a live process, or a buffer.

A backend reads guest memory into caller buffers and classifies every page as DATA, ZERO or
POISONED without ever touching poisoned memory directly (no SIGBUS in the source: a live
process is read through /proc/PID/mem, where poison is an EIO, never a signal).

Page state lives in bitmaps (one bit a page), never in per-page Python objects: a guest may
have hundreds of millions of pages.
"""

from __future__ import annotations

import bisect
import enum
import errno
import functools
import os
import re
import struct
import threading
from array import array
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

from uffdpoison.kernel.digest import zero_runs
from uffdpoison.kernel.urgent import ReadLayout
from uffdpoison.units import parse_int

__all__ = [
    "Backend",
    "ImageBackend",
    "MemoryBackend",
    "PageBitmap",
    "ProcessBackend",
    "Run",
    "RunKind",
    "SourceError",
    "SourceGone",
    "parse_poison_list",
]

DEFAULT_PAGE_SIZE = 4096
_EHWPOISON = getattr(errno, "EHWPOISON", 133)

# pagemap (Documentation/admin-guide/mm/pagemap.rst): bit 63 present, bit 62 swapped, bits 0-4
# swap type, bits 5-54 swap offset. A uffd poison marker is PTE marker type 31, offset 2
# (PTE_MARKER_POISONED): the low 55 bits read exactly 0x5f. Bit 55 (soft-dirty) and bits 56-61
# may vary, bit 63 must be clear. Matched as raw little-endian bytes so a scan of millions of
# entries runs in C.
_PAGEMAP_POISON_RE = re.compile(rb"\x5f\x00\x00\x00\x00\x00[\x00\x80][\x40-\x7f]", re.DOTALL)
_NONZERO_RE = re.compile(rb"[^\x00]")
_NOT_FF_RE = re.compile(rb"[^\xff]")


class SourceError(Exception):
    """A source backend cannot do what was asked (bad input, unreadable memory)."""


class SourceGone(SourceError):
    """The served process exited: its memory can no longer be read."""


class RunKind(enum.IntEnum):
    DATA = 0
    ZERO = 1
    POISONED = 2


class Run(NamedTuple):
    """`units` pages (of the unit read) of one kind from byte `offset` of guest memory."""

    kind: RunKind
    offset: int
    units: int


# ----------------------------------------------------------------------------------------------
# Bitmap


class PageBitmap:
    """One bit a page in a bytearray; searches run in C (regex / bytes methods)."""

    __slots__ = ("_bits", "count", "npages")

    def __init__(self, npages: int) -> None:
        self.npages = npages
        self._bits = bytearray((npages + 7) // 8)
        self.count = 0

    def __len__(self) -> int:
        return self.npages

    @property
    def buffer(self) -> bytearray:
        """The bits themselves (bit i of byte i // 8), for C code that shares them. Bits set
        there are not in ``count``."""
        return self._bits

    def get(self, i: int) -> bool:
        return bool(self._bits[i >> 3] & (1 << (i & 7)))

    def set(self, i: int) -> bool:
        """Set bit i; return True if it was clear."""
        b = self._bits[i >> 3]
        m = 1 << (i & 7)
        if b & m:
            return False
        self._bits[i >> 3] = b | m
        self.count += 1
        return True

    def set_range(self, start: int, stop: int) -> None:
        if start >= stop:
            return
        before = self.count_range(start, stop)
        bits = self._bits
        i = start
        while i < stop and i & 7:
            bits[i >> 3] |= 1 << (i & 7)
            i += 1
        full_end = stop & ~7
        if i < full_end:
            bits[i >> 3 : full_end >> 3] = b"\xff" * ((full_end - i) >> 3)
            i = full_end
        while i < stop:
            bits[i >> 3] |= 1 << (i & 7)
            i += 1
        self.count += (stop - start) - before

    def count_range(self, start: int, stop: int) -> int:
        if start >= stop:
            return 0
        n = 0
        i = self.find_set(start, stop)
        while i >= 0:
            j = self.find_clear(i, stop)
            if j < 0:
                j = stop
            n += j - i
            i = self.find_set(j, stop)
        return n

    def _find(self, start: int, stop: int, want: int) -> int:
        stop = min(stop, self.npages)
        bits = self._bits
        i = start
        # Leading partial byte bit by bit, then whole bytes through C, then the tail.
        while i < stop and i & 7:
            if ((bits[i >> 3] >> (i & 7)) & 1) == want:
                return i
            i += 1
        if i >= stop:
            return -1
        pattern = _NONZERO_RE if want else _NOT_FF_RE
        m = pattern.search(bits, i >> 3, (stop + 7) >> 3)
        if m is None:
            return -1
        i = m.start() << 3
        byte = bits[m.start()]
        for k in range(8):
            if i + k >= stop:
                return -1
            if ((byte >> k) & 1) == want:
                return i + k
        return -1  # pragma: no cover - the regex guarantees a hit in this byte

    def find_set(self, start: int, stop: int | None = None) -> int:
        """First set bit in [start, stop), or -1."""
        return self._find(start, self.npages if stop is None else stop, 1)

    def find_clear(self, start: int, stop: int | None = None) -> int:
        """First clear bit in [start, stop), or -1."""
        return self._find(start, self.npages if stop is None else stop, 0)

    def any_set(self, start: int, stop: int) -> bool:
        return self.find_set(start, stop) >= 0

    def iter_set(self) -> Iterator[int]:
        i = self.find_set(0)
        while i >= 0:
            yield i
            i = self.find_set(i + 1)


# ----------------------------------------------------------------------------------------------
# Zero-page scan (C, uffdpoison.kernel.digest).


def _zero_split(mv: memoryview, start: int, stop: int, unit: int) -> list[tuple[bool, int]]:
    """(is_zero, units) runs covering mv[start:stop]."""
    if start >= stop:
        return []
    if stop - start == unit:  # one page (a demand fault): skip the run machinery
        return [(mv[start:stop].tobytes() == _zero_unit(unit), 1)]  # 0.1 µs; == on views: 4 µs
    return zero_runs(mv[start:stop], unit)


@functools.cache
def _zero_unit(unit: int) -> bytes:
    return bytes(unit)


# ----------------------------------------------------------------------------------------------
# Input parsing


def parse_poison_list(path: str | os.PathLike[str], *, page_size: int, size: int) -> list[int]:
    """Read a poison list: one page-aligned byte offset a line (decimal or 0x-hex), blank lines
    and `#` comments allowed. Returns sorted unique offsets; bad lines raise SourceError naming
    the file and line."""
    offsets: set[int] = set()
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except OSError as e:
        raise SourceError(f"cannot read poison list {os.fspath(path)!r}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise SourceError(f"poison list {os.fspath(path)!r} is not text: {e}") from e
    for lineno, raw in enumerate(lines, 1):
        text = raw.split("#", 1)[0].strip()
        if not text:
            continue
        where = f"{os.fspath(path)}:{lineno}"
        try:
            off = parse_int(text)
        except ValueError:
            raise SourceError(f"{where}: not an offset: {text!r}") from None
        if off < 0:
            raise SourceError(f"{where}: negative offset {text!r}")
        if off % page_size:
            raise SourceError(f"{where}: offset {off:#x} is not aligned to page size {page_size}")
        if off >= size:
            raise SourceError(f"{where}: offset {off:#x} is past the end of memory ({size:#x})")
        offsets.add(off)
    return sorted(offsets)


# ----------------------------------------------------------------------------------------------
# Backends


def _check_page_size(page_size: int) -> None:
    if page_size < 4096 or page_size & (page_size - 1):
        raise SourceError(f"page size {page_size} is not a power of two of at least 4096")


class Backend:
    """Guest memory of `size` bytes in `page_size` base pages, plus which pages are poisoned.

    Subclasses implement `_read(offset, buf)`: fill buf from guest byte `offset`, marking any
    page that cannot be read as poisoned (it is then never served as data or zero)."""

    page_size: int
    size: int

    def __init__(self, size: int, page_size: int = DEFAULT_PAGE_SIZE) -> None:
        _check_page_size(page_size)
        if size <= 0:
            raise SourceError("guest memory is empty")
        if size % page_size:
            raise SourceError(f"memory size {size} is not a multiple of the page size {page_size}")
        self.page_size = page_size
        self.size = size
        self.npages = size // page_size
        self._poison = PageBitmap(self.npages)
        # Reads may run in a worker thread while another reader marks poison in the same byte.
        self._poison_lock = threading.Lock()

    @property
    def huge_page_size(self) -> int:
        """The guest's huge-page size for the Welcome: a base page above 4 KiB is one (a
        hugetlb guest served with --page-size 2M), else 0."""
        return self.page_size if self.page_size > DEFAULT_PAGE_SIZE else 0

    # -- poison set ---------------------------------------------------------------------------

    def mark_poisoned(self, offset: int) -> bool:
        """Record the base page at byte `offset` as poisoned (terminal). True if new."""
        with self._poison_lock:
            return self._poison.set(offset // self.page_size)

    def add_poison(self, offsets: Iterable[int]) -> None:
        for off in offsets:
            if off % self.page_size or not 0 <= off < self.size:
                raise SourceError(f"poisoned offset {off:#x} is not a page of this memory")
            self.mark_poisoned(off)

    def check_unit(self, unit: int | None) -> int:
        """Validate a negotiated unit (a power-of-two multiple of the base page size)."""
        if not unit:
            return self.page_size
        if unit % self.page_size or unit & (unit - 1):
            raise SourceError(
                f"page size {unit} is not a power-of-two multiple of the source's {self.page_size}"
            )
        if self.size % unit:
            raise SourceError(f"memory size {self.size} is not a multiple of page size {unit}")
        return unit

    def is_poisoned(self, offset: int, length: int | None = None) -> bool:
        """Whether any base page in [offset, offset+length) is poisoned."""
        length = self.page_size if length is None else length
        first = offset // self.page_size
        last = (offset + length + self.page_size - 1) // self.page_size
        return self._poison.any_set(first, last)

    def poisoned_count(self, unit: int | None = None) -> int:
        unit = self.check_unit(unit)
        if unit == self.page_size:
            return self._poison.count
        return len(self.poisoned_offsets(unit))

    def poisoned_offsets(self, unit: int | None = None) -> array:
        """Byte offsets of poisoned units, ascending, as array('Q'). A unit is poisoned if any
        base page in it is."""
        unit = self.check_unit(unit)
        ratio = unit // self.page_size
        out = array("Q")
        last = -1
        for i in self._poison.iter_set():
            u = i // ratio
            if u != last:
                out.append(u * unit)
                last = u
        return out

    @property
    def poison_bits(self) -> bytearray:
        """The poison bitmap's bits, one per base page (shared with the C urgent path)."""
        return self._poison.buffer

    # -- reading ------------------------------------------------------------------------------

    def read_layout(self) -> ReadLayout | None:
        """Where C may read guest bytes itself (the urgent fast path), or None: every read
        then goes through this object."""
        return None

    def _read(self, offset: int, buf: memoryview) -> None:
        raise NotImplementedError

    def read_into(
        self, offset: int, buf: bytearray | memoryview, unit: int | None = None
    ) -> list[Run]:
        """Fill buf with guest memory from `offset` and classify it in `unit` pages.

        Returns runs (kind, offset, count) in order covering the buffer; the bytes of a DATA
        run are at buf[run.offset - offset:...]. The bytes of ZERO and POISONED runs are not
        meaningful (poisoned pages are never read into buf as data)."""
        unit = self.check_unit(unit)
        mv = memoryview(buf).cast("B")
        length = len(mv)
        if offset % unit or length % unit:
            raise SourceError(f"read of {length} bytes at {offset:#x} is not aligned to {unit}")
        if offset < 0 or offset + length > self.size:
            raise SourceError(
                f"read of {length} bytes at {offset:#x} is outside memory of {self.size:#x} bytes"
            )
        if length == 0:
            return []
        self._read(offset, mv)
        return self._classify(offset, mv, unit)

    def read(
        self, offset: int, buf: bytearray | memoryview, unit: int | None = None
    ) -> tuple[memoryview, list[Run]]:
        """Like read_into, but may return a view of the backend's own memory instead of
        filling buf (no copy). Returns (view of the bytes, runs); run offsets are relative to
        `offset` as for read_into."""
        runs = self.read_into(offset, buf, unit)
        return memoryview(buf).cast("B"), runs

    def _classify(self, offset: int, mv: memoryview, unit: int) -> list[Run]:
        ps = self.page_size
        length = len(mv)
        first = offset // ps
        runs: list[Run] = []
        poisoned_here = self._poison.any_set(first, first + length // ps)

        def add(kind: RunKind, off: int, n: int) -> None:
            if runs and runs[-1].kind == kind and runs[-1].offset + runs[-1].units * unit == off:
                prev = runs[-1]
                runs[-1] = Run(kind, prev.offset, prev.units + n)
            else:
                runs.append(Run(kind, off, n))

        pos = 0
        while pos < length:
            if poisoned_here and self.is_poisoned(offset + pos, unit):
                add(RunKind.POISONED, offset + pos, 1)
                pos += unit
                continue
            stop = length
            if poisoned_here:
                # Classify up to the unit holding the next poisoned base page.
                nxt = self._poison.find_set((offset + pos) // ps, (offset + length) // ps)
                if nxt >= 0:
                    stop = (nxt * ps - offset) // unit * unit
            for is_zero, n in _zero_split(mv, pos, stop, unit):
                add(RunKind.ZERO if is_zero else RunKind.DATA, offset + pos, n)
                pos += n * unit
        return runs

    def close(self) -> None:
        pass

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MemoryBackend(Backend):
    """An in-memory guest (tests, demo, benchmarks)."""

    def __init__(
        self,
        buffer: bytes | bytearray | memoryview,
        poisoned_offsets: Iterable[int] = (),
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> None:
        self._buf = memoryview(buffer).cast("B")
        super().__init__(len(self._buf), page_size)
        self.add_poison(poisoned_offsets)

    def _read(self, offset: int, buf: memoryview) -> None:
        buf[:] = self._buf[offset : offset + len(buf)]

    def read_layout(self) -> ReadLayout:
        return ReadLayout(mem=self._buf)

    def read(
        self, offset: int, buf: bytearray | memoryview, unit: int | None = None
    ) -> tuple[memoryview, list[Run]]:
        # Serve straight from the buffer: no copy. The caller owns the buffer and must not
        # change it while the server runs (data sent would be torn).
        unit = self.check_unit(unit)
        length = memoryview(buf).nbytes
        if offset % unit or length % unit or offset < 0 or offset + length > self.size:
            return super().read(offset, buf, unit)  # raises the usual error
        view = self._buf[offset : offset + length]
        return view, self._classify(offset, view, unit)

    def close(self) -> None:
        self._buf.release()


class ImageBackend(Backend):
    """A raw snapshot file: file offset 0 is guest byte 0. Read with pread, never mmap, so a
    file truncated under us is a clear error rather than a SIGBUS."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        poison_list: str | os.PathLike[str] | Sequence[int] | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> None:
        self.path = os.fspath(path)
        _check_page_size(page_size)
        try:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise SourceError(f"cannot open image {self.path!r}: {e.strerror}") from e
        try:
            size = os.fstat(self._fd).st_size
            if size == 0:
                raise SourceError(f"image {self.path!r} is empty")
            if size % page_size:
                raise SourceError(
                    f"image {self.path!r} is {size} bytes, not a multiple of the page size "
                    f"{page_size}"
                )
            super().__init__(size, page_size)
            if isinstance(poison_list, (str, os.PathLike)):
                poison_list = parse_poison_list(poison_list, page_size=page_size, size=size)
            if poison_list:
                self.add_poison(poison_list)
        except BaseException:
            os.close(self._fd)
            raise

    def read_layout(self) -> ReadLayout:
        return ReadLayout(data_fd=self._fd, ranges=[(0, 0, self.size)])

    def _read(self, offset: int, buf: memoryview) -> None:
        done = 0
        while done < len(buf):
            try:
                n = os.preadv(self._fd, [buf[done:]], offset + done)
            except OSError as e:
                raise SourceError(f"reading image {self.path!r} at {offset + done:#x}: {e}") from e
            if n == 0:
                raise SourceError(
                    f"image {self.path!r} ended at {offset + done:#x} (truncated while serving?)"
                )
            done += n

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _read_maps(pid: int) -> list[tuple[int, int]]:
    try:
        with open(f"/proc/{pid}/maps") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise SourceError(f"process {pid} does not exist") from None
    except OSError as e:
        raise SourceError(f"cannot read /proc/{pid}/maps: {e.strerror}") from e
    out = []
    for line in lines:
        lo, hi = line.split(None, 1)[0].split("-")
        out.append((int(lo, 16), int(hi, 16)))
    return out


def _covered(maps: list[tuple[int, int]], start: int, end: int) -> bool:
    """Whether [start, end) lies inside the union of (sorted, adjacent-allowed) mappings."""
    pos = start
    for lo, hi in maps:
        if hi <= pos:
            continue
        if lo > pos:
            return False
        pos = hi
        if pos >= end:
            return True
    return pos >= end


class ProcessBackend(Backend):
    """The memory of a live (stopped) VMM process: `ranges` (address, length), concatenated in
    order, form the guest memory space. Read through /proc/PID/mem: a poisoned page there is an
    EIO, never a SIGBUS. Poison markers are found up front in /proc/PID/pagemap (needs
    CAP_SYS_ADMIN to see them) and, whatever the pagemap said, any page that fails to read
    becomes POISONED from then on."""

    def __init__(
        self,
        pid: int,
        ranges: Sequence[tuple[int, int]],
        poison_list: str | os.PathLike[str] | Sequence[int] | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
        *,
        scan_pagemap: bool = True,
    ) -> None:
        self.pid = pid
        _check_page_size(page_size)
        if not ranges:
            raise SourceError("no memory ranges given")
        maps = _read_maps(pid)
        # (guest_offset, address, length) per range; guest offsets are cumulative.
        self._ranges: list[tuple[int, int, int]] = []
        goff = 0
        for addr, length in ranges:
            if addr % page_size or length % page_size or length <= 0:
                raise SourceError(
                    f"range {addr:#x}:{length:#x} is not page-aligned (page size {page_size})"
                )
            if not _covered(maps, addr, addr + length):
                raise SourceError(
                    f"range {addr:#x}:{length:#x} is not inside the mappings of process {pid}"
                )
            self._ranges.append((goff, addr, length))
            goff += length
        super().__init__(goff, page_size)
        self._starts = [g for g, _, _ in self._ranges]
        try:
            self._fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SourceError(f"process {pid} does not exist") from None
        except OSError as e:
            raise SourceError(f"cannot open /proc/{pid}/mem: {e.strerror}") from e
        try:
            self._pagemap_fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._pagemap_fd = -1  # then every unreadable page counts as poisoned
        try:
            self.pagemap_poisoned = 0
            if scan_pagemap:
                self.pagemap_poisoned = self._scan_pagemap()
            if isinstance(poison_list, (str, os.PathLike)):
                poison_list = parse_poison_list(poison_list, page_size=page_size, size=self.size)
            if poison_list:
                self.add_poison(poison_list)
        except BaseException:
            self.close()
            raise

    def _scan_pagemap(self) -> int:
        """Mark pages whose pagemap entry is a uffd poison marker. Returns how many."""
        found = 0
        sys_ps = os.sysconf("SC_PAGE_SIZE")
        fd = self._pagemap_fd
        if fd < 0:
            return 0  # no pagemap to read: unreadable pages are found by EIO instead
        chunk_pages = 1 << 16
        for goff, addr, length in self._ranges:
            vpn0 = addr // sys_ps
            npages = length // sys_ps
            done = 0
            while done < npages:
                n = min(chunk_pages, npages - done)
                data = os.pread(fd, n * 8, (vpn0 + done) * 8)
                if not data:
                    raise SourceGone(f"process {self.pid} exited")
                for m in _PAGEMAP_POISON_RE.finditer(data):
                    if m.start() % 8:
                        continue
                    page = done + m.start() // 8
                    if self.mark_poisoned(goff + page * sys_ps):
                        found += 1
                done += len(data) // 8
        return found

    def _locate(self, offset: int) -> tuple[int, int, int]:
        """(index of range, address of offset, bytes left in that range)."""

        i = bisect.bisect_right(self._starts, offset) - 1
        goff, addr, length = self._ranges[i]
        return i, addr + (offset - goff), length - (offset - goff)

    def read_layout(self) -> ReadLayout:
        return ReadLayout(data_fd=self._fd, ranges=list(self._ranges))

    def _gone(self) -> SourceGone:
        return SourceGone(f"process {self.pid} exited: its memory can no longer be read")

    def _read(self, offset: int, buf: memoryview) -> None:
        ps = self.page_size
        pos = 0
        end = len(buf)
        while pos < end:
            page = (offset + pos) // ps
            if self._poison.get(page):
                pos += ps
                continue
            # A segment of not-known-poisoned pages, within one range.
            nxt = self._poison.find_set(page, (offset + end) // ps)
            seg_end = end if nxt < 0 else nxt * ps - offset
            _, addr, left = self._locate(offset + pos)
            seg_end = min(seg_end, pos + left)
            pos = self._read_segment(offset, buf, pos, seg_end, addr)

    def _read_segment(self, offset: int, buf: memoryview, pos: int, end: int, addr: int) -> int:
        ps = self.page_size
        while pos < end:
            try:
                n = os.preadv(self._fd, [buf[pos:end]], addr)
            except OSError as e:
                if e.errno in (errno.EIO, errno.EFAULT, _EHWPOISON):
                    # The first page cannot be read: poisoned from now on (or an error).
                    self._unreadable(offset + pos, addr)
                    pos += ps
                    addr += ps
                    continue
                if e.errno == errno.ESRCH:
                    raise self._gone() from e
                raise SourceError(f"reading process {self.pid} at {addr:#x}: {e}") from e
            if n == 0:
                # The mm is gone (process exited): /proc/PID/mem reads as end of file.
                raise self._gone()
            # A short read stops at an unreadable page: the next pread starts there and
            # its error names it. A partial page is never served: it is re-read whole, and a
            # page that cannot be read whole is poisoned.
            if n < ps:
                self._unreadable(offset + pos, addr)
                n = ps
            n -= n % ps
            pos += n
            addr += n
        return pos

    def _unreadable(self, offset: int, addr: int) -> None:
        """A page that /proc/PID/mem cannot read. A poison marker (or hardware poison) has a
        swap-type pagemap entry (bit 62; type and offset hidden without CAP_SYS_ADMIN): that
        page is POISONED from now on. An entry with nothing at all (not present, not swapped)
        is a hole, e.g. a userfaultfd-registered page the VMM has not populated: its content
        is unknown, but it is not poison, so the read fails instead (never data, never zero,
        and no false poison). Without a readable pagemap every unreadable page is poison."""
        entry = None
        if self._pagemap_fd >= 0:
            sys_ps = os.sysconf("SC_PAGE_SIZE")
            try:
                raw: bytes | None = os.pread(self._pagemap_fd, 8, addr // sys_ps * 8)
            except OSError:
                raw = None
            if raw is not None and len(raw) == 0:
                raise self._gone()
            if raw is not None and len(raw) == 8:
                (entry,) = struct.unpack("<Q", raw)
        if entry is not None and not entry & (3 << 62):
            raise SourceError(
                f"process {self.pid}: page at {addr:#x} (guest offset {offset:#x}) cannot be "
                "read and is not poisoned: nothing is mapped there (a userfaultfd-registered "
                "page not yet populated?)"
            )
        self.mark_poisoned(offset)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._pagemap_fd >= 0:
            os.close(self._pagemap_fd)
            self._pagemap_fd = -1
