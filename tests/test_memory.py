"""Mappings, huge page reservation, digests and zero runs."""

from __future__ import annotations

import os

import pytest

from uffdpoison.harness._ffi import ffi, lib
from uffdpoison.kernel import (
    HUGE_PAGE_SIZE,
    PAGE_SIZE,
    anon,
    digest,
    hugetlb,
    page_digests,
    reserve_hugepages,
    shmem,
)

P = PAGE_SIZE


def _nr() -> int:
    with open("/proc/sys/vm/nr_hugepages") as f:
        return int(f.read())


def test_anon_read_write_discard() -> None:
    with anon(4 * P) as m:
        assert m.kind == "anon" and m.alias_addr is None and m.fd is None
        m.write(P + 5, b"hello")
        assert m.read(P + 5, 5) == b"hello"
        m.discard(P, P)
        assert m.read(P + 5, 5) == bytes(5)
        with pytest.raises(ValueError, match="outside"):
            m.read(4 * P - 1, 2)
        with pytest.raises(ValueError, match="no alias"):
            m.read(0, 1, alias=True)
    assert m.addr == 0
    with pytest.raises(ValueError, match="multiple"):
        anon(P + 1)


def test_shmem_alias_sees_the_same_file() -> None:
    with shmem(2 * P) as m:
        assert m.kind == "shmem" and m.alias_addr and m.fd is not None
        fd = m.fd
        m.write(100, b"\x01\x02", alias=True)
        assert m.read(100, 2) == b"\x01\x02"
        m.discard(0, P)  # MADV_REMOVE punches the file: both views lose it
        assert m.read(100, 2, alias=True) == b"\x00\x00"
    with pytest.raises(OSError):
        os.fstat(fd)


def test_noreserve_terabyte_mapping() -> None:
    with anon(1 << 40, noreserve=True) as m:
        m.write((1 << 40) - P, b"x")
        assert m.read((1 << 40) - P, 1) == b"x"


def test_reserve_hugepages_restores_the_count() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to change vm.nr_hugepages")
    before = _nr()
    with reserve_hugepages(2) as n:
        assert n == 2 and _nr() == before + 2
        with hugetlb(2 * HUGE_PAGE_SIZE) as m:
            assert m.kind == "hugetlb" and m.page_size == HUGE_PAGE_SIZE
            m.write(HUGE_PAGE_SIZE + 3, b"z", alias=True)
            assert m.read(HUGE_PAGE_SIZE + 3, 1) == b"z"
    assert _nr() == before
    with pytest.raises(RuntimeError), reserve_hugepages(1):
        raise RuntimeError("restores on error too")
    assert _nr() == before


def test_hugetlb_size_must_be_whole_huge_pages() -> None:
    with pytest.raises(ValueError, match="hugetlb size"):
        hugetlb(P)


def test_xxh64_known_vectors() -> None:
    # xxHash reference values for seed 0
    assert digest(b"") == 0xEF46DB3751D8E999
    assert digest(b"abc") == 0x44BC2CF5AD770999
    assert digest(memoryview(b"xabc")[1:]) == 0x44BC2CF5AD770999


def test_xxh64_matches_the_toucher_implementation() -> None:
    # the toucher's page digests (what touches verify) are the wire's digest, byte for byte
    for n in (0, 1, 3, 4, 7, 8, 31, 32, 33, 63, 64, 100, 4096, 4099):
        data = os.urandom(n)
        assert digest(data) == lib.up_xxh64_buffer(ffi.from_buffer(data), n, 0), n


def test_page_digests() -> None:
    buf = bytearray(6 * P)
    buf[2 * P] = 1
    buf[3 * P + P - 1] = 2
    d = page_digests(buf, P)
    assert d.typecode == "Q" and len(d) == 6
    assert d[0] == d[1] == d[4] == digest(bytes(P)) and d[2] != d[3]
    assert d[2] == digest(bytes(buf[2 * P : 3 * P]))
    assert len(page_digests(b"", P)) == 0
    with pytest.raises(ValueError, match="whole number"):
        page_digests(b"x" * (P + 1), P)
