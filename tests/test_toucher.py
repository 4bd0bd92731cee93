"""The C toucher: reads, writes, digests, threads, pinning, and SIGBUS survival in this process."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import signal
import subprocess
import sys
import time
from array import array
from collections.abc import Iterator

import pytest

from uffdpoison.harness._ffi import ffi, lib
from uffdpoison.harness.cref import LocalHandler
from uffdpoison.harness.toucher import (
    BUS_ADRERR,
    BUS_MCEERR_AR,
    OUTCOME_NOT_RUN,
    OUTCOME_OK,
    OUTCOME_SIGBUS,
    Toucher,
)
from uffdpoison.kernel import RegisterMode, Userfaultfd, anon as anon_mapping

PAGE = mmap.PAGESIZE


def address_of(m: mmap.mmap) -> int:
    return int(ffi.cast("uintptr_t", ffi.from_buffer(m)))


def sigbus_handler() -> tuple[int, int]:
    flags = ffi.new("int32_t *")
    return int(lib.up_toucher_sigbus_current(flags)), int(flags[0])


@pytest.fixture
def holed() -> Iterator[tuple[mmap.mmap, int]]:
    """A 4-page shared mapping of a memfd truncated to 1 page: pages 1-3 SIGBUS on touch."""
    fd = os.memfd_create("toucher-test-hole")
    try:
        os.ftruncate(fd, 4 * PAGE)
        m = mmap.mmap(fd, 4 * PAGE)
        m[:PAGE] = bytes(range(256)) * (PAGE // 256)
        os.ftruncate(fd, PAGE)
    finally:
        os.close(fd)
    try:
        yield m, address_of(m)
    finally:
        m.close()


@pytest.fixture
def anon() -> Iterator[tuple[mmap.mmap, int]]:
    m = mmap.mmap(-1, 16 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        yield m, address_of(m)
    finally:
        m.close()


def _xxh64_reference() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("xxhash")
    if name is None:
        return None
    libx = ctypes.CDLL(name)
    libx.XXH64.restype = ctypes.c_uint64
    libx.XXH64.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint64]
    return libx


def test_sigbus_past_eof_is_recorded_at_exact_address_repeatedly(holed) -> None:
    _, base = holed
    before = sigbus_handler()
    assert before[0] != lib.up_toucher_sigbus_own()
    addrs = [base + 5, base + PAGE + 17, base + 3 * PAGE + PAGE - 1, base + 9]
    for _ in range(5):
        r = Toucher(addrs, threads=2).run(timeout=10)
        assert list(r.outcome) == [OUTCOME_OK, OUTCOME_SIGBUS, OUTCOME_SIGBUS, OUTCOME_OK]
        assert r.sigbus_addresses() == [base + PAGE + 17, base + 4 * PAGE - 1]
        assert all(r.si_code[i] in (BUS_ADRERR, BUS_MCEERR_AR) for i in (1, 2))
        assert (r.ok, r.sigbus, r.pending) == (2, 2, 0)
        assert r.value[0] == 5 and r.value[3] == 9
        # The previous (faulthandler's) C-level handler is back, flags included.
        assert sigbus_handler() == before
        assert lib.up_toucher_sigbus_refs() == 0


def test_read_values(anon) -> None:
    m, base = anon
    m[:] = bytes((i * 7) & 0xFF for i in range(len(m)))
    offsets = list(range(0, len(m), 997))
    r = Toucher([base + o for o in offsets]).run(timeout=10)
    assert r.ok == len(offsets)
    assert list(r.value) == [m[o] for o in offsets]
    assert all(lat > 0 for lat in r.latency_ns)


def test_write_values(anon) -> None:
    m, base = anon
    offsets = [0, 1, PAGE, 5 * PAGE + 3, len(m) - 1]
    r = Toucher([base + o for o in offsets], write=True, value=0xA5, threads=3).run(timeout=10)
    assert r.ok == len(offsets)
    assert all(m[o] == 0xA5 for o in offsets)
    assert m[2] == 0
    assert list(r.value) == [0xA5] * len(offsets)


def test_xxh64_known_vectors() -> None:
    assert lib.up_xxh64_buffer(b"", 0, 0) == 0xEF46DB3751D8E999
    assert lib.up_xxh64_buffer(b"a", 1, 0) == 0xD24EC4F1A98C6E5B
    assert lib.up_xxh64_buffer(b"abc", 3, 0) == 0x44BC2CF5AD770999


def test_xxh64_matches_libxxhash() -> None:
    libx = _xxh64_reference()
    if libx is None:
        pytest.skip("libxxhash not installed: no reference implementation to compare with")
    for n in [*range(0, 100), 4096, 4097, 65536]:
        data = os.urandom(n)
        for seed in (0, 1, 2**64 - 1):
            assert lib.up_xxh64_buffer(data, n, seed) == libx.XXH64(data, n, seed), (n, seed)


def test_digests_of_known_pages(anon) -> None:
    m, base = anon
    pages = [os.urandom(PAGE) for _ in range(4)]
    for i, p in enumerate(pages):
        m[i * PAGE : (i + 1) * PAGE] = p
    addrs = [base + 3 * PAGE + 100, base + 10, base + 2 * PAGE + PAGE - 1, base + 5 * PAGE]
    r = Toucher(addrs, digest=True, threads=2).run(timeout=10)
    expect = [lib.up_xxh64_buffer(pages[i], PAGE, 0) for i in (3, 0, 2)]
    expect.append(lib.up_xxh64_buffer(bytes(PAGE), PAGE, 0))
    assert list(r.digest) == expect
    assert len(Toucher(addrs).run(timeout=10).digest) == 0


def test_many_threads_cover_every_address(anon) -> None:
    m, base = anon
    m[:] = bytes(i & 0xFF for i in range(len(m)))
    addrs = array("Q", (base + (i * 31) % len(m) for i in range(5000)))
    t = Toucher(addrs, threads=4)
    r = t.run(timeout=20)
    assert (r.ok, r.pending) == (5000, 0)
    assert list(r.value) == [((i * 31) % len(m)) & 0xFF for i in range(5000)]
    assert len(r.cpus) == 4
    assert all(c in os.sched_getaffinity(0) for c in r.cpus)
    assert r.percentile(0) <= r.percentile(50) <= r.percentile(99) <= r.percentile(100)
    assert r.percentile(100) == max(r.latency_ns)


def test_buffer_of_u64_is_accepted(anon) -> None:
    _, base = anon
    raw = array("Q", [base, base + 1]).tobytes()
    assert Toucher(raw).run(timeout=10).ok == 2
    assert Toucher(memoryview(array("Q", [base]))).run(timeout=10).ok == 1


def test_pinning_reports_the_cpu(anon) -> None:
    _, base = anon
    for cpu in sorted(os.sched_getaffinity(0)):
        r = Toucher([base] * 100, threads=2, cpus=[cpu]).run(timeout=10)
        assert r.cpus == [cpu, cpu]


def test_empty_address_list() -> None:
    r = Toucher([], threads=3).run(timeout=10)
    assert (r.ok, r.sigbus, r.pending) == (0, 0, 0)
    with pytest.raises(ValueError, match="no finished touches"):
        r.percentile(50)


def test_not_started_touches_are_pending(anon) -> None:
    _, base = anon
    t = Toucher([base, base + 1])
    r = t.results
    assert list(r.outcome) == [OUTCOME_NOT_RUN] * 2
    assert r.pending == 2
    with pytest.raises(RuntimeError, match="not started"):
        t.join(0)
    t.run(timeout=10)
    with pytest.raises(RuntimeError, match="already started"):
        t.start()


async def test_wait_polls_without_blocking(anon) -> None:
    _, base = anon
    t = Toucher([base] * 1000, threads=2)
    t.start()
    await t.wait()
    assert t.results.ok == 1000


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threads": 0}, "threads must be at least 1"),
        ({"value": 256}, "value must be a byte"),
        ({"page_size": 3000}, "page_size must be a power of two"),
        ({"cpus": [100000]}, "not available"),
        ({"cpus": []}, "cpus must not be empty"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Toucher([0], **kwargs)


def test_bad_addresses_are_named() -> None:
    with pytest.raises(ValueError, match="unsigned 64-bit"):
        Toucher([-1])
    with pytest.raises(ValueError, match="u64 items"):
        Toucher(array("i", [1, 2, 3]))


# -- touches that block in a userfaultfd fault ------------------------------------------------


@pytest.fixture
def registered() -> Iterator[tuple[Userfaultfd, int]]:
    """A 4-page anon region registered MISSING; nothing resolves its faults by itself."""
    mem = anon_mapping(4 * PAGE)
    uffd = Userfaultfd.create()
    try:
        uffd.register(mem.addr, mem.size, RegisterMode.MISSING)
        yield uffd, mem.addr
    finally:
        uffd.close()  # wakes a still-blocked toucher (its retry maps a zero page)
        mem.close()


def test_blocked_touch_is_pending_until_resolved(registered) -> None:
    uffd, base = registered
    src = bytes([0x5A]) * (4 * PAGE)
    t = Toucher([base + 10, base + PAGE + 1], threads=1)
    t.start()
    assert t.join(0.2) is False
    r = t.results
    assert (r.pending, r.ok) == (2, 0)
    assert t.pending == 2
    # Our handler is installed while the toucher runs.
    assert sigbus_handler()[0] == lib.up_toucher_sigbus_own()
    assert lib.up_toucher_sigbus_refs() == 1
    with LocalHandler(uffd.fileno(), base, 4 * PAGE, src=src):
        assert t.join(10) is True
    r = t.results
    assert (r.ok, r.pending) == (2, 0)
    assert list(r.value) == [0x5A, 0x5A]
    assert lib.up_toucher_sigbus_refs() == 0


def test_done_ns_puts_touches_on_the_monotonic_clock(registered, holed) -> None:
    """Each touch's completion time is on time.monotonic_ns()'s clock: a touch blocked in a
    fault finishes after the fault is resolved, and done - latency is when it began."""
    uffd, base = registered
    _, hole = holed
    t = Toucher([base, hole + PAGE, base + PAGE], threads=1)
    before = time.monotonic_ns()
    t.start()
    assert t.join(0.2) is False
    assert t.results.done_ns.tolist() == [0, 0, 0]  # none finished: the first one blocks
    resolved = time.monotonic_ns()
    with LocalHandler(uffd.fileno(), base, 4 * PAGE, src=bytes(4 * PAGE)):
        assert t.join(10) is True
    after = time.monotonic_ns()
    r = t.results
    assert list(r.outcome) == [OUTCOME_OK, OUTCOME_SIGBUS, OUTCOME_OK]
    done = r.done_ns.tolist()
    assert resolved < done[0] <= done[1] <= done[2] <= after  # one thread: in order
    assert before <= done[0] - r.latency_ns[0] < resolved  # it began before, waited it out
    assert all(done[k] - r.latency_ns[k] >= before for k in range(3))


def test_run_timeout_names_pending_touches(registered) -> None:
    uffd, base = registered
    t = Toucher([base, base + 1, base + 2], threads=1)
    with pytest.raises(TimeoutError, match="3 of 3 touches still pending"):
        t.run(timeout=0.1)
    with LocalHandler(uffd.fileno(), base, 4 * PAGE, src=bytes(4 * PAGE)):
        assert t.join(10)
    assert t.results.ok == 3


async def test_wait_does_not_block_the_event_loop(registered) -> None:
    import trio

    uffd, base = registered
    t = Toucher([base + 3 * PAGE])
    t.start()
    ticks = 0
    with trio.move_on_after(0.1):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(t.wait)
            while True:
                await trio.sleep(0.005)
                ticks += 1
    assert ticks >= 2 and not t.done  # the loop kept running while the touch blocked
    with LocalHandler(uffd.fileno(), base, 4 * PAGE, src=bytes([7]) * (4 * PAGE)):
        with trio.fail_after(10):
            await t.wait()
    assert t.results.value[0] == 7


CHAIN_CHILD = r"""
import ctypes, mmap, os, sys
if sys.argv[1] == "faulthandler":
    import faulthandler
    faulthandler.enable()
