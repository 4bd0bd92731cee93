"""MINOR mode's precopy: the guest's memory written into the page cache of the file that will
back it, before the switchover, while the guest may still run at the source.

The source's push is placed by the same data plane and ledgers as ever, with no userfaultfd:
each page is written through an unregistered mapping of the file (``up_ledger_minor``) and its
digest kept as written. The source starts a precopy epoch first: from then on it can tell which
pages changed (a live process: soft-dirty bits; an image: none), so after the switchover an
unchanged page is confirmed without being read or hashed at either end.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

import trio

from uffdpoison.auth import Token
from uffdpoison.destination.regions import Region, RegionMap
from uffdpoison.destination.session import Session, SessionFailed, StatusSink, serving
from uffdpoison.kernel.tls import TlsContext

log = logging.getLogger(__name__)


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


@dataclass(frozen=True, slots=True)
class MemoryFile:
    """A MINOR-mode handoff's guest memory file, and what a precopy into it kept (or None)."""

    fd: int
    precopy: Precopy | None = None


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
        async with serving(session) as nursery:
            if switchover is not None:
                nursery.start_soon(_cancel_on, switchover, nursery.cancel_scope)
            await session.completed.wait()
        counts = session.page_counts()
        digests = tuple(bytes(led.digests or b"") for led in session.ledgers)
        return Precopy(session.epoch, digests, counts["present"], counts["poisoned"])
    finally:
        session.close()


async def _cancel_on(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


class PrecopyFile:
    """The daemon's precopy (``uffdpoison dest --precopy PATH``): guest memory into a file on
    tmpfs or hugetlbfs that the VMM will map, registered MISSING|MINOR, and hand over. The
    file is created (0600, owned like the handoff socket) and sized to the guest when the
    source first answers; the precopy runs until it is complete or a VMM hands over (the
    switchover), whichever comes first. A handoff whose memory file is this file (the same
    inode) is served with what the precopy kept."""

    def __init__(self, path: str, owner: tuple[int, int] | None = None) -> None:
        self.path = path
        self.owner = owner
        self.result: Precopy | None = None
        self.page_size = 0
        self._identity: tuple[int, int] | None = None
        self._switchover = trio.Event()
        self._done = trio.Event()

    def _open(self, memory_size: int) -> int:
        st = os.statvfs(os.path.dirname(os.path.abspath(self.path)))
        self.page_size = st.f_bsize if st.f_bsize > 4096 else 4096  # hugetlbfs: its page
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, memory_size)
            if self.owner is not None:
                os.fchown(fd, *self.owner)
            fst = os.fstat(fd)
            self._identity = (fst.st_dev, fst.st_ino)
        except BaseException:
            os.close(fd)
            raise
        return fd

    async def run(
        self,
        source: str,
        memory_size: int,
        *,
        token: Token | None = None,
        tls: TlsContext | None = None,
        status: StatusSink | None = None,
    ) -> None:
        """Precopy into the file; any failure is logged and leaves no precopy (the sessions
        then confirm each cached page by its digest, or fetch it)."""
        emit = status or (lambda _d: None)
        try:
            fd = self._open(memory_size)
        except OSError as e:
            log.error("precopy into %s: %s", self.path, e.strerror or e)
            emit({"event": "precopy-failed", "path": self.path, "reason": str(e)})
            self._done.set()
            return
        t0 = trio.current_time()
        emit({"event": "precopy-started", "path": self.path, "bytes": memory_size})
        try:
            region = Region(self.page_size, memory_size, 0, page_size=self.page_size)
            self.result = await precopy(
                [region], source, fd, hugetlb=self.page_size > 4096, token=token, tls=tls,
                switchover=self._switchover,
            )  # fmt: skip
            pages, cut = self.result.pages, self._switchover.is_set()
            log.info(
                "precopy into %s: %d pages in %.3f s%s",
                self.path,
                pages,
                trio.current_time() - t0,
                " (cut short by the switchover)" if cut else "",
            )
            emit({"event": "precopy-done", "path": self.path, "pages": pages, "cut_short": cut,
                  "epoch": self.result.epoch is not None,
                  "seconds": round(trio.current_time() - t0, 3)})  # fmt: skip
        except (SessionFailed, OSError) as e:
            log.error("precopy into %s failed: %s", self.path, e)
            emit({"event": "precopy-failed", "path": self.path, "reason": str(e)})
        finally:
            os.close(fd)
            self._done.set()

    async def switchover(self, memory_file: int, regions: RegionMap) -> Precopy | None:
        """A VMM handed over ``memory_file``: the precopy stops (a page being written is
        finished first); what it kept for ``regions``, if that file is this one."""
        self._switchover.set()
        await self._done.wait()
        st = os.fstat(memory_file)
        if self.result is None or (st.st_dev, st.st_ino) != self._identity:
            return None
        if regions.page_size != self.page_size:
            return None
        ps, whole = self.page_size, self.result.digests[0]
        return Precopy(
            self.result.epoch,
            tuple(whole[r.offset // ps * 8 : r.offset_end // ps * 8] for r in regions),
            self.result.pages,
            self.result.poisoned,
        )
