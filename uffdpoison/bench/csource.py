"""The C reference page source in a process of its own (as a real source host would be).

    python -m uffdpoison.bench.csource --listen HOST:PORT --image FILE [--poison-list FILE]
        [--page-size N] [--cpu N] [--threaded]

Prints one JSON line ``{"event": "listening", "host", "port"}`` when ready, serves
(``uffdpoison.harness.cref.PageSource``, one C thread) until stdin closes or SIGTERM, then prints
``{"event": "stopped", ...counters}``.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import threading
from dataclasses import asdict

from uffdpoison.harness.cref import PageSource, poison_bitmap


def read_poison_list(path: str, page_size: int) -> list[int]:
    """Page indices from a file of byte offsets, one a line (decimal or 0x-hex, # comments)."""
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            off = int(text, 0)
            if off % page_size:
                raise ValueError(f"{path}:{n}: offset {off:#x} is not page-aligned")
            out.append(off // page_size)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m uffdpoison.bench.csource", description=__doc__)
    ap.add_argument("--listen", required=True, metavar="HOST:PORT")
    ap.add_argument("--image", required=True)
    ap.add_argument("--poison-list")
    ap.add_argument("--page-size", type=int, default=4096)
    ap.add_argument("--cpu", type=int, default=None)
    ap.add_argument(
        "--threaded",
        action="store_true",
        help="a thread per connection (demand never waits behind bulk on another connection)",
    )
    args = ap.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    with open(args.image, "rb") as f:
        data = bytearray(f.read())
    pages = len(data) // args.page_size
    bm = None
    if args.poison_list:
        bm = poison_bitmap(pages, read_poison_list(args.poison_list, args.page_size))
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((host, int(port)))
    lsock.listen(16)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with PageSource(
        data,
        page_size=args.page_size,
        poison=bm,
        listen=lsock,
        cpu=args.cpu,
        threaded=args.threaded,
    ) as src:
        print(json.dumps({"event": "listening", "host": host, "port": lsock.getsockname()[1]}))
        sys.stdout.flush()

        def stop_on_eof() -> None:
            sys.stdin.read()  # the parent closes our stdin to stop us
            stop.set()

        threading.Thread(target=stop_on_eof, daemon=True).start()
        stop.wait()
        final = src.stop()
    lsock.close()
    print(json.dumps({"event": "stopped", **asdict(final)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
