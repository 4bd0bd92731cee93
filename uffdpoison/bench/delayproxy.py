"""A user-space delay line for TCP (this kernel has no netem).

    python -m uffdpoison.bench.delayproxy --listen HOST:PORT --to HOST:PORT --delay SECONDS

Accepts connections, connects each to ``--to``, and forwards both directions, holding every chunk
it reads for ``--delay`` seconds before writing it on (chunks keep their order; a later chunk is
not held longer because an earlier one is waiting: it is a delay line, not a queue of sleeps).
A round trip through it is longer by 2 x delay plus the proxy's own cost (a few tens of µs).

Plain threads and ``time.sleep`` (nanosleep): an event loop's timers round up to the
millisecond (epoll), which would turn a 0.5 ms delay into 1 ms. Prints one JSON line
``{"event": "listening", "host", "port"}`` when ready; runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import queue
import signal
import socket
import sys
import threading
import time


def _pump(src: socket.socket, dst: socket.socket, delay: float) -> None:
    q: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()

    def reader() -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 18):
                q.put((time.monotonic() + delay, data))
        q.put((0.0, b""))

    def writer() -> None:
        with contextlib.suppress(OSError):
            while True:
                due, data = q.get()
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                dst.sendall(data)

    threading.Thread(target=reader, daemon=True).start()
    threading.Thread(target=writer, daemon=True).start()


def _handle(client: socket.socket, to: tuple[str, int], delay: float) -> None:
    try:
        upstream = socket.create_connection(to)
    except OSError:
        client.close()
        return
    for s in (client, upstream):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _pump(client, upstream, delay)
    _pump(upstream, client, delay)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m uffdpoison.bench.delayproxy", description=__doc__)
    ap.add_argument("--listen", required=True, metavar="HOST:PORT")
    ap.add_argument("--to", required=True, metavar="HOST:PORT")
    ap.add_argument("--delay", type=float, required=True, metavar="SECONDS")
    args = ap.parse_args(argv)
    if args.delay < 0:
        ap.error(f"--delay must be >= 0, got {args.delay}")
    host, _, port = args.listen.rpartition(":")
    thost, _, tport = args.to.rpartition(":")
    lsock = socket.create_server((host, int(port)))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    bound = lsock.getsockname()
    print(json.dumps({"event": "listening", "host": bound[0], "port": bound[1]}), flush=True)
    with lsock:
        while True:
            client, _ = lsock.accept()
            _handle(client, (thost, int(tport)), args.delay)


if __name__ == "__main__":
    sys.exit(main())
