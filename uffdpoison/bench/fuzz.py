"""Fuzzing the wire: the sans-IO protocol (both sides, both channels) and the C data planes'
frame handling (over socket pairs), with mutated valid frame streams (docs/RELIABILITY.md).

    python -m uffdpoison.bench.fuzz [--inputs N] [--seed S] [--target protocol|dest|source|all]
        [--seconds T] [--json PATH] [--save DIR] [--deadline S] [--max-rss MIB]
    python -m uffdpoison.bench.fuzz --replay FILE

Each target runs in a child process that the parent watches: a child that dies (a signal, a
non-zero exit) is a **crash** at the input it was on, an input that takes longer than
``--deadline`` is a **hang** (the child is killed), an invariant the target checks that breaks
is a **violation**, any other exception the target raises a crash too. Each such input is
written to ``--save`` (default: a new temporary directory, named in the report) for
``--replay``, and the child is started again after it. Inputs are numbered and each is made
from (seed, target, number) alone (``uffdpoison.bench.fuzzgen``), so a run is deterministic.
The peak RSS of each target's children is reported and must stay within ``--max-rss``.

``--inputs`` and ``--seconds`` apply to each target. Exit status: 0 no crash, hang,
violation and memory within bound; 1 otherwise; 2 bad options.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import mmap
import os
import select
import signal
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uffdpoison.bench.fuzzgen import TARGETS, Case, make_case, source_image
from uffdpoison.bench.fuzztargets import TARGET_CLASSES, Violation

JSON_SCHEMA = "uffdpoison.fuzz/1"
DEFAULT_INPUTS = {"protocol": 100_000, "dest": 10_000, "source": 10_000}
DEFAULT_DEADLINE = 10.0  # seconds one input may take
DEFAULT_MAX_RSS = 512  # MiB: a receiver may buffer one 64 MiB frame, the planes two
_PROGRESS = struct.Struct("qq")  # the input a child is on, and since when (monotonic ns)
_REPORT_EVERY = 0.25  # seconds between a child's reports


@dataclass
class Finding:
    kind: str  # crash, hang, violation
    index: int
    detail: str
    saved: str = ""


@dataclass
class TargetReport:
    target: str
    inputs: int = 0
    seconds: float = 0.0
    outcomes: Counter[str] = field(default_factory=Counter)
    findings: list[Finding] = field(default_factory=list)
    peak_rss_kib: int = 0
    children: int = 0

    def count(self, kind: str) -> int:
        return sum(f.kind == kind for f in self.findings)

    def as_dict(self) -> dict[str, Any]:
        return {
            "inputs": self.inputs,
            "seconds": round(self.seconds, 3),
            "inputs_per_s": round(self.inputs / self.seconds) if self.seconds else 0,
            "crashes": self.count("crash"),
            "hangs": self.count("hang"),
            "violations": self.count("violation"),
            "peak_rss_mib": round(self.peak_rss_kib / 1024, 1),
            "children": self.children,
            "distinct_outcomes": len(self.outcomes),
            "outcomes": dict(self.outcomes.most_common()),
            "findings": [f.__dict__ for f in self.findings],
        }


def _digests(target: str) -> list[int] | None:
    if target != "source":
        return None
    from uffdpoison.kernel.digest import page_digests

    return list(page_digests(source_image(), 4096))


# ---------------------------------------------------------------- the child


def _run_one(t: Any, case: Case, index: int, inject: tuple[str, int] | None) -> str:
    if inject is not None and inject[1] == index:
        kind = inject[0]
        if kind == "crash":
            faulthandler.disable()  # a real death, without the dump pytest asked for
            os.kill(os.getpid(), signal.SIGSEGV)
        elif kind == "hang":
            time.sleep(3600)
        elif kind == "violation":
            raise Violation("injected")
        raise RuntimeError("injected")
    return str(t.run(case))


def _child(
    target: str,
    seed: int,
    start: int,
    end: int,
    step: int,
    skip: set[int],
    stop_at: float,
    progress: mmap.mmap,
    out: int,
    inject: tuple[str, int] | None,
) -> None:
    """Inputs range(start, end, step) but ``skip``, reported as JSON lines on ``out`` every
    quarter of a second: {"upto": the next input, "outcomes": {...}, "findings": [[kind,
    index, detail]], "done": bool}."""
    t = TARGET_CLASSES[target]()
    digests = _digests(target)
    outcomes: Counter[str] = Counter()
    findings: list[tuple[str, int, str]] = []
    last = time.monotonic()

    done_here = 0

    def report(upto: int, done: bool) -> None:
        nonlocal done_here
        line = {
            "upto": upto,
            "n": done_here,
            "outcomes": outcomes,
            "findings": findings,
            "done": done,
        }
        done_here = 0
        data = (json.dumps(line) + "\n").encode()
        while data:
            data = data[os.write(out, data) :]
        outcomes.clear()
        findings.clear()

    i = start
    try:
        while i < end:
            if i not in skip:
                _PROGRESS.pack_into(progress, 0, i, time.monotonic_ns())
                case = make_case(target, seed, i, digests)
                try:
                    outcomes[_run_one(t, case, i, inject)] += 1
                except Violation as e:
                    findings.append(("violation", i, str(e)))
                except Exception as e:
                    tb = traceback.format_exc(limit=-6)
                    findings.append(("crash", i, f"{type(e).__name__}: {e}\n{tb}"))
                done_here += 1
            i += step
            now = time.monotonic()
            if now - last >= _REPORT_EVERY:
                report(i, False)
                last = now
            if stop_at and now >= stop_at:
                break
        _PROGRESS.pack_into(progress, 0, -1, 0)
        if hasattr(t, "close"):
            t.close()
    finally:
        _PROGRESS.pack_into(progress, 0, -1, 0)
    report(i, True)


# ---------------------------------------------------------------- the parent


class _Saver:
    def __init__(self, directory: str | None) -> None:
        self.directory = Path(directory) if directory else None

    def save(self, target: str, seed: int, f: Finding) -> str:
        if f.index < 0:
            return ""
        if self.directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix="uffdpoison-fuzz-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{target}-{seed}-{f.index}-{f.kind}.json"
        case = make_case(target, seed, f.index, _digests(target))
        record = {
            "schema": JSON_SCHEMA,
            "seed": seed,
            "index": f.index,
            "kind": f.kind,
            "detail": f.detail,
            "case": case.to_json(),
        }
        path.write_text(json.dumps(record, indent=1) + "\n")
        return str(path)


def _status_text(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.WEXITSTATUS(status)}"


class _Child:
    """One child process running every ``step``-th input from ``start``, and how to watch it."""

    def __init__(self, args: tuple[Any, ...], start: int, step: int, skip: set[int]) -> None:
        target, seed, end, stop_at, inject = args
        self.upto = start
        self.done = False
        self.buf = b""
        self.progress = mmap.mmap(-1, _PROGRESS.size)
        _PROGRESS.pack_into(self.progress, 0, -1, 0)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child (its coverage is not collected)
            code = 0
            try:
                os.close(r)
                _child(target, seed, start, end, step, skip, stop_at, self.progress, w, inject)
            except BaseException:
                traceback.print_exc()
                code = 70
            finally:
                os._exit(code)
        os.close(w)
        self.pid, self.fd = pid, r

    def lines(self) -> list[dict[str, Any]] | None:
        """The reports that arrived, or None at EOF (the child is exiting)."""
        data = os.read(self.fd, 1 << 16)
        if not data:
            return None
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        return [json.loads(line) for line in lines]

    def stuck(self, deadline: float) -> int:
        """The input it has been on for longer than ``deadline`` seconds, or -1."""
        index, since = _PROGRESS.unpack_from(self.progress)
        return index if since and time.monotonic_ns() - since > deadline * 1e9 else -1

    def reap(self) -> tuple[int, int, int]:
        """Wait for it: (status, peak RSS KiB, the input it was on)."""
        os.close(self.fd)
        _, status, usage = os.wait4(self.pid, 0)
        index = _PROGRESS.unpack_from(self.progress)[0]
        self.progress.close()
        return status, usage.ru_maxrss, index


def fuzz_target(
    target: str,
    inputs: int,
    seed: int,
    *,
    seconds: float = 0.0,
    deadline: float = DEFAULT_DEADLINE,
    saver: _Saver,
    jobs: int = 1,
    inject: tuple[str, int] | None = None,
) -> TargetReport:
    """Inputs [0, inputs) of ``target`` (or until ``seconds`` pass) in ``jobs`` watched
    children, input i in child i % jobs; a child that crashes or hangs is started again after
    the input it was on."""
    rep = TargetReport(target)
    skip: set[int] = set()
    t0 = time.monotonic()
    args = (target, seed, inputs, t0 + seconds if seconds else 0.0, inject)

    def found(kind: str, index: int, detail: str) -> None:
        f = Finding(kind, index, detail)
        f.saved = saver.save(target, seed, f)
        rep.findings.append(f)
        skip.add(index)

    live = [_Child(args, k, jobs, skip) for k in range(min(jobs, inputs))]
    rep.children = len(live)
    while live:
        ready, _, _ = select.select([c.fd for c in live], [], [], 0.1)
        for c in list(live):
            hung = -1
            if c.fd in ready:
                msgs = c.lines()
                if msgs is not None:
                    for msg in msgs:
                        c.upto, c.done = msg["upto"], msg["done"]
                        rep.inputs += msg["n"]
                        rep.outcomes.update(msg["outcomes"])
                        for kind, index, detail in msg["findings"]:
                            found(kind, index, detail)
                    continue
            else:
                hung = c.stuck(deadline)
                if hung < 0:
                    continue
                os.kill(c.pid, signal.SIGKILL)
            live.remove(c)
            status, rss, index = c.reap()
            rep.peak_rss_kib = max(rep.peak_rss_kib, rss)
            if c.done and status == 0:
                continue
            if hung >= 0:
                found("hang", hung, f"no answer within {deadline} s")
                rep.outcomes["hang"] += 1
            else:
                died = f"the child died at input {index}: {_status_text(status)}"
                found("crash", index, died)
                rep.outcomes["crash"] += 1
            rep.inputs += index >= 0 or hung >= 0
            # the inputs it did since its last report are done again by its successor
            if c.upto < inputs and not (args[3] and time.monotonic() >= args[3]):
                live.append(_Child(args, c.upto, jobs, skip))
                rep.children += 1
    rep.seconds = time.monotonic() - t0
    for f in rep.findings:
        if f.kind != "hang" and not f.detail.startswith("the child died"):
            rep.outcomes[f.kind] += 1
    return rep


# ---------------------------------------------------------------- command line


def replay(path: str) -> int:
    """Run one saved input in this process; print its outcome or what went wrong."""
    record = json.loads(Path(path).read_text())
    case = Case.from_json(record["case"])
    t = TARGET_CLASSES[case.target]()
    try:
        print(f"{case.target} input {record['index']}: {t.run(case)}")
        return 0
    except Violation as e:
        print(f"{case.target} input {record['index']}: VIOLATION: {e}")
        return 1
    finally:
        if hasattr(t, "close"):
            t.close()


def _parse_inject(text: str | None) -> tuple[str, int] | None:
    if not text:
        return None
    kind, _, index = text.partition("@")
    if kind not in ("crash", "hang", "violation", "raise") or not index.isdigit():
        raise argparse.ArgumentTypeError(f"--inject KIND@INDEX, got {text!r}")
    return kind, int(index)


def _print_report(reps: list[TargetReport], saver: _Saver, max_rss: int, seed: int) -> None:
    print(f"uffdpoison fuzz, seed {seed}, {os.cpu_count()} CPUs")
    for rep in reps:
        d = rep.as_dict()
        print(
            f"{rep.target:>8}: {d['inputs']} inputs in {d['seconds']:.1f} s "
            f"({d['inputs_per_s']}/s), {d['crashes']} crashes, {d['hangs']} hangs, "
            f"{d['violations']} violations, peak RSS {d['peak_rss_mib']} MiB "
            f"(bound {max_rss}), {d['distinct_outcomes']} distinct outcomes"
        )
        for outcome, n in rep.outcomes.most_common(12):
            print(f"{n:>14}  {outcome[:100]}")
        for f in rep.findings:
            print(f"  {f.kind.upper()} at input {f.index}: {f.detail.splitlines()[0][:120]}")
            if f.saved:
                print(f"    saved: {f.saved}")
    total = sum(r.inputs for r in reps)
    print(f"   total: {total} inputs; saved inputs: {saver.directory or 'none'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m uffdpoison.bench.fuzz",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--target", choices=[*TARGETS, "all"], default="all")
    ap.add_argument("--inputs", type=int, help=f"inputs per target (default: {DEFAULT_INPUTS})")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=0.0, help="stop each target after this")
    ap.add_argument(
        "--deadline",
        type=float,
        default=DEFAULT_DEADLINE,
        help="seconds one input may take before it is a hang",
    )
    ap.add_argument("--max-rss", type=int, default=DEFAULT_MAX_RSS, help="MiB per target")
    ap.add_argument("--jobs", type=int, default=1, help="child processes per target")
    ap.add_argument("--json", metavar="PATH", help="write the report as JSON ('-': stdout)")
    ap.add_argument("--save", metavar="DIR", help="where crashing/hanging inputs go")
    ap.add_argument("--replay", metavar="FILE", help="run one saved input and exit")
    ap.add_argument("--inject", type=_parse_inject, help=argparse.SUPPRESS)  # the fuzzer's test
    args = ap.parse_args(argv)
    if args.replay:
        return replay(args.replay)
    if args.inputs is not None and args.inputs < 0:
        ap.error("--inputs must be >= 0")
    if args.jobs < 1:
        ap.error("--jobs must be >= 1")
    saver = _Saver(args.save)
    reps = []
    for target in TARGETS if args.target == "all" else (args.target,):
        n = args.inputs if args.inputs is not None else DEFAULT_INPUTS[target]
        reps.append(
            fuzz_target(
                target,
                n,
                args.seed,
                seconds=args.seconds,
                deadline=args.deadline,
                saver=saver,
                jobs=args.jobs,
                inject=args.inject,
            )
        )
    over = [r.target for r in reps if r.peak_rss_kib > args.max_rss * 1024]
    if args.json != "-":
        _print_report(reps, saver, args.max_rss, args.seed)
        for t in over:
            print(f"MEMORY: {t} peaked above {args.max_rss} MiB")
    if args.json:
        doc = {
            "schema": JSON_SCHEMA,
            "seed": args.seed,
            "cpus": os.cpu_count(),
            "max_rss_mib": args.max_rss,
            "saved": str(saver.directory or ""),
            "targets": {r.target: r.as_dict() for r in reps},
        }
        text = json.dumps(doc, indent=1)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    bad = sum(len(r.findings) for r in reps) or over
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
