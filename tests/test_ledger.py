"""The page ledger: the placement table of docs/DESIGN.md against the real kernel."""

from __future__ import annotations

import select
import threading

import kernel_raw as _raw
import pytest
from conftest import SIGBUS_CODES, wait_events

from uffdpoison.harness.toucher import OUTCOME_OK, OUTCOME_SIGBUS, Toucher
from uffdpoison.kernel import (
    HUGE_PAGE_SIZE,
    PAGE_SIZE,
    EventPending,
    Feature,
    RegisterMode,
    Userfaultfd,
    anon,
    hugetlb,
    shmem,
)
from uffdpoison.kernel.ledger import (
    Ledger,
    LedgerError,
    PageState,
    PlaceResult,
    PoisonOverwriteRefused,
)

P = PAGE_SIZE
ALL = list(PageState)


def pages(byte: int, n: int) -> bytes:
    return bytes([byte]) * (n * P)


@pytest.fixture
def region(uffd: Userfaultfd):
    with anon(64 * P) as m:
        uffd.register(m.addr, m.size, RegisterMode.MISSING)
        ledger = Ledger(uffd, m.addr, m.size, P)
        try:
            yield uffd, m, ledger
        finally:
            ledger.close()
            uffd.unregister(m.addr, m.size)


def test_strict_copy_over_poison_is_refused_before_any_ioctl(region) -> None:
    uffd, m, ledger = region
    assert ledger.poison(5, 1) == PlaceResult(1, 0, 0, 0, 0)
    assert ledger.state(5) == PageState.POISONED
    with pytest.raises(PoisonOverwriteRefused) as ei:
        ledger.copy(0, 64, pages(0xAB, 64))
    assert (ei.value.first_page, ei.value.pages) == (5, 1)
    assert ledger.refused_total == 1
    assert ledger.counts[PageState.PRESENT] == 0
    # nothing was placed: the kernel still sees page 0 as empty, and page 5 still SIGBUSes
    assert _raw.zeropage(uffd, m.addr, P) == P
    assert Toucher([m.addr + 5 * P]).run(5).outcome[0] == OUTCOME_SIGBUS


@pytest.mark.parametrize("op", ["zero", "continue_"])
def test_strict_zero_and_continue_refuse_too(uffd: Userfaultfd, op: str) -> None:
    # on shmem the kernel lets ZEROPAGE and CONTINUE replace a marker
    with shmem(4 * P) as m, Ledger(uffd, m.addr, m.size, P) as ledger:
        uffd.register(m.addr, m.size, RegisterMode.MISSING | RegisterMode.MINOR)
        if op == "continue_":  # CONTINUE maps what the page cache holds
            m.write(0, pages(0x61, 4), alias=True)
        ledger.poison(2, 1)
        with pytest.raises(PoisonOverwriteRefused):
            getattr(ledger, op)(0, 4)
        r = getattr(ledger, op)(0, 4, strict=False)
        assert (r.placed, r.refused) == (3, 1)
        res = Toucher([m.addr + i * P for i in range(4)]).run(5)
        assert list(res.outcome) == [OUTCOME_OK, OUTCOME_OK, OUTCOME_SIGBUS, OUTCOME_OK]
        assert ledger.refused_total == 2
        uffd.unregister(m.addr, m.size)


def test_non_strict_copy_places_around_poison(region) -> None:
    _uffd, m, ledger = region
    ledger.poison(10, 2)
    r = ledger.copy(0, 64, pages(0xCD, 64), strict=False)
    assert r == PlaceResult(placed=62, already=0, refused=2, dropped=0, raced=0)
    assert ledger.counts[PageState.PRESENT] == 62 and ledger.counts[PageState.POISONED] == 2
    assert ledger.complete
    res = Toucher([m.addr + 9 * P, m.addr + 10 * P, m.addr + 12 * P]).run(5)
    assert list(res.outcome) == [OUTCOME_OK, OUTCOME_SIGBUS, OUTCOME_OK]
    assert res.value[0] == 0xCD


