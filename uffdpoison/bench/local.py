"""Micro-benchmark of the LOCAL fault path: Python handler vs the C reference handler.

A C toucher thread (the vCPU stand-in) reads one byte of each page of a freshly registered
private anonymous region, in order; every touch is a MISSING fault. Each fault is resolved by

* ``python``: a minimal trio handler on the real ledger path:
  ``trio.lowlevel.wait_readable(uffd)`` → batched ``Userfaultfd.read_events`` → ``Ledger.copy``
  of that one page;
* ``c``: the C reference handler (``uffdpoison.harness.cref.LocalHandler``): poll, read, COPY.

Rounds of the two alternate (which one goes first alternates too), with the same CPU placement,
on a new region each round. Reported: per-touch latency p50/p99/mean over all rounds, the ratio
Python/C, and the CPUs the toucher and each handler actually ran on.

Placements (2-vCPU machine): ``same`` pins toucher and handler to one CPU, ``cross`` puts them
on two different CPUs, ``free`` pins nothing.

    python -m uffdpoison.bench.local --pages 2000 --rounds 10 --placement same
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from array import array
from collections.abc import Sequence
from typing import Any

import trio

from uffdpoison.harness.cref import LocalHandler
from uffdpoison.harness.toucher import Toucher, current_cpu
from uffdpoison.kernel import EventBatch, RegisterMode, Userfaultfd, anon
from uffdpoison.kernel._ffi import ffi
from uffdpoison.kernel.ledger import Ledger
from uffdpoison.stats import percentile

PLACEMENTS = ("same", "cross", "free")
PAGE = 4096
_PAGEFAULT = 0x12
TIMEOUT = 60.0  # seconds a round may take before it is declared hung


def _cpus(placement: str) -> tuple[int | None, int | None]:
    """(toucher CPU, handler CPU) for a placement."""
    allowed = sorted(os.sched_getaffinity(0))
    if placement == "free":
        return None, None
    if placement == "same":
        return allowed[0], allowed[0]
    if placement == "cross":
        if len(allowed) < 2:
            raise ValueError(f"placement 'cross' needs two CPUs, this process may use {allowed}")
        return allowed[0], allowed[1]
    raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")


class _Region:
    """A registered anon region of ``pages`` pages; closes everything on exit."""

    def __init__(self, pages: int) -> None:
        self.mem = anon(pages * PAGE)
        self.uffd = Userfaultfd.create()
        try:
            self.uffd.register(self.mem.addr, self.mem.size, RegisterMode.MISSING)
        except BaseException:
            self.close()
            raise
        self.base = self.mem.addr
        self.size = self.mem.size

    def addresses(self, order: Sequence[int] | None = None) -> array:
        """Page addresses in ``order`` (page indices; default: every page, ascending)."""
        if order is None:
            return array("Q", range(self.base, self.base + self.size, PAGE))
        return array("Q", (self.base + i * PAGE for i in order))

    def close(self) -> None:
        self.uffd.close()
        self.mem.close()

    def __enter__(self) -> _Region:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _python_handler(region: _Region, ledger: Ledger, src: int, expected: int) -> int:
    """Resolve ``expected`` faults; returns the CPU this (trio) thread ran on."""
    fd = region.uffd.fileno()
    batch = EventBatch(64)
    raw = batch.raw
    read = region.uffd.read_events
    copy = ledger.copy
    wait = trio.lowlevel.wait_readable
    base = region.base
    shift = PAGE.bit_length() - 1
    placed = 0
    cpu = current_cpu()
    while placed < expected:
        # Read first, wait only when nothing is pending: on one CPU the toucher's next fault
        # is often already queued by the time the COPY returns.
        n = read(batch)
        if n == 0:
            await wait(fd)
            continue
        for i in range(n):
            e = raw[i]
            if e.kind == _PAGEFAULT:
                idx = (e.address - base) >> shift
                copy(idx, 1, src + (idx << shift))
                placed += 1
    return cpu


def _python_round(
    pages: int,
    src: int,
    tcpu: int | None,
    hcpu: int | None,
    order: Sequence[int] | None = None,
    threads: int = 1,
) -> dict[str, Any]:
    """One round of the Python handler; ``order`` (page indices) and ``threads`` shape the
    toucher. Returns the touch results, the handler's CPU and the touch phase's seconds."""
    expected = pages if order is None else len(order)
    with _Region(pages) as region, Ledger(region.uffd, region.base, region.size, PAGE) as ledger:
        toucher = Toucher(
            region.addresses(order), threads=threads, cpus=None if tcpu is None else [tcpu]
        )
        old = os.sched_getaffinity(0)
        if hcpu is not None:
            os.sched_setaffinity(0, {hcpu})  # this thread only: trio runs here

        async def main() -> int:
            with trio.fail_after(TIMEOUT):
                t0 = time.perf_counter()
                toucher.start()
                cpu = await _python_handler(region, ledger, src, expected)
                await toucher.wait()
                seconds.append(time.perf_counter() - t0)
                return cpu

        seconds: list[float] = []
        try:
            hcpu_seen = trio.run(main)
        finally:
            os.sched_setaffinity(0, old)
            if not toucher.join(TIMEOUT):
                raise RuntimeError(f"toucher hung: {toucher.pending} touches pending")
        return {"results": toucher.results, "handler_cpu": hcpu_seen, "seconds": seconds[0]}


def _c_round(
    pages: int,
    src: int,
    tcpu: int | None,
    hcpu: int | None,
    order: Sequence[int] | None = None,
    threads: int = 1,
) -> dict[str, Any]:
    """One round of the C handler; same arguments and result as :func:`_python_round`."""
    with _Region(pages) as region:
        toucher = Toucher(
            region.addresses(order), threads=threads, cpus=None if tcpu is None else [tcpu]
        )
        with LocalHandler(region.uffd.fileno(), region.base, region.size, src=src, cpu=hcpu) as h:
            t0 = time.perf_counter()
            results = toucher.run(timeout=TIMEOUT)
            seconds = time.perf_counter() - t0
            st = h.stats()
        if st.errors:
            raise RuntimeError(f"C handler failed: {os.strerror(st.last_errno)}")
        return {"results": results, "handler_cpu": st.cpu, "seconds": seconds}


def _summary(lat: array) -> dict[str, float]:
    s = sorted(lat)
    n = len(s)

    def pct(p: float) -> int:
        return percentile(s, p)

    return {
        "touches": n,
        "p50_ns": pct(50),
        "p90_ns": pct(90),
        "p99_ns": pct(99),
        "mean_ns": round(statistics.fmean(s), 1),
        "max_ns": s[-1],
    }


def run(pages: int, rounds: int, placement: str, *, warmup: int = 1) -> dict[str, Any]:
    """Interleaved rounds of both handlers; returns the figures (latencies in ns)."""
    if pages < 1 or rounds < 1:
        raise ValueError(f"pages and rounds must be >= 1, got {pages}, {rounds}")
    tcpu, hcpu = _cpus(placement)
    data = bytearray(os.urandom(pages * PAGE))
    src_buf = ffi.from_buffer(data)
    src = int(ffi.cast("uintptr_t", src_buf))
    expect = bytes(data[i * PAGE] for i in range(pages))
    lat: dict[str, array] = {"python": array("Q"), "c": array("Q")}
    seen: dict[str, set[int]] = {"toucher": set(), "python": set(), "c": set()}
    rounds_fn = {"python": _python_round, "c": _c_round}
    for r in range(warmup + rounds):
        order = ("python", "c") if r % 2 == 0 else ("c", "python")
        for name in order:
            out = rounds_fn[name](pages, src, tcpu, hcpu)
            res = out["results"]
            if res.ok != pages or res.value.tobytes() != expect:
                raise RuntimeError(f"{name} round {r}: wrong bytes or failed touches ({res.ok} ok)")
            if r < warmup:
                continue
            lat[name].extend(res.latency_ns)
            seen["toucher"].update(res.cpus)
            seen[name].add(out["handler_cpu"])
    py, c = _summary(lat["python"]), _summary(lat["c"])
    return {
        "benchmark": "local fault path",
        "pages": pages,
        "rounds": rounds,
        "placement": placement,
        "cpus": {k: sorted(v) for k, v in seen.items()},
        "python": py,
        "c": c,
        "ratio_p50": round(py["p50_ns"] / c["p50_ns"], 3),
        "ratio_p99": round(py["p99_ns"] / c["p99_ns"], 3),
    }


def _print(res: dict[str, Any]) -> None:
    cpus = res["cpus"]
    print(
        f"local fault path: {res['pages']} pages x {res['rounds']} rounds, "
        f"placement {res['placement']} (toucher CPU {cpus['toucher']}, "
        f"python handler CPU {cpus['python']}, C handler CPU {cpus['c']})"
    )
    for name in ("python", "c"):
        s = res[name]
        print(
            f"  {name:<6} p50 {s['p50_ns'] / 1000:7.2f} us  p90 {s['p90_ns'] / 1000:7.2f} us  "
            f"p99 {s['p99_ns'] / 1000:7.2f} us  mean {s['mean_ns'] / 1000:7.2f} us  "
            f"({s['touches']} touches)"
        )
    print(f"  python/C: p50 {res['ratio_p50']:.2f}x  p99 {res['ratio_p99']:.2f}x")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m uffdpoison.bench.local", description=__doc__)
    ap.add_argument("--pages", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument(
        "--placement", choices=(*PLACEMENTS, "all"), default="all", help="CPU placement"
    )
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    placements = PLACEMENTS[:2] if args.placement == "all" else (args.placement,)
    for p in placements:
        res = run(args.pages, args.rounds, p)
        if args.json:
            print(json.dumps(res))
        else:
            _print(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
