"""MINOR mode: guest memory in a shmem or hugetlbfs file whose page cache was filled before the
switchover; each fault asks the source only "poisoned, or changed?" (docs/DESIGN.md, "MINOR
mode"). Real memfds, a real source on loopback, C toucher threads."""

from __future__ import annotations

from array import array
from collections.abc import Callable
from typing import Any

import pytest
import trio
from destination_helpers import make_guest, start_source

from uffdpoison.destination.embed import serve_memory
from uffdpoison.destination.regions import Region
from uffdpoison.harness.toucher import Toucher
from uffdpoison.kernel import Ledger, PageState, RegisterMode, Userfaultfd, memory
from uffdpoison.kernel.ledger import PoisonOverwriteRefused
from uffdpoison.kernel.uffd import UffdError

HUGE = 2 << 20


def _kind(kind: str, hugepages: Callable[[int], int], n: int) -> int:
    if kind == "hugetlb":
        hugepages(n + 1)  # the toucher's and the test's own pages come from the same pool
        return HUGE
    return 4096


@pytest.mark.parametrize("kind", ["shmem", "hugetlb"])
async def test_cached_pages_are_confirmed_changed_ones_sent_poisoned_ones_marked(
    nursery: trio.Nursery, kind: str, hugepages: Callable[[int], int]
) -> None:
    """The file holds the precopy; then the source changed some pages and some were poisoned,
    and some never reached the cache. Every page touched: changed and absent pages arrive
    byte-exact (DATA), poisoned ones SIGBUS (again after completion), the rest are mapped as
    they are (CLEAN) with no page data on the wire."""
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
        async with serve_memory(
            [region], source, memory_file=m.fd, background=False, hugetlb=kind == "hugetlb"
        ) as server:
            t = Toucher(array("Q", (m.addr + i * ps for i in range(n))), digest=True, page_size=ps)
            t.start()
            await t.wait()
            st = server.stats
            counts = server.page_counts()
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
        assert st["minor_faults"] == n - len(absent) - len(guest.poisoned)  # poison: known
        assert counts["poisoned"] == len(guest.poisoned)
        assert counts["present"] == n - len(guest.poisoned)
        # Touched again, the poisoned pages still SIGBUS.
        again = Toucher(array("Q", (m.addr + i * ps for i in guest.poisoned)))
        again.start()
        await again.wait()
        assert list(again.results.outcome) == [1] * len(guest.poisoned)
    await trio.sleep(0.1)
    ended = [s for s in statuses if s["event"] == "session-ended"]
    assert ended and ended[0]["data_pages"] == len(changed) + len(absent)
    assert ended[0]["clean_pages"] == clean
    # The page data on the wire is the changed and absent pages, and a header per reply.
    assert ended[0]["bytes_urgent"] <= (len(changed) + len(absent)) * ps + 64 * n


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
