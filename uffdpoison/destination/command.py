"""``uffdpoison dest``: the destination daemon (see ``handoff``)."""

from __future__ import annotations

import argparse
import grp
import logging
import pwd
import signal
import sys

import trio

from uffdpoison.console import emit
from uffdpoison.destination.handoff import HandoffDaemon
from uffdpoison.destination.link import SourceUnavailable

log = logging.getLogger(__name__)


def _mode(text: str) -> int:
    try:
        value = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode (e.g. 0600)") from None
    if not 0 <= value <= 0o7777:
        raise argparse.ArgumentTypeError(f"mode {text!r} is out of range")
    return value


def _owner(text: str) -> tuple[int, int]:
    user, _, group = text.partition(":")
    try:
        uid = int(user) if user.isdigit() else pwd.getpwnam(user).pw_uid
        if not group:
            gid = pwd.getpwuid(uid).pw_gid if not user.isdigit() else -1
        else:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError as e:
        raise argparse.ArgumentTypeError(
            f"--handoff-owner {text!r}: unknown user or group {e}"
        ) from None
    return uid, gid


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--source",
        required=True,
        metavar="HOST:PORT",
        help="the source page server ([IPv6]:PORT also accepted)",
    )
    p.add_argument(
        "--handoff",
        required=True,
        metavar="PATH",
        help="Unix socket path VMMs connect to (Firecracker's backend_path)",
    )
    p.add_argument(
        "--allow-uid",
        type=int,
        action="append",
        default=[],
        metavar="UID",
        help="uid allowed to hand over a userfaultfd (repeatable; default: ours)",
    )
    p.add_argument(
        "--handoff-mode",
        type=_mode,
        default=None,
        metavar="MODE",
        help="octal mode of the socket file (e.g. 0660)",
    )
    p.add_argument(
        "--handoff-owner",
        type=_owner,
        default=None,
        metavar="USER[:GROUP]",
        help="owner of the socket file, for a VMM jailed under another uid",
    )


async def _amain(args: argparse.Namespace) -> None:
    daemon = HandoffDaemon(
        args.handoff,
        args.source,
        allow_uids=args.allow_uid,
        mode=args.handoff_mode,
        owner=args.handoff_owner,
        status=emit,
    )
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.serve)

            async def stop_on_signal() -> None:
                async for signum in signals:
                    log.info("%s: stopping", signal.Signals(signum).name)
                    if daemon.sessions:
                        log.warning(
                            "stopping with %d live session(s); their VMMs keep their "
                            "userfaultfd and block on unplaced pages",
                            len(daemon.sessions),
                        )
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop_on_signal)
    emit({"event": "stopped"})


def main(args: argparse.Namespace) -> int:
    try:
        trio.run(_amain, args)
    except SourceUnavailable as e:
        print(f"uffdpoison dest: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"uffdpoison dest: {e}", file=sys.stderr)
        return 1
    return 0
