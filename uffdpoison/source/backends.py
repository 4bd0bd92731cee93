"""Where the source's guest memory comes from: a snapshot image, a live process, or a buffer.

A backend opens what is served and says where its bytes are (``guest()``: the C view the data
planes read through, csrc/guest.c). Reading classifies every unit as DATA, ZERO or POISONED
without ever touching poisoned memory directly (no SIGBUS in the source: a live process is read
through /proc/PID/mem, where poison is an EIO, never a signal).

Page state lives in bitmaps (one bit a page), never in per-page Python objects: a guest may
have hundreds of millions of pages.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from array import array
from collections.abc import Iterable, Sequence
from typing import Any

from uffdpoison.kernel import pagemap
from uffdpoison.kernel.planes import Guest
from uffdpoison.owned import Owned
from uffdpoison.protocol import PageKind
from uffdpoison.units import parse_int

log = logging.getLogger(__name__)

__all__ = [
    "Backend",
    "ImageBackend",
    "MemoryBackend",
    "ProcessBackend",
    "SourceError",
    "SourceGone",
    "parse_poison_list",
]

DEFAULT_PAGE_SIZE = 4096

_NONZERO_RE = re.compile(rb"[^\x00]")


# A poison list: a file of offsets (parse_poison_list), the offsets themselves, or none.
PoisonList = str | os.PathLike[str] | Iterable[int] | None


class SourceError(Exception):
    """A source backend cannot do what was asked (bad input, unreadable memory)."""


class SourceGone(SourceError):
    """The served process exited: its memory can no longer be read."""


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


class Backend(Owned):
    """Guest memory of ``size`` bytes in ``page_size`` base pages, plus which are poisoned.

    Subclasses open what they serve and say where its bytes are (``_guest``); reading is C's
    (csrc/guest.c), which also marks any page it finds unreadable as poisoned, in the same
    bitmap."""

    page_size: int
    size: int
    _guest: Guest | None = None

    def __init__(
        self, size: int, page_size: int, poison: PoisonList, what: str = "guest memory"
    ) -> None:
        _check_page_size(page_size)
        if size <= 0:
            raise SourceError(f"{what} is empty")
        if size % page_size:
            raise SourceError(
                f"{what} is {size} bytes, not a multiple of the page size {page_size}"
            )
        self.page_size = page_size
        self.size = size
        self.npages = size // page_size
        # One bit a base page, shared with C (which sets bits found by EIO with an atomic OR).
        self.poison_bits = bytearray((self.npages + 7) // 8)
        self._guest: Guest | None = None
        if isinstance(poison, (str, os.PathLike)):
            poison = parse_poison_list(poison, page_size=page_size, size=size)
        self.add_poison(poison or ())

    @property
    def huge_page_size(self) -> int:
        """The guest's huge-page size for the Welcome: a base page above 4 KiB is one (a
        hugetlb guest served with --page-size 2M), else 0."""
        return self.page_size if self.page_size > DEFAULT_PAGE_SIZE else 0

    # -- poison set ---------------------------------------------------------------------------

    def mark_poisoned(self, offset: int) -> bool:
        """Record the base page at byte ``offset`` as poisoned (terminal). True if new."""
        i = offset // self.page_size
        new = not self.poison_bits[i >> 3] & (1 << (i & 7))
        self.poison_bits[i >> 3] |= 1 << (i & 7)
        return new

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

    def poisoned_count(self, unit: int | None = None) -> int:
        """Poisoned units known now (a unit is poisoned if any base page in it is)."""
        unit = self.check_unit(unit)
        if unit == self.page_size:
            return int.from_bytes(self.poison_bits, "little").bit_count()
        return len(self.poisoned_offsets(unit))

    def poisoned_offsets(self, unit: int | None = None) -> array:
        """Byte offsets of poisoned units, ascending, as array('Q'). A unit is poisoned if any
        base page in it is."""
        unit = self.check_unit(unit)
        ratio = unit // self.page_size
        out = array("Q")
        bits = self.poison_bits
        for m in _NONZERO_RE.finditer(bits):  # whole bytes searched in C
            byte = m.start()
            for k in range(8):
                if bits[byte] >> k & 1:
                    u = (byte * 8 + k) // ratio
                    if not out or out[-1] != u * unit:
                        out.append(u * unit)
        return out

    # -- reading ------------------------------------------------------------------------------

    def guest(self) -> Guest:
        """The C view of this memory, which the data planes read through (made once)."""
        if self._guest is None:
            size, ps, bits = self.size, self.page_size, self.poison_bits
            self._guest = Guest(size=size, base_page_size=ps, poison_bits=bits, **self._where())
        return self._guest

    def _where(self) -> dict[str, Any]:
        """Where the bytes are, as Guest's keyword arguments."""
        raise NotImplementedError

    def start_epoch(self) -> bool:
        """Begin a precopy epoch: from now on the guest can tell which pages changed
        (``up_guest_changed``). False if this memory cannot tell (then every CLEAN is decided
        by comparing digests)."""
        return False

    def read(
        self, offset: int, count: int, unit: int | None = None
    ) -> tuple[list[PageKind], bytes]:
        """Read ``count`` units at ``offset`` as the data planes do: each unit's kind and the
        bytes (meaningful for DATA units). Raises SourceError naming what cannot be read,
        SourceGone once the served process exited."""
        unit = self.check_unit(unit)
        if offset % unit or offset < 0 or count < 0 or offset + count * unit > self.size:
            raise SourceError(
                f"read of {count} units of {unit} bytes at {offset:#x} is outside memory of "
                f"{self.size:#x} bytes or not aligned"
            )
        try:
            kinds, data = self.guest().read(offset, count, unit)
        except ProcessLookupError:
            raise SourceGone(
                "the served process exited: its memory can no longer be read"
            ) from None
        except OSError as e:
            raise SourceError(str(e)) from None
        return [PageKind(k) for k in kinds], data

    def close(self) -> None:
        if self._guest is not None:
            self._guest.close()
            self._guest = None


