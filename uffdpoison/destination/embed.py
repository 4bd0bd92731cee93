"""Embedding API: serve guest memory of *this* process from a source.

For a custom VMM written in Python. The same ``Session`` (ledger, fault loop) as the daemon.

.. warning:: **The GIL rule.** A thread that touches guest memory not yet placed blocks inside the
   kernel until the page server places it. If that thread holds the GIL — any Python code reading
   the region: ``bytes(view)``, a memoryview slice, ``ctypes.string_at`` — the page server, which
   is Python in the same process, can never run, and the process deadlocks. Touch guest memory
   only from vCPU threads running C (KVM_RUN, or code called through cffi/ctypes, which release
   the GIL), and before Python reads guest memory call ``ensure_present(addr, length)``. Never
   read a page it reports poisoned: that raises SIGBUS. (The C data plane serves a fault without
   the GIL while the source answers; recovering from a lost source needs Python, so the rule
   stands.)

Two shapes::

    async with serve_memory(regions, "127.0.0.1:7000") as server:   # in a trio program
        poisoned = await server.ensure_present(addr, 4096)

    with ThreadedPageServer(regions, "127.0.0.1:7000") as server:   # anywhere else
        poisoned = server.ensure_present(addr, 4096)
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager, suppress
from typing import Any

import trio
from prometheus_client import CollectorRegistry, generate_latest

from uffdpoison.auth import Token
from uffdpoison.destination.link import AuthenticationFailed as AuthenticationFailed
from uffdpoison.destination.precopy import Precopy as Precopy, precopy as precopy
from uffdpoison.destination.regions import Region, RegionMap
from uffdpoison.destination.session import (
    REQUEST_TIMEOUT,
    RESUME_DEADLINE,
    Session,
    SessionFailed as SessionFailed,
    SourceLost as SourceLost,
    StatusSink,
    serving,
)
from uffdpoison.kernel import Feature, RegisterMode, Userfaultfd
from uffdpoison.kernel.tls import TlsContext
from uffdpoison.metrics import DestCollector, DestSnapshot, from_any_thread, registry_of

FEATURES = Feature.EVENT_REMOVE | Feature.EVENT_UNMAP | Feature.THREAD_ID


class PageServer:
    """Handle on a running embedded session."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self._registry = registry_of(DestCollector(from_any_thread(self._snapshot)))

    def _snapshot(self) -> DestSnapshot | None:
        try:
            return DestSnapshot([self.session.sample()])
        except ValueError:  # closed: the serve_memory block has exited
            return None

    @property
    def registry(self) -> CollectorRegistry:
        """This session's Prometheus metrics (the daemon's, labelled with the session's
        ``name``), read when scraped, from any thread: e.g.
        ``prometheus_client.start_http_server(9100, registry=server.registry)``."""
        return self._registry

    def metrics_text(self) -> str:
        """The metrics now, in Prometheus's text format."""
        return generate_latest(self._registry).decode()

    @property
    def completed(self) -> bool:
        return self.session.completed.is_set()

    @property
    def stats(self) -> dict[str, int]:
        return self.session.stats

    def page_counts(self) -> dict[str, int]:
        return self.session.page_counts()

    async def ensure_present(self, addr: int, length: int) -> list[int]:
        """Make [addr, addr+length) safe to read; returns the poisoned page addresses in it."""
        return await self.session.ensure_present(addr, length)

    async def wait_complete(self) -> None:
        """Until every page is PRESENT, POISONED or REMOVED (the source is no longer needed)."""
        await self.session.completed.wait()