def test_poison_again_and_poison_over_data(region) -> None:
    _uffd, _m, ledger = region
    ledger.poison(3, 1)
    # the marker is still there: EEXIST from the kernel, counted as already
    assert ledger.poison(3, 1) == PlaceResult(0, 1, 0, 0, 0)
    ledger.zero(4, 1)
    r = ledger.poison(2, 4)  # pages 2..5: MISSING, POISONED, PRESENT, MISSING
    assert r == PlaceResult(placed=2, already=2, refused=0, dropped=0, raced=0)
    assert ledger.state(4) == PageState.PRESENT  # data stays
    assert [ledger.state(i) for i in (2, 3, 5)] == [PageState.POISONED] * 3


def test_partial_progress_resumes_and_reconciles(region) -> None:
    uffd, m, ledger = region
    _raw.zeropage(uffd, m.addr + 30 * P, P)  # placed behind the ledger's back
    r = ledger.copy(0, 64, pages(0x5E, 64))
    assert r == PlaceResult(placed=63, already=0, refused=0, dropped=0, raced=1)
    assert ledger.counts[PageState.PRESENT] == 64 and ledger.raced_total == 1
    assert m.read(29 * P, 1) == b"\x5e" and m.read(30 * P, 1) == b"\x00"
    assert m.read(31 * P, P) == pages(0x5E, 1)


def test_raced_page_is_woken(region) -> None:
    uffd, m, ledger = region
    t = Toucher([m.addr + 3 * P])
    t.start()
    batch = _raw.EventBatch(4)
    assert wait_events(uffd, batch) == 1
    # someone places the page without waking the vCPU
    with anon(P) as src:
        assert _raw.copy(uffd, m.addr + 3 * P, src.addr, P, wake=False) == P
    assert not t.join(0.2)
    r = ledger.copy(0, 8, pages(1, 8))
    assert r.raced == 1 and r.placed == 7
    assert t.join(5) and t.results.outcome[0] == OUTCOME_OK


def test_removed_pages_drop_data_take_zero(region) -> None:
    _uffd, _m, ledger = region
    assert ledger.mark(0, 4, PageState.REMOVED, only_from=[PageState.MISSING]) == 4
    assert ledger.copy(0, 4, pages(9, 4)) == PlaceResult(0, 0, 0, 4, 0)
    assert ledger.zero(0, 4) == PlaceResult(4, 0, 0, 0, 0)
    assert ledger.counts[PageState.PRESENT] == 4 and ledger.counts[PageState.REMOVED] == 0


def test_mark_find_and_addressing(region) -> None:
    _uffd, m, ledger = region
    assert ledger.npages == 64 and ledger.index(m.addr + 5 * P + 7) == 5
    assert ledger.address(5) == m.addr + 5 * P
    assert ledger.mark(8, 8, PageState.REQUESTED, only_from=[PageState.MISSING]) == 8
    assert ledger.mark(0, 64, PageState.BACKGROUND, only_from=[PageState.MISSING]) == 56
    assert ledger.find(0, [PageState.REQUESTED]) == 8
    assert ledger.find(9, [PageState.REQUESTED, PageState.PRESENT]) == 9
    assert ledger.find(16, [PageState.REQUESTED]) == -1
    assert ledger.counts[PageState.BACKGROUND] == 56 and not ledger.complete
    with pytest.raises(LedgerError):
        ledger.index(m.addr + m.size)
    with pytest.raises(IndexError):
        ledger.mark(60, 8, PageState.PRESENT, only_from=ALL)
    with pytest.raises(LedgerError, match="outside"):
        ledger.copy(60, 8, pages(0, 8))
    with pytest.raises(ValueError, match="short"):
        ledger.copy(0, 2, pages(0, 1))