from uffdpoison.kernel import RegisterMode, Userfaultfd
from uffdpoison.kernel import anon as anon_mapping
from uffdpoison.harness.toucher import Toucher
mem = anon_mapping(mmap.PAGESIZE)
uffd = Userfaultfd.create()
uffd.register(mem.addr, mem.size, RegisterMode.MISSING)
t = Toucher([mem.addr])
t.start()
assert not t.join(0.1)
fd = os.memfd_create("hole")
os.ftruncate(fd, 2 * mmap.PAGESIZE)
m = mmap.mmap(fd, 2 * mmap.PAGESIZE)
os.ftruncate(fd, 0)
print("touching", flush=True)
ctypes.string_at(ctypes.addressof(ctypes.c_char.from_buffer(m)) + 5, 1)
print("survived", flush=True)
"""


@pytest.mark.parametrize("previous", ["faulthandler", "default"])
def test_sigbus_on_another_thread_goes_to_the_previous_handler(previous: str) -> None:
    """A SIGBUS outside a toucher thread must not be swallowed while a toucher runs."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", CHAIN_CHILD, previous],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "touching" in proc.stdout, proc.stderr
    assert "survived" not in proc.stdout
    assert proc.returncode == -signal.SIGBUS, proc.stderr
    if previous == "faulthandler":
        assert "Fatal Python error: Bus error" in proc.stderr
    else:
        assert "Fatal Python error" not in proc.stderr


