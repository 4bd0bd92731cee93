"""``uffdpoison demo``: a whole postcopy migration with poison, on an embedded default.

Builds a synthetic guest (random pages, zero pages, ~1% poisoned), starts a source for it on
loopback (a separate process, as on a real source host), serves it into this process's memory
with the embedding API, touches every page in random order from C toucher threads, and checks
every byte (XXH64 of each page, computed by the toucher in C) and that every poisoned page raises
SIGBUS — again after the background stream has finished. ``--plot`` draws the run's timeline
(``uffdpoison.timeline``). ``--mode minor``: the guest memory is a shmem or hugetlbfs file
whose page cache a precopy filled first; after the switchover every fault is confirmed with the
source (CLEAN, no page data) and the background confirms the rest.

Exit status: 0 everything held, 1 a mismatch, 2 a setup error or a failed migration (the
reason is printed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import random
import re
import sys
import tempfile
import time
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from uffdpoison import __version__
from uffdpoison.console import Progress
from uffdpoison.destination.embed import Precopy, SessionFailed, precopy, serve_memory
from uffdpoison.destination.regions import Region
from uffdpoison.harness.toucher import OUTCOME_SIGBUS, Toucher
from uffdpoison.kernel import memory
from uffdpoison.kernel.digest import page_digests
from uffdpoison.plotting import missing_matplotlib
from uffdpoison.source.spawn import SourceStartError, source_process
from uffdpoison.stats import percentile
from uffdpoison.timeline import SAMPLE_S, Sampler, plot, touch_series
from uffdpoison.units import count_arg, fraction_arg, size_arg

log = logging.getLogger(__name__)

JSON_SCHEMA = "uffdpoison.demo/1"
HUGE = 2 << 20
FAULT_THRESHOLD_NS = 10_000
ZERO_RUN_MEAN = 32  # a touch slower than this took a fault (as ANCHORS.md counts them)


class SetupError(Exception):
    """The demo could not start (permissions, missing kernel feature, bad option)."""


@dataclass
class Guest:
    image: bytearray
    page_size: int
    zero: array = field(default_factory=lambda: array("Q"))  # page indices
    poisoned: array = field(default_factory=lambda: array("Q"))

    @property
    def npages(self) -> int:
        return len(self.image) // self.page_size


def build_guest(
    size: int, page_size: int, *, poison_fraction: float, zero_fraction: float, seed: int
) -> Guest:
    """Random pages; all-zero pages in runs (free memory comes in stretches, as in a real
    guest: a mean run of ``ZERO_RUN_MEAN`` pages); poisoned pages scattered one by one."""
    rng = random.Random(seed)
    image = bytearray(size)
    chunk = 1 << 20  # randbytes() of a whole guest overflows past 256 MiB
    for off in range(0, size, chunk):
        n = min(chunk, size - off)
        image[off : off + n] = rng.randbytes(n)
    npages = size // page_size
    is_zero = bytearray(npages)
    want = round(npages * zero_fraction)
    have = 0
    mean = ZERO_RUN_MEAN if page_size == 4096 else 1
    while have < want:
        start = rng.randrange(npages)
        run = min(want - have, max(1, round(rng.expovariate(1 / mean))), npages - start)
        for i in range(start, start + run):
            have += not is_zero[i]
            is_zero[i] = 1
    n_poison = max(1, round(npages * poison_fraction)) if poison_fraction > 0 else 0
    candidates = [i for i in range(npages) if not is_zero[i]] or list(range(npages))
    poisoned = array("Q", sorted(rng.sample(candidates, k=min(n_poison, len(candidates)))))
    for i in poisoned:
        is_zero[i] = 0
    zero = array("Q", (i for i in range(npages) if is_zero[i]))
    blank = bytes(page_size)
    for i in zero:
        image[i * page_size : (i + 1) * page_size] = blank
    return Guest(image, page_size, zero, poisoned)


def _pct(sorted_ns: list[int], p: float) -> float:
    """µs; 0 when there is nothing to measure (no faulting touch)."""
    return percentile(sorted_ns, p) / 1000.0 if sorted_ns else 0.0


@contextlib.contextmanager
def _source_process(guest: Guest, workdir: Path, max_bandwidth: str | None) -> Iterator[str]:
    image_path = workdir / "guest.img"
    image_path.write_bytes(guest.image)
    poison_path = workdir / "poison.txt"
    poison_path.write_text(
        "# synthetic guest: poisoned pages\n"
        + "".join(f"{i * guest.page_size:#x}\n" for i in guest.poisoned)
    )
    try:
        with source_process(
            image_path, poison_list=poison_path, max_bandwidth=max_bandwidth
        ) as address:
            yield address
    except SourceStartError as e:
        raise SetupError(str(e)) from None


def _mapping(kind: str, size: int) -> memory.Mapping:
    try:
        return memory.of_kind(kind, size)
    except OSError as e:
        raise SetupError(f"cannot map {size} bytes of {kind} memory: {e}") from e


async def _bulk_only(source: str, kind: str, size: int, page_size: int, timeout: float) -> float:
    """Seconds from connecting to every page resident, with no vCPU touching anything."""
    with _mapping(kind, size) as m:
        region = Region(base=m.addr, size=size, offset=0, page_size=page_size)
        t0 = time.monotonic()
        async with serve_memory([region], source, hugetlb=kind == "hugetlb") as server:
            with trio.move_on_after(timeout) as scope:
                await server.wait_complete()
            if scope.cancelled_caught:
                raise SetupError(f"the stream alone did not complete within {timeout} s")
            return time.monotonic() - t0


async def _run(args: argparse.Namespace, out: dict[str, Any]) -> bool:
    page_size = HUGE if args.memory == "hugetlb" else 4096
    size = args.size
    if size <= 0 or size % page_size:
        raise SetupError(f"--size {size} must be a positive multiple of the page size {page_size}")
    progress = Progress(not args.quiet)
    t0 = time.monotonic()
    guest = build_guest(
        size,
        page_size,
        poison_fraction=args.poison_fraction,
        zero_fraction=args.zero_fraction,
        seed=args.seed,
    )
    expected = page_digests(guest.image, page_size)
    is_poisoned = bytearray(guest.npages)
    for i in guest.poisoned:
        is_poisoned[i] = 1
    progress.show(
        f"guest: {guest.npages} pages of {page_size} B, {len(guest.zero)} zero, "
        f"{len(guest.poisoned)} poisoned",
        force=True,
    )

    with contextlib.ExitStack() as stack:
        workdir = Path(
            stack.enter_context(
                tempfile.TemporaryDirectory(
                    prefix="uffdpoison-demo-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None
                )
            )
        )
        if args.memory == "hugetlb":
            try:
                stack.enter_context(memory.reserve_hugepages(size // HUGE))
            except OSError as e:
                raise SetupError(f"cannot reserve {size // HUGE} huge pages: {e}") from e
        source = stack.enter_context(_source_process(guest, workdir, args.max_bandwidth))
        del guest.image  # the source process has it; keep only digests here
        minor = args.mode == "minor"
        if not minor:
            # The same migration with nobody faulting: what the stream alone moves, for the
            # residency rate under faulting to be compared with (the same source, this run;
            # before the guest's own mapping: hugetlb reserves pages for one at a time).
            bulk_only_s = await _bulk_only(source, args.memory, size, page_size, args.timeout)
        mapping = stack.enter_context(_mapping(args.memory, size))
        region = Region(base=mapping.addr, size=size, offset=0, page_size=page_size)
        pc: Precopy | None = None
        if minor:  # before the switchover: the guest's memory into the file's page cache
            progress.show("precopy into the page cache ...", force=True)
            t_pre = time.monotonic()
            assert mapping.fd is not None
            pc = await precopy([region], source, mapping.fd, hugetlb=args.memory == "hugetlb")
            precopy_s = time.monotonic() - t_pre
        order = list(range(size // page_size))
        random.Random(args.seed + 1).shuffle(order)
        addrs = array("Q", (mapping.addr + i * page_size for i in order))
        t_session = time.monotonic()
        async with serve_memory(
            [region], source, hugetlb=args.memory == "hugetlb",
            memory_file=mapping.fd if minor else None, precopy=pc,
        ) as server:  # fmt: skip
            toucher = Toucher(addrs, threads=args.threads, page_size=page_size, digest=True)
            origin_ns = time.monotonic_ns()  # the timeline's 0: the vCPU threads start
            t_touch = origin_ns / 1e9
            sampler = Sampler(origin_ns)
            done: dict[str, float] = {}  # when every page was touched / resident

            async def touched() -> None:
                await trio.to_thread.run_sync(toucher.join, None, abandon_on_cancel=True)
                done["touched"] = time.monotonic()

            async def resident() -> None:
                await server.wait_complete()
                done["resident"] = time.monotonic()

            def take_sample() -> None:
                stats, counts, n = server.stats, server.page_counts(), toucher.completed
                sampler.sample(stats, counts, n)
                progress.show(
                    f"touched {n}/{len(addrs)} pages · present {counts['present']} · "
                    f"poisoned {counts['poisoned']} · demand faults {stats['demand_requests']}"
                )

            toucher.start()
            with trio.move_on_after(args.timeout) as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(touched)
                    nursery.start_soon(resident)
                    while len(done) < 2:
                        take_sample()
                        await trio.sleep(SAMPLE_S)
            take_sample()
            if scope.cancelled_caught:
                raise SetupError(
                    f"migration did not complete within {args.timeout} s: {server.page_counts()}"
                )
            first = toucher.results
            touch_s = done["touched"] - t_touch
            total_s = max(done.values()) - t_touch
            resident_s = done["resident"] - t_session
            # After the background stream: every poisoned page must still SIGBUS, data stays.
            poisoned_addrs = array("Q", (mapping.addr + i * page_size for i in guest.poisoned))
            again = Toucher(poisoned_addrs, threads=1, page_size=page_size).run(timeout=60)
            sample = order[: min(len(order), 4096)]
            resample = Toucher(
                array("Q", (mapping.addr + i * page_size for i in sample)),
                threads=1,
                page_size=page_size,
                digest=True,
            ).run(timeout=60)
            stats = server.stats
            counts = server.page_counts()
        progress.done()

    mismatches: list[str] = []
    lat_fault: list[int] = []
    for k, page in enumerate(order):
        outcome = first.outcome[k]
        if is_poisoned[page]:
            if outcome != 1:
                mismatches.append(f"page {page}: poisoned at the source but read without SIGBUS")
        elif outcome != 0:
            mismatches.append(f"page {page}: touch raised SIGBUS but the page is not poisoned")
        elif first.digest[k] != expected[page]:
            mismatches.append(f"page {page}: bytes differ from the source")
        if outcome == 0 and first.latency_ns[k] > FAULT_THRESHOLD_NS:
            lat_fault.append(first.latency_ns[k])
    for k in range(len(poisoned_addrs)):
        if again.outcome[k] != 1:
            mismatches.append(f"poisoned page {guest.poisoned[k]} readable after completion")
    for k, page in enumerate(sample):
        if is_poisoned[page]:
            continue
        if resample.outcome[k] != 0 or resample.digest[k] != expected[page]:
            mismatches.append(f"page {page}: changed after completion")
    lat_fault.sort()
    lat_all = sorted(first.latency_ns[k] for k in range(len(order)) if first.outcome[k] == 0)
    touches = touch_series(origin_ns, first.done_ns, first.latency_ns, first.outcome,
                           sigbus=OUTCOME_SIGBUS, fault_ns=FAULT_THRESHOLD_NS)  # fmt: skip
    out.update(
        {
            "schema": JSON_SCHEMA,
            "ok": not mismatches,
            "config": {
                "size": size,
                "page_size": page_size,
                "memory": args.memory,
                "poison_fraction": args.poison_fraction,
                "zero_fraction": args.zero_fraction,
                "seed": args.seed,
                "threads": args.threads,
                "max_bandwidth": args.max_bandwidth,
                "mode": args.mode,
            },
            "guest": {
                "pages": len(order),
                "zero": len(guest.zero),
                "poisoned": len(guest.poisoned),
            },
            "placed": {
                "copied": stats["copied"],
                "zero": stats["zeroed"],
                "poisoned": stats["poisoned"],
                "confirmed": stats["continued"],  # MINOR mode: CLEAN, mapped as cached
                "refused": stats["refused"],
            },
            "pages": counts,
            "faults": {
                "demand_requests": stats["demand_requests"],
                "coalesced": stats["coalesced"],
                "sigbus_first_pass": first.sigbus,
                "sigbus_after_completion": again.sigbus,
            },
            "latency_us": {
                "faulting_touches": len(lat_fault),
                "fault_threshold_us": FAULT_THRESHOLD_NS / 1000,
                "p50": _pct(lat_fault, 50),
                "p90": _pct(lat_fault, 90),
                "p99": _pct(lat_fault, 99),
                "max": _pct(lat_fault, 100),
                "all_touches_p50": _pct(lat_all, 50),
                "all_touches_p99": _pct(lat_all, 99),
            },
            "seconds": {
                "setup": round(t_touch - t0, 3),
                "touch_all": round(touch_s, 3),
                "to_completion": round(total_s, 3),
            },
            "throughput_mb_s": round(size / total_s / 1e6, 1) if total_s else None,
            "residency": {
                "under_faulting_gb_s": round(size / resident_s / 1e9, 3),
                "bulk_only_gb_s": None if minor else round(size / bulk_only_s / 1e9, 3),
                "ratio": None if minor else round(bulk_only_s / resident_s, 2),
            },
            "precopy": None
            if pc is None
            else {
                "seconds": round(precopy_s, 3),
                "pages": pc.pages,
                "epoch": pc.epoch is not None,  # the source vouches for unchanged pages
            },
            "timeline": sampler.as_dict() | touches,
            "mismatches": mismatches[:50],
            "mismatch_count": len(mismatches),
            "environment": {
                "kernel": platform.release(),
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "uffdpoison": __version__,
            },
        }
    )
    return not mismatches


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--size",
        type=size_arg,
        default=256 << 20,
        help="guest memory size, e.g. 256M, 1G (default 256M)",
    )
    p.add_argument(
        "--poison-fraction",
        type=fraction_arg,
        default=0.01,
        help="fraction of pages poisoned at the source (default 0.01)",
    )
    p.add_argument(
        "--zero-fraction",
        type=fraction_arg,
        default=0.25,
        help="fraction of all-zero pages (default 0.25)",
    )
    p.add_argument(
        "--memory",
        choices=memory.KINDS,
        default=None,
        help="kind of destination memory (default anon; shmem with --mode minor)",
    )
    p.add_argument(
        "--mode",
        choices=("missing", "minor"),
        default="missing",
        help="missing: pages fetched on first touch; minor: a precopy fills the memory "
        "file's page cache first, then each fault is confirmed with the source",
    )
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    p.add_argument(
        "--threads", type=count_arg, default=1, help="toucher (vCPU) threads (default 1)"
    )
    p.add_argument(
        "--max-bandwidth",
        default=None,
        help="cap the background stream, e.g. 200M (bytes/s); demand is never capped",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds to wait for the migration to complete (default 120)",
    )
    p.add_argument("--json", metavar="PATH", help="write the summary as JSON to PATH")
    p.add_argument(
        "--plot",
        metavar="PATH.png",
        help="draw the migration's timeline: resident pages, demand faults, fault latency, "
        "poisoned pages touched (needs matplotlib)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress line")


def _print_summary(out: dict[str, Any]) -> None:
    g, pl, lat, sec = out["guest"], out["placed"], out["latency_us"], out["seconds"]
    print(
        f"guest       {g['pages']} pages ({out['config']['size'] >> 20} MiB, "
        f"{out['config']['memory']}), {g['zero']} zero, {g['poisoned']} poisoned"
    )
    pre = out["precopy"]
    if pre is not None:
        vouched = "the source vouches for its epoch" if pre["epoch"] else "no epoch: digests"
        print(f"precopy     {pre['pages']} pages into the page cache in {pre['seconds']} s "
              f"({vouched})")  # fmt: skip
    confirmed = f"{pl['confirmed']} confirmed (CLEAN, no page data), " if pre else ""
    print(
        f"placed      {confirmed}{pl['copied']} copied, {pl['zero']} zero, "
        f"{pl['poisoned']} poisoned, {pl['refused']} refused overwrites"
    )
    f = out["faults"]
    print(
        f"faults      {f['demand_requests']} demand requests, {f['coalesced']} coalesced; "
        f"SIGBUS {f['sigbus_first_pass']} on first touch, {f['sigbus_after_completion']} "
        "after completion"
    )
    print(
        f"latency     faulting touches (> {lat['fault_threshold_us']:.0f} µs): "
        f"{lat['faulting_touches']}, p50 {lat['p50']:.1f} µs, p90 {lat['p90']:.1f} µs, "
        f"p99 {lat['p99']:.1f} µs, max {lat['max']:.1f} µs"
    )
    print(
        f"time        setup {sec['setup']} s, all pages touched {sec['touch_all']} s, "
        f"complete {sec['to_completion']} s ({out['throughput_mb_s']} MB/s)"
    )
    res = out["residency"]
    alone = f", {res['bulk_only_gb_s']} GB/s for the stream alone ({res['ratio']}x)"
    print(f"residency   {res['under_faulting_gb_s']} GB/s while the guest faults"
          f"{alone if res['ratio'] is not None else ''}")  # fmt: skip
    if out["ok"]:
        print("result      OK: every byte matched and every poisoned page raised SIGBUS")
    else:
        print(f"result      MISMATCH ({out['mismatch_count']}):")
        for m in out["mismatches"][:10]:
            print(f"  {m}")


_NUMBERS = re.compile(r"\[\s+(-?[\d.eE+-]+(?:,\s+-?[\d.eE+-]+)*)\s+\]")


def _json_text(out: dict[str, Any]) -> str:
    """Indented JSON with each array of numbers (the timeline's) on one line."""
    text = json.dumps(out, indent=2)
    return _NUMBERS.sub(lambda m: "[" + ", ".join(v.strip() for v in m[1].split(",")) + "]", text)


def main(args: argparse.Namespace) -> int:
    if args.plot and missing_matplotlib("uffdpoison demo"):
        return 2
    args.memory = args.memory or ("shmem" if args.mode == "minor" else "anon")
    if args.mode == "minor" and args.memory == "anon":
        print("uffdpoison demo: --mode minor needs --memory shmem or hugetlb (a file's page "
              "cache to precopy into)", file=sys.stderr)  # fmt: skip
        return 2
    out: dict[str, Any] = {}
    try:
        ok = trio.run(_run, args, out)
    except SetupError as e:
        print(f"uffdpoison demo: setup error: {e}", file=sys.stderr)
        return 2
    except SessionFailed as e:  # the source process died, or broke the protocol
        print(f"uffdpoison demo: the migration failed: {e}", file=sys.stderr)
        return 2
    except PermissionError as e:
        print(
            f"uffdpoison demo: setup error: no permission ({e}); userfaultfd needs root or "
            "vm.unprivileged_userfaultfd=1",
            file=sys.stderr,
        )
        return 2
    _print_summary(out)
    if args.json:
        Path(args.json).write_text(_json_text(out) + "\n")
    if args.plot:
        try:
            plot(out, args.plot)
        except (OSError, ValueError) as e:
            print(f"uffdpoison demo: --plot {args.plot}: {e}", file=sys.stderr)
            return 2
    return 0 if ok else 1
