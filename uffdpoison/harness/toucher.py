"""The C "vCPU" stand-in: pthreads that touch guest addresses and survive SIGBUS.

A :class:`Toucher` starts ``threads`` C threads that take indexes from one shared atomic cursor
(a thread blocked in a fault does not hold back the others) and touch each address with a
volatile one-byte read or write, timing it with ``CLOCK_MONOTONIC`` (how long it took, and when
it finished, on ``time.monotonic_ns()``'s clock). A SIGBUS (poisoned page, file hole) is caught
in C and recorded with its ``si_code`` and ``si_addr``; the process's previous SIGBUS handler
(pytest's faulthandler) is restored when the last toucher finishes.

Python never touches the memory itself, and every call that waits for the threads runs in C with
the GIL released, so a touch that blocks in a userfaultfd fault cannot deadlock a Python handler
running in the same process.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from uffdpoison.harness._ffi import ffi, lib
from uffdpoison.stats import percentile

__all__ = [
    "OUTCOME_NOT_RUN",
    "OUTCOME_OK",
    "OUTCOME_SIGBUS",
    "TouchResults",
    "Toucher",
    "current_cpu",
]

OUTCOME_OK = 0
OUTCOME_SIGBUS = 1
OUTCOME_NOT_RUN = 2

BUS_ADRERR = 2
BUS_MCEERR_AR = 4

# Touchers dropped while their threads were still blocked: their C state and result buffers must
# outlive the threads, so they are parked here and freed once the threads have finished.
_ABANDONED: list[tuple[Any, tuple[Any, ...]]] = []


def current_cpu() -> int:
    """The CPU the calling thread runs on now (sched_getcpu)."""
    return int(lib.up_toucher_current_cpu())


def _reap_abandoned() -> None:
    keep = []
    for handle, buffers in _ABANDONED:
        if lib.up_toucher_join(handle, 0):
            lib.up_toucher_free(handle)
        else:
            keep.append((handle, buffers))
    _ABANDONED[:] = keep


def _as_u64_array(addresses: Iterable[int] | Any) -> array:
    """Copy ``addresses`` (ints, ``array('Q')`` or any buffer of u64) into an ``array('Q')``."""
    try:
        view = memoryview(addresses)  # type: ignore[arg-type]
    except TypeError:
        try:
            return array("Q", addresses)
        except (TypeError, OverflowError) as exc:
            raise ValueError(f"addresses must be unsigned 64-bit integers: {exc}") from None
    with view:
        if view.itemsize != 8 and not (view.itemsize == 1 and view.nbytes % 8 == 0):
            raise ValueError(
                f"addresses buffer must hold u64 items (format {view.format!r}, "
                f"itemsize {view.itemsize})"
            )
        out = array("Q")
        out.frombytes(view.cast("B"))
        return out


@dataclass
class TouchResults:
    """Per-touch results, index-aligned with the addresses given to the toucher."""

    latency_ns: array  # 'Q'
    done_ns: array  # 'Q': when the touch finished, CLOCK_MONOTONIC (time.monotonic_ns); 0: not run
    outcome: array  # 'B': OUTCOME_OK, OUTCOME_SIGBUS, OUTCOME_NOT_RUN
    value: array  # 'B': byte read (or written) by the touch
    si_code: array  # 'i': SIGBUS si_code (BUS_ADRERR=2 here, BUS_MCEERR_AR=4 with MEMORY_FAILURE)
    si_addr: array  # 'Q': SIGBUS si_addr (the exact faulting byte)
    digest: array  # 'Q': XXH64 (seed 0) of the page holding the touch; empty unless asked
    cpus: list[int]  # per thread: the CPU it started on (sched_getcpu)

    @property
    def ok(self) -> int:
        return self.outcome.count(OUTCOME_OK)

    @property
    def sigbus(self) -> int:
        return self.outcome.count(OUTCOME_SIGBUS)

    @property
    def pending(self) -> int:
        return self.outcome.count(OUTCOME_NOT_RUN)

    def sigbus_addresses(self) -> list[int]:
        """``si_addr`` of every touch that took a SIGBUS, in address-list order."""
        return [a for a, o in zip(self.si_addr, self.outcome, strict=True) if o == OUTCOME_SIGBUS]

    def percentile(self, p: float, *, only_ok: bool = True) -> int:
        """Nearest-rank percentile ``p`` (0-100) of touch latency in ns.

        ``only_ok`` counts successful touches only; otherwise SIGBUS touches count too. Touches
        that have not run never count. Raises ValueError when no touch qualifies.
        """
        wanted = (OUTCOME_OK,) if only_ok else (OUTCOME_OK, OUTCOME_SIGBUS)
        lat = sorted(v for v, o in zip(self.latency_ns, self.outcome, strict=True) if o in wanted)
        if not lat:
            raise ValueError("no finished touches to take a percentile of")
        return percentile(lat, p)


class Toucher:
    """``threads`` C threads touching ``addresses`` (see the module docstring).

    ``write`` stores ``value`` at each address instead of reading it. ``digest`` computes, after
    each successful touch, the XXH64 (seed 0) of the ``page_size`` page that holds it. ``cpus``
    pins thread ``i`` to ``cpus[i % len(cpus)]``. Addresses are shared through one atomic cursor:
    whichever thread is free takes the next one.

    A blocking ``join()``/``run()`` must not be called from the thread that runs the fault
    handler for these touches (it would wait for itself): from a trio handler use ``wait()``.
    """

    def __init__(
        self,
        addresses: Iterable[int] | Any,
        *,
        threads: int = 1,
        write: bool = False,
        value: int = 0,
        page_size: int = 4096,
        digest: bool = False,
        cpus: Sequence[int] | None = None,
    ) -> None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        if not 0 <= value <= 255:
            raise ValueError(f"value must be a byte (0..255), got {value}")
        if page_size <= 0 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {page_size}")
        addrs = _as_u64_array(addresses)
        self._n = n = len(addrs)
        if cpus is not None:
            cpus = list(cpus)
            if not cpus:
                raise ValueError("cpus must not be empty (use None for no pinning)")
            allowed = os.sched_getaffinity(0)
            bad = [c for c in cpus if c not in allowed]
            if bad:
                raise ValueError(f"cpus {bad} not available to this process (allowed {allowed})")
        self._threads = threads
        self._write = bool(write)
        self._value = value
        self._page_size = page_size
        self._cpus = cpus
        cap = max(n, 1)
        self._addrs = ffi.new("uint64_t[]", cap)
        if n:
            ffi.memmove(self._addrs, addrs, n * 8)
        self._latency = ffi.new("uint64_t[]", cap)
        self._done_ns = ffi.new("uint64_t[]", cap)
        self._outcome = ffi.new("uint8_t[]", [OUTCOME_NOT_RUN] * cap)
        self._value_out = ffi.new("uint8_t[]", cap)
        self._si_code = ffi.new("int32_t[]", cap)
        self._si_addr = ffi.new("uint64_t[]", cap)
        self._digest = ffi.new("uint64_t[]", cap) if digest else ffi.NULL
        self._thread_cpu = ffi.new("int32_t[]", [-1] * threads)
        self._cpu_arr = ffi.new("int32_t[]", cpus) if cpus else ffi.NULL
        self._handle: Any = None
        self._done = False

    def __len__(self) -> int:
        return self._n

    def _outputs(self) -> tuple[Any, ...]:
        """The buffers the threads write, in up_toucher_start's order."""
        return (self._latency, self._done_ns, self._outcome, self._value_out, self._si_code,
                self._si_addr, self._digest, self._thread_cpu)  # fmt: skip

    def start(self) -> None:
        """Start the threads and return at once."""
        if self._handle is not None:
            raise RuntimeError("toucher already started (a Toucher runs once)")
        _reap_abandoned()
        out = ffi.new("up_toucher **")
        setup = (self._n, self._threads, int(self._write), self._value, self._page_size)
        ncpus = len(self._cpus) if self._cpus else 0
        rc = lib.up_toucher_start(out, self._addrs, *setup, self._cpu_arr, ncpus, *self._outputs())
        if rc < 0:
            raise OSError(-rc, f"starting {self._threads} toucher threads: {os.strerror(-rc)}")
        self._handle = out[0]

    def join(self, timeout: float | None = None) -> bool:
        """Wait (in C, GIL released) up to ``timeout`` s (None: forever); True when all done."""
        if self._handle is None:
            raise RuntimeError("toucher not started")
        if self._done:
            return True
        ms = -1 if timeout is None else max(0, int(timeout * 1000))
        self._done = bool(lib.up_toucher_join(self._handle, ms))
        return self._done

    async def wait(self) -> None:
        """Wait without blocking the trio event loop: ``join`` in a worker thread (in C, the
        GIL released), so nothing in this process wakes until the touches are done (polling
        would, every millisecond, on the CPUs the touches are measured on)."""
        if not self.join(0):
            await trio.to_thread.run_sync(self.join, None, abandon_on_cancel=True)

    def run(self, timeout: float | None = None) -> TouchResults:
        """Start, wait up to ``timeout`` s, return the results; TimeoutError if not all done."""
        self.start()
        if not self.join(timeout):
            raise TimeoutError(
                f"{self.pending} of {self._n} touches still pending after {timeout} s"
            )
        return self.results

    @property
    def completed(self) -> int:
        """Touches finished so far (ok or SIGBUS)."""
        return 0 if self._handle is None else int(lib.up_toucher_completed(self._handle))

    @property
    def pending(self) -> int:
        return self._n - self.completed

    @property
    def done(self) -> bool:
        return self._done or (self._handle is not None and self.join(0))

    @property
    def latency_view(self) -> memoryview:
        """Zero-copy view (format 'Q') of the per-touch latencies, live while threads run."""
        return memoryview(ffi.buffer(self._latency, self._n * 8)).cast("B").cast("Q")

    @property
    def outcome_view(self) -> memoryview:
        """Zero-copy view (format 'B') of the per-touch outcomes, live while threads run."""
        return memoryview(ffi.buffer(self._outcome, self._n)).cast("B")

    @property
    def results(self) -> TouchResults:
        """A copy of the results; a snapshot while threads still run."""
        n = self._n

        def copy(typecode: str, buf: Any) -> array:
            a = array(typecode)
            if n:
                a.frombytes(ffi.buffer(buf, n * a.itemsize))
            return a

        return TouchResults(
            latency_ns=copy("Q", self._latency),
            done_ns=copy("Q", self._done_ns),
            outcome=copy("B", self._outcome),
            value=copy("B", self._value_out),
            si_code=copy("i", self._si_code),
            si_addr=copy("Q", self._si_addr),
            digest=array("Q") if self._digest == ffi.NULL else copy("Q", self._digest),
            cpus=[int(self._thread_cpu[k]) for k in range(self._threads)],
        )

    def __del__(self) -> None:
        handle = getattr(self, "_handle", None)
        if handle is None:
            return
        self._handle = None
        if lib.up_toucher_join(handle, 0):
            lib.up_toucher_free(handle)
        else:
            # Threads still blocked (e.g. on an unresolved fault): keep everything they write to.
            _ABANDONED.append((handle, (self._addrs, self._cpu_arr, *self._outputs())))
