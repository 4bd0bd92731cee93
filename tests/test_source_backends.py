"""Source backends against real files and a real child process holding uffd poison markers."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from live_process import live_process, page_bytes

from uffdpoison.protocol import PageKind
from uffdpoison.source.backends import (
    ImageBackend,
    MemoryBackend,
    ProcessBackend,
    SourceError,
    SourceGone,
    parse_poison_list,
)

PS = 4096


K = PageKind


# -- poison list ------------------------------------------------------------------------------


def test_poison_list_good(tmp_path: Path) -> None:
    p = tmp_path / "poison.txt"
    p.write_text("# header\n\n0x2000\n4096   # a comment\n0x2000\n  12288\n")
    assert parse_poison_list(p, page_size=PS, size=16 * PS) == [0x1000, 0x2000, 0x3000]


@pytest.mark.parametrize(
    ("content", "line", "what"),
    [
        ("4096\nbanana\n", 2, "not an offset"),
        ("4096\n\n4097\n", 3, "not aligned"),
        ("# x\n0x10000\n", 2, "past the end"),
        ("0x\n", 1, "not an offset"),
        ("-4096\n", 1, "negative"),
    ],
)
def test_poison_list_bad(tmp_path: Path, content: str, line: int, what: str) -> None:
    p = tmp_path / "bad.txt"
    p.write_text(content)
    with pytest.raises(SourceError) as e:
        parse_poison_list(p, page_size=PS, size=16 * PS)
    assert f"{p}:{line}:" in str(e.value)
    assert what in str(e.value)


def test_poison_list_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"nope\.txt"):
        parse_poison_list(tmp_path / "nope.txt", page_size=PS, size=PS)


def test_poison_bitmap_is_shared_and_counted() -> None:
    be = MemoryBackend(bytearray(2000 * PS))
    for i in (5, 6, 200, 999, 1999):
        assert be.mark_poisoned(i * PS)
    assert not be.mark_poisoned(999 * PS)
    be.poison_bits[10] |= 1  # a bit C set (atomic OR on the shared buffer) counts too
    assert be.poisoned_count() == 6
    assert list(be.poisoned_offsets()) == [i * PS for i in (5, 6, 80, 200, 999, 1999)]
    assert list(be.poisoned_offsets(4 * PS)) == [i * PS for i in (4, 80, 200, 996, 1996)]


def test_image_size_errors(tmp_path: Path) -> None:
    odd = tmp_path / "odd.img"
    odd.write_bytes(b"x" * (PS + 1))
    with pytest.raises(SourceError, match=r"odd\.img.*not a multiple of the page size"):
        ImageBackend(odd)
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    with pytest.raises(SourceError, match="empty"):
        ImageBackend(empty)
    with pytest.raises(SourceError, match=r"missing\.img"):
        ImageBackend(tmp_path / "missing.img")


def test_image_classifies_and_reads(tmp_path: Path) -> None:
    n = 16
    pages = [bytes(PS) if i % 4 == 1 else page_bytes(i) for i in range(n)]
    img = tmp_path / "guest.img"
    img.write_bytes(b"".join(pages))
    plist = tmp_path / "poison.txt"
    plist.write_text("0x3000\n0xa000\n")
    with ImageBackend(img, poison_list=plist) as be:
        assert be.size == n * PS and be.poisoned_count() == 2
        kinds, buf = be.read(0, n)
        for i in range(n):
            want = K.POISONED if i in (3, 10) else K.ZERO if i % 4 == 1 else K.DATA
            assert kinds[i] == want, i
            if want is K.DATA:
                assert buf[i * PS : (i + 1) * PS] == pages[i]
        # A read in the middle.
        assert be.read(9 * PS, 2)[0] == [K.ZERO, K.POISONED]
        with pytest.raises(SourceError, match="outside memory"):
            be.read(15 * PS, 2)
        with pytest.raises(SourceError, match="not aligned"):
            be.read(100, 1)


def test_image_truncated_under_us(tmp_path: Path) -> None:
    img = tmp_path / "guest.img"
    img.write_bytes(b"\x01" * (8 * PS))
    with ImageBackend(img) as be:
        os.truncate(img, 2 * PS)
        with pytest.raises(SourceError, match="truncated"):
            be.read(4 * PS, 1)


def test_huge_unit_poisoned_if_any_base_page_is() -> None:
    huge = 2 << 20
    buf = bytearray(3 * huge)
    buf[huge + 5] = 7  # unit 1 data, unit 0 and 2 zero
    poisoned = 2 * huge + 511 * PS  # the last base page of unit 2
    be = MemoryBackend(buf, [poisoned])
    assert be.poisoned_count() == 1
    assert list(be.poisoned_offsets(huge)) == [2 * huge]
    assert be.poisoned_count(huge) == 1
    assert be.read(0, 3, huge)[0] == [K.ZERO, K.DATA, K.POISONED]
    with pytest.raises(SourceError, match="not a power-of-two multiple"):
        be.read(0, 3, 3 * PS)
    with pytest.raises(SourceError, match="not a multiple of page size"):
        MemoryBackend(bytearray(3 * PS)).check_unit(2 * PS)


# -- live process backend ---------------------------------------------------------------------

N = 64
POISON = (0, 5, 6, 31, 63)
ZERO = (2, 40)
UNTOUCHED = (7, 50, 51)


@pytest.fixture
def child() -> Iterator[tuple[subprocess.Popen[str], int]]:
    with live_process(N, POISON, ZERO, UNTOUCHED) as child:
        yield child


def _expected_kind(i: int) -> PageKind:
    if i in POISON:
        return K.POISONED
    if i in ZERO or i in UNTOUCHED:
        return K.ZERO
    return K.DATA


def _check_served(be: ProcessBackend, base: int = 0, pages: range = range(N)) -> None:
    kinds, buf = be.read(base, len(pages))
    for k, i in enumerate(pages):
        assert kinds[k] == _expected_kind(i), i
        if kinds[k] is K.DATA:
            assert buf[k * PS : (k + 1) * PS] == page_bytes(i), i


@pytest.mark.parametrize("scan_pagemap", [True, False], ids=["pagemap", "eio"])
def test_process_backend_finds_exact_poison(
    child: tuple[subprocess.Popen[str], int], scan_pagemap: bool
) -> None:
    proc, addr = child
    with ProcessBackend(proc.pid, [(addr, N * PS)], scan_pagemap=scan_pagemap) as be:
        if scan_pagemap:
            assert be.pagemap_poisoned == len(POISON)
            assert list(be.poisoned_offsets()) == [i * PS for i in POISON]
        else:
            assert be.poisoned_count() == 0  # nothing known until a read hits EIO
        _check_served(be)
        assert list(be.poisoned_offsets()) == [i * PS for i in POISON]
        # Served again: poison is terminal, data still byte-exact.
        _check_served(be)
        # Small reads straddling the poison.
        _check_served(be, 4 * PS, range(4, 8))
    assert proc.poll() is None  # the served process is untouched


def test_process_backend_concatenates_ranges(child: tuple[subprocess.Popen[str], int]) -> None:
    proc, addr = child
    half = N // 2 * PS
    # Second half first: guest offset 0 is page N/2 of the child's mapping.
    with ProcessBackend(proc.pid, [(addr + half, half), (addr, half)], scan_pagemap=False) as be:
        assert be.size == N * PS
        kinds, buf = be.read(0, N)
        order = list(range(N // 2, N)) + list(range(N // 2))
        for k, i in enumerate(order):
            assert kinds[k] == _expected_kind(i), (k, i)
            if kinds[k] is K.DATA:
                assert buf[k * PS : (k + 1) * PS] == page_bytes(i)


def test_process_backend_poison_list_adds(
    child: tuple[subprocess.Popen[str], int], tmp_path: Path
) -> None:
    proc, addr = child
    plist = tmp_path / "extra.txt"
    plist.write_text("0x9000\n")  # page 9 holds data, but the operator says it is poisoned
    with ProcessBackend(proc.pid, [(addr, N * PS)], poison_list=plist) as be:
        assert list(be.poisoned_offsets()) == sorted(i * PS for i in (*POISON, 9))
        assert be.read(9 * PS, 1)[0] == [K.POISONED]


def test_process_backend_source_gone(child: tuple[subprocess.Popen[str], int]) -> None:
    proc, addr = child
    with ProcessBackend(proc.pid, [(addr, N * PS)]) as be:
        _check_served(be, PS, range(1, 3))
        proc.kill()
        proc.wait()
        with pytest.raises(SourceGone):
            be.read(8 * PS, 4)
        with pytest.raises(SourceGone):
            be.read(0, N)


def test_process_backend_bad_ranges(child: tuple[subprocess.Popen[str], int]) -> None:
    proc, addr = child
    with pytest.raises(SourceError, match="not inside the mappings"):
        ProcessBackend(proc.pid, [(0x1000, PS)])
    with pytest.raises(SourceError, match="not page-aligned"):
        ProcessBackend(proc.pid, [(addr + 1, PS)])
    with pytest.raises(SourceError, match="no memory ranges"):
        ProcessBackend(proc.pid, [])


def test_process_backend_gone_pid() -> None:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    with pytest.raises(SourceError, match=f"process {p.pid} does not exist"):
        ProcessBackend(p.pid, [(0x1000, PS)])


def test_process_backend_unpopulated_uffd_page_is_an_error_not_poison() -> None:
    with live_process(16, [3], untouched=[7], keep=True) as (proc, addr):
        with ProcessBackend(proc.pid, [(addr, 16 * PS)], scan_pagemap=False) as be:
            with pytest.raises(SourceError, match="not poisoned: nothing is mapped") as e:
                be.read(0, 16)
            assert not isinstance(e.value, SourceGone)
            # Page 3 (a marker, found by EIO on the way) is poisoned; page 7 (a hole) is not.
            assert list(be.poisoned_offsets()) == [3 * PS]
            assert be.read(0, 7)[0] == [*[K.DATA] * 3, K.POISONED, *[K.DATA] * 3]
        assert proc.poll() is None
