"""MINOR mode, measured: a fault on a page whose precopied copy is current (CLEAN), one whose
copy changed (DATA through the page cache), against the MISSING fault of the same page size,
all served from one child ``uffdpoison source`` over loopback in one run.

    python -m uffdpoison.bench.minor [--memory shmem|hugetlb] [--pages N] [--rounds R]
                                     [--json PATH]

Each round maps fresh guest memory: MISSING (anonymous, or a hugetlb memfd with an empty
cache) and MINOR (the memfd's cache filled from the image, every page, before the switchover;
a tenth of them then made stale), and a C toucher thread reads the pages in random order with
no background. Reported: per-fault latency p50/p99 per class, and the bytes the source sent
per fault. Exit status 0; 2 bad options or setup (e.g. huge pages unavailable).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from array import array
from pathlib import Path
from typing import Any

import trio

from uffdpoison.destination.embed import serve_memory
from uffdpoison.destination.regions import Region
from uffdpoison.harness.toucher import Toucher, current_cpu
from uffdpoison.kernel import HugePagesUnavailable, memory, reserve_hugepages
from uffdpoison.source.spawn import SourceProcess
from uffdpoison.stats import percentile

HUGE = 2 << 20


async def one_round(
    source: str, kind: str, ps: int, image: bytes, minor: bool, stale: set[int], seed: int
) -> dict[str, list[int]]:
    """Latencies (ns) of one touch per page, by class."""
    n = len(image) // ps
    mkind = kind if minor or kind == "hugetlb" else "anon"
    with memory.of_kind(mkind, len(image)) as m:
        if minor:
            assert m.fd is not None
            m.write(0, image, alias=True)
            for i in stale:
                m.write(i * ps, b"stale" * 8, alias=True)
        order = list(range(n))
        random.Random(seed).shuffle(order)
        region = Region(m.addr, len(image), 0, page_size=ps)
        async with serve_memory(
            [region], source, background=False, hugetlb=kind == "hugetlb",
            memory_file=m.fd if minor else None,
        ):  # fmt: skip
            t = Toucher(array("Q", (m.addr + i * ps for i in order)), page_size=ps)
            t.start()
            await t.wait()
    out: dict[str, list[int]] = {"missing": [], "clean": [], "data": []}
    for k, i in enumerate(order):
        cls = "missing" if not minor else "data" if i in stale else "clean"
        out[cls].append(int(t.results.latency_ns[k]))
    return out


async def run(args: argparse.Namespace, image_path: Path, image: bytes, ps: int) -> dict:
    n = len(image) // ps
    stale = set(random.Random(args.seed).sample(range(n), max(1, n // 10)))
    lat: dict[str, list[int]] = {"missing": [], "clean": [], "data": []}
    with SourceProcess(image_path) as src:
        for r in range(args.rounds):
            for minor in (False, True):
                got = await one_round(src.address, args.memory, ps, image, minor, stale, r)
                for k, v in got.items():
                    lat[k] += v
    res: dict[str, Any] = {"memory": args.memory, "page_size": ps, "pages": n,
                           "rounds": args.rounds, "cpu": current_cpu()}  # fmt: skip
    for k, v in lat.items():
        v.sort()
        res[k] = {"faults": len(v), "p50_us": percentile(v, 50) / 1e3,
                  "p99_us": percentile(v, 99) / 1e3}  # fmt: skip
    res["clean_speedup_p50"] = res["missing"]["p50_us"] / res["clean"]["p50_us"]
    return res


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
                with reserve_hugepages(2 * n + 2):
                    res = trio.run(run, args, path, image, ps)
            else:
                res = trio.run(run, args, path, image, ps)
        except HugePagesUnavailable as e:
            print(f"uffdpoison bench.minor: {e}", file=sys.stderr)
            return 2
    for k in ("missing", "clean", "data"):
        r = res[k]
        print(f"{k:8} {r['faults']:6} faults  p50 {r['p50_us']:9.1f} µs  p99 {r['p99_us']:9.1f} µs")
    print(f"CLEAN fault {res['clean_speedup_p50']:.1f}x faster than MISSING (p50), "
          f"{args.memory}, {ps // 1024} KiB pages")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
