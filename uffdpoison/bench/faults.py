"""Source crashes, measured: SIGKILL the source at a random point of a migration, start it
again on the same port after a random outage, and check that the session resumes and the guest
ends byte-identical, every poisoned page still SIGBUS.

    python -m uffdpoison.bench.faults [--runs 100] [--size 32M] [--seed 1] [--json PATH]
                                      [--kill-window 0.4]

Each run migrates a fresh guest into this process with the embedding API (the source a child
``uffdpoison source``), while a C toucher thread reads every page in random order. Reported per
run and as percentiles: *pause to resumed* (the session's ``session-paused`` to
``session-resumed``), *resumed after listening* (the restarted source's first listening line to
``session-resumed``; goal: within 1 s), and the *extra blocked time* a vCPU saw: the longest
touch minus the outage (the source's kill to its listening again). Exit status: 0 every run
completed byte-identical, 1 a run did not, 2 bad options or setup.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import tempfile
import time
from array import array
from pathlib import Path
from typing import Any

import trio

from uffdpoison.console import Progress
from uffdpoison.destination.embed import serve_memory
from uffdpoison.destination.regions import Region
from uffdpoison.harness.toucher import OUTCOME_OK, OUTCOME_SIGBUS, Toucher
from uffdpoison.kernel import memory
from uffdpoison.kernel.digest import page_digests
from uffdpoison.source.spawn import SourceProcess, SourceStartError
from uffdpoison.stats import percentile
from uffdpoison.units import size_arg

PS = 4096
BANDWIDTH = "64M"  # the push, capped so a kill lands mid-migration


class RunFailed(Exception):
    """A run that did not end byte-identical with every poisoned page SIGBUS."""


def make_guest(size: int, seed: int) -> tuple[bytes, list[int]]:
    rng = random.Random(seed)
    image = bytearray(rng.randbytes(size))
    pages = size // PS
    for i in rng.sample(range(pages), pages // 8):
        image[i * PS : (i + 1) * PS] = bytes(PS)
    return bytes(image), sorted(rng.sample(range(pages), max(1, pages // 256)))


async def one_run(
    src: SourceProcess,
    size: int,
    poisoned: set[int],
    want: array,
    rng: random.Random,
    window: float,
) -> dict[str, Any]:
    events: list[tuple[float, dict[str, Any]]] = []
    order = list(range(size // PS))
    rng.shuffle(order)
    kill_after, outage = rng.uniform(0.0, window), rng.uniform(0.0, 0.3)
    with memory.anon(size) as m:
        region = Region(m.addr, size, 0)
        status = lambda e: events.append((time.monotonic(), e))  # noqa: E731
        async with serve_memory([region], src.address, status=status) as server:
            touch = Toucher(array("Q", (m.addr + i * PS for i in order)), digest=True)
            touch.start()
            await trio.sleep(kill_after)
            t_kill = time.monotonic()
            src.kill()
            await trio.sleep(outage)
            await trio.to_thread.run_sync(src.start)
            t_listening = time.monotonic()
            with trio.fail_after(60):
                await touch.wait()
                await server.wait_complete()
            again = Toucher(array("Q", (m.addr + i * PS for i in sorted(poisoned)))).run(60)
    r = touch.results
    for k, page in enumerate(order):
        if page in poisoned:
            if r.outcome[k] != OUTCOME_SIGBUS:
                raise RunFailed(f"poisoned page {page} was read without SIGBUS")
        elif r.outcome[k] != OUTCOME_OK or r.digest[k] != want[page]:
            raise RunFailed(f"page {page} differs from the source's")
    if any(o != OUTCOME_SIGBUS for o in again.outcome):
        raise RunFailed("a poisoned page was readable after completion")
    at = {e["event"]: t for t, e in events}
    out: dict[str, Any] = {"kill_after_s": round(kill_after, 4), "outage_s": round(outage, 4)}
    if "session-resumed" in at:
        out["pause_to_resumed_s"] = at["session-resumed"] - at["session-paused"]
        out["resumed_after_listening_s"] = at["session-resumed"] - t_listening
    else:  # the migration was over before the kill landed: nothing to resume
        out["completed_before_kill"] = at.get("session-completed", t_kill) <= t_kill
    out["max_touch_ms"] = max(r.latency_ns) / 1e6
    out["extra_blocked_ms"] = max(0.0, out["max_touch_ms"] - (t_listening - t_kill) * 1e3)
    return out


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    resumed = [r for r in runs if "pause_to_resumed_s" in r]
    out: dict[str, Any] = {"runs": len(runs), "resumed": len(resumed)}
    for key in ("pause_to_resumed_s", "resumed_after_listening_s", "extra_blocked_ms"):
        vals = sorted(r[key] for r in resumed)
        if vals:
            out[key] = {"p50": percentile(vals, 50), "p99": percentile(vals, 99), "max": vals[-1]}
    return out


async def run_all(args: argparse.Namespace) -> tuple[list[dict[str, Any]], str | None]:
    image, poisoned = make_guest(args.size, args.seed)
    want = page_digests(image, PS)
    rng = random.Random(args.seed)
    progress = Progress(not args.quiet)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="uffdpoison-faults-") as tmp:
        img, plist = Path(tmp) / "guest.img", Path(tmp) / "poison.txt"
        img.write_bytes(image)
        plist.write_text("".join(f"{i * PS:#x}\n" for i in poisoned))
        with SourceProcess(img, poison_list=plist, max_bandwidth=BANDWIDTH) as src:
            for k in range(args.runs):
                progress.show(f"run {k + 1}/{args.runs}")
                try:
                    runs.append(
                        await one_run(src, args.size, set(poisoned), want, rng, args.kill_window)
                    )
                except (RunFailed, trio.TooSlowError) as e:
                    progress.done()
                    return runs, f"run {k + 1}: {e or 'did not complete within 60 s'}"
                if src.proc is None or src.proc.poll() is not None:
                    src.start()
    progress.done()
    return runs, None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m uffdpoison.bench.faults", description=__doc__)
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--size", type=size_arg, default=32 << 20, help="guest size (default 32M)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--kill-window",
        type=float,
        default=0.4,
        metavar="SECONDS",
        help="the kill lands at a uniform time in this window after the session starts",
    )
    p.add_argument("--json", metavar="PATH", help="every run and the summary, as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument("-v", "--verbose", action="store_true", help="the sessions' log lines")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR)
    if args.runs < 1 or args.size <= 0 or args.size % PS:
        p.error("--runs must be positive and --size a positive multiple of 4096")
    try:
        runs, failure = trio.run(run_all, args)
    except SourceStartError as e:
        print(f"faults: {e}", file=sys.stderr)
        return 2
    doc: dict[str, Any] = {"summary": summary(runs), "runs": runs, "failure": failure}
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    s = doc["summary"]
    print(f"{s['runs']} runs, {s['resumed']} resumed after a source SIGKILL, "
          f"{'all' if not failure else 'NOT all'} byte-identical with poison kept")  # fmt: skip
    for key, unit in (("pause_to_resumed_s", "s"), ("resumed_after_listening_s", "s"),
                      ("extra_blocked_ms", "ms")):  # fmt: skip
        if key in s:
            v = s[key]
            print(f"  {key:<27} p50 {v['p50']:.3f} {unit}  p99 {v['p99']:.3f} {unit}  "
                  f"max {v['max']:.3f} {unit}")  # fmt: skip
    if failure:
        print(f"FAILED: {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
