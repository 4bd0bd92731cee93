"""Userfaultfd binding against the real kernel; each test pins a KERNEL-FACTS line."""

from __future__ import annotations

import errno
import os
import socket
import threading

import kernel_raw as _raw
import pytest
import trio
from conftest import SIGBUS_CODES, wait_events

from uffdpoison.harness.toucher import OUTCOME_OK, OUTCOME_SIGBUS, Toucher
from uffdpoison.kernel import (
    HUGE_PAGE_SIZE,
    PAGE_SIZE,
    AlreadyPopulated,
    Feature,
    InvalidArgument,
    Ioctl,
    NotAUserfaultfd,
    RegisterMode,
    TargetGone,
    Userfaultfd,
    anon,
    hugetlb,
    shmem,
)
from uffdpoison.kernel._ffi import ffi, lib

P = PAGE_SIZE


def pattern(byte: int, n: int = P) -> bytes:
    return bytes([byte]) * n


def test_create_reports_path_and_negotiated_features(uffd: Userfaultfd) -> None:
    assert uffd.created_via in ("syscall", "/dev/userfaultfd")
    assert Feature.THREAD_ID in uffd.features
    assert uffd.available is not None and Feature.POISON in uffd.available
    assert Ioctl.API in uffd.api_ioctls and Ioctl.REGISTER in uffd.api_ioctls
    # the fd's negotiated set is what fdinfo shows, not everything the kernel offers
    with open(f"/proc/self/fdinfo/{uffd.fileno()}") as f:
        api = next(line for line in f if line.startswith("API:")).split(":", 1)[1].strip()
    assert int(api.split(":")[1], 16) & 0x1FFFF == int(uffd.features)


def test_device_path_creates_a_working_fd() -> None:
    if not os.path.exists("/dev/userfaultfd"):
        pytest.skip("no /dev/userfaultfd on this machine")
    fd = lib.up_uffd_open_device()
    assert fd >= 0, os.strerror(-fd)
    feats, ioctls = ffi.new("uint64_t *"), ffi.new("uint64_t *")
    try:
        assert lib.up_uffd_api(fd, 0, feats, ioctls) == 0
        assert feats[0] & int(Feature.POISON)
    finally:
        os.close(fd)


def test_second_api_call_is_einval(uffd: Userfaultfd) -> None:
    feats, ioctls = ffi.new("uint64_t *"), ffi.new("uint64_t *")
    assert lib.up_uffd_api(uffd.fileno(), 0, feats, ioctls) == -errno.EINVAL


def test_close_is_idempotent() -> None:
    u = Userfaultfd.create()
    fd = u.fileno()
    u.close()
    u.close()
    assert u.closed
    with pytest.raises(OSError):
        os.fstat(fd)
    with pytest.raises(ValueError):
        u.fileno()


def test_register_ioctls_anon_missing(uffd: Userfaultfd) -> None:
    with anon(4 * P) as m:
        got = uffd.register(m.addr, m.size, RegisterMode.MISSING)
        want = Ioctl.WAKE | Ioctl.COPY | Ioctl.ZEROPAGE | Ioctl.MOVE | Ioctl.POISON
        assert got & want == want
        assert Ioctl.CONTINUE not in got
        with pytest.raises(InvalidArgument, match="MINOR"):
            uffd.register(m.addr, m.size, RegisterMode.MINOR)  # MINOR on private anon
        uffd.unregister(m.addr, m.size)


