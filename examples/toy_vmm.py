#!/usr/bin/env python3
"""A toy VMM that hands its guest memory to ``uffdpoison dest`` the way Firecracker does.

It creates a userfaultfd with Firecracker's feature set (EVENT_REMOVE only), maps guest memory,
registers it MISSING, and sends the region table as JSON with the fd attached (SCM_RIGHTS) to
the daemon's handoff socket. With ``--minor IMAGE`` (shmem or hugetlb) it first fills the
memory file's page cache from IMAGE (a precopy done by the VMM itself), registers
MISSING|MINOR and attaches the memory file as a second fd. Its "vCPUs" are C toucher
threads, so a poisoned page raises SIGBUS in C and is reported, instead of killing this
process.

It keeps the handoff connection open while it lives: if the daemon closes it without a word
(the daemon stopped or died) it hands the same userfaultfd over again to whichever daemon
listens there next, which resumes the session (docs/FIRECRACKER.md, "Restarts"); a one-line
``{"error": ...}`` reply means the handoff was refused, and it stops trying.

It then reads commands on stdin, one per line, and answers each with one JSON line:

    touch all | touch I,J,K    touch pages (index into the guest), report outcome/digest/latency
    discard FIRST COUNT        MADV_DONTNEED (anon) / MADV_REMOVE (shared) pages: a REMOVE event
    exit

Usage: toy_vmm.py --handoff PATH --size BYTES [--memory anon|shmem|hugetlb] [--offset BYTES]
                  [--minor IMAGE]
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time
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
    p.add_argument("--minor", metavar="IMAGE", help="MINOR mode, the page cache filled from IMAGE")
    p.add_argument(
        "--memory-file",
        metavar="PATH",
        help="MINOR mode: map this file, which the daemon precopied (dest --precopy)",
    )
    args = p.parse_args()

    page_size = HUGE if args.memory == "hugetlb" else 4096
    mapping = (
        memory.of_file(args.memory_file, args.size, page_size)
        if args.memory_file
        else memory.of_kind(args.memory, args.size)
    )
    # Firecracker negotiates only EVENT_REMOVE: no thread ids, no UNMAP/REMAP/FORK events.
    uffd = Userfaultfd.create(Feature.EVENT_REMOVE)
    mode, fds = RegisterMode.MISSING, [uffd.fileno()]
    if args.minor:
        with open(args.minor, "rb") as f:  # the precopy: into the page cache, unregistered
            f.seek(args.offset)
            mapping.write(0, f.read(args.size), alias=True)
    if args.minor or args.memory_file:
        assert mapping.fd is not None, "MINOR mode needs --memory shmem or hugetlb"
        mode |= RegisterMode.MINOR  # MINOR alone would map zeros where the cache has no page
        fds.append(mapping.fd)
    uffd.register(mapping.addr, mapping.size, mode)
    region = Region(base=mapping.addr, size=args.size, offset=args.offset, page_size=page_size)

    body = regions_to_json([region])
    sock = _hand_over(args.handoff, body, fds, retry=False)
    threading.Thread(
        target=_keep_handed_over, args=(sock, args.handoff, body, fds), daemon=True
    ).start()
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
    return 0


def _hand_over(path: str, body: bytes, fds: list[int], *, retry: bool) -> socket.socket:
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            socket.send_fds(sock, [body], fds)
            return sock
        except OSError:
            sock.close()
            if not retry:
                raise
            time.sleep(0.05)  # no daemon listening yet: a restarted one will be


def _keep_handed_over(sock: socket.socket, path: str, body: bytes, fds: list[int]) -> None:
    """The restart contract: a close without a word means hand over again; a reply, refused."""
    while True:
        try:
            reply = sock.recv(4096)
        except OSError:  # reset by a daemon that died: as good as a close without a word
            reply = b""
        sock.close()
        if reply:
            print(f"toy VMM: handoff refused: {reply.decode(errors='replace').strip()}",
                  file=sys.stderr)  # fmt: skip
            return
        sock = _hand_over(path, body, fds, retry=True)


if __name__ == "__main__":
    sys.exit(main())
