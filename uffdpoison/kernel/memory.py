"""Guest-memory stand-ins: private anon, shmem memfd and hugetlb (2 MiB) memfd mappings.

Shared kinds come with ``alias_addr``: a second mapping of the same file that is never
registered, used to fill the page cache for MINOR mode (and to read real data behind a
poison marker, which belongs to one mapping only).
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass

from uffdpoison.kernel._ffi import ffi, lib
from uffdpoison.owned import Owned

PAGE_SIZE = mmap.PAGESIZE
HUGE_PAGE_SIZE = 2 << 20
NR_HUGEPAGES = "/proc/sys/vm/nr_hugepages"


class HugePagesUnavailable(OSError):
    """Huge pages could not be reserved (not root, or not enough contiguous memory)."""


@dataclass(slots=True, eq=False)
class Mapping(Owned):
    """An mmap'ed region; ``close()`` unmaps it (and its alias and memfd)."""

    addr: int
    size: int
    page_size: int
    kind: str
    alias_addr: int | None = None
    fd: int | None = None

    def __repr__(self) -> str:
        return f"<Mapping {self.kind} {self.addr:#x}+{self.size:#x}>"

    def close(self) -> None:
        """Unmap. With non-cooperative events negotiated on a registered range, unmapping
        blocks until the UNMAP event is read: unregister or close the userfaultfd first."""
        if self.addr:
            lib.up_unmap(self.addr, self.size)
            self.addr = 0
        if self.alias_addr:
            lib.up_unmap(self.alias_addr, self.size)
            self.alias_addr = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def _base(self, offset: int, length: int, alias: bool) -> int:
        if not self.addr:
            raise ValueError(f"{self!r} is closed")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"range {offset:#x}+{length:#x} outside {self.size:#x}-byte mapping")
        if alias:
            if self.alias_addr is None:
                raise ValueError(f"a {self.kind} mapping has no alias")
            return self.alias_addr + offset
        return self.addr + offset

    def read(self, offset: int, length: int, *, alias: bool = False) -> bytes:
        """Copy out via C with the GIL released (a read of registered memory may block)."""
        src = self._base(offset, length, alias)
        out = bytearray(length)
        lib.up_memcpy(ffi.cast("uint64_t", ffi.from_buffer(out)), src, length)
        return bytes(out)

    def write(self, offset: int, data: bytes, *, alias: bool = False) -> None:
        dst = self._base(offset, len(data), alias)
        lib.up_memcpy(dst, ffi.cast("uint64_t", ffi.from_buffer(data)), len(data))

    def discard(self, offset: int, length: int) -> None:
        """Drop the pages (and any poison markers): MADV_DONTNEED for anon, MADV_REMOVE
        (punch the file) for shmem and hugetlb."""
        start = self._base(offset, length, False)
        advice = mmap.MADV_DONTNEED if self.kind == "anon" else mmap.MADV_REMOVE
        rc = lib.up_madvise(start, length, advice)
        if rc < 0:
            raise OSError(
                -rc, f"madvise({start:#x}, {length:#x}) on {self.kind}: {os.strerror(-rc)}"
            )


def _check_size(size: int, page: int, kind: str) -> None:
    if size <= 0 or size % page:
        raise ValueError(f"{kind} size {size:#x} must be a positive multiple of {page:#x}")


def anon(size: int, *, noreserve: bool = False) -> Mapping:
    """Private anonymous memory (MAP_NORESERVE: no commit charge, for huge sparse regions)."""
    _check_size(size, PAGE_SIZE, "anon")
    addr = lib.up_map_anon(size, int(noreserve))
    if addr < 0:
        raise OSError(-addr, f"mmap anon {size:#x}: {os.strerror(-addr)}")
    return Mapping(addr, size, PAGE_SIZE, "anon")


def _memfd(size: int, hugetlb: bool) -> Mapping:
    kind, page = ("hugetlb", HUGE_PAGE_SIZE) if hugetlb else ("shmem", PAGE_SIZE)
    _check_size(size, page, kind)
    fd = ffi.new("int *")
    alias = ffi.new("uint64_t *")
    addr = lib.up_map_memfd(size, int(hugetlb), fd, alias)
    if addr < 0:
        raise OSError(-addr, f"memfd {kind} {size:#x}: {os.strerror(-addr)}")
    return Mapping(addr, size, page, kind, alias[0], fd[0])


def shmem(size: int) -> Mapping:
    """MAP_SHARED memfd plus an unregistered alias mapping of the same file."""
    return _memfd(size, False)


def hugetlb(size: int) -> Mapping:
    """MFD_HUGETLB|MFD_HUGE_2MB memfd, shared, with an alias. Needs reserved huge pages."""
    return _memfd(size, True)


def of_file(path: str | os.PathLike[str], size: int, page_size: int = PAGE_SIZE) -> Mapping:
    """An existing file on tmpfs or hugetlbfs (``page_size``: its page), shared, with an
    alias; the Mapping owns the fd it opened."""
    kind = "hugetlb" if page_size > PAGE_SIZE else "shmem"
    _check_size(size, page_size, kind)
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    alias = ffi.new("uint64_t *")
    addr = lib.up_map_file(fd, size, alias)
    if addr < 0:
        os.close(fd)
        raise OSError(-addr, f"mmap {os.fspath(path)} {size:#x}: {os.strerror(-addr)}")
    return Mapping(addr, size, page_size, kind, alias[0], fd)


KINDS = ("anon", "shmem", "hugetlb")


def of_kind(kind: str, size: int) -> Mapping:
    """A mapping of one of ``KINDS`` (what a command line's --memory names)."""
    if kind not in KINDS:
        raise ValueError(f"memory kind {kind!r} is not one of {', '.join(KINDS)}")
    return anon(size) if kind == "anon" else _memfd(size, kind == "hugetlb")


def _read_nr() -> int:
    with open(NR_HUGEPAGES) as f:
        return int(f.read())


def _write_nr(n: int) -> None:
    with open(NR_HUGEPAGES, "w") as f:
        f.write(str(n))


@contextlib.contextmanager
def reserve_hugepages(count: int) -> Iterator[int]:
    """Raise vm.nr_hugepages by ``count`` 2 MiB pages; take as many back on exit (relative,
    so two users at once, a test run and a benchmark, each give back only their own)."""
    try:
        prev = _read_nr()
    except OSError as e:
        raise HugePagesUnavailable(e.errno, f"cannot read {NR_HUGEPAGES}: {e.strerror}") from e
    added = 0
    try:
        try:
            _write_nr(prev + count)
        except OSError as e:
            raise HugePagesUnavailable(
                e.errno, f"cannot set {NR_HUGEPAGES} to {prev + count}: {e.strerror}"
            ) from e
        added = max(0, _read_nr() - prev)
        if added < count:
            raise HugePagesUnavailable(
                0, f"asked the kernel for {count} more huge pages, it found only {added}"
            )
        yield count
    finally:
        with contextlib.suppress(OSError):
            if added:
                _write_nr(max(0, _read_nr() - added))