def test_dropped_blocked_toucher_is_parked_then_reaped(registered) -> None:
    import gc

    from uffdpoison.harness import toucher as toucher_mod

    uffd, base = registered
    t = Toucher([base + 2 * PAGE])
    t.start()
    assert not t.join(0.05)
    del t
    gc.collect()
    assert len(toucher_mod._ABANDONED) == 1  # its buffers outlive it while the thread blocks
    with LocalHandler(uffd.fileno(), base, 4 * PAGE, src=bytes(4 * PAGE)):
        handle = toucher_mod._ABANDONED[0][0]
        assert lib.up_toucher_join(handle, 10000) == 1
    fresh = Toucher([])
    fresh.run(timeout=10)  # start() reaps finished, parked touchers
    assert toucher_mod._ABANDONED == []


def test_live_views(anon) -> None:
    _, base = anon
    t = Toucher([base, base + 1, base + 2])
    assert t.outcome_view.tolist() == [OUTCOME_NOT_RUN] * 3
    t.run(timeout=10)
    assert t.outcome_view.tolist() == [OUTCOME_OK] * 3
    assert t.latency_view.tolist() == list(t.results.latency_ns)


def test_handler_is_refcounted_across_concurrent_touchers(registered, holed) -> None:
    uffd, base = registered
    _, hole = holed
    before = sigbus_handler()
    blocked = Toucher([base])
    blocked.start()
    assert not blocked.join(0.05)
    r = Toucher([hole, hole + PAGE]).run(timeout=10)
    assert list(r.outcome) == [OUTCOME_OK, OUTCOME_SIGBUS]
    # The blocked toucher still holds the handler.
    assert lib.up_toucher_sigbus_refs() == 1
    assert sigbus_handler()[0] == lib.up_toucher_sigbus_own()
    with LocalHandler(uffd.fileno(), base, 4 * PAGE, src=bytes(4 * PAGE)):
        assert blocked.join(10)
    assert lib.up_toucher_sigbus_refs() == 0
    assert sigbus_handler() == before
