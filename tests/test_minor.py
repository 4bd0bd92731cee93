"""MINOR mode: guest memory in a shmem or hugetlbfs file whose page cache was filled before the
switchover; each fault asks the source only "poisoned, or changed?" (docs/DESIGN.md, "MINOR
mode"). Real memfds, a real source on loopback, C toucher threads."""

from __future__ import annotations

import subprocess
import sys
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from destination_helpers import Guest, ToyVMM, make_guest, start_source
from live_process import live_process, page_bytes, poison_now
from test_daemon import Daemon, check_touches, expect_rejected

from uffdpoison.destination.embed import Precopy, precopy, serve_memory
from uffdpoison.destination.regions import Region
from uffdpoison.harness.toucher import Toucher
from uffdpoison.kernel import (
    Ledger,
    Mapping,
    PageState,
    RegisterMode,
    Userfaultfd,
    memory,
    pagemap,
)
from uffdpoison.kernel.digest import page_digests
from uffdpoison.kernel.ledger import PoisonOverwriteRefused
from uffdpoison.kernel.uffd import UffdError
from uffdpoison.source.backends import ImageBackend, ProcessBackend

HUGE = 2 << 20


async def _serve_and_touch(
    region: Region,
    source: str,
    m: Mapping,
    *,
    precopy: Precopy | None = None,
    background: bool = False,
) -> tuple[Toucher, dict[str, int], dict[str, int]]:
    """Serve ``m`` (MINOR mode, its file) and touch every page once (after the background
    confirmed them all, with ``background``); the toucher, the counters, the page counts."""
    ps = region.page_size
    async with serve_memory(
        [region], source, memory_file=m.fd, precopy=precopy, background=background,
        hugetlb=ps > 4096,
    ) as server:  # fmt: skip
        if background:
            with trio.fail_after(20):
                await server.wait_complete()
        t = Toucher(array("Q", (m.addr + i * ps for i in range(m.size // ps))), digest=True,
                    page_size=ps)  # fmt: skip
        t.start()
        await t.wait()
        return t, server.stats, server.page_counts()


def _as_reply(t: Toucher) -> dict[str, Any]:
    """A toucher's results as the toy VMM's touch reply (for ``check_touches``)."""
    r = t.results
    return {"done": True, "pending": r.pending, "outcome": list(r.outcome),
            "digest": list(r.digest), "si_code": list(r.si_code)}  # fmt: skip


async def _image_source(
    nursery: trio.Nursery, tmp_path: Path, guest: Guest, statuses: list[dict[str, Any]]
) -> str:
    """A source serving ``guest`` from an image file (which never changes while served: it
    vouches for a precopy's epoch), its status events into ``statuses``."""
    image = tmp_path / "guest.img"
    image.write_bytes(guest.image)
    poison = [i * guest.page_size for i in guest.poisoned]
    return await start_source(nursery, ImageBackend(image, poison), status=statuses.append)


async def _ended(statuses: list[dict[str, Any]], count: int) -> dict[str, Any]:
    """The source's ``count``-th session-ended status (the session's own summary)."""
    with trio.fail_after(10):
        while len(ended := [s for s in statuses if s["event"] == "session-ended"]) < count:
            await trio.sleep(0.01)
    return ended[count - 1]


def _kind(kind: str, hugepages: Callable[[int], int], n: int) -> int:
    if kind == "hugetlb":
        hugepages(n + 1)  # the toucher's and the test's own pages come from the same pool
        return HUGE
    return 4096


@pytest.mark.parametrize("background", [False, True], ids=["faults", "confirmed"])
@pytest.mark.parametrize("kind", ["shmem", "hugetlb"])
async def test_cached_pages_are_confirmed_changed_ones_sent_poisoned_ones_marked(
    nursery: trio.Nursery, kind: str, hugepages: Callable[[int], int], background: bool
) -> None:
    """The file holds the precopy; then the source changed some pages and some were poisoned,
    and some never reached the cache. Every page touched (after the background confirmed
    them all, or each on its fault): changed and absent pages arrive byte-exact (DATA),
    poisoned ones SIGBUS (again after completion), the rest are mapped as they are (CLEAN)
    with no page data on the wire."""
    n = 32 if kind == "shmem" else 8
    ps = _kind(kind, hugepages, n)
    guest = make_guest(n, ps, poisoned=[3, 6], zero=[])
    changed, absent = [1, 5], [7]
    cached = bytearray(guest.image)
    for i in changed:
        cached[i * ps : i * ps + 64] = b"stale" * 12 + b"!!!!"  # the precopied, older bytes
    statuses: list[dict[str, Any]] = []
    source = await start_source(nursery, guest.backend(), status=statuses.append)
    with memory.of_kind(kind, n * ps) as m:
        assert m.fd is not None
        for i in range(n):
            if i not in absent:
                m.write(i * ps, bytes(cached[i * ps : (i + 1) * ps]), alias=True)
        region = Region(m.addr, n * ps, 0, page_size=ps)
        t, st, counts = await _serve_and_touch(region, source, m, background=background)
        digests = guest.digests()
        for i in range(n):
            if i in guest.poisoned:
                assert t.results.outcome[i] == 1, f"page {i} did not SIGBUS"
            else:
                assert t.results.outcome[i] == 0 and t.results.digest[i] == digests[i], i
        clean = n - len(changed) - len(absent) - len(guest.poisoned)
        assert st["continued"] == clean  # mapped as cached: CLEAN
        assert st["copied"] == len(changed) + len(absent)  # only those crossed the wire
        assert st["poisoned"] == len(guest.poisoned)
        faults = n - len(absent) - len(guest.poisoned)  # poison: known from the handshake
        assert st["minor_faults"] == (0 if background else faults)
        assert counts["poisoned"] == len(guest.poisoned)
        assert counts["present"] == n - len(guest.poisoned)
        # Touched again, the poisoned pages still SIGBUS.
        again = Toucher(array("Q", (m.addr + i * ps for i in guest.poisoned)))
        again.start()
        await again.wait()
        assert list(again.results.outcome) == [1] * len(guest.poisoned)
    ended = await _ended(statuses, 1)
    assert ended["data_pages"] == len(changed) + len(absent)
    assert ended["clean_pages"] == clean
    # The page data on the wire is the changed and absent pages, and a header per reply.
    assert ended["bytes_urgent"] <= (len(changed) + len(absent)) * ps + 64 * n


def test_continue_over_poison_is_refused(uffd: Userfaultfd) -> None:
    """The kernel lets CONTINUE replace a poison marker (KERNEL-FACTS); the ledger refuses, in
    MINOR mode as in MISSING mode, and the alias is not written either."""
    with memory.shmem(4 * 4096) as m:
        assert m.fd is not None
        m.write(0, b"\x11" * 4 * 4096, alias=True)
        uffd.register(m.addr, m.size, RegisterMode.MISSING | RegisterMode.MINOR)
        with Ledger(uffd, m.addr, m.size, 4096, memory_file=(m.fd, 0)) as led:
            assert led.poison(1, 1).placed == 1
            for op in (led.continue_, led.zero):
                with pytest.raises(PoisonOverwriteRefused):
                    op(0, 3, strict=True)
                assert op(1, 1, strict=False).refused == 1  # counted, not placed
            with pytest.raises(PoisonOverwriteRefused):
                led.copy(1, 1, b"\x22" * 4096, strict=True)
            assert led.state(1) == PageState.POISONED
            assert m.read(4096, 4096, alias=True) == b"\x11" * 4096  # the cache as it was
            assert led.continue_(0, 1).placed == 1
            assert m.read(0, 4096) == b"\x11" * 4096
        uffd.unregister(m.addr, m.size)


def test_a_memory_file_smaller_than_the_region_is_refused(uffd: Userfaultfd) -> None:
    with memory.shmem(4 * 4096) as m:
        assert m.fd is not None
        uffd.register(m.addr, m.size, RegisterMode.MISSING | RegisterMode.MINOR)
        with pytest.raises(OSError, match="ends before the region does"):
            Ledger(uffd, m.addr, m.size, 4096, memory_file=(m.fd, 4096))
        uffd.unregister(m.addr, m.size)


def test_continue_on_a_page_not_in_the_cache_is_an_error(uffd: Userfaultfd) -> None:
    """Why DATA in MINOR mode is written through the alias first: CONTINUE alone needs a
    page-cache page."""
    with memory.shmem(2 * 4096) as m:
        assert m.fd is not None
        uffd.register(m.addr, m.size, RegisterMode.MISSING | RegisterMode.MINOR)
        with Ledger(uffd, m.addr, m.size, 4096, memory_file=(m.fd, 0)) as led:
            with pytest.raises(UffdError):
                led.continue_(0, 1)
            assert led.copy(1, 1, b"\x33" * 4096).placed == 1
            assert m.read(4096, 4096) == b"\x33" * 4096
        uffd.unregister(m.addr, m.size)


# -- the handoff: [uffd] is MISSING mode, [uffd, memory file] MINOR mode ----------------------

# argv: handoff path, region bytes, then what follows the uffd: "memfd:BYTES" or "pipe" each.
HANDOFF_FDS = """
import json, os, socket, sys
from uffdpoison.kernel import Feature, Userfaultfd
u = Userfaultfd.create(Feature.EVENT_REMOVE)
fds = [u.fileno()]
for spec in sys.argv[3:]:
    if spec == "pipe":
        fds.append(os.pipe()[0])
    else:
        fd = os.memfd_create("guest"); os.ftruncate(fd, int(spec.split(":")[1])); fds.append(fd)
region = {"base_host_virt_addr": 1 << 40, "size": int(sys.argv[2]), "offset": 0,
          "page_size": 4096}
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
socket.send_fds(s, [json.dumps([region]).encode()], fds)
s.recv(4096)
sys.stdin.read()
"""


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["memfd:8192"], "holds 8192 bytes; the regions need 16384"),
        (["pipe"], "not a file"),
        (["memfd:16384", "memfd:16384"], "carried 3 file descriptors"),
    ],
)
async def test_handoffs_that_do_not_fit_minor_mode_are_refused(
    nursery: trio.Nursery, tmp_path: Path, extra: list[str], words: str
) -> None:
    guest = make_guest(16)
    d = Daemon(str(tmp_path / "h.sock"), await start_source(nursery, guest.backend()))
    await nursery.start(d.daemon.serve)
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-c", HANDOFF_FDS, d.path, str(4 * 4096), *extra],
        stdin=subprocess.PIPE,
    )
    await expect_rejected(d, proc, words)


