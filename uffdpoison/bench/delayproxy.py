"""A user-space delay line for TCP (this kernel has no netem).

    python -m uffdpoison.bench.delayproxy --listen HOST:PORT --to HOST:PORT --delay SECONDS

Accepts connections, connects each to ``--to``, and forwards both directions, holding every chunk
it reads for ``--delay`` seconds before writing it on (chunks keep their order; a later chunk is
not held longer because an earlier one is waiting: it is a delay line, not a queue of sleeps).
A round trip through it is longer by 2 x delay plus the proxy's own cost. Prints one JSON line
``{"event": "listening", "host", "port"}`` when ready; runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import socket
import sys

import trio


async def _pump(src: trio.SocketStream, dst: trio.SocketStream, delay: float) -> None:
    send, recv = trio.open_memory_channel[tuple[float, bytes]](math.inf)

    async def reader() -> None:
        async with send:
            while data := await src.receive_some(1 << 18):
                send.send_nowait((trio.current_time() + delay, data))

    async def writer() -> None:
        async with recv:
            async for due, data in recv:
                await trio.sleep_until(due)
                await dst.send_all(data)
        await dst.send_eof()

    async with trio.open_nursery() as n:
        n.start_soon(reader)
        n.start_soon(writer)


async def _serve(listen: str, to: str, delay: float) -> None:
    host, _, port = listen.rpartition(":")
    thost, _, tport = to.rpartition(":")
    listeners = await trio.open_tcp_listeners(int(port), host=host)

    async def handle(client: trio.SocketStream) -> None:
        try:
            upstream = await trio.open_tcp_stream(thost, int(tport))
        except OSError:
            await client.aclose()
            return
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            async with client, upstream, trio.open_nursery() as n:
                n.start_soon(_pump, client, upstream, delay)
                n.start_soon(_pump, upstream, client, delay)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    bound = listeners[0].socket.getsockname()
    print(json.dumps({"event": "listening", "host": bound[0], "port": bound[1]}), flush=True)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as n:
            n.start_soon(trio.serve_listeners, handle, listeners)
            async for _ in signals:
                n.cancel_scope.cancel()
                break


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m uffdpoison.bench.delayproxy", description=__doc__)
    ap.add_argument("--listen", required=True, metavar="HOST:PORT")
    ap.add_argument("--to", required=True, metavar="HOST:PORT")
    ap.add_argument("--delay", type=float, required=True, metavar="SECONDS")
    args = ap.parse_args(argv)
    if args.delay < 0:
        ap.error(f"--delay must be >= 0, got {args.delay}")
    trio.run(_serve, args.listen, args.to, args.delay)
    return 0


if __name__ == "__main__":
    sys.exit(main())
