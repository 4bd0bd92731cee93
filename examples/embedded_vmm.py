#!/usr/bin/env python3
"""A custom VMM written in Python that restores its guest memory with uffdpoison's embedding API.

It maps guest memory, serves it from a source (``uffdpoison source --image ...``) with
``ThreadedPageServer`` (a page server on a background thread: this program is not a trio
program), lets its "vCPUs" (C toucher threads standing in for KVM_RUN) touch memory, and reads a
page from Python the only safe way: after ``ensure_present``. Poisoned pages raise SIGBUS in the
vCPU that touches them, as real poison would, and are never read from Python.

    uffdpoison source --listen 127.0.0.1:7000 --image guest.img --poison-list bad.txt &
    python examples/embedded_vmm.py --source 127.0.0.1:7000 --size 64M
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from array import array

from uffdpoison.destination.embed import ThreadedPageServer
from uffdpoison.destination.regions import Region
from uffdpoison.harness.toucher import Toucher
from uffdpoison.kernel import memory
from uffdpoison.kernel.digest import digest
from uffdpoison.units import size_arg

PAGE = 4096


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--source", required=True, help="HOST:PORT of a uffdpoison source")
    p.add_argument("--size", type=size_arg, required=True, help="guest memory size")
    p.add_argument("--vcpus", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    with memory.anon(args.size) as guest:
        region = Region(base=guest.addr, size=args.size, offset=0, page_size=PAGE)
        with ThreadedPageServer([region], args.source) as server:
            # The vCPUs run C with the GIL released: they may touch unplaced memory freely.
            pages = list(range(args.size // PAGE))
            random.Random(args.seed).shuffle(pages)
            vcpus = Toucher(
                array("Q", (guest.addr + i * PAGE for i in pages)), threads=args.vcpus, digest=True
            )
            results = vcpus.run(timeout=120)

            # Python reading guest memory: only after ensure_present, never a poisoned page.
            poisoned = server.ensure_present(guest.addr, PAGE)
            first_page = guest.read(0, PAGE) if not poisoned else None

            server.wait_complete()
            stats = server.stats()
        report = {
            "pages": len(pages),
            "touched_ok": results.ok,
            "sigbus": results.sigbus,
            "sigbus_pages": sorted((a - guest.addr) // PAGE for a in results.sigbus_addresses()),
            "page0_xxh64": None if first_page is None else digest(first_page),
            "demand_requests": stats["demand_requests"],
            "copied": stats["copied"],
            "poisoned": stats["poisoned"],
        }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