@pytest.mark.parametrize("kind", ["shmem", "hugetlb"])
async def test_a_vmm_hands_over_its_memory_file_and_is_served_in_minor_mode(
    nursery: trio.Nursery, tmp_path: Path, kind: str, hugepages: Callable[[int], int]
) -> None:
    """Firecracker's guest_memfd shape: the VMM precopied into its memory file, registered
    MISSING|MINOR and handed over the uffd and the file. The source has since changed pages
    and poisoned some: every touch reads the source's bytes or SIGBUSes."""
    n = 48 if kind == "shmem" else 6
    ps = _kind(kind, hugepages, n)
    guest = make_guest(n, ps, poisoned=[2, 5], zero=[4])
    precopy = bytearray(guest.image)
    for i in (1, 3):
        precopy[i * ps : i * ps + 8] = b"old data"
    image = tmp_path / "precopy.img"
    image.write_bytes(precopy)
    d = Daemon(str(tmp_path / "h.sock"), await start_source(nursery, guest.backend()))
    await nursery.start(d.daemon.serve)
    vmm = await ToyVMM.start(d.path, n * ps, memory=kind, minor=str(image))
    try:
        check_touches(guest, await vmm.touch("all"))
        (session,) = d.daemon.sessions.values()
        st = session.stats  # by the fault or by the background, each page once
        assert (st["continued"], st["copied"], st["minor_unservable"]) == (n - 4, 2, 0)
    finally:
        await vmm.close()


