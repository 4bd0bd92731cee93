"""`uffdpoison source`: serve a snapshot image or a live process's memory to destinations.

stdout is a JSON-lines status stream whose first line is the bound address
({"event": "listening", "host": ..., "port": ...}); logs go to stderr.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import signal
import sys
from collections.abc import AsyncIterator

import trio

from uffdpoison import sdnotify, tls_options
from uffdpoison.auth import token_arg
from uffdpoison.console import emit
from uffdpoison.exgroups import caught
from uffdpoison.metrics import (
    SourceCollector,
    from_any_thread,
    http_endpoint,
    metrics_arg,
    registry_of,
)
from uffdpoison.source.backends import (
    Backend,
    ImageBackend,
    ProcessBackend,
    SourceError,
)
from uffdpoison.source.server import PUSH_NICE, SourceServer, parse_listen
from uffdpoison.units import parse_int, size_arg

log = logging.getLogger("uffdpoison.source")


def _range(text: str) -> tuple[int, int]:
    start, sep, length = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"range {text!r} is not START:LENGTH")
    try:
        return parse_int(start), parse_int(length)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"range {text!r}: START and LENGTH must be decimal or 0x-hex integers"
        ) from None


def _rate(text: str) -> int:
    n = size_arg(text)
    if n <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive rate")
    return n


def _nice(text: str) -> int:
    try:
        n = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 0 <= n <= 19:
        raise argparse.ArgumentTypeError(f"{n} is outside 0-19")
    return n


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--listen",
        required=True,
        metavar="HOST:PORT",
        help="address to serve on, HOST:PORT or [IPv6]:PORT; port 0 picks a free port",
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--image", metavar="FILE", help="raw guest memory snapshot to serve")
    what.add_argument("--pid", type=int, help="live (stopped) VMM process whose memory to serve")
    parser.add_argument(
        "--range",
        dest="ranges",
        action="append",
        type=_range,
        default=[],
        metavar="START:LENGTH",
        help="with --pid: guest memory range in the process (address and length, decimal or "
        "0x-hex); repeat for more; the ranges concatenated in order form guest memory",
    )
    parser.add_argument(
        "--poison-list",
        metavar="FILE",
        help="poisoned pages: one page-aligned guest byte offset a line (decimal or 0x-hex, "
        "# comments); with --pid, added to the poison discovered in the process",
    )
    parser.add_argument(
        "--page-size",
        type=size_arg,
        default=4096,
        metavar="BYTES",
        help="the source's base page size (default 4096)",
    )
    parser.add_argument(
        "--max-bandwidth",
        type=_rate,
        default=None,
        metavar="RATE",
        help="cap the background (bulk) push at RATE bytes/s, e.g. 10M or 1G (binary "
        "multiples), summed over all sessions; demand replies are never delayed by it",
    )
    parser.add_argument(
        "--push-nice",
        type=_nice,
        default=None,
        metavar="N",
        help="run the background push N nice levels below the demand replies, 0-19 (default "
        "19: the push only takes CPU nothing else wants; 0 = same priority). Needs "
        "CAP_SYS_NICE; without it the push runs at normal priority",
    )
    parser.add_argument(
        "--token-file",
        dest="token",
        type=token_arg,
        metavar="PATH",
        help="a shared secret (16+ bytes): serve only destinations that prove they hold it "
        "(HMAC challenge-response, docs/SECURITY.md); required to listen beyond loopback "
        "unless --tls --tls-ca asks for client certificates",
    )
    tls_options.add_arguments(parser, server=True)
    parser.add_argument(
        "--metrics",
        type=metrics_arg,
        metavar="[HOST:]PORT",
        help="serve Prometheus metrics over HTTP (/metrics) on PORT of loopback, or of HOST; "
        "off by default",
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _open_backend(args: argparse.Namespace) -> Backend:
    if args.image is not None:
        if args.ranges:
            raise SourceError("--range goes with --pid, not --image")
        return ImageBackend(args.image, poison_list=args.poison_list, page_size=args.page_size)
    if not args.ranges:
        raise SourceError("--pid needs at least one --range START:LENGTH")
    return ProcessBackend(
        args.pid, args.ranges, poison_list=args.poison_list, page_size=args.page_size
    )


async def _run(server: SourceServer, listen: str, metrics: tuple[str, int] | None) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        registry = registry_of(SourceCollector(from_any_thread(server.sample)))
        async with http_endpoint(metrics, registry) as where:
            await _serve(server, listen, where, signals)


async def _serve(
    server: SourceServer, listen: str, metrics: str | None, signals: AsyncIterator[int]
) -> None:
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(server.serve, listen)
        emit({"event": "listening", "host": host, "port": port, "metrics": metrics})
        sdnotify.notify("READY=1")  # systemd: serving
        nursery.start_soon(sdnotify.watchdog)
        async for signum in signals:
            log.info("received %s, shutting down", signal.Signals(signum).name)
            sdnotify.notify("STOPPING=1")
            nursery.cancel_scope.cancel()
            break


def main(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s"
        )
    try:
        host, _ = parse_listen(args.listen)
    except ValueError as e:
        print(f"uffdpoison source: --listen: {e}", file=sys.stderr)
        return 2
    try:
        tls = tls_options.context(args, server=True)
    except ValueError as e:
        print(f"uffdpoison source: {e}", file=sys.stderr)
        return 2
    if not _is_loopback(host) and args.token is None and not (tls and tls.requires_client_cert):
        print(
            f"uffdpoison source: refusing to listen on non-loopback address {host!r} without "
            "--token-file or --tls --tls-ca (anyone who could connect could read the served "
            "memory)",
            file=sys.stderr,
        )
        return 2
    try:
        backend = _open_backend(args)
    except SourceError as e:
        print(f"uffdpoison source: {e}", file=sys.stderr)
        return 1
    with backend:
        server = SourceServer(
            backend,
            max_bandwidth=args.max_bandwidth,
            status=emit,
            push_nice=PUSH_NICE if args.push_nice is None else args.push_nice,
            token=args.token,
            tls=tls,
            timing=args.metrics is not None,  # service times are seen only in the metrics
        )
        try:
            trio.run(_run, server, args.listen, args.metrics)
        except (OSError, BaseExceptionGroup) as exc:
            err = caught(exc, OSError)
            if err is None:
                raise
            where = "" if str(err).startswith("--metrics") else f"cannot listen on {args.listen}: "
            print(f"uffdpoison source: {where}{err}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            pass
    return 0


def _standalone() -> int:
    parser = argparse.ArgumentParser(prog="uffdpoison source", description=__doc__)
    add_arguments(parser)
    return main(parser.parse_args())


if __name__ == "__main__":
    sys.exit(_standalone())
