"""``uffdpoison dest``: the destination daemon (see ``daemon``).

Exit status: 0 stopped by SIGTERM/SIGINT (sessions' state kept for a restart), 1 could not
start (the reason is printed: the handoff or control socket path, the state directory), 2 bad
options.
"""

from __future__ import annotations

import argparse
import grp
import logging
import pwd
import signal
import sys

import trio

from uffdpoison import sdnotify, tls_options
from uffdpoison.auth import token_arg
from uffdpoison.console import emit
from uffdpoison.destination.daemon import MAX_HANDOFFS, MAX_SESSIONS, HandoffDaemon
from uffdpoison.destination.handoff import HANDOFF_TIMEOUT
from uffdpoison.destination.session import REQUEST_TIMEOUT, RESUME_DEADLINE
from uffdpoison.destination.state import STATE_DIR
from uffdpoison.exgroups import caught
from uffdpoison.kernel.tls import TlsContext
from uffdpoison.metrics import metrics_arg
from uffdpoison.transport import parse_address
from uffdpoison.units import count_arg, seconds_arg

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


def _address(text: str) -> str:
    try:
        parse_address(text, what="--source")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--source",
        required=True,
        type=_address,
        metavar="HOST:PORT",
        help="the source page server ([IPv6]:PORT also accepted); it may start later",
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
    p.add_argument(
        "--state-dir",
        default=STATE_DIR,
        metavar="DIR",
        help=f"keep each session's page states here, so a restarted daemon resumes its VMMs "
        f"(default {STATE_DIR}; 'none': do not keep them)",
    )
    p.add_argument(
        "--resume-deadline",
        type=seconds_arg,
        default=RESUME_DEADLINE,
        metavar="SECONDS",
        help=f"how long a session waits for a lost source before it fails "
        f"(default {RESUME_DEADLINE:g}); its vCPUs stay blocked either way",
    )
    p.add_argument(
        "--request-timeout",
        type=seconds_arg,
        default=REQUEST_TIMEOUT,
        metavar="SECONDS",
        help=f"a demand request unanswered this long means the source is lost "
        f"(default {REQUEST_TIMEOUT:g})",
    )
    p.add_argument(
        "--token-file",
        dest="token",
        type=token_arg,
        metavar="PATH",
        help="the source's shared secret: each side proves it holds it before anything of a "
        "guest crosses (docs/SECURITY.md)",
    )
    tls_options.add_arguments(p, server=False)
    p.add_argument(
        "--handoff-timeout",
        type=seconds_arg,
        default=HANDOFF_TIMEOUT,
        metavar="SECONDS",
        help=f"a connection that has not sent its whole handoff this long is dropped "
        f"(default {HANDOFF_TIMEOUT:g})",
    )
    p.add_argument(
        "--max-handoffs",
        type=count_arg,
        default=MAX_HANDOFFS,
        metavar="N",
        help=f"handoffs read at once; the next connections wait (default {MAX_HANDOFFS})",
    )
    p.add_argument(
        "--max-sessions",
        type=count_arg,
        default=MAX_SESSIONS,
        metavar="N",
        help=f"VMMs served at once; the next is refused (default {MAX_SESSIONS})",
    )
    p.add_argument(
        "--precopy",
        metavar="PATH",
        help="MINOR mode: precopy the guest into this file (on tmpfs, e.g. /dev/shm, or "
        "hugetlbfs) as soon as the source answers, until a VMM that maps it hands it over "
        "with its userfaultfd (docs/FIRECRACKER.md)",
    )
    p.add_argument(
        "--control",
        metavar="PATH",
        help="a local control socket for 'uffdpoison status' and 'uffdpoison set-source'",
    )
    p.add_argument(
        "--metrics",
        type=metrics_arg,
        metavar="[HOST:]PORT",
        help="serve Prometheus metrics over HTTP (/metrics) on PORT of loopback, or of HOST; "
        "off by default",
    )


async def _amain(args: argparse.Namespace, tls: TlsContext | None) -> None:
    daemon = HandoffDaemon(
        args.handoff,
        args.source,
        allow_uids=args.allow_uid,
        mode=args.handoff_mode,
        owner=args.handoff_owner,
        status=emit,
        state_dir=None if args.state_dir == "none" else args.state_dir,
        precopy=args.precopy,
        control=args.control,
        resume_deadline=args.resume_deadline,
        request_timeout=args.request_timeout,
        token=args.token,
        tls=tls,
        handoff_timeout=args.handoff_timeout,
        max_handoffs=args.max_handoffs,
        max_sessions=args.max_sessions,
        metrics=args.metrics,
    )
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.serve)
            sdnotify.notify("READY=1")  # systemd: the handoff (and control) socket listens
            nursery.start_soon(sdnotify.watchdog)

            async def stop_on_signal() -> None:
                async for signum in signals:
                    log.info("%s: stopping", signal.Signals(signum).name)
                    sdnotify.notify("STOPPING=1")
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop_on_signal)
    emit({"event": "stopped"})


def main(args: argparse.Namespace) -> int:
    try:
        tls = tls_options.context(args, server=False)
    except ValueError as e:
        print(f"uffdpoison dest: {e}", file=sys.stderr)
        return 2
    try:
        trio.run(_amain, args, tls)
    except (OSError, BaseExceptionGroup) as exc:
        err = caught(exc, OSError)
        if err is None:
            raise
        print(f"uffdpoison dest: {err}", file=sys.stderr)
        return 1
    return 0