# -- the precopy, and a source that knows what changed since ---------------------------------


async def test_precopy_then_a_live_source_changes_and_poisons_pages(nursery: trio.Nursery) -> None:
    """The guest keeps running at the source after the precopy: two pages are written, one is
    poisoned. The changed ones arrive byte-exact, the poisoned ones SIGBUS (the one poisoned
    later too), the rest are CLEAN. Where the kernel tracks soft-dirty bits the source vouches
    for its epoch and reads none of the unchanged pages; where it does not (this machine:
    CONFIG_MEM_SOFT_DIRTY unset) it compares the digests the precopy kept."""
    n, ps = 64, 4096
    changed, late_poison = [5, 9], 12
    with live_process(n, [3], keep=True) as (proc, addr):
        statuses: list[dict[str, Any]] = []
        backend = ProcessBackend(proc.pid, [(addr, n * ps)])
        source = await start_source(nursery, backend, status=statuses.append)
        with memory.shmem(n * ps) as m:
            assert m.fd is not None
            region = Region(m.addr, n * ps, 0)
            pc = await precopy([region], source, m.fd)
            assert (pc.epoch is not None) == pagemap.soft_dirty_works()
            assert (pc.pages, pc.poisoned) == (n - 1, 1)
            with open(f"/proc/{proc.pid}/mem", "r+b") as mem:  # the guest runs on
                for i in changed:
                    mem.seek(addr + i * ps)
                    mem.write(bytes([i]) * ps)
            poison_now(proc, late_poison)
            t, st, _ = await _serve_and_touch(region, source, m, precopy=pc)
        for i in range(n):
            if i in (3, late_poison):
                assert t.results.outcome[i] == 1, f"page {i} did not SIGBUS"
                continue
            want = bytes([i]) * ps if i in changed else page_bytes(i)
            assert t.results.outcome[i] == 0 and t.results.digest[i] == page_digests(want, ps)[0], i
        assert (st["copied"], st["continued"]) == (len(changed), n - len(changed) - 2)
    serving = await _ended(statuses, 2)  # the precopy's, then the serving session's
    unchanged = n - len(changed) - 2
    assert serving["clean_pages"] == unchanged
    assert serving["vouched_pages"] == (unchanged if pc.epoch else 0)  # neither read nor hashed
    assert serving["data_pages"] == len(changed) and serving["poisoned_pages"] == 1


