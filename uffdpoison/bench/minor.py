"""MINOR mode, measured (``uffdpoison bench --mode minor``): faults on pages whose cached copy
is current (CLEAN) or stale (DATA through the page cache), touches of poisoned pages, against
the MISSING fault of the same page size, all served from one child ``uffdpoison source`` (an
image) over loopback, and the same work done by a C reference, in one run.

    uffdpoison bench --mode minor [--memory shmem|hugetlb] [--pages N] [--rounds R]
                                  [--pin CPU] [--seed S] [--json PATH]

Each round maps fresh guest memory three ways, and a C toucher thread reads every page in
random order, with no background:

* ``missing``: an empty cache (anonymous memory for shmem), registered MISSING;
* ``clean-epoch``: the cache filled by ``precopy()``, whose epoch the source vouches for (an
  image never changes): a fault sends the digest kept at precopy, the source answers CLEAN
  without reading the page;
* ``clean-digest`` and ``data``: the cache filled by the VMM itself (no epoch), a tenth of the
  pages stale: each fault hashes the cached page, the source reads and hashes its own;
* ``poisoned``: the pages poisoned at the source (1 in 32), touched in the MINOR rounds: the
  touch's SIGBUS. uffdpoison knows them from the handshake and has the markers in place before
  the guest runs; the C reference learns each on its fault (a round trip, then POISON).

The C reference (``harness/cref.c``: a C handler thread asking a C page source over loopback;
MINOR: the digest with the request, CONTINUE, the source vouching or hashing) does each round
right after uffdpoison's. ``--pin CPU`` runs everything (both sides, both sources) on one CPU.
Exit status 0; 2 bad options or setup (e.g. huge pages unavailable, a source that does not
start or a session that fails: one line saying which).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from uffdpoison.destination.embed import SessionFailed, precopy, serve_memory
from uffdpoison.destination.regions import Region
from uffdpoison.harness.cref import PageSource, RemoteHandler, poison_bitmap
from uffdpoison.harness.toucher import Toucher
from uffdpoison.kernel import (
    HugePagesUnavailable,
    Mapping,
    RegisterMode,
    Userfaultfd,
    memory,
    page_digests,
    reserve_hugepages,
)
from uffdpoison.source.spawn import SourceProcess, SourceStartError
from uffdpoison.stats import percentile

HUGE = 2 << 20
CLASSES = ("missing", "clean-epoch", "clean-digest", "data", "poisoned")
FILLS = ("none", "precopy", "vmm")  # how the cache is filled before the touches


@dataclass(frozen=True, slots=True)
class Plan:
    memory: str  # shmem or hugetlb
    page_size: int
    image: bytes
    stale: frozenset[int]  # cached pages the VMM's own fill gets wrong
    poisoned: frozenset[int]

    @property
    def pages(self) -> int:
        return len(self.image) // self.page_size

    def mapping(self, fill: str) -> Mapping:
        kind = self.memory if fill != "none" or self.memory == "hugetlb" else "anon"
        return memory.of_kind(kind, len(self.image))

    def fill_as_vmm(self, m: Mapping) -> None:
        m.write(0, self.image, alias=True)
        for i in self.stale:
            m.write(i * self.page_size, b"stale" * 8, alias=True)

    def order(self, seed: int) -> list[int]:
        order = list(range(self.pages))
        random.Random(seed).shuffle(order)
        return order

    def by_class(self, t: Toucher, order: list[int], fill: str) -> dict[str, list[int]]:
        """Latencies (ns) of the round's touches, by class."""
        out: dict[str, list[int]] = {k: [] for k in CLASSES}
        for k, i in enumerate(order):
            if i in self.poisoned:
                cls = "poisoned" if fill != "none" else ""
            elif fill != "vmm":
                cls = "missing" if fill == "none" else "clean-epoch"
            else:
                cls = "data" if i in self.stale else "clean-digest"
            if cls:
                out[cls].append(int(t.results.latency_ns[k]))
        return out


async def one_round(source: str, plan: Plan, fill: str, seed: int) -> dict[str, list[int]]:
    ps = plan.page_size
    with plan.mapping(fill) as m:
        region = Region(m.addr, m.size, 0, page_size=ps)
        hugetlb = plan.memory == "hugetlb"
        pc = None
        if fill == "precopy":
            assert m.fd is not None
            pc = await precopy([region], source, m.fd, hugetlb=hugetlb)
        elif fill == "vmm":
            plan.fill_as_vmm(m)
        order = plan.order(seed)
        async with serve_memory(
            [region], source, background=False, hugetlb=hugetlb,
            memory_file=m.fd if fill != "none" else None, precopy=pc,
        ):  # fmt: skip
            t = Toucher(array("Q", (m.addr + i * ps for i in order)), page_size=ps)
            t.start()
            await t.wait()
    return plan.by_class(t, order, fill)


