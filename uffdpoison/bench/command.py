"""``uffdpoison bench``: demand-fault latency and bulk throughput, uffdpoison vs a C reference.

Every scenario runs uffdpoison and the C reference (``uffdpoison.harness.cref``: a C handler
asking a C source over the same transport, placing pages with the same ioctls) on the same work,
rounds interleaved, in one invocation, and prints both and their ratios. Latency is measured in
the faulting thread (C toucher, CLOCK_MONOTONIC). Missed goals are reported, not failures.

Exit status: 0 the benchmark ran (goals met or not), 1 a scenario failed to run (the reason is in
the table and the JSON), 2 bad options or a setup error (missing matplotlib for --plot, ...).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from uffdpoison.bench import minor
from uffdpoison.bench.scenarios import (
    DEFAULT_SCENARIOS,
    SCENARIOS,
    BenchError,
    Config,
    Runner,
)
from uffdpoison.console import Progress
from uffdpoison.kernel import memory
from uffdpoison.plotting import missing_matplotlib, pyplot
from uffdpoison.units import size_arg

JSON_SCHEMA = "uffdpoison.bench/1"
GOALS = (
    # name, scenario, what, target
    ("loopback demand p50 <= 1.25x C", "loopback", "ratio.p50", 1.25),
    ("loopback demand p99 <= 1.25x C", "loopback", "ratio.p99", 1.25),
    ("demand p99 with background <= 1.5x idle", "loopback+bg", "bg_vs_idle.p99", 1.5),
    ("bulk >= 2 GB/s on loopback", "bulk", "uffdpoison.bytes_per_s", 2e9),
    ("metrics on <= 1.02x off, loopback demand p50", "metrics", "ratio.p50", 1.02),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--mode",
        choices=("missing", "minor"),
        default="missing",
        help="minor: MINOR-mode faults (CLEAN, DATA, POISONED) against MISSING and a C "
        "reference (python -m uffdpoison.bench.minor --help for its options)",
    )
    p.add_argument(
        "--scenarios",
        default=",".join(DEFAULT_SCENARIOS),
        metavar="LIST",
        help=f"comma-separated, from: {', '.join(SCENARIOS)} (default: all)",
    )
    p.add_argument("--pages", type=int, default=None, help="pages touched per round "
                   "(default 4000; 32 with --memory hugetlb)")  # fmt: skip
    p.add_argument(
        "--size",
        type=size_arg,
        default=None,
        help="alternative to --pages: bytes touched per round, e.g. 8M",
    )
    p.add_argument(
        "--span",
        type=int,
        default=None,
        help="the registered region is SPAN x the touched pages, so the background stream "
        "has work left while the toucher runs (default 8; 1 with hugetlb)",
    )
    p.add_argument("--rounds", type=int, default=5, help="counted rounds per side (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="uncounted rounds first (default 1)")
    p.add_argument("--threads", type=int, default=1, help="toucher threads (default 1)")
    p.add_argument(
        "--memory",
        choices=memory.KINDS,
        default=None,
        help="destination memory (default anon; shmem with --mode minor)",
    )
    p.add_argument(
        "--pattern",
        choices=("random", "sequential"),
        default="random",
        help="touch order: a random sample of the region, or its first pages in order",
    )
    p.add_argument(
        "--poison-fraction", type=float, default=0.0, help="fraction of pages poisoned (default 0)"
    )
    p.add_argument(
        "--pin",
        metavar="T,H,S",
        default=None,
        help="CPUs for the toucher, the handler (and the background stream) and the source, "
        "e.g. 0,0,1 (default: unpinned; the CPUs used are recorded either way)",
    )
    p.add_argument(
        "--bg-cap",
        type=size_arg,
        default=64 << 20,
        metavar="RATE",
        help="bytes/s of the background stream in the +bg scenarios (default 64M)",
    )
    p.add_argument(
        "--tls-dir",
        type=Path,
        metavar="DIR",
        help="encrypt the uffdpoison side (the C reference stays plain): DIR holds ca.pem, "
        "server.pem and server.key",
    )
    p.add_argument(
        "--rate",
        type=size_arg,
        default=None,
        metavar="RATE",
        help="netns: shape the source's egress with a tbf qdisc at RATE bytes/s, e.g. 125M",
    )
    p.add_argument(
        "--delay",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="netns: one-way delay added in user space in each direction (no netem here)",
    )
    p.add_argument(
        "--bulk-size", type=size_arg, default=256 << 20, help="bulk scenario size (default 256M)"
    )
    p.add_argument("--bulk-rounds", type=int, default=3, help="bulk rounds per side (default 3)")
    p.add_argument("--seed", type=int, default=1, help="guest image, poison and order seed")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a round may take")
    p.add_argument("--json", metavar="PATH", help=f"write every figure as JSON ({JSON_SCHEMA})")
    p.add_argument("--plot", metavar="PATH.png", help="latency CDFs (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")


def config_from_args(args: argparse.Namespace) -> Config:
    args.memory = args.memory or "anon"
    huge = args.memory == "hugetlb"
    page = (2 << 20) if huge else 4096
    if args.pages is not None and args.size is not None:
        raise BenchError("give --pages or --size, not both")
    pages = args.pages if args.pages is not None else (32 if huge else 4000)
    if args.size is not None:
        if args.size <= 0 or args.size % page:
            raise BenchError(f"--size {args.size} must be a positive multiple of {page}")
        pages = args.size // page
    pin = None
    if args.pin:
        try:
            t, h, s = (int(x) for x in args.pin.split(","))
        except ValueError:
            raise BenchError(f"--pin {args.pin!r} must be three CPU numbers T,H,S") from None
        pin = (t, h, s)
    bulk_size = args.bulk_size
    if huge and bulk_size % page:
        bulk_size = max(page, bulk_size // page * page)
    return Config(
        pages=pages,
        span=args.span if args.span is not None else (1 if huge else 8),
        memory=args.memory,
        threads=args.threads,
        poison_fraction=args.poison_fraction,
        pattern=args.pattern,
        rounds=args.rounds,
        warmup=args.warmup,
        pin=pin,
        bg_cap=args.bg_cap,
        tls_dir=args.tls_dir,
        rate=args.rate,
        delay=args.delay,
        bulk_size=bulk_size,
        bulk_rounds=args.bulk_rounds,
        seed=args.seed,
        timeout=args.timeout,
    )


def environment() -> dict[str, Any]:
    import cffi
    import trio

    from uffdpoison import __version__

    model = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "trio": trio.__version__,
        "cffi": cffi.__version__,
        "uffdpoison": __version__,
    }


def _get(rec: dict[str, Any], path: str) -> Any:
    cur: Any = rec
    for part in path.split("."):
        if not isinstance(cur, dict):
            return None
        cur = cur.get(part)
    return cur


def evaluate_goals(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {r["name"]: r for r in records if r["status"] == "ok"}
    status = {r["name"]: r["status"] for r in records}
    out = []
    for name, scen, what, target in GOALS:
        value: float | None = None
        note = None
        rec = by.get(scen)
        if rec is None:
            note = f"scenario {scen} {status.get(scen, 'not run')}"
        elif what == "bg_vs_idle.p99":
            idle = by.get("loopback")
            a = _get(rec, "uffdpoison.latency_us.p99")
            b = _get(idle, "uffdpoison.latency_us.p99") if idle else None
            if idle is None:
                note = "needs the loopback scenario too"
            elif a is not None and b:
                value = round(a / b, 3)
                note = f"at a background cap of {rec['params']['bg_cap_bytes_per_s']} bytes/s"
        else:
            value = _get(rec, what)
        met = None if value is None else (value >= target if what.endswith("bytes_per_s")
                                          else value <= target)  # fmt: skip
        out.append(
            {"name": name, "scenario": scen, "metric": what, "target": target, "value": value,
             "met": met, "note": note}
        )  # fmt: skip
    return out


def _us(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v / 1000:.2f}ms" if v >= 1000 else f"{v:.1f}"


def _rate(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v / 1e9:.2f}G" if v >= 1e9 else f"{v / 1e6:.1f}M"


def _cpus(fig: dict[str, Any]) -> str:
    c = fig["cpus"]

    def one(k: str) -> str:
        return ",".join(map(str, c[k])) or "?"

    return f"{one('toucher')}/{one('handler')}/{one('source')}"


def side_names(rec: dict[str, Any]) -> dict[str, str]:
    """What a scenario's two sides are (the metrics scenario's are uffdpoison both times)."""
    return dict(rec["params"].get("sides") or {"uffdpoison": "uffdpoison", "c": "C"})


def print_table(doc: dict[str, Any], out: Any = None) -> None:
    out = out or sys.stdout
    env = doc["environment"]
    cfg = doc["config"]
    pin = cfg["pin"]
    print(
        f"uffdpoison bench — Linux {env['kernel']}, {env['cpus']} CPUs, "
        f"placement {'pinned t/h/s ' + str(tuple(pin.values())) if pin else 'unpinned'}, "
        f"{cfg['memory']} {cfg['page_size']} B pages, {cfg['threads']} toucher thread(s), "
        f"{cfg['pattern']} access",
        file=out,
    )
    print("latency µs in the faulting thread; CPUs = toucher/handler/source seen", file=out)
    head = (
        f"{'scenario':<12} {'side':<10} {'faults':>7} {'p50':>8} {'p90':>8} {'p99':>8} "
        f"{'p99.9':>8} {'max':>8} {'faults/s':>9} {'B/s':>7}  CPUs"
    )
    print(head, file=out)
    print("-" * len(head), file=out)
    for rec in doc["scenarios"]:
        if rec["status"] != "ok":
            print(f"{rec['name']:<12} {rec['status'].upper()}: {rec['reason']}", file=out)
            continue
        names = side_names(rec)
        for side in ("uffdpoison", "c"):
            f = rec[side]
            lat = f["latency_us"]
            print(
                f"{rec['name'] if side == 'uffdpoison' else '':<12} "
                f"{names[side]:<10} {f['faults']:>7} {_us(lat['p50']):>8} "
                f"{_us(lat['p90']):>8} {_us(lat['p99']):>8} {_us(lat['p999']):>8} "
                f"{_us(lat['max']):>8} {f['faults_per_s'] or '-':>9} {_rate(f['bytes_per_s']):>7}"
                f"  {_cpus(f)}",
                file=out,
            )
        r = rec["ratio"]

        def x(v: float | None) -> str:
            return "-" if v is None else f"{v:.2f}x"

        print(
            f"{'':<12} {'ratio':<10} {'':>7} {x(r['p50']):>8} {x(r['p90']):>8} "
            f"{x(r['p99']):>8} {x(r['p999']):>8} {x(r['max']):>8} {x(r['faults_per_s']):>9} "
            f"{x(r['bytes_per_s']):>7}",
            file=out,
        )
    print("goals:", file=out)
    for g in doc["goals"]:
        state = {True: "met", False: "MISSED", None: "not evaluated"}[g["met"]]
        val = "-" if g["value"] is None else (
            _rate(g["value"]) + "B/s" if g["metric"].endswith("bytes_per_s") else f"{g['value']}x"
        )  # fmt: skip
        note = f" ({g['note']})" if g["note"] else ""
        print(f"  {state:<13} {g['name']}: {val}{note}", file=out)


def plot(records: list[dict[str, Any]], path: str) -> None:
    plt = pyplot()
    recs = [r for r in records if r["status"] == "ok" and r.get("_samples", {}).get("c")]
    if not recs:
        raise BenchError("--plot: no scenario with latency samples to plot")
    cols = min(3, len(recs))
    rows = -(-len(recs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, rec in zip(axes.flat, recs, strict=False):
        names = side_names(rec)
        if "sides" not in rec["params"]:
            names["c"] = "C reference"
        for side, style in (("uffdpoison", "-"), ("c", "--")):
            s = sorted(rec["_samples"][side])
            if not s:
                continue
            n = len(s)
            ax.plot([v / 1000 for v in s], [(i + 1) / n for i in range(n)], style,
                    label=names[side])  # fmt: skip
        ax.set_xscale("log")
        ax.set_title(rec["name"])
        ax.set_xlabel("demand-fault latency (µs)")
        ax.set_ylabel("fraction of faults")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right")
    for ax in list(axes.flat)[len(recs) :]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(
    cfg: Config, scenarios: list[str], *, progress: Any = None, command: str = ""
) -> dict[str, Any]:
    """Run ``scenarios``; the JSON document (records keep ``_samples`` for plotting)."""
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    t0 = time.monotonic()
    records = []
    with Runner(cfg, progress or (lambda s: None)) as runner:
        runner.reserve(scenarios)
        for name in scenarios:
            records.append(runner.run(name))
    return {
        "schema": JSON_SCHEMA,
        "command": command,
        "started": started,
        "seconds": round(time.monotonic() - t0, 2),
        "environment": environment()
        | {"placement": cfg.as_dict()["pin"] or "unpinned (CPUs seen: per scenario, per side)"},
        "config": cfg.as_dict(),
        "scenarios": records,
        "goals": evaluate_goals(records),
    }


def public(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` without the raw samples."""
    return doc | {"scenarios": [{k: v for k, v in r.items() if k != "_samples"} for r in
                                doc["scenarios"]]}  # fmt: skip