def test_fault_carries_thread_id_and_copy_resolves(uffd: Userfaultfd) -> None:
    batch = _raw.EventBatch(8)
    with anon(4 * P) as m, anon(P) as src:
        uffd.register(m.addr, m.size, RegisterMode.MISSING)
        src.write(0, pattern(0xA5))
        t = Toucher([m.addr + P + 17])
        t.start()
        assert wait_events(uffd, batch) == 1
        ev = batch[0]
        assert ev.kind == _raw.EventKind.PAGEFAULT
        assert ev.address == m.addr + P  # page-aligned without EXACT_ADDRESS
        assert not ev.write and not ev.minor
        # THREAD_ID: the tid is a (non-main) thread of this process, blocked in the fault
        assert ev.tid != 0 and ev.tid != os.getpid()
        assert os.path.exists(f"/proc/self/task/{ev.tid}")
        assert batch.raw[0].tid == ev.tid
        assert _raw.copy(uffd, m.addr + P, src.addr, P) == P
        assert t.join(5)
        assert t.results.outcome[0] == OUTCOME_OK and t.results.value[0] == 0xA5
        uffd.unregister(m.addr, m.size)


def test_write_fault_flag_and_zeropage_resolves(uffd: Userfaultfd) -> None:
    batch = _raw.EventBatch(8)
    with anon(2 * P) as m:
        uffd.register(m.addr, m.size, RegisterMode.MISSING)
        t = Toucher([m.addr], write=True, value=7)
        t.start()
        assert wait_events(uffd, batch) == 1
        assert batch[0].write
        assert _raw.zeropage(uffd, m.addr, P) == P
        assert t.join(5) and t.results.outcome[0] == OUTCOME_OK
        uffd.unregister(m.addr, m.size)
        assert m.read(0, 1) == b"\x07"


def test_nothing_pending_reads_zero(uffd: Userfaultfd) -> None:
    assert _raw.read_events(uffd, _raw.EventBatch(4)) == 0


def test_wake_without_resolving_refaults(uffd: Userfaultfd) -> None:
    batch = _raw.EventBatch(8)
    with anon(P) as m:
        uffd.register(m.addr, m.size, RegisterMode.MISSING)
        t = Toucher([m.addr])
        t.start()
        assert wait_events(uffd, batch) == 1
        uffd.wake(m.addr, P)
        assert wait_events(uffd, batch) == 1  # an identical second message
        assert batch[0].address == m.addr
        _raw.zeropage(uffd, m.addr, P)
        assert t.join(5)
        uffd.unregister(m.addr, m.size)


def test_poison_sigbuses_every_touch_without_messages(uffd: Userfaultfd) -> None:
    with anon(4 * P) as m:
        uffd.register(m.addr, m.size, RegisterMode.MISSING)
        assert _raw.poison(uffd, m.addr + 2 * P, P) == P
        addr = m.addr + 2 * P + 123
        res = Toucher([addr, addr], threads=1).run(5)
        assert list(res.outcome) == [OUTCOME_SIGBUS, OUTCOME_SIGBUS]
        assert set(res.si_code) <= set(SIGBUS_CODES)
        assert list(res.si_addr) == [addr, addr]  # the exact byte
        assert (
            _raw.read_events(uffd, _raw.EventBatch(4)) == 0
        )  # no fault message for a poisoned page
        with pytest.raises(AlreadyPopulated) as ei:
            _raw.poison(uffd, m.addr + 2 * P, P)
        assert ei.value.errno == errno.EEXIST and ei.value.done == 0
        assert "UFFDIO_POISON" in str(ei.value) and hex(m.addr + 2 * P) in str(ei.value)
        uffd.unregister(m.addr, m.size)


def test_kernel_lets_copy_overwrite_a_marker(uffd: Userfaultfd) -> None:
    """The reason the Ledger exists: raw COPY replaces a poison marker without complaint."""
    with anon(P) as m, anon(P) as src:
        src.write(0, pattern(0x3C))
        uffd.register(m.addr, m.size, RegisterMode.MISSING)
        _raw.poison(uffd, m.addr, P)
        assert _raw.copy(uffd, m.addr, src.addr, P) == P
        res = Toucher([m.addr]).run(5)
        assert res.outcome[0] == OUTCOME_OK and res.value[0] == 0x3C
        uffd.unregister(m.addr, m.size)


