"""``uffdpoison`` command line: one subcommand per job, each in the module that owns it."""

from __future__ import annotations

import argparse
import importlib
import logging
import resource
import sys
from collections.abc import Sequence

# subcommand → (module, one-line help). Each module has add_arguments(parser) and main(args).
COMMANDS = {
    "demo": (
        "uffdpoison.demo",
        "migrate a synthetic guest with poisoned pages end to end and verify every byte",
    ),
    "source": ("uffdpoison.source.command", "serve guest memory (an image or a live process)"),
    "dest": (
        "uffdpoison.destination.command",
        "destination daemon: VMMs hand over their userfaultfd (Firecracker format)",
    ),
    "status": ("uffdpoison.status", "what a running destination daemon is doing"),
    "set-source": ("uffdpoison.set_source", "point a running destination daemon at a new source"),
    "check": ("uffdpoison.check", "report what this kernel's userfaultfd supports"),
    "bench": ("uffdpoison.bench.command", "fault-latency benchmark against a C reference"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="uffdpoison",
        description="Postcopy page server that carries memory poison across live migration.",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging on stderr (-vv for debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
    return parser


def _raise_fd_limit() -> None:
    """Every fd the hard limit allows: each VMM and session holds several. Running out is
    back-pressure, never a crash, but it should not come at the soft limit's 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: Sequence[str] | None = None) -> int:
    _raise_fd_limit()
    parser = build_parser()
    args = parser.parse_args(argv)
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.main(args))
    except KeyboardInterrupt:
        return 130