def _command_line() -> str:
    """``uffdpoison bench ...`` as invoked (whatever ran the CLI: script, -m, tests)."""
    argv = sys.argv
    rest = argv[argv.index("bench") + 1 :] if "bench" in argv else argv[1:]
    return " ".join(["uffdpoison", "bench", *rest])


def main(args: argparse.Namespace) -> int:
    if args.mode == "minor":
        return _minor(args)
    args.memory = args.memory or "anon"
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown or not scenarios:
        print(
            f"uffdpoison bench: unknown scenario(s) {unknown or args.scenarios!r}; known: "
            f"{', '.join(SCENARIOS)}",
            file=sys.stderr,
        )
        return 2
    if args.plot and missing_matplotlib("uffdpoison bench"):
        return 2
    try:
        cfg = config_from_args(args)
        cfg.validate()
    except BenchError as e:
        print(f"uffdpoison bench: {e}", file=sys.stderr)
        return 2
    progress = Progress(not args.quiet, every=0)
    try:
        doc = run(cfg, scenarios, progress=progress.show, command=_command_line())
    except BenchError as e:
        print(f"\nuffdpoison bench: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nuffdpoison bench: interrupted (namespaces and helper processes removed)",
              file=sys.stderr)  # fmt: skip
        return 130
    except BaseExceptionGroup as group:  # trio wraps a Ctrl-C that lands inside a session
        if group.subgroup(KeyboardInterrupt) is None:
            raise
        print("\nuffdpoison bench: interrupted (namespaces and helper processes removed)",
              file=sys.stderr)  # fmt: skip
        return 130
    progress.done()
    print_table(doc)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(public(doc), f, indent=1)
            f.write("\n")
    if args.plot:
        try:
            plot(doc["scenarios"], args.plot)
        except BenchError as e:
            print(f"uffdpoison bench: {e}", file=sys.stderr)
    return 1 if any(r["status"] == "failed" for r in doc["scenarios"]) else 0


def _minor(args: argparse.Namespace) -> int:
    """``--mode minor``: the MINOR-mode benchmark, with the options it shares."""
    args.memory = args.memory or "shmem"
    if args.memory not in ("shmem", "hugetlb"):
        print("uffdpoison bench: --mode minor needs --memory shmem or hugetlb (a file's page "
              "cache)", file=sys.stderr)  # fmt: skip
        return 2
    argv = ["--memory", args.memory, "--rounds", str(args.rounds)]
    argv += ["--pages", str(args.pages)] if args.pages else []
    argv += ["--seed", str(args.seed)] if args.seed is not None else []
    argv += ["--json", str(args.json)] if args.json else []
    if args.pin:
        argv += ["--pin", args.pin.split(",")[0]]
    return minor.main(argv)