def test_poison_over_present_page_is_eexist(uffd: Userfaultfd) -> None:
    with anon(P) as m:
        uffd.register(m.addr, m.size, RegisterMode.MISSING)
        _raw.zeropage(uffd, m.addr, P)
        with pytest.raises(AlreadyPopulated):
            _raw.poison(uffd, m.addr, P)
        uffd.unregister(m.addr, m.size)


def test_partial_copy_reports_exact_bytes_done(uffd: Userfaultfd) -> None:
    with anon(64 * P) as m, anon(64 * P) as src:
        uffd.register(m.addr, m.size, RegisterMode.MISSING)
        _raw.zeropage(uffd, m.addr + 22 * P, P)
        # EAGAIN with 22 pages done: the count, not a cast -EAGAIN (userfaultfd-rs #91)
        assert _raw.copy(uffd, m.addr, src.addr, 64 * P) == 22 * P
        with pytest.raises(AlreadyPopulated) as ei:
            _raw.copy(uffd, m.addr + 22 * P, src.addr, 42 * P)
        assert ei.value.done == 0
        assert _raw.copy(uffd, m.addr + 23 * P, src.addr, 41 * P) == 41 * P
        uffd.unregister(m.addr, m.size)


def test_marker_survives_unregister_and_close() -> None:
    with anon(2 * P) as m:
        u = Userfaultfd.create()
        u.register(m.addr, m.size, RegisterMode.MISSING)
        _raw.poison(u, m.addr, P)
        u.unregister(m.addr, m.size)
        assert Toucher([m.addr]).run(5).outcome[0] == OUTCOME_SIGBUS
        u.close()
        res = Toucher([m.addr, m.addr + P]).run(5)
        assert list(res.outcome) == [OUTCOME_SIGBUS, OUTCOME_OK]  # only the marker page
        m.discard(0, P)  # a discard is what removes it
        assert Toucher([m.addr]).run(5).outcome[0] == OUTCOME_OK


def test_shmem_minor_flow(uffd: Userfaultfd) -> None:
    batch = _raw.EventBatch(8)
    with shmem(4 * P) as m, anon(P) as src:
        got = uffd.register(m.addr, m.size, RegisterMode.MISSING | RegisterMode.MINOR)
        assert Ioctl.CONTINUE in got and Ioctl.POISON in got
        m.write(0, pattern(0x5A), alias=True)  # fill the page cache via the alias
        t = Toucher([m.addr + 10])
        t.start()
        assert wait_events(uffd, batch) == 1
        assert batch[0].minor and batch[0].address == m.addr
        assert _raw.continue_(uffd, m.addr, P) == P
        assert t.join(5) and t.results.value[0] == 0x5A
        # a page absent from the page cache arrives as a MISSING fault
        src.write(0, pattern(0x11))
        t = Toucher([m.addr + P])
        t.start()
        assert wait_events(uffd, batch) == 1
        assert not batch[0].minor and batch[0].address == m.addr + P
        assert _raw.copy(uffd, m.addr + P, src.addr, P) == P
        assert t.join(5) and t.results.value[0] == 0x11
        uffd.unregister(m.addr, m.size)


def test_shmem_poison_in_minor_mode(uffd: Userfaultfd) -> None:
    with shmem(2 * P) as m:
        uffd.register(m.addr, m.size, RegisterMode.MISSING | RegisterMode.MINOR)
        m.write(0, pattern(0x77), alias=True)
        assert _raw.poison(uffd, m.addr, P) == P
        assert Toucher([m.addr]).run(5).outcome[0] == OUTCOME_SIGBUS
        # the marker belongs to the registered mapping; the alias still reads the data
        assert m.read(0, 4, alias=True) == b"\x77" * 4
        # and CONTINUE would silently replace the marker (the Ledger refuses it)
        assert _raw.continue_(uffd, m.addr, P) == P
        assert Toucher([m.addr]).run(5).value[0] == 0x77
        uffd.unregister(m.addr, m.size)


