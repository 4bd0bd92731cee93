"""``uffdpoison set-source``: point a running destination daemon at another source (a
replacement after the first was lost); a paused session resumes there.

Exit status: 0 done, 1 the daemon could not be reached or refused it.
"""

from __future__ import annotations

import argparse
import sys

from uffdpoison.destination.admin import request


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--control", required=True, metavar="PATH", help="the daemon's --control")
    p.add_argument("source", metavar="HOST:PORT", help="the replacement source")


def main(args: argparse.Namespace) -> int:
    try:
        answer = request(args.control, {"cmd": "set-source", "source": args.source})
    except OSError as e:
        print(f"uffdpoison set-source: cannot reach {args.control}: {e}", file=sys.stderr)
        return 1
    if not answer.get("ok"):
        print(f"uffdpoison set-source: {answer.get('error')}", file=sys.stderr)
        return 1
    print(f"source is now {answer['source']}")
    return 0
