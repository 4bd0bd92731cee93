"""Wire benchmark: the uffdpoison source over loopback against C of the same sizes, in one run.

* **bulk**: the source's push of a whole guest (a separate ``uffdpoison source`` process
  serving an image), drained by a plain reader (``FrameStream`` + the sans-IO ``Connection``,
  no placement) — GB/s. The C figure is the reference page source streaming 64-page replies
  back to back to a C client.
* **demand round trip**, one page, two ways, rounds alternating their order:

  - the C reference: C ping-pong client and C page source (request padded to 45 bytes, 16 +
    4096 reply);
  - the uffdpoison source driven by that same C client loop, sending the protocol's Request
    frames (45 bytes) and reading each 48 + 4096-byte DATA reply: the source alone.

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
from uffdpoison.destination.link import SourceLink
from uffdpoison.harness.cref import REPLY, PageSource, pingpong, request_bytes
from uffdpoison.source.spawn import source_process
from uffdpoison.stats import percentile
from uffdpoison.units import size_arg

PS = 4096
BULK_PAGES = 64
_RTT_KEYS = ["c", "source"]
_RTT_LABELS = {
    "c": "C ping-pong (C client, C source)",
    "source": "uffdpoison source, C client",
}
_REPLY = protocol.PREFIX_SIZE + protocol.layout.PAGES.size  # before a reply's page data


def _pct(values: list[int], p: float) -> float:
    return percentile(sorted(values), p) / 1000.0


def _image(size: int, seed: int = 1) -> bytes:
    rng = random.Random(seed)
    return b"".join(rng.randbytes(1 << 20) for _ in range(size >> 20))


async def _drain_bulk(address: str) -> tuple[int, float]:
    """Open a session, then time the push until Done (bytes, seconds)."""
    link = await SourceLink.connect(address, want_poison_list=False)
    assert link.bulk is not None
    try:
        t0 = time.perf_counter()
        nbytes = 0
        while True:
            ev = await link.bulk.receive()
            if isinstance(ev, protocol.Done):
                break
            if isinstance(ev, protocol.Pages):
                nbytes += ev.count * link.info.page_size
        return nbytes, time.perf_counter() - t0
    finally:
        link.close()


async def _c_client_rtts(address: str, n: int, npages: int, seed: int) -> array:
    """The C ping-pong client against the uffdpoison source: the same C loop as the reference,
    sending the protocol's Request frames (encoded by the sans-IO Connection) and reading each
    48 + 4096-byte DATA reply. Measures the source alone. (Blocks the trio loop on purpose:
    nothing else runs in it.)"""
    link = await SourceLink.connect(address, want_poison_list=False, bulk=False)
    rng = random.Random(seed)
    lat = array("Q")
    try:
        sock, conn = link.urgent.sock, link.urgent.conn
        sock.setblocking(True)
        for rid in range(1, n + 1):
            req = b"".join(conn.send(protocol.Request(rid, rng.randrange(npages) * PS, 1)))
            lat.extend(pingpong(sock, req, _REPLY + PS, 1))
        return lat
    finally:
        link.close()


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
            rtt = {k: array("Q") for k in _RTT_KEYS}
            with PageSource(image) as src:
                for r in range(rounds):
                    nbytes, secs = trio.run(_drain_bulk, address)
                    py_bulk.append(nbytes / secs / 1e9)
                    c_bulk.append(size / _c_bulk(src, size) / 1e9)
                    # Alternate the order so drift on a shared machine hits each figure alike.
                    for k in _RTT_KEYS[r % 2 :] + _RTT_KEYS[: r % 2]:
                        if k == "source":
                            rtt[k].extend(trio.run(_c_client_rtts, address, requests, npages, r))
                        else:
                            with src.connect() as s:
                                rng = random.Random(r)
                                for _ in range(requests):
                                    # Padded to the size of our Request frame.
                                    req = request_bytes(rng.randrange(npages) * PS, 1, pad=29)
                                    rtt[k].extend(pingpong(s, req, REPLY.size + PS, 1))
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
            k: {p: _pct(list(v), q) for p, q in (("p50", 50), ("p90", 90), ("p99", 99))}
            for k, v in rtt.items()
        },
    }
    c = res["rtt_us"]["c"]
    res["rtt_ratio"] = {
        k: {p: round(res["rtt_us"][k][p] / c[p], 2) for p in ("p50", "p99")} for k in ("source",)
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
    print("demand round trip, 1 page (µs)        p50      p90      p99   ratio p50/p99")
    for k, label in _RTT_LABELS.items():
        v = r[k]
        ratio = res["rtt_ratio"].get(k)
        tail = f"   {ratio['p50']:.2f}x / {ratio['p99']:.2f}x" if ratio else "   (reference)"
        print(f"  {label:<34} {v['p50']:7.1f}  {v['p90']:7.1f}  {v['p99']:7.1f}{tail}")
    print("goal: uffdpoison source <= 1.3x the C ping-pong")
    return 0


if __name__ == "__main__":
    sys.exit(main())