def test_event_pending_stops_with_nothing_lost() -> None:
    with Userfaultfd.create(Feature.EVENT_REMOVE) as u, anon(8 * P) as m:
        u.register(m.addr, m.size, RegisterMode.MISSING)
        ledger = Ledger(u, m.addr, m.size, P)
        ledger.zero(0, 1)
        th = threading.Thread(target=m.discard, args=(0, P))  # blocks until the event is read
        th.start()
        try:
            # once the REMOVE is queued (fd readable), placements see mmap_changing
            r, _, _ = select.select([u.fileno()], [], [], 5)
            assert r
            with pytest.raises(EventPending) as ei:
                ledger.copy(1, 4, pages(2, 4))
            assert ei.value.result.placed == 0 and ei.value.stop_page == 1  # type: ignore[attr-defined]
            assert ei.value.done == 0
            assert ledger.counts[PageState.MISSING] == 7  # nothing recorded as placed
            batch = _raw.EventBatch(4)
            assert _raw.read_events(u, batch) == 1 and batch[0].kind == _raw.EventKind.REMOVE
        finally:
            th.join(5)
        assert ledger.copy(1, 4, pages(2, 4)).placed == 4
        ledger.close()
        u.unregister(m.addr, m.size)


def test_long_non_strict_run_is_placed_in_slices_with_one_result(region) -> None:
    """A non-strict call over more than one 64 KiB slice (the lock is taken per slice, so a
    demand placement waits behind one slice of a bulk run): one result over the whole run,
    poison refused and a raced page reconciled wherever they fall."""
    uffd, m, ledger = region
    ledger.poison(40, 1)
    _raw.zeropage(uffd, m.addr + 20 * P, P)  # placed behind the ledger's back, in another slice
    r = ledger.copy(3, 60, pages(0x77, 60), strict=False)
    assert r == PlaceResult(placed=58, already=0, refused=1, dropped=0, raced=1)
    assert ledger.counts[PageState.PRESENT] == 59 and ledger.counts[PageState.POISONED] == 1
    assert m.read(3 * P, 1) == b"\x77" and m.read(62 * P, 1) == b"\x77"
    assert m.read(19 * P, 1) == b"\x77" and m.read(21 * P, 1) == b"\x77"
    assert Toucher([m.addr + 40 * P]).run(5).outcome[0] == OUTCOME_SIGBUS


def test_hugetlb_ledger_zero_copy_poison(uffd: Userfaultfd, hugepages) -> None:
    hugepages(3)
    H = HUGE_PAGE_SIZE
    with hugetlb(3 * H) as m, Ledger(uffd, m.addr, m.size, H, hugetlb=True) as ledger:
        uffd.register(m.addr, m.size, RegisterMode.MISSING)
        assert ledger.npages == 3
        assert ledger.zero(0, 1).placed == 1  # COPY from a zero huge page: no ZEROPAGE here
        assert ledger.poison(1, 1).placed == 1
        with pytest.raises(PoisonOverwriteRefused):
            ledger.copy(1, 2, b"\x01" * (2 * H))
        assert ledger.copy(2, 1, b"\x01" * H).placed == 1
        res = Toucher([m.addr + 5, m.addr + H + 5, m.addr + 2 * H + 5]).run(5)
        assert list(res.outcome) == [OUTCOME_OK, OUTCOME_SIGBUS, OUTCOME_OK]
        assert list(res.value)[0::2] == [0, 1]
        uffd.unregister(m.addr, m.size)


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1])


def test_one_tib_region_costs_no_rss(uffd: Userfaultfd) -> None:
    tib = 1 << 40
    before = _rss_kib()
    with anon(tib, noreserve=True) as m:
        uffd.register(m.addr, m.size, RegisterMode.MISSING)
        with Ledger(uffd, m.addr, m.size, P) as ledger:
            assert ledger.npages == tib // P
            assert ledger.counts[PageState.MISSING] == tib // P
            far = ledger.npages - 3
            assert ledger.poison(far, 1).placed == 1
            assert ledger.find(0, [PageState.POISONED]) == far  # a scan of the whole array
            grown = _rss_kib() - before
            assert grown < 8 * 1024, f"RSS grew {grown} KiB for a 1 TiB region"
        uffd.unregister(m.addr, m.size)


