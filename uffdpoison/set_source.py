"""``uffdpoison set-source``: point a running destination daemon at another source (a
replacement after the first was lost); a paused session resumes there.

Exit status: 0 done, 1 the daemon could not be reached or refused it.
"""

from __future__ import annotations

import argparse

from uffdpoison.destination.admin import ask


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--control", required=True, metavar="PATH", help="the daemon's --control")
    p.add_argument("source", metavar="HOST:PORT", help="the replacement source")


def main(args: argparse.Namespace) -> int:
    cmd = {"cmd": "set-source", "source": args.source}
    answer = ask(args.control, cmd, "uffdpoison set-source")
    if answer is None:
        return 1
    print(f"source is now {answer['source']}")
    return 0