def test_hugetlb_copy_and_poison(uffd: Userfaultfd, hugepages) -> None:
    hugepages(2)
    with hugetlb(2 * HUGE_PAGE_SIZE) as m, anon(HUGE_PAGE_SIZE) as src:
        got = uffd.register(m.addr, m.size, RegisterMode.MISSING | RegisterMode.MINOR)
        assert got & (Ioctl.COPY | Ioctl.POISON | Ioctl.CONTINUE | Ioctl.WAKE) == (
            Ioctl.COPY | Ioctl.POISON | Ioctl.CONTINUE | Ioctl.WAKE
        )
        assert Ioctl.ZEROPAGE not in got
        src.write(HUGE_PAGE_SIZE - P, pattern(0x42))
        assert _raw.copy(uffd, m.addr, src.addr, HUGE_PAGE_SIZE) == HUGE_PAGE_SIZE
        with pytest.raises(InvalidArgument):
            _raw.poison(uffd, m.addr + HUGE_PAGE_SIZE, P)  # must cover the whole huge page
        assert _raw.poison(uffd, m.addr + HUGE_PAGE_SIZE, HUGE_PAGE_SIZE) == HUGE_PAGE_SIZE
        res = Toucher([m.addr + HUGE_PAGE_SIZE - 1, m.addr + HUGE_PAGE_SIZE + 4321]).run(5)
        assert list(res.outcome) == [OUTCOME_OK, OUTCOME_SIGBUS]
        assert res.value[0] == 0x42 and res.si_addr[1] == m.addr + HUGE_PAGE_SIZE + 4321
        uffd.unregister(m.addr, m.size)


def test_remove_event_is_decoded() -> None:
    batch = _raw.EventBatch(8)
    with Userfaultfd.create(Feature.EVENT_REMOVE) as u, anon(4 * P) as m:
        u.register(m.addr, m.size, RegisterMode.MISSING)
        _raw.zeropage(u, m.addr, m.size)
        # madvise(DONTNEED) blocks until the REMOVE event is read: do it from a thread
        th = threading.Thread(target=m.discard, args=(P, 2 * P))
        th.start()
        try:
            assert wait_events(u, batch) == 1
            ev = batch[0]
            assert ev.kind == _raw.EventKind.REMOVE
            assert (ev.start, ev.end) == (m.addr + P, m.addr + 3 * P)
        finally:
            th.join(5)
        u.unregister(m.addr, m.size)