@asynccontextmanager
async def serve_memory(
    regions: Iterable[Region],
    source: str,
    *,
    hugetlb: bool = False,
    background: bool = True,
    status: StatusSink | None = None,
    name: str = "embedded",
    request_timeout: float = REQUEST_TIMEOUT,
    resume_deadline: float = RESUME_DEADLINE,
    token: Token | None = None,
    tls: TlsContext | None = None,
    memory_file: int | None = None,
    precopy: Precopy | None = None,
) -> AsyncIterator[PageServer]:
    """Register ``regions`` of this process with a new userfaultfd and serve them from
    ``source`` (``HOST:PORT``) until the block exits.

    The memory must be mapped and not yet touched (a page already present is never fetched).
    On exit the range is unregistered: pages not placed by then read as zeros afterwards, so
    ``await server.wait_complete()`` first if the guest will keep running.

    ``background=False`` opens no bulk connection: pages arrive only when touched (or through
    ``ensure_present``), which isolates demand-fault latency for measurements.

    A lost source (closed, reset, silent past ``request_timeout`` seconds or the keepalive)
    pauses the session: vCPUs wait, nothing is guessed; it reconnects with backoff and resumes
    (status events ``session-paused`` / ``session-resumed``). If the source is not back within
    ``resume_deadline`` seconds the block raises ``SourceLost`` (the pages not placed stay
    blocked until the range is unregistered on exit).

    ``token`` (``uffdpoison.auth.Token``, e.g. ``Token.from_file(path)``): the source and we
    prove we hold it before anything of the guest crosses; a source that cannot is refused
    (``AuthenticationFailed``, a ``ConnectionError``). ``tls`` (a client
    ``uffdpoison.kernel.tls.TlsContext``): every byte encrypted, the source's certificate
    checked.

    ``memory_file`` (MINOR mode): the fd of the shmem or hugetlbfs file the regions map
    (MAP_SHARED), each region at its ``offset`` in it, its page cache filled before (precopy):
    the regions are registered MISSING|MINOR; a page in the cache is served by asking the
    source whether it is poisoned or changed (CLEAN: mapped as it is, no page data on the
    wire; changed: the new bytes; poisoned: a marker), an absent one is fetched. ``precopy``
    (what ``precopy()`` into that file returned, for the same regions): a fault sends the
    digest it kept instead of hashing the page, and a source that still tracks its epoch
    confirms an unchanged page without reading it.
    """
    rmap = RegionMap(regions)
    uffd = Userfaultfd.create(FEATURES)
    mode = RegisterMode.MISSING
    if memory_file is not None:
        mode |= RegisterMode.MINOR  # MINOR alone maps zeros for a page not in the cache
    try:
        for r in rmap:
            uffd.register(r.base, r.size, mode)
        session = await Session.connect(
            uffd, rmap, source, bulk=background, hugetlb=hugetlb, name=name, status=status,
            request_timeout=request_timeout, resume_deadline=resume_deadline, token=token,
            tls=tls, memory_file=memory_file,
            epoch=precopy.epoch if precopy else None,
            digests=precopy.digests if precopy else None,
        )  # fmt: skip
        try:
            async with serving(session):
                yield PageServer(session)
        finally:
            for r in rmap:
                with suppress(OSError):
                    uffd.unregister(r.base, r.size)
            session.close()
    finally:
        uffd.close()


class ThreadedPageServer:
    """``serve_memory`` on a thread of its own, for VMMs that are not trio programs."""

    def __init__(self, regions: Iterable[Region], source: str, **kwargs: Any) -> None:
        self._regions = list(regions)
        self._source = source
        self._kwargs = kwargs
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.CancelScope | None = None
        self._server: PageServer | None = None

    def start(self, timeout: float = 30.0) -> ThreadedPageServer:
        self._thread = threading.Thread(target=self._main, name="uffdpoison", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("page server did not start")
        if self._error is not None:
            raise self._error
        return self

    def _main(self) -> None:
        try:
            trio.run(self._amain)
        except BaseException as e:  # surfaced through start() / close()
            self._error = e
        finally:
            self._ready.set()

    async def _amain(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as scope:
            self._stop = scope
            async with serve_memory(self._regions, self._source, **self._kwargs) as server:
                self._server = server
                self._ready.set()
                await trio.sleep_forever()

    def _call(self, fn: Any, *args: Any) -> Any:
        if self._token is None or self._server is None:
            raise RuntimeError("page server is not running")
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def ensure_present(self, addr: int, length: int) -> list[int]:
        """Blocks this thread (GIL released) until the range is placed; see module doc."""
        assert self._server is not None
        return self._call(self._server.ensure_present, addr, length)

    def wait_complete(self) -> None:
        assert self._server is not None
        self._call(self._server.wait_complete)

    @property
    def completed(self) -> bool:
        return self._server is not None and self._server.completed

    def stats(self) -> dict[str, int]:
        assert self._server is not None
        return self._server.stats

    def page_counts(self) -> dict[str, int]:
        """Pages in each ledger state (``missing`` ... ``poisoned``); read without a lock."""
        assert self._server is not None
        return self._server.page_counts()

    @property
    def registry(self) -> CollectorRegistry:
        """``PageServer.registry``: scraped from any thread, read on the page server's."""
        assert self._server is not None
        return self._server.registry

    def metrics_text(self) -> str:
        assert self._server is not None
        return self._server.metrics_text()

    def close(self) -> None:
        if self._thread is None:
            return
        if self._stop is not None and self._token is not None and self._thread.is_alive():
            with suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._stop.cancel, trio_token=self._token)
        self._thread.join()
        self._thread = None
        if self._error is not None and not isinstance(self._error, trio.Cancelled):
            raise self._error

    def __enter__(self) -> ThreadedPageServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
