"""MINOR mode, measured: faults on pages whose cached copy is current (CLEAN) or stale (DATA
through the page cache), against the MISSING fault of the same page size, all served from one
child ``uffdpoison source`` (an image) over loopback in one run.

    python -m uffdpoison.bench.minor [--memory shmem|hugetlb] [--pages N] [--rounds R]
                                     [--json PATH]

Each round maps fresh guest memory three ways, and a C toucher thread reads every page in
random order, with no background:

* ``missing``: an empty cache (anonymous memory for shmem), registered MISSING;
* ``clean-epoch``: the cache filled by ``precopy()``, whose epoch the source vouches for (an
  image never changes): a fault sends the digest kept at precopy, the source answers CLEAN
  without reading the page;
* ``clean-digest`` and ``data``: the cache filled by the VMM itself (no epoch), a tenth of the
  pages stale: each fault hashes the cached page, the source reads and hashes its own.

The C reference does the same in the same run (``harness/cref.c``: a C handler thread asking
a C page source over loopback; MINOR: the digest with the request, CONTINUE, the source
vouching or hashing). Reported: per-fault latency p50/p99 per class, uffdpoison's and the C
reference's, and their ratio. Exit status 0; 2 bad options or setup (e.g. huge pages
unavailable).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from array import array
from pathlib import Path
from typing import Any

import trio

from uffdpoison.destination.embed import precopy, serve_memory
from uffdpoison.destination.regions import Region
from uffdpoison.harness.cref import MinorHandler, PageSource, RemoteHandler
from uffdpoison.harness.toucher import Toucher, current_cpu
from uffdpoison.kernel import (
    HugePagesUnavailable,
    RegisterMode,
    Userfaultfd,
    memory,
    page_digests,
    reserve_hugepages,
)
from uffdpoison.source.spawn import SourceProcess
from uffdpoison.stats import percentile

HUGE = 2 << 20


CLASSES = ("missing", "clean-epoch", "clean-digest", "data")


async def one_round(
    source: str, kind: str, ps: int, image: bytes, fill: str, stale: set[int], seed: int
) -> dict[str, list[int]]:
    """Latencies (ns) of one touch per page, by class. ``fill``: "none", "precopy", "vmm"."""
    n = len(image) // ps
    with memory.of_kind(kind if fill != "none" or kind == "hugetlb" else "anon", len(image)) as m:
        region = Region(m.addr, len(image), 0, page_size=ps)
        hugetlb = kind == "hugetlb"
        pc = None
        if fill == "precopy":
            assert m.fd is not None
            pc = await precopy([region], source, m.fd, hugetlb=hugetlb)
        elif fill == "vmm":
            m.write(0, image, alias=True)
            for i in stale:
                m.write(i * ps, b"stale" * 8, alias=True)
        order = list(range(n))
        random.Random(seed).shuffle(order)
        async with serve_memory(
            [region], source, background=False, hugetlb=hugetlb,
            memory_file=m.fd if fill != "none" else None, precopy=pc,
        ):  # fmt: skip
            t = Toucher(array("Q", (m.addr + i * ps for i in order)), page_size=ps)
            t.start()
            await t.wait()
    return _by_class(t, order, fill, stale)


def _by_class(t: Toucher, order: list[int], fill: str, stale: set[int]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {k: [] for k in CLASSES}
    for k, i in enumerate(order):
        cls = {"none": "missing", "precopy": "clean-epoch"}.get(fill)
        cls = cls or ("data" if i in stale else "clean-digest")
        out[cls].append(int(t.results.latency_ns[k]))
    return out


def cref_round(
    kind: str, ps: int, image: bytes, fill: str, stale: set[int], seed: int
) -> dict[str, list[int]]:
    """The same round against the C reference (its source serves ``image`` from memory)."""
    n = len(image) // ps
    with memory.of_kind(kind if fill != "none" or kind == "hugetlb" else "anon", len(image)) as m:
        digests = None
        if fill != "none":
            assert m.alias_addr is not None
            m.write(0, image, alias=True)
            if fill == "precopy":
                digests = page_digests(image, ps)
            else:
                for i in stale:
                    m.write(i * ps, b"stale" * 8, alias=True)
        uffd = Userfaultfd.create()
        mode = RegisterMode.MISSING | (RegisterMode.MINOR if fill != "none" else 0)
        uffd.register(m.addr, m.size, mode)
        order = list(range(n))
        random.Random(seed).shuffle(order)
        with PageSource(image, page_size=ps, vouch=fill == "precopy") as src:
            sock = src.connect()
            args = (uffd.fileno(), m.addr, m.size)
            handler: RemoteHandler | MinorHandler
            if fill == "none":
                handler = RemoteHandler(*args, sock=sock, page_size=ps)
            else:
                alias = m.alias_addr or 0
                handler = MinorHandler(*args, sock=sock, alias=alias, digests=digests, page_size=ps)
            with handler:
                t = Toucher(array("Q", (m.addr + i * ps for i in order)), page_size=ps)
                t.run(60)
            sock.close()
        uffd.unregister(m.addr, m.size)
        uffd.close()
    return _by_class(t, order, fill, stale)


async def run(args: argparse.Namespace, image_path: Path, image: bytes, ps: int) -> dict:
    n = len(image) // ps
    stale = set(random.Random(args.seed).sample(range(n), max(1, n // 10)))
    lat: dict[str, list[int]] = {k: [] for k in CLASSES}
    ref: dict[str, list[int]] = {k: [] for k in CLASSES}
    with SourceProcess(image_path) as src:
        for r in range(args.rounds):
            for fill in ("none", "precopy", "vmm"):
                got = await one_round(src.address, args.memory, ps, image, fill, stale, r)
                cgot = cref_round(args.memory, ps, image, fill, stale, r)
                for k in CLASSES:
                    lat[k] += got[k]
                    ref[k] += cgot[k]
    res: dict[str, Any] = {"memory": args.memory, "page_size": ps, "pages": n,
                           "rounds": args.rounds, "cpus": sorted(os.sched_getaffinity(0)),
                           "cpu": current_cpu()}  # fmt: skip
    for k in CLASSES:
        res[k] = {"faults": len(lat[k]), **_pcts(lat[k]),
                  "cref": _pcts(ref[k])}  # fmt: skip
        res[k]["ratio_p50"] = res[k]["p50_us"] / res[k]["cref"]["p50_us"]
    res["clean_speedup_p50"] = res["missing"]["p50_us"] / res["clean-epoch"]["p50_us"]
    return res


def _pcts(v: list[int]) -> dict[str, float]:
    v = sorted(v)
    return {"p50_us": percentile(v, 50) / 1e3, "p99_us": percentile(v, 99) / 1e3}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m uffdpoison.bench.minor", description=__doc__)
    p.add_argument("--memory", choices=("shmem", "hugetlb"), default="shmem")
    p.add_argument("--pages", type=int, default=None, help="default 2048 (16 with hugetlb)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    ps = HUGE if args.memory == "hugetlb" else 4096
    n = args.pages or (16 if args.memory == "hugetlb" else 2048)
    if n < 1 or args.rounds < 1:
        print("uffdpoison bench.minor: --pages and --rounds must be at least 1", file=sys.stderr)
        return 2
    image = random.Random(args.seed).randbytes(n * ps)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "guest.img"
        path.write_bytes(image)
        try:
            if args.memory == "hugetlb":
                with reserve_hugepages(2 * n + 4):
                    res = trio.run(run, args, path, image, ps)
            else:
                res = trio.run(run, args, path, image, ps)
        except HugePagesUnavailable as e:
            print(f"uffdpoison bench.minor: {e}", file=sys.stderr)
            return 2
    print(f"{args.memory}, {ps // 1024} KiB pages, CPUs {res['cpus']}; uffdpoison | C reference")
    for k in CLASSES:
        r, c = res[k], res[k]["cref"]
        print(f"{k:12} {r['faults']:6} faults  p50 {r['p50_us']:8.1f} µs  p99 {r['p99_us']:8.1f} "
              f"µs | p50 {c['p50_us']:8.1f} µs  p99 {c['p99_us']:8.1f} µs  "
              f"({r['ratio_p50']:.2f}x)")  # fmt: skip
    print(f"CLEAN (epoch) fault {res['clean_speedup_p50']:.1f}x faster than MISSING (p50), "
          f"{args.memory}, {ps // 1024} KiB pages")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