def test_bad_input_is_named(region) -> None:
    uffd, m, ledger = region
    with pytest.raises(ValueError, match="placement pages -1"):
        ledger.zero(-1, 1)
    with pytest.raises(ValueError, match="unsigned 64-bit"):
        _raw.copy(uffd, m.addr, -5, P)
    with pytest.raises(LedgerError, match="not aligned"):
        Ledger(uffd, m.addr + 1, P, P)


def test_claim_requests_a_page_exactly_once(region) -> None:
    """The fault path's claim: MISSING and BACKGROUND become REQUESTED (one request), every
    other state is reported untouched, poison included."""
    _, _, ledger = region
    assert ledger.claim(0) == PageState.MISSING
    assert ledger.state(0) == PageState.REQUESTED
    assert ledger.claim(0) == PageState.REQUESTED  # a second fault coalesces
    ledger.mark(1, 1, PageState.BACKGROUND, only_from=[PageState.MISSING])
    assert ledger.claim(1) == PageState.BACKGROUND
    assert ledger.state(1) == PageState.REQUESTED
    ledger.poison(2, 1)
    assert ledger.claim(2) == PageState.POISONED
    assert ledger.state(2) == PageState.POISONED
    counts = ledger.counts
    assert counts[PageState.REQUESTED] == 2 and counts[PageState.POISONED] == 1


def _race(ledger: Ledger, n: int, reverse: bool) -> list[int]:
    """COPY every page from one thread while another POISONs every page; returns the pages
    whose POISON call reported it placed the marker."""
    poisoned: list[int] = []
    start = threading.Barrier(2)
    data = pages(0x5A, 1)

    def copier() -> None:
        start.wait()
        for i in range(n):
            ledger.copy(i, 1, data, strict=False)

    def poisoner() -> None:
        start.wait()
        for i in range(n - 1, -1, -1) if reverse else range(n):
            if ledger.poison(i, 1).placed:
                poisoned.append(i)

    threads = [threading.Thread(target=copier), threading.Thread(target=poisoner)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return poisoned


def test_copy_and_poison_racing_on_one_ledger_never_unpoison(uffd: Userfaultfd) -> None:
    """Two threads place on the same pages of one ledger at once (the demand engine's thread
    and Python's bulk push do): COPY from one, POISON from the other. The ledger's mutex makes
    check-state -> ioctl -> record atomic, so a COPY can never land on a marker placed between
    its check and its ioctl (the kernel would let it). Every page the POISON thread placed
    ends POISONED in the ledger and SIGBUSes when touched; every other page holds the data."""
    n = 256
    for rnd in range(32):
        with anon(n * P) as m:
            uffd.register(m.addr, m.size, RegisterMode.MISSING)
            ledger = Ledger(uffd, m.addr, m.size, P)
            try:
                poisoned = _race(ledger, n, reverse=rnd % 2 == 1)
                states = [ledger.state(i) for i in range(n)]
                assert all(s in (PageState.PRESENT, PageState.POISONED) for s in states)
                bad = [i for i in poisoned if states[i] != PageState.POISONED]
                assert not bad, f"round {rnd}: poisoned pages {bad[:5]} ended {states[bad[0]]}"
                assert ledger.counts[PageState.POISONED] == len(poisoned)
                res = Toucher([m.addr + i * P for i in range(n)]).run(10)
                for i in range(n):
                    if states[i] == PageState.POISONED:
                        assert res.outcome[i] == OUTCOME_SIGBUS, f"page {i}: marker overwritten"
                        assert res.si_code[i] in SIGBUS_CODES
                    else:
                        assert res.outcome[i] == OUTCOME_OK and res.value[i] == 0x5A
            finally:
                ledger.close()
                uffd.unregister(m.addr, m.size)


def test_mark_never_moves_a_poisoned_page(region) -> None:
    """POISONED is terminal: a mark from every state leaves it (a COPY could follow)."""
    _uffd, _m, ledger = region
    ledger.poison(3, 1)
    assert ledger.mark(0, 8, PageState.REMOVED, only_from=ALL) == 7
    assert ledger.state(3) is PageState.POISONED
    assert ledger.copy(3, 1, pages(0, 1), strict=False).refused == 1
