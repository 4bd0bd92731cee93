"""``uffdpoison status``: what a running destination daemon is doing, from its control socket.

Exit status: 0 answered, 1 the daemon could not be reached or refused the request.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from uffdpoison.destination.admin import request


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--control", required=True, metavar="PATH", help="the daemon's --control")
    p.add_argument("--json", action="store_true", help="the answer as JSON")
    p.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS")


def _text(answer: dict[str, Any]) -> str:
    lines = [f"source {answer['source']} ({'ready' if answer['source_ready'] else 'waiting'})"]
    if not answer["sessions"]:
        lines.append("no sessions")
    for s in answer["sessions"]:
        done = s["resident"] / s["total"] if s["total"] else 1.0
        bar = "#" * round(done * 30)
        lines.append(
            f"{s['session']:<10} pid {s['pid']:<8} {s['state']:<10} [{bar:<30}] "
            f"{done:6.1%}  poisoned {s['pages']['poisoned']}  "
            f"refused {s['placed']['refused']}  pauses {s['pauses']}"
        )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    while True:
        try:
            answer = request(args.control, {"cmd": "status"})
        except OSError as e:
            print(f"uffdpoison status: cannot reach {args.control}: {e}", file=sys.stderr)
            return 1
        if not answer.get("ok"):
            print(f"uffdpoison status: {answer.get('error')}", file=sys.stderr)
            return 1
        print(json.dumps(answer) if args.json else _text(answer), flush=True)
        if not args.watch:
            return 0
        time.sleep(args.watch)
