"""The C reference: local handler, TCP page source, remote handler, ping-pong; real kernel."""

from __future__ import annotations

import contextlib
import mmap
import os
import socket
from collections.abc import Iterator

import pytest

from uffdpoison.harness._ffi import ffi, lib
from uffdpoison.harness.cref import (
    FLAG_ZERO_DETECT,
    KIND_DATA,
    KIND_ERROR,
    KIND_POISONED,
    KIND_ZERO,
    REPLY,
    LocalHandler,
    PageSource,
    RemoteHandler,
    pingpong,
    poison_bitmap,
    request_bytes,
    uffd_open,
    uffd_register,
)
from uffdpoison.harness.toucher import BUS_ADRERR, BUS_MCEERR_AR, OUTCOME_SIGBUS, Toucher

PAGE = mmap.PAGESIZE
PAGES = 32
POISONED = (3, 17, 31)
ZEROS = (5, 6)


def xxh(data: bytes) -> int:
    return int(lib.up_xxh64_buffer(data, len(data), 0))


@pytest.fixture
def source_data() -> bytearray:
    data = bytearray(os.urandom(PAGES * PAGE))
    for z in ZEROS:
        data[z * PAGE : (z + 1) * PAGE] = bytes(PAGE)
    return data


@pytest.fixture
def region() -> Iterator[tuple[int, int]]:
    """(uffd, base) of a private anonymous region of PAGES pages registered MISSING."""
    m = mmap.mmap(-1, PAGES * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = int(ffi.cast("uintptr_t", ffi.from_buffer(m)))
    uffd = uffd_open()
    try:
        uffd_register(uffd, base, PAGES * PAGE)
        yield uffd, base
    finally:
        os.close(uffd)  # wakes any still-blocked toucher: its retry maps a zero page
        m.close()


def check_touch_results(r, base: int, data: bytes) -> None:
    for i in range(PAGES):
        if i in POISONED:
            assert r.outcome[i] == OUTCOME_SIGBUS, i
            assert r.si_addr[i] == base + i * PAGE + 7
            assert r.si_code[i] in (BUS_ADRERR, BUS_MCEERR_AR)
        else:
            assert r.outcome[i] == 0, i
            assert r.value[i] == data[i * PAGE + 7]
            assert r.digest[i] == xxh(bytes(data[i * PAGE : (i + 1) * PAGE])), i


def test_local_handler_copies_and_poisons(region, source_data) -> None:
    uffd, base = region
    addrs = [base + i * PAGE + 7 for i in range(PAGES)]
    with LocalHandler(
        uffd, base, PAGES * PAGE, src=source_data, poison=poison_bitmap(PAGES, POISONED)
    ) as h:
        r = Toucher(addrs, threads=2, digest=True).run(timeout=10)
        check_touch_results(r, base, source_data)
        # Fault messages are counted before they are resolved: final once the touches are done.
        faults = h.stats().faults
        assert faults >= PAGES
        # Poison markers stay: a second touch SIGBUSes again without a new fault message.
        again = Toucher([base + p * PAGE for p in POISONED]).run(timeout=10)
        assert again.sigbus == len(POISONED)
        assert h.stats().faults == faults
    # Placement counters lag the woken toucher; after stop() (a join) they are final.
    st = h.stop()
    assert st.poisons == len(POISONED)
    assert st.copies + st.eexist == faults - len(POISONED)
    assert st.copies >= PAGES - len(POISONED)
    assert st.errors == 0
    assert st.cpu in os.sched_getaffinity(0)


def test_local_handler_pinned(region, source_data) -> None:
    uffd, base = region
    cpu = min(os.sched_getaffinity(0))
    with LocalHandler(uffd, base, PAGES * PAGE, src=source_data, cpu=cpu) as h:
        r = Toucher([base + i * PAGE for i in range(PAGES)], cpus=[cpu]).run(timeout=10)
        assert r.ok == PAGES
        assert h.stats().cpu == cpu
        assert r.cpus == [cpu]


def test_local_handler_rejects_bad_geometry(region, source_data) -> None:
    uffd, base = region
    with pytest.raises(ValueError, match="aligned"):
        LocalHandler(uffd, base + 1, PAGE, src=source_data)
    with pytest.raises(ValueError, match="src buffer has"):
        LocalHandler(uffd, base, PAGES * PAGE, src=bytes(PAGE))
    with pytest.raises(ValueError, match="poison bitmap has"):
        LocalHandler(uffd, base, PAGES * PAGE, src=source_data, poison=b"\x01")


def read_reply(s: socket.socket, count: int) -> list[tuple[int, int, int, bytes]]:
    """Runs (offset, count, kind, payload) until ``count`` pages are covered."""
    f = s.makefile("rb")
    runs = []
    got = 0
    while got < count:
        off, n, kind = REPLY.unpack(f.read(REPLY.size))
        payload = f.read(n * PAGE) if kind == KIND_DATA else b""
        runs.append((off, n, kind, payload))
        if kind == KIND_ERROR:
            break
        got += n
    f.close()
    return runs


def test_source_serves_runs_over_loopback(source_data) -> None:
    with (
        PageSource(source_data, poison=poison_bitmap(PAGES, POISONED)) as src,
        src.connect() as s,
    ):
        s.sendall(request_bytes(2 * PAGE, 6, FLAG_ZERO_DETECT))
        runs = read_reply(s, 6)
        assert [(o // PAGE, n, k) for o, n, k, _ in runs] == [
            (2, 1, KIND_DATA),
            (3, 1, KIND_POISONED),
            (4, 1, KIND_DATA),
            (5, 2, KIND_ZERO),
            (7, 1, KIND_DATA),
        ]
        assert runs[0][3] == source_data[2 * PAGE : 3 * PAGE]
        assert runs[2][3] == source_data[4 * PAGE : 5 * PAGE]
        # Without zero detection, zero pages travel as data; padding is skipped.
        s.sendall(request_bytes(5 * PAGE, 2, pad=48))
        assert read_reply(s, 2) == [(5 * PAGE, 2, KIND_DATA, bytes(2 * PAGE))]
        # Outside the buffer: one ERROR header, the connection stays usable.
        s.sendall(request_bytes(PAGES * PAGE, 1))
        assert read_reply(s, 1)[0][1:3] == (0, KIND_ERROR)
        s.sendall(request_bytes(0, 1))
        assert read_reply(s, 1)[0][3] == source_data[:PAGE]
    st = src.stop()  # final counters (they are bumped after each reply is sent)
    assert (st.requests, st.connections, st.errors) == (4, 1, 0)
    assert st.pages == 6 + 2 + 1


def test_remote_handler_through_source(region, source_data) -> None:
    uffd, base = region
    addrs = [base + i * PAGE + 7 for i in range(PAGES)]
    with (
        PageSource(source_data, poison=poison_bitmap(PAGES, POISONED)) as src,
        src.connect() as sock,
        RemoteHandler(uffd, base, PAGES * PAGE, sock=sock) as h,
    ):
        r = Toucher(addrs, threads=2, digest=True).run(timeout=10)
        check_touch_results(r, base, source_data)
    st = h.stop()
    assert st.errors == 0, os.strerror(st.last_errno)
    assert st.poisons == len(POISONED)
    assert st.zeropages == len(ZEROS)
    assert st.copies == PAGES - len(POISONED) - len(ZEROS)
    assert st.requests == st.faults == PAGES
    assert src.stop().requests == PAGES


def test_pingpong_returns_n_latencies(source_data) -> None:
    with PageSource(source_data) as src, src.connect() as s:
        ns = pingpong(s, request_bytes(PAGE, 1), REPLY.size + PAGE, 200)
        assert len(ns) == 200
        assert all(v > 0 for v in ns)
        padded = pingpong(s, request_bytes(0, 2, pad=48), REPLY.size + 2 * PAGE, 50)
        assert len(padded) == 50
    assert src.stop().requests == 250


def test_pingpong_reports_a_closed_peer() -> None:
    a, b = socket.socketpair()
    with a:
        b.close()
        with pytest.raises(OSError):
            pingpong(a, b"x" * 16, 16, 3)


def test_poison_bitmap_checks_indexes() -> None:
    assert poison_bitmap(10, [0, 9]) == bytearray([0x01, 0x02])
    with pytest.raises(ValueError, match="outside"):
        poison_bitmap(10, [10])


@pytest.mark.parametrize("handler", ["local", "remote"])
def test_hugetlb_pages(handler: str) -> None:
    """2 MiB pages: COPY, zero (a COPY of zeros: hugetlb has no ZEROPAGE) and POISON of a
    whole huge page."""
    from uffdpoison.kernel import (
        HUGE_PAGE_SIZE,
        HugePagesUnavailable,
        RegisterMode,
        Userfaultfd,
        hugetlb,
        reserve_hugepages,
    )

    huge = HUGE_PAGE_SIZE
    data = bytearray(os.urandom(3 * huge))
    data[2 * huge :] = bytes(huge)  # page 2 is all zero
    poison = poison_bitmap(3, [1])
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(reserve_hugepages(3))  # puts the count back on exit
        except HugePagesUnavailable as e:
            pytest.skip(f"no 2 MiB huge pages on this machine: {e}")
        with hugetlb(3 * huge) as mem, Userfaultfd.create() as uffd:
            uffd.register(mem.addr, mem.size, RegisterMode.MISSING)
            addrs = [mem.addr + i * huge + 4096 * 3 + 1 for i in range(3)]
            h: LocalHandler | RemoteHandler
            if handler == "local":
                h = LocalHandler(
                    uffd.fileno(), mem.addr, mem.size, src=data, page_size=huge, poison=poison
                )
                src = None
                sock = None
            else:
                src = PageSource(data, page_size=huge, poison=poison)
                sock = src.connect()
                h = RemoteHandler(uffd.fileno(), mem.addr, mem.size, sock=sock, page_size=huge)
            try:
                r = Toucher(addrs, digest=True, page_size=huge).run(timeout=20)
            finally:
                st = h.stop()
                if sock is not None:
                    sock.close()
                if src is not None:
                    src.stop()
            assert list(r.outcome) == [0, OUTCOME_SIGBUS, 0]
            assert r.si_addr[1] == addrs[1]
            assert r.digest[0] == xxh(bytes(data[:huge]))
            assert r.digest[2] == xxh(bytes(huge))
            assert st.poisons == 1 and st.errors == 0, os.strerror(st.last_errno)
            if handler == "remote":
                assert (st.copies, st.zeropages) == (1, 1)
            uffd.unregister(mem.addr, mem.size)