class MemoryBackend(Backend):
    """An in-memory guest (tests, benchmarks). The caller must not change the buffer while it
    is served (data sent would be torn)."""

    def __init__(
        self,
        buffer: bytes | bytearray | memoryview,
        poisoned_offsets: Iterable[int] = (),
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> None:
        self._buf = memoryview(buffer).cast("B")
        super().__init__(len(self._buf), page_size, poisoned_offsets)

    def _where(self) -> dict[str, Any]:
        return {"mem": self._buf}

    def close(self) -> None:
        super().close()
        self._buf.release()


class _FdBackend(Backend):
    """A backend read with pread on an fd it owns."""

    _fd = -1
    _pagemap_fd = -1

    def close(self) -> None:
        super().close()
        for name in ("_fd", "_pagemap_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)


class ImageBackend(_FdBackend):
    """A raw snapshot file: file offset 0 is guest byte 0. Read with pread, never mmap, so a
    file truncated under us is a clear error rather than a SIGBUS."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        poison_list: PoisonList = None,
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> None:
        self.path = os.fspath(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise SourceError(f"cannot open image {self.path!r}: {e.strerror}") from e
        try:
            st = os.fstat(self._fd)
            if not stat.S_ISREG(st.st_mode):
                raise SourceError(f"image {self.path!r} is not a regular file")
            super().__init__(st.st_size, page_size, poison_list, f"image {self.path!r}")
        except BaseException:
            self.close()
            raise

    def _where(self) -> dict[str, Any]:
        return {"data_fd": self._fd, "ranges": [(0, 0, self.size)]}

    def start_epoch(self) -> bool:
        return True  # an image does not change while it is served


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


class ProcessBackend(_FdBackend):
    """The memory of a live (stopped) VMM process: ``ranges`` (address, length), concatenated
    in order, form the guest memory space. Read through /proc/PID/mem: a poisoned page there is
    an EIO, never a SIGBUS. Poison markers are found up front in /proc/PID/pagemap (needs
    CAP_SYS_ADMIN to see them) and, whatever the pagemap said, any page that fails to read
    becomes POISONED from then on, unless pagemap shows nothing mapped there (a hole: the read
    fails instead)."""

    def __init__(
        self,
        pid: int,
        ranges: Sequence[tuple[int, int]],
        poison_list: PoisonList = None,
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
        super().__init__(goff, page_size, poison_list)
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
            self.pagemap_poisoned = self._scan_pagemap() if scan_pagemap else 0
        except BaseException:
            self.close()
            raise

    def start_epoch(self) -> bool:
        """Clear the process's soft-dirty bits (``4 > /proc/PID/clear_refs``): a page written
        from now on has pagemap bit 55 set. Nothing else may clear them while served."""
        if self._pagemap_fd < 0:
            return False
        if not pagemap.soft_dirty_works():
            log.info("this kernel tracks no soft-dirty bits (CONFIG_MEM_SOFT_DIRTY): CLEAN "
                     "answers compare digests")  # fmt: skip
            return False
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as f:
                f.write("4")
        except OSError as e:
            log.warning("process %d: cannot start a precopy epoch (clear_refs): %s; CLEAN "
                        "answers compare digests", self.pid, e.strerror)  # fmt: skip
            return False
        return True

    def _scan_pagemap(self) -> int:
        """Mark pages whose pagemap entry is a uffd poison marker. Returns how many."""
        if self._pagemap_fd < 0:
            return 0  # unreadable pages are then found by EIO instead
        found = 0
        try:
            for goff, addr, length in self._ranges:
                for k in pagemap.poison_markers(self._pagemap_fd, addr, length):
                    self.mark_poisoned(goff + k * pagemap.PAGE_SIZE)
                    found += 1
        except pagemap.ProcessGone:
            raise SourceGone(f"process {self.pid} exited") from None
        return found

    def _where(self) -> dict[str, Any]:
        fds = {"data_fd": self._fd, "pagemap_fd": self._pagemap_fd}
        return fds | {"ranges": self._ranges, "is_process": True}
