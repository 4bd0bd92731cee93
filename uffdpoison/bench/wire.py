"""Wire benchmark: the uffdpoison source over loopback against C of the same sizes, in one run.

* **bulk**: the source's background push of a whole guest (a separate ``uffdpoison source``
  process serving an image), drained by the destination's own receive path
  (``FrameTransport`` + the sans-IO ``Connection``, no placement) — GB/s. The C figure is the
  reference page source streaming 64-page replies back to back to a C client.
* **demand round trip**: one 1-page Request and its DATA reply through the destination's real
  client (trio, non-blocking socket, protocol encode/decode on both sides) against the C
  reference's 16-byte request / 16 + 4096-byte reply ping-pong. Rounds alternate.

    python -m uffdpoison.bench.wire [--size 256M] [--requests 3000] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from array import array
from typing import Any

import trio

from uffdpoison import protocol
from uffdpoison.destination.client import SourceClient
from uffdpoison.kernel.cref import REPLY, PageSource, pingpong, request_bytes
from uffdpoison.source.spawn import source_process
from uffdpoison.stats import percentile
from uffdpoison.units import size_arg

PS = 4096
BULK_PAGES = 64


def _pct(values: list[int], p: float) -> float:
    return percentile(sorted(values), p) / 1000.0


def _image(size: int, seed: int = 1) -> bytes:
    rng = random.Random(seed)
    return b"".join(rng.randbytes(1 << 20) for _ in range(size >> 20))


async def _drain_bulk(address: str) -> tuple[int, float]:
    """Open a session, then time the bulk push until Done (bytes, seconds)."""
    client = await SourceClient.connect(address, want_poison_list=False)
    try:
        t0 = time.perf_counter()
        nbytes = 0
        while True:
            ev = await client.bulk.receive()
            if isinstance(ev, protocol.Done):
                break
            if isinstance(ev, protocol.Pages):
                nbytes += ev.count * client.info.page_size
        return nbytes, time.perf_counter() - t0
    finally:
        client.close()


async def _demand_rtts(address: str, n: int, npages: int, seed: int) -> array:
    client = await SourceClient.connect(address, want_poison_list=False, bulk=False)
    rng = random.Random(seed)
    lat = array("Q")
    try:
        t = client.urgent
        for _ in range(n):
            off = rng.randrange(npages) * PS
            t0 = time.perf_counter_ns()
            client.request(off, 1)
            ev = await t.receive()
            lat.append(time.perf_counter_ns() - t0)
            assert isinstance(ev, protocol.Pages) and ev.offset == off
        return lat
    finally:
        client.close()


def _c_bulk(src: PageSource, size: int) -> float:
    """Seconds for the C client to fetch ``size`` bytes in 64-page replies."""
    frames = size // (BULK_PAGES * PS)
    with src.connect() as s:
        t0 = time.perf_counter()
        for i in range(frames):
            pingpong(
                s, request_bytes(i * BULK_PAGES * PS, BULK_PAGES), REPLY.size + BULK_PAGES * PS, 1
            )
        return time.perf_counter() - t0


def run(
    size: int = 256 << 20, requests: int = 3000, rounds: int = 3, cpu: int | None = None
) -> dict[str, Any]:
    """``cpu``: pin every party (this process, its C threads, the source process) to one CPU;
    None leaves placement to the scheduler (on 2 vCPUs it decides the figures: report it)."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    image = _image(size)
    npages = size // PS
    with tempfile.NamedTemporaryFile(
        dir="/dev/shm" if os.path.isdir("/dev/shm") else None, prefix="uffdpoison-wire-"
    ) as f:
        f.write(image)
        f.flush()
        prefix = ("taskset", "-c", str(cpu)) if cpu is not None else ()
        with source_process(f.name, prefix=prefix) as address:
            py_bulk: list[float] = []
            c_bulk: list[float] = []
            py_rtt = array("Q")
            c_rtt = array("Q")
            with PageSource(image) as src:
                for r in range(rounds):
                    nbytes, secs = trio.run(_drain_bulk, address)
                    py_bulk.append(nbytes / secs / 1e9)
                    c_bulk.append(size / _c_bulk(src, size) / 1e9)
                    order = [0, 1] if r % 2 == 0 else [1, 0]
                    for which in order:
                        if which == 0:
                            py_rtt.extend(trio.run(_demand_rtts, address, requests, npages, r))
                        else:
                            with src.connect() as s:
                                rng = random.Random(r)
                                for _ in range(requests):
                                    req = request_bytes(rng.randrange(npages) * PS, 1)
                                    c_rtt.extend(pingpong(s, req, REPLY.size + PS, 1))
    py, c = list(py_rtt), list(c_rtt)
    res: dict[str, Any] = {
        "size": size,
        "requests_per_round": requests,
        "rounds": rounds,
        "cpus": os.cpu_count(),
        "placement": "unpinned" if cpu is None else f"all on CPU {cpu}",
        "bulk_gb_s": {
            "uffdpoison": sorted(py_bulk)[len(py_bulk) // 2],
            "c": sorted(c_bulk)[len(c_bulk) // 2],
            "goal": 2.0,
        },
        "rtt_us": {
            "uffdpoison": {"p50": _pct(py, 50), "p90": _pct(py, 90), "p99": _pct(py, 99)},
            "c": {"p50": _pct(c, 50), "p90": _pct(c, 90), "p99": _pct(c, 99)},
        },
    }
    res["rtt_ratio"] = {
        k: round(res["rtt_us"]["uffdpoison"][k] / res["rtt_us"]["c"][k], 2) for k in ("p50", "p99")
    }
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=size_arg, default=256 << 20)
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cpu", type=int, default=None, help="pin every party to this CPU")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    res = run(a.size, a.requests, a.rounds, a.cpu)
    if a.json:
        print(json.dumps(res, indent=2))
        return 0
    b, r = res["bulk_gb_s"], res["rtt_us"]
    print(f"placement   {res['placement']} ({res['cpus']} CPUs)")
    print(
        f"bulk push   uffdpoison {b['uffdpoison']:.2f} GB/s   C 64-page replies {b['c']:.2f} "
        f"GB/s   (goal >= {b['goal']} GB/s)"
    )
    for k in ("p50", "p90", "p99"):
        print(f"demand rtt  {k}: uffdpoison {r['uffdpoison'][k]:7.1f} µs   C {r['c'][k]:6.1f} µs")
    print(
        f"ratio       p50 {res['rtt_ratio']['p50']}x  p99 {res['rtt_ratio']['p99']}x  "
        "(goal <= 1.3x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
