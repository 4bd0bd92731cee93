"""``uffdpoison status``: what a running destination daemon is doing, from its control socket.

Per session: the VMM's pid, state, resident pages, demand faults served and their p50/p99
fault-serve latency so far (the data plane's power-of-two histogram, interpolated within the
bucket), poisoned pages, refused overwrites of poison, pauses. ``--watch`` redraws until Ctrl-C.

Exit status: 0 answered, 1 the daemon could not be reached or refused the request.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from uffdpoison.destination.admin import ask
from uffdpoison.units import seconds_arg


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--control", required=True, metavar="PATH", help="the daemon's --control")
    p.add_argument("--json", action="store_true", help="the answer as JSON")
    p.add_argument("--watch", type=seconds_arg, metavar="SECONDS", nargs="?", const=1.0,
                   help="refresh every SECONDS (default 1) until Ctrl-C")  # fmt: skip


def _text(answer: dict[str, Any]) -> str:
    lines = [f"source {answer['source']} ({'ready' if answer['source_ready'] else 'waiting'})"]
    if not answer["sessions"]:
        lines.append("no sessions")
    for s in answer["sessions"]:
        done = s["resident"] / s["total"] if s["total"] else 1.0
        bar = "#" * round(done * 30)
        lat = s["latency_us"]
        lines.append(
            f"{s['session']:<10} pid {s['pid']:<8} {s['state']:<10} [{bar:<30}] "
            f"{done:6.1%}  faults {s['faults_served']} p50 {_us(lat['p50'])} "
            f"p99 {_us(lat['p99'])}  poisoned {s['pages']['poisoned']}  "
            f"refused {s['placed']['refused']}  pauses {s['pauses']}"
        )
    return "\n".join(lines)


def _us(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v / 1000:.2f}ms" if v >= 1000 else f"{v:.0f}us"


def main(args: argparse.Namespace) -> int:
    redraw = bool(args.watch) and not args.json and sys.stdout.isatty()
    while True:
        answer = ask(args.control, {"cmd": "status"}, "uffdpoison status")
        if answer is None:
            return 1
        if redraw:
            print("\x1b[H\x1b[J", end="")  # a terminal: the screen shows the latest only
        print(json.dumps(answer) if args.json else _text(answer), flush=True)
        if not args.watch:
            return 0
        time.sleep(args.watch)
