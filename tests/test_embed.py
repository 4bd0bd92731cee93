"""The embedding API: this process's own memory served from a source on loopback."""

from __future__ import annotations

import random
import threading
from array import array
from pathlib import Path

import pytest
import trio
from destination_helpers import make_guest, start_source

from uffdpoison.destination.embed import ThreadedPageServer, serve_memory
from uffdpoison.destination.regions import Region
from uffdpoison.harness.toucher import Toucher
from uffdpoison.kernel import memory
from uffdpoison.kernel.digest import page_digests
from uffdpoison.kernel.ledger import PageState
from uffdpoison.source.spawn import source_process

PS = 4096


async def test_serve_memory_touch_everything(nursery: trio.Nursery) -> None:
    guest = make_guest(128)
    source = await start_source(nursery, guest.backend())
    with memory.anon(len(guest.image)) as m:
        async with serve_memory([Region(m.addr, len(guest.image), 0)], source) as server:
            t = Toucher(array("Q", (m.addr + i * PS for i in range(guest.npages))), digest=True)
            t.start()
            await t.wait()
            r = t.results
            await server.wait_complete()
            assert server.page_counts()["poisoned"] == len(guest.poisoned)
        digests = guest.digests()
        for i in range(guest.npages):
            if i in guest.poisoned:
                assert r.outcome[i] == 1
            else:
                assert r.outcome[i] == 0 and r.digest[i] == digests[i]


async def test_faults_are_served_while_the_background_stream_runs(tmp_path: Path) -> None:
    """A steady bulk push must not starve the fault reader: a touch far ahead of the push is
    answered by a demand request, not left blocked until the push gets there. (The source is
    a separate process, as in production: only then does the push arrive faster than it is
    placed.)"""
    # Scattered zero pages cut the push into many small frames, none big enough to be split.
    rng = random.Random(3)
    n = 16384
    guest = make_guest(n, poisoned=[], zero=[i for i in range(n) if rng.random() < 0.25])
    image = tmp_path / "guest.img"
    image.write_bytes(guest.image)
    with source_process(image) as source, memory.anon(len(guest.image)) as m:
        async with serve_memory([Region(m.addr, len(guest.image), 0)], source) as server:
            far = [n - 1, n - 1000, n - 3000, n - 5000]
            t = Toucher(array("Q", (m.addr + i * PS for i in far)), digest=True)
            t.start()
            await t.wait()
            assert t.results.ok == len(far)
            assert server.stats["faults"] >= 1, "no fault was read while the push ran"
            assert server.stats["demand_requests"] >= 1
            await server.wait_complete()


async def test_ensure_present_lets_python_read(nursery: trio.Nursery) -> None:
    guest = make_guest(64, poisoned=[2], zero=[])
    # A trickle of background so the range is still unplaced when we ask for it.
    source = await start_source(nursery, guest.backend(), max_bandwidth=4096)
    with memory.anon(len(guest.image)) as m:
        async with serve_memory([Region(m.addr, len(guest.image), 0)], source) as server:
            led = server.session.ledgers[0]
            assert led.state(40) == PageState.MISSING
            poisoned = await server.ensure_present(m.addr + 40 * PS, 4 * PS)
            assert poisoned == []
            assert m.read(40 * PS, 4 * PS) == bytes(guest.image[40 * PS : 44 * PS])
            poisoned = await server.ensure_present(m.addr, 4 * PS)
            assert poisoned == [m.addr + 2 * PS]  # never read it: it would SIGBUS
            assert m.read(0, 2 * PS) == bytes(guest.image[: 2 * PS])


