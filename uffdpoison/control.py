"""How trio, the control plane, drives a C data plane (``uffdpoison.kernel.planes``).

A data plane's loop blocks in C with the GIL released, so it runs in a worker thread of its
own: a ``CapacityLimiter`` per loop (trio's default limiter of 40 would make the 41st session
wait behind the others), with the affinity of the thread that started it (a pinned handler
stays pinned). Cancelling the task stops the loop and waits for it to return. Its notes are
awaited on their eventfd and taken in one call.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable

import trio

from uffdpoison.kernel.planes import Flag, Note


async def run_loop(loop: Callable[[], None], stop: Callable[[], None]) -> None:
    """Run a data plane's blocking ``loop`` in a thread of its own until it returns;
    cancellation calls ``stop`` and then waits for the loop to return."""
    affinity = os.sched_getaffinity(0)

    def target() -> None:
        before = os.sched_getaffinity(0)
        if before != affinity:
            os.sched_setaffinity(0, affinity)
        try:
            loop()
        finally:
            if before != affinity:
                os.sched_setaffinity(0, before)

    async def stop_when_cancelled() -> None:
        try:
            await trio.sleep_forever()
        finally:
            stop()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stop_when_cancelled)
        try:
            await trio.to_thread.run_sync(target, limiter=trio.CapacityLimiter(1))
        finally:
            nursery.cancel_scope.cancel()


async def notes(
    fd: int, take: Callable[[], tuple[Flag, list[Note]]]
) -> AsyncIterator[tuple[Flag, list[Note]]]:
    """What a data plane tells, as it tells it: (flags raised, notes left), never empty."""
    try:
        while True:
            await trio.lowlevel.wait_readable(fd)
            flags, got = take()
            if flags or got:
                yield flags, got
    finally:
        trio.lowlevel.notify_closing(fd)  # the plane closes it when freed