def cref_round(plan: Plan, fill: str, seed: int) -> dict[str, list[int]]:
    """The same round against the C reference (its source serves the image from memory)."""
    ps = plan.page_size
    with plan.mapping(fill) as m:
        digests = None
        if fill == "precopy":  # what a precopy leaves: the image in the cache, its digests
            m.write(0, plan.image, alias=True)
            digests = page_digests(plan.image, ps)
        elif fill == "vmm":
            plan.fill_as_vmm(m)
        uffd = Userfaultfd.create()
        uffd.register(m.addr, m.size, RegisterMode.MISSING | (RegisterMode.MINOR if fill != "none"
                                                               else 0))  # fmt: skip
        order = plan.order(seed)
        bitmap = poison_bitmap(plan.pages, plan.poisoned)
        with PageSource(plan.image, page_size=ps, poison=bitmap, vouch=fill == "precopy") as src:
            sock = src.connect()
            alias = (m.alias_addr or 0) if fill != "none" else 0  # MINOR: CONTINUE from the cache
            with RemoteHandler(uffd.fileno(), m.addr, m.size, sock=sock, page_size=ps,
                               alias=alias, digests=digests):  # fmt: skip
                t = Toucher(array("Q", (m.addr + i * ps for i in order)), page_size=ps)
                t.run(60)
            sock.close()
        uffd.unregister(m.addr, m.size)
        uffd.close()
    return plan.by_class(t, order, fill)


async def run(plan: Plan, image_path: Path, poison_path: Path, rounds: int) -> dict[str, Any]:
    ours: dict[str, list[int]] = {k: [] for k in CLASSES}
    ref: dict[str, list[int]] = {k: [] for k in CLASSES}
    with SourceProcess(image_path, poison_list=poison_path) as src:
        for r in range(rounds):
            for fill in FILLS:
                got = await one_round(src.address, plan, fill, r)
                cgot = cref_round(plan, fill, r)
                for k in CLASSES:
                    ours[k] += got[k]
                    ref[k] += cgot[k]
    res: dict[str, Any] = {"memory": plan.memory, "page_size": plan.page_size,
                           "pages": plan.pages, "rounds": rounds,
                           "cpus": sorted(os.sched_getaffinity(0))}  # fmt: skip
    for k in CLASSES:
        res[k] = {"touches": len(ours[k]), **_pcts(ours[k]), "cref": _pcts(ref[k])}
        res[k]["ratio_p50"] = res[k]["p50_us"] / res[k]["cref"]["p50_us"]
    res["clean_speedup_p50"] = res["missing"]["p50_us"] / res["clean-epoch"]["p50_us"]
    return res


def _pcts(v: list[int]) -> dict[str, float]:
    v = sorted(v)
    return {"p50_us": percentile(v, 50) / 1e3, "p99_us": percentile(v, 99) / 1e3}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="uffdpoison bench --mode minor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--memory", choices=("shmem", "hugetlb"), default="shmem")
    p.add_argument("--pages", type=int, default=None, help="default 2048 (16 with hugetlb)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--pin", type=int, metavar="CPU", help="run everything on this CPU")
    p.add_argument("--json", type=Path)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    ps = HUGE if args.memory == "hugetlb" else 4096
    n = args.pages or (16 if args.memory == "hugetlb" else 2048)
    if n < 4 or args.rounds < 1:
        print("uffdpoison bench: --mode minor needs --pages >= 4 and --rounds >= 1",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.pin is not None:
        try:
            os.sched_setaffinity(0, {args.pin})  # the source process inherits it
        except OSError as e:
            print(f"uffdpoison bench: --pin {args.pin}: {e.strerror}", file=sys.stderr)
            return 2
    rng = random.Random(args.seed)
    image = rng.randbytes(n * ps)
    poisoned = frozenset(range(1, n, 32))
    stale = frozenset(rng.sample(sorted(set(range(n)) - poisoned), max(1, n // 10)))
    plan = Plan(args.memory, ps, image, stale, poisoned)
    with tempfile.TemporaryDirectory() as tmp:
        image_path, poison_path = Path(tmp) / "guest.img", Path(tmp) / "poison.txt"
        image_path.write_bytes(image)
        poison_path.write_text("".join(f"{i * ps}\n" for i in sorted(poisoned)))
        try:
            if args.memory == "hugetlb":
                with reserve_hugepages(2 * n + 4):
                    res = trio.run(run, plan, image_path, poison_path, args.rounds)
            else:
                res = trio.run(run, plan, image_path, poison_path, args.rounds)
        except (HugePagesUnavailable, SourceStartError, SessionFailed) as e:
            print(f"uffdpoison bench: --mode minor: {e}", file=sys.stderr)
            return 2
    print_table(res)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0


def print_table(res: dict[str, Any]) -> None:
    print(f"MINOR mode, {res['memory']}, {res['page_size'] // 1024} KiB pages, CPUs "
          f"{res['cpus']}: uffdpoison | C reference, per touch")  # fmt: skip
    for k in CLASSES:
        r, c = res[k], res[k]["cref"]
        print(
            f"  {k:12} {r['touches']:6}  p50 {r['p50_us']:8.1f} µs  p99 {r['p99_us']:8.1f} µs"
            f" | p50 {c['p50_us']:8.1f} µs  p99 {c['p99_us']:8.1f} µs  ({r['ratio_p50']:.2f}x)"
        )
    print(
        f"  a CLEAN (epoch) fault is {res['clean_speedup_p50']:.1f}x faster than a MISSING "
        "fault (p50)"
    )


if __name__ == "__main__":
    sys.exit(main())