@pytest.mark.parametrize("kind", ["shmem", "hugetlb"])
async def test_an_image_source_vouches_for_its_epoch(
    nursery: trio.Nursery, tmp_path: Path, kind: str, hugepages: Callable[[int], int]
) -> None:
    """An image does not change while served, so after a precopy every page nobody poisoned is
    confirmed CLEAN from the epoch alone: the source reads and hashes none of them, the
    destination hashes none at fault time (it kept the digests as written), and the wire
    carries no page data, only a header per reply."""
    n = 64 if kind == "shmem" else 6
    ps = _kind(kind, hugepages, n)
    guest = make_guest(n, ps, poisoned=[1], zero=[2])
    statuses: list[dict[str, Any]] = []
    source = await _image_source(nursery, tmp_path, guest, statuses)
    with memory.of_kind(kind, n * ps) as m:
        assert m.fd is not None
        region = Region(m.addr, n * ps, 0, page_size=ps)
        hugetlb = kind == "hugetlb"
        pc = await precopy([region], source, m.fd, hugetlb=hugetlb)
        assert pc.epoch is not None and pc.pages == n - 1
        t, st, _ = await _serve_and_touch(region, source, m, precopy=pc)
        assert st["continued"] == n - 1
    check_touches(guest, _as_reply(t))
    serving = await _ended(statuses, 2)
    assert serving["vouched_pages"] == serving["clean_pages"] == n - 1
    assert serving["data_pages"] == 0 and serving["bytes_urgent"] <= 64 * n