async def test_discard_in_embedded_session(nursery: trio.Nursery) -> None:
    """MADV_DONTNEED of a poisoned and a data page: the poison stays, the data reads zero."""
    guest = make_guest(16, poisoned=[3], zero=[])
    source = await start_source(nursery, guest.backend())
    with memory.anon(len(guest.image)) as m:
        async with serve_memory([Region(m.addr, len(guest.image), 0)], source) as server:
            await server.wait_complete()
            # madvise waits for the REMOVE event to be read: call it off the trio thread.
            await trio.to_thread.run_sync(m.discard, 3 * PS, PS)
            await trio.to_thread.run_sync(m.discard, 5 * PS, PS)
            t = Toucher(array("Q", [m.addr + 3 * PS, m.addr + 5 * PS]), digest=True)
            t.start()
            await t.wait()
            r = t.results
            assert r.outcome[0] == 1
            assert r.outcome[1] == 0 and r.digest[1] == page_digests(bytes(PS), PS)[0]
            assert server.stats["repoisoned"] == 1
            assert server.stats["zero_after_remove"] == 1


def test_threaded_page_server() -> None:
    guest = make_guest(32)
    backend = guest.backend()

    ready: list[str] = []
    stop = threading.Event()

    def source_thread() -> None:
        async def main() -> None:
            async with trio.open_nursery() as n:
                ready.append(await start_source(n, backend))
                while not stop.is_set():
                    await trio.sleep(0.01)
                n.cancel_scope.cancel()

        trio.run(main)

    th = threading.Thread(target=source_thread)
    th.start()
    try:
        while not ready:
            threading.Event().wait(0.01)
        with memory.anon(len(guest.image)) as m:  # noqa: SIM117
            with ThreadedPageServer([Region(m.addr, len(guest.image), 0)], ready[0]) as server:
                poisoned = server.ensure_present(m.addr, len(guest.image))
                assert poisoned == [m.addr + i * PS for i in guest.poisoned]
                for i in range(guest.npages):
                    if i not in guest.poisoned:
                        assert m.read(i * PS, PS) == bytes(guest.image[i * PS : (i + 1) * PS])
                server.wait_complete()
                assert server.completed
                counts = server.page_counts()
                assert counts["poisoned"] == len(guest.poisoned)
                assert counts["present"] == guest.npages - len(guest.poisoned)
    finally:
        stop.set()
        th.join()


async def test_unreachable_source_is_a_clear_error() -> None:
    with memory.anon(PS) as m, pytest.raises(ConnectionError, match="unreachable"):
        async with serve_memory([Region(m.addr, PS, 0)], "127.0.0.1:1"):
            pass


async def test_discards_racing_the_background_stream(tmp_path: Path) -> None:
    """Balloon-style discards while pages stream in: a placement that meets the pending REMOVE
    event (EAGAIN) is retried after the event is read, never lost or misapplied. Afterwards
    every discarded page reads as zeros, every other page as the source's bytes, and every
    poisoned page (discarded or not) still raises SIGBUS."""
    n = 8192
    poisoned = [5, 100, 4000, 8000]
    guest = make_guest(n, poisoned=poisoned, zero=[])
    image = tmp_path / "guest.img"
    image.write_bytes(guest.image)
    listing = tmp_path / "poison.txt"
    listing.write_text("".join(f"{i * PS}\n" for i in poisoned))
    discarded = sorted({i for k in range(0, n, 128) for i in range(k, k + 8)} | {100})
    with source_process(image, poison_list=listing) as source, memory.anon(n * PS) as m:
        async with serve_memory([Region(m.addr, n * PS, 0)], source) as server:

            def balloon() -> None:
                for i in discarded:
                    m.discard(i * PS, PS)

            await trio.to_thread.run_sync(balloon)  # madvise waits for its REMOVE to be read
            await server.wait_complete()
            t = Toucher(array("Q", (m.addr + i * PS for i in range(n))), digest=True)
            t.start()
            await t.wait()
            r = t.results
            assert server.stats["removes"] >= len(discarded)
    zero = page_digests(bytes(PS), PS)[0]
    digests = guest.digests()
    gone = set(discarded)
    for i in range(n):
        if i in poisoned:
            assert r.outcome[i] == 1, f"poisoned page {i} readable"
        elif i in gone:
            assert r.outcome[i] == 0 and r.digest[i] == zero, f"discarded page {i} not zero"
        else:
            assert r.outcome[i] == 0 and r.digest[i] == digests[i], f"page {i} bytes differ"