def _child_sends_uffd(features: Feature) -> tuple[int, int]:
    """Fork a child that creates a userfaultfd (as a VMM would) and hands it over."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # child: no pytest machinery, just syscalls
        code = 1
        try:
            u = Userfaultfd.create(features)
            socket.send_fds(b, [b"uffd"], [u.fileno()])
            code = 0
        finally:
            os._exit(code)
    b.close()
    try:
        _msg, fds, _flags, _addr = socket.recv_fds(a, 16, 1)
    finally:
        a.close()
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert len(fds) == 1
    return fds[0], pid


def test_adopt_handed_off_fd_reports_its_features() -> None:
    fd, _pid = _child_sends_uffd(Feature.EVENT_REMOVE)  # Firecracker's set
    u = Userfaultfd.adopt(fd)
    try:
        assert u.created_via == "adopted"
        assert u.features == Feature.EVENT_REMOVE
        assert u.available is None
        assert Ioctl.REGISTER in u.api_ioctls
        assert any("thread id" in gap for gap in u.lacks)
        assert any("UNMAP" in gap for gap in u.lacks)
        assert not any("REMOVE" in gap for gap in u.lacks)
        assert os.get_blocking(fd) is False
        # a second UFFDIO_API on a handed-off fd is refused
        feats, ioctls = ffi.new("uint64_t *"), ffi.new("uint64_t *")
        assert lib.up_uffd_api(fd, 0, feats, ioctls) == -errno.EINVAL
        # the fd serves the child's mm, which has exited
        with pytest.raises(TargetGone):
            _raw.zeropage(u, 0x10000000, P)
    finally:
        u.close()


def test_adopt_rejects_other_fds() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(NotAUserfaultfd, match=f"fd {r} is 'pipe:"):
            Userfaultfd.adopt(r)
    finally:
        os.close(r)
        os.close(w)
    with pytest.raises(NotAUserfaultfd):
        Userfaultfd.adopt(987654)


def test_move_moves_a_page(uffd: Userfaultfd) -> None:
    with anon(4 * P) as m:
        uffd.register(m.addr, 2 * P, RegisterMode.MISSING)
        m.write(3 * P, pattern(0x99))  # source: unregistered part of the same mm
        assert _raw.move(uffd, m.addr, m.addr + 3 * P, P) == P
        assert Toucher([m.addr]).run(5).value[0] == 0x99
        uffd.unregister(m.addr, 2 * P)


def test_user_mode_only_fd_serves_user_touches() -> None:
    with Userfaultfd.create(user_mode_only=True) as u, anon(2 * P) as m:
        assert "user-mode only" in u.created_via
        u.register(m.addr, m.size, RegisterMode.MISSING)
        _raw.poison(u, m.addr, P)
        assert Toucher([m.addr]).run(5).outcome[0] == OUTCOME_SIGBUS
        u.unregister(m.addr, m.size)


def test_one_read_decodes_a_burst_of_faults(uffd: Userfaultfd) -> None:
    batch = _raw.EventBatch(16)
    with anon(4 * P) as m:
        uffd.register(m.addr, m.size, RegisterMode.MISSING)
        addrs = [m.addr + i * P for i in range(4)]
        t = Toucher(addrs, threads=4)
        t.start()
        seen: dict[int, int] = {}
        while len(seen) < 4:
            n = wait_events(uffd, batch)
            assert n > 0, f"only {len(seen)} of 4 faults arrived"
            for i in range(n):
                e = batch.raw[i]
                assert e.kind == _raw.EventKind.PAGEFAULT
                seen[e.address] = e.tid
        assert sorted(seen) == addrs and len(set(seen.values())) == 4  # four vCPU threads
        _raw.zeropage(uffd, m.addr, m.size)
        assert t.join(5) and t.results.ok == 4
        uffd.unregister(m.addr, m.size)
    with pytest.raises(ValueError, match="capacity"):
        _raw.EventBatch(0)
    with pytest.raises(IndexError):
        batch[batch.count]


def test_poison_resolves_a_blocked_touch_with_sigbus(uffd: Userfaultfd) -> None:
    """The postcopy case: a vCPU blocked on a missing page gets SIGBUS once it is poisoned;
    with DONTWAKE it stays blocked until UFFDIO_WAKE."""
    batch = _raw.EventBatch(4)
    with anon(2 * P) as m:
        uffd.register(m.addr, m.size, RegisterMode.MISSING)
        t = Toucher([m.addr + P + 9])
        t.start()
        assert wait_events(uffd, batch) == 1 and batch[0].address == m.addr + P
        assert _raw.poison(uffd, m.addr + P, P, wake=False) == P
        assert not t.join(0.2)
        uffd.wake(m.addr, m.size)
        assert t.join(5)
        res = t.results
        assert res.outcome[0] == OUTCOME_SIGBUS and res.si_addr[0] == m.addr + P + 9
        assert res.si_code[0] in SIGBUS_CODES
        uffd.unregister(m.addr, m.size)


async def test_trio_wait_readable_on_the_fd(uffd: Userfaultfd) -> None:
    batch = _raw.EventBatch(4)
    with anon(P) as m:
        uffd.register(m.addr, m.size, RegisterMode.MISSING)
        t = Toucher([m.addr])
        t.start()
        with trio.fail_after(5):
            await trio.lowlevel.wait_readable(uffd.fileno())
        assert _raw.read_events(uffd, batch) == 1
        _raw.zeropage(uffd, m.addr, P)
        with trio.fail_after(5):
            await t.wait()
        assert t.results.ok == 1
        uffd.unregister(m.addr, m.size)