async def test_the_switchover_cuts_the_precopy_short(nursery: trio.Nursery, tmp_path: Path) -> None:
    """The switchover comes while the precopy still streams (the source's push capped): what
    reached the cache is confirmed (MINOR faults), what did not is fetched (MISSING faults),
    and every page reads the source's bytes or SIGBUSes."""
    n, ps = 256, 4096
    guest = make_guest(n, ps, poisoned=[200], zero=[7])
    statuses: list[dict[str, Any]] = []
    source = await start_source(
        nursery, guest.backend(), status=statuses.append, max_bandwidth=256 << 10
    )
    with memory.shmem(n * ps) as m:
        assert m.fd is not None
        region = Region(m.addr, n * ps, 0)
        switchover = trio.Event()
        nursery.start_soon(_set_after, switchover, 1.0)
        pc = await precopy([region], source, m.fd, switchover=switchover)
        assert 0 < pc.pages < n - 1, pc.pages
        t, st, _ = await _serve_and_touch(region, source, m, precopy=pc)
    check_touches(guest, _as_reply(t))
    assert st["minor_faults"] == pc.pages  # cached: confirmed
    assert st["faults"] - st["minor_faults"] == n - 1 - pc.pages  # absent: fetched
    assert st["continued"] == pc.pages and st["copied"] + st["zeroed"] == n - 1 - pc.pages


async def _set_after(event: trio.Event, seconds: float) -> None:
    await trio.sleep(seconds)
    event.set()


@pytest.mark.parametrize("kind", ["shmem", "hugetlb"])
async def test_the_daemon_precopies_into_the_file_the_vmm_then_hands_over(
    nursery: trio.Nursery, tmp_path: Path, kind: str, hugepages: Callable[[int], int]
) -> None:
    """``dest --precopy PATH``: the daemon fills the file as soon as the source answers; a VMM
    maps that very file, registers MISSING|MINOR and hands it over with its userfaultfd. Every
    page is confirmed from the precopy's epoch (nothing read at the source, nothing sent
    again), every poisoned page SIGBUSes."""
    n = 64 if kind == "shmem" else 6
    ps = _kind(kind, hugepages, 2 * n)
    guest = make_guest(n, ps, poisoned=[3], zero=[4])
    statuses: list[dict[str, Any]] = []
    source = await _image_source(nursery, tmp_path, guest, statuses)
    where = tmp_path / "fs"
    where.mkdir()
    fs = "hugetlbfs" if kind == "hugetlb" else "tmpfs"
    mount = subprocess.run(["mount", "-t", fs, "none", str(where)], capture_output=True, text=True)
    if mount.returncode:
        pytest.skip(f"cannot mount a {fs} for the test: {mount.stderr.strip()}")
    path = where / "guest.mem"
    try:
        d = Daemon(str(tmp_path / "h.sock"), source, precopy=str(path))
        async with trio.open_nursery() as daemon:  # stopped before the file system goes
            await daemon.start(d.daemon.serve)
            (done,) = await d.wait_for("precopy-done")
            assert done["pages"] == n - 1 and done["epoch"] and not done["cut_short"]
            vmm = await ToyVMM.start(d.path, n * ps, memory=kind, memory_file=str(path))
            try:
                check_touches(guest, await vmm.touch("all"))
                (session,) = d.daemon.sessions.values()
                st = session.stats
                assert (st["continued"], st["copied"], st["zeroed"]) == (n - 1, 0, 0)
            finally:
                await vmm.close()
            serving = await _ended(statuses, 3)  # the daemon's probe, the precopy, the VMM's
            assert serving["vouched_pages"] == n - 1 and serving["data_pages"] == 0
            daemon.cancel_scope.cancel()
    finally:
        path.unlink(missing_ok=True)
        subprocess.run(["umount", str(where)], check=True)


async def test_a_precopy_of_other_regions_is_refused(nursery: trio.Nursery) -> None:
    guest = make_guest(4, poisoned=[], zero=[])
    source = await start_source(nursery, guest.backend())
    with memory.shmem(4 * 4096) as m:
        assert m.fd is not None
        other = Precopy(None, (bytes(8),), 1, 0)  # a one-page region's
        with pytest.raises(ValueError, match=r"cover 1 pages, the region at 0x[0-9a-f]+ has 4"):
            async with serve_memory([Region(m.addr, m.size, 0)], source, memory_file=m.fd,
                                    precopy=other):  # fmt: skip
                pass
