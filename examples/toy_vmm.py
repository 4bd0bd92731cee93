#!/usr/bin/env python3
"""A toy VMM that hands its guest memory to ``uffdpoison dest`` the way Firecracker does.

It creates a userfaultfd with Firecracker's feature set (EVENT_REMOVE only), maps guest memory,
registers it MISSING, and sends the region table as JSON with the fd attached (SCM_RIGHTS) to
the daemon's handoff socket. Its "vCPUs" are C toucher threads, so a poisoned page raises
SIGBUS in C and is reported, instead of killing this process.

It then reads commands on stdin, one per line, and answers each with one JSON line:

    touch all | touch I,J,K    touch pages (index into the guest), report outcome/digest/latency
    discard FIRST COUNT        MADV_DONTNEED (anon) / MADV_REMOVE (shared) pages: a REMOVE event
    exit

Usage: toy_vmm.py --handoff PATH --size BYTES [--memory anon|shmem|hugetlb] [--offset BYTES]
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from array import array

from uffdpoison.destination.regions import Region, regions_to_json
from uffdpoison.harness.toucher import Toucher
from uffdpoison.kernel import Feature, RegisterMode, Userfaultfd, memory

HUGE = 2 << 20


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--handoff", required=True)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--memory", choices=memory.KINDS, default="anon")
    p.add_argument("--offset", type=int, default=0, help="region offset in the source's memory")
    p.add_argument("--timeout", type=float, default=20.0, help="seconds a touch command may take")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    page_size = HUGE if args.memory == "hugetlb" else 4096
    mapping = memory.of_kind(args.memory, args.size)
    # Firecracker negotiates only EVENT_REMOVE: no thread ids, no UNMAP/REMAP/FORK events.
    uffd = Userfaultfd.create(Feature.EVENT_REMOVE)
    uffd.register(mapping.addr, mapping.size, RegisterMode.MISSING)
    region = Region(base=mapping.addr, size=args.size, offset=args.offset, page_size=page_size)

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(args.handoff)
    socket.send_fds(sock, [regions_to_json([region])], [uffd.fileno()])
    print(
        json.dumps({"event": "handed-off", "base": mapping.addr, "page_size": page_size}),
        flush=True,
    )

    npages = args.size // page_size
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        cmd = words[0]
        if cmd == "exit":
            break
        if cmd == "touch":
            pages = range(npages) if words[1] == "all" else [int(w) for w in words[1].split(",")]
            t = Toucher(
                array("Q", (mapping.addr + i * page_size for i in pages)),
                threads=args.threads,
                page_size=page_size,
                digest=True,
            )
            t.start()
            done = t.join(args.timeout)
            r = t.results
            reply = {
                "done": done,
                "pending": r.pending,
                "outcome": list(r.outcome),
                "digest": list(r.digest) or None,
                "latency_ns": list(r.latency_ns),
                "si_code": list(r.si_code),
            }
            print(json.dumps(reply), flush=True)
            if not done:
                # A vCPU is stuck in a fault nobody serves: nothing more this VMM can do.
                return 3
        elif cmd == "discard":
            first, count = int(words[1]), int(words[2])
            mapping.discard(first * page_size, count * page_size)
            print(json.dumps({"discarded": [first, count]}), flush=True)
        else:
            print(json.dumps({"error": f"unknown command {cmd!r}"}), flush=True)
    sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
