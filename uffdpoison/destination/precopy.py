"""MINOR mode's precopy: the guest's memory written into the page cache of the file that will
back it, before the switchover, while the guest may still run at the source.

The source's push is placed by the same data plane and ledgers as ever, with no userfaultfd:
each page is written through an unregistered mapping of the file (``up_ledger_minor``) and its
digest kept as written. The source starts a precopy epoch first: from then on it can tell which
pages changed (a live process: soft-dirty bits; an image: none), so after the switchover an
unchanged page is confirmed without being read or hashed at either end.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import trio

from uffdpoison.auth import Token
from uffdpoison.destination.regions import Region, RegionMap
from uffdpoison.destination.session import Session, SessionFailed, StatusSink
from uffdpoison.exgroups import leaf_of
from uffdpoison.kernel.tls import TlsContext


@dataclass(frozen=True, slots=True)
class Precopy:
    """What a precopy left in the file: the source's epoch (None: it cannot tell changes, so
    each page's digest decides), and per region the XXH64 of each page as written (8 bytes a
    page, 0 where not known). Give it to ``serve_memory(..., precopy=)`` with the same
    regions."""

    epoch: bytes | None
    digests: tuple[bytes, ...]
    pages: int  # pages written (data or zeros)
    poisoned: int  # pages the source said are poisoned (never written)


async def precopy(
    regions: Iterable[Region],
    source: str,
    memory_file: int,
    *,
    hugetlb: bool = False,
    token: Token | None = None,
    tls: TlsContext | None = None,
    status: StatusSink | None = None,
    switchover: trio.Event | None = None,
) -> Precopy:
    """Fill ``memory_file`` (shmem or hugetlbfs, each region at its ``offset`` in it) with the
    guest from ``source``; returns when every page is in it (or known poisoned), or as soon
    as ``switchover`` is set: the pages not written yet are then absent from the cache, and
    fault as MISSING once served. Nothing is registered: the regions' addresses only name the
    pages (they may be the VMM's mapping of the file, as later for ``serve_memory``). Raises
    ``SessionFailed`` or ``SourceLost``."""
    rmap = RegionMap(regions)
    session = await Session.connect(
        None, rmap, source, memory_file=memory_file, epoch=b"", hugetlb=hugetlb,
        token=token, tls=tls, status=status, name="precopy",
    )  # fmt: skip
    try:
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(session.run)
                if switchover is not None:
                    nursery.start_soon(_cancel_on, switchover, nursery.cancel_scope)
                await session.completed.wait()
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            failed = leaf_of(group, SessionFailed)
            if failed is None:
                raise
            raise failed from None
        counts = session.page_counts()
        digests = tuple(bytes(led.digests or b"") for led in session.ledgers)
        return Precopy(session.epoch, digests, counts["present"], counts["poisoned"])
    finally:
        session.close()


async def _cancel_on(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()
