"""The scenarios of ``uffdpoison bench``: each runs uffdpoison and the C reference on the same
work, rounds interleaved, and returns one JSON-ready record (schema in docs/BENCHMARKS.md).

Every latency is measured in the faulting thread: the C toucher's ``CLOCK_MONOTONIC`` around a
one-byte read of a page that is not there yet. Both sides get the same guest image, poison
list, memory kind, touch order, toucher threads and CPU placement; each side's source runs in a
process of its own (loopback, netns), so a round has three parties: the toucher + handler
process (this one), the source process, and the kernel between them.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from array import array
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

import uffdpoison
from uffdpoison.auth import Token
from uffdpoison.bench.netns import NetnsPair, NetnsUnavailable
from uffdpoison.destination.embed import PageServer, serve_memory
from uffdpoison.destination.regions import Region
from uffdpoison.harness.bulkpull import BulkPuller
from uffdpoison.harness.cref import RemoteHandler
from uffdpoison.harness.toucher import OUTCOME_OK, OUTCOME_SIGBUS, Toucher, current_cpu
from uffdpoison.kernel import RegisterMode, Userfaultfd, memory
from uffdpoison.kernel.tls import TlsContext
from uffdpoison.metrics import http_endpoint
from uffdpoison.owned import Owned
from uffdpoison.stats import percentile

HUGE = 2 << 20
HIT_NS = 5_000  # a touch faster than this found its page present (the bulk stream won the race)
BG_CHUNK = 64 << 10  # the C reference's background request (CRIU's first chunk size)
BULK_CHUNK = 256 << 10  # the C reference's bulk-throughput request


def chunk_pages(chunk: int, page_size: int) -> int:
    """Pages in a C reference request of ``chunk`` bytes (at least one page)."""
    return max(1, chunk // page_size)


SCENARIOS: dict[str, str] = {
    "loopback": "demand faults, source in its own process over TCP 127.0.0.1, no background stream",
    "loopback+bg": "demand faults over loopback while the background stream pushes the region "
    "at the --bg-cap rate",
    "netns": "demand faults, source in its own network namespace over a veth pair "
    "(--rate: tbf on the source's egress; --delay: user-space delay line each way)",
    "netns+bg": "netns with the background stream at the --bg-cap rate",
    "bulk": "background stream throughput on loopback, uncapped, no touches: bytes/s until "
    "every page of --bulk-size is placed",
    "metrics": "the cost of metrics: loopback demand faults with metrics on (latency histograms "
    "recorded in C at both ends, both endpoints scraped every 100 ms) against off (nothing "
    "recorded, nothing scraped); the 'C' side is uffdpoison with metrics off",
}
DEFAULT_SCENARIOS = tuple(s for s in SCENARIOS if s != "metrics")
SCRAPE_EVERY = 0.1  # seconds between two scrapes of each endpoint in the metrics scenario


class BenchError(Exception):
    """The benchmark (or one scenario) could not run; the message says why."""


class Skip(Exception):
    """A scenario this machine cannot run; the message is the recorded reason."""


@dataclass
class Config:
    pages: int = 4000  # pages touched per round
    span: int = 8  # the region is span x pages (room for the background stream to push)
    memory: str = "anon"
    threads: int = 1
    poison_fraction: float = 0.0
    pattern: str = "random"
    rounds: int = 5
    warmup: int = 1
    pin: tuple[int, int, int] | None = None  # toucher, handler, source CPUs
    bg_cap: int = 64 << 20  # bytes/s of the background stream in the +bg scenarios
    rate: int | None = None  # netns: tbf rate in bytes/s
    delay: float = 0.0  # netns: one-way delay in seconds, each direction
    bulk_size: int = 256 << 20
    bulk_rounds: int = 3
    seed: int = 1
    timeout: float = 120.0
    tls_dir: Path | None = None  # ca.pem, server.pem, server.key: the uffdpoison side is TLS

    def client_tls(self) -> TlsContext | None:
        return TlsContext(server=False, ca=self.tls_dir / "ca.pem") if self.tls_dir else None

    @property
    def page_size(self) -> int:
        return HUGE if self.memory == "hugetlb" else 4096

    @property
    def region_pages(self) -> int:
        return self.pages * self.span

    def validate(self) -> None:
        if self.pages < 1 or self.span < 1 or self.rounds < 1 or self.warmup < 0:
            raise BenchError("--pages, --span and --rounds must be >= 1, --warmup >= 0")
        if self.memory not in memory.KINDS:
            raise BenchError(f"--memory must be anon, shmem or hugetlb, got {self.memory!r}")
        if self.pattern not in ("random", "sequential"):
            raise BenchError(f"--pattern must be random or sequential, got {self.pattern!r}")
        if not 0 <= self.poison_fraction < 1:
            raise BenchError(f"--poison-fraction must be within [0, 1), got {self.poison_fraction}")
        if self.threads < 1:
            raise BenchError(f"--threads must be >= 1, got {self.threads}")
        if self.bulk_size < self.page_size or self.bulk_size % self.page_size:
            raise BenchError(
                f"--bulk-size {self.bulk_size} must be a positive multiple of the page size "
                f"{self.page_size}"
            )
        if self.pin is not None:
            allowed = os.sched_getaffinity(0)
            bad = [c for c in self.pin if c not in allowed]
            if bad:
                raise BenchError(f"--pin CPUs {bad} not available (this process may use {allowed})")
        if self.delay < 0:
            raise BenchError(f"--delay must be >= 0, got {self.delay}")

    def as_dict(self) -> dict[str, Any]:
        return {
            "pages": self.pages,
            "span": self.span,
            "region_pages": self.region_pages,
            "page_size": self.page_size,
            "memory": self.memory,
            "threads": self.threads,
            "poison_fraction": self.poison_fraction,
            "pattern": self.pattern,
            "rounds": self.rounds,
            "warmup": self.warmup,
            "pin": None
            if self.pin is None
            else dict(zip(("toucher", "handler", "source"), self.pin, strict=True)),
            "bg_cap_bytes_per_s": self.bg_cap,
            "netns_rate_bytes_per_s": self.rate,
            "netns_delay_s": self.delay,
            "bulk_size": self.bulk_size,
            "bulk_rounds": self.bulk_rounds,
            "seed": self.seed,
        }

    @property
    def tcpus(self) -> list[int] | None:
        return None if self.pin is None else [self.pin[0]]

    @property
    def hcpu(self) -> int | None:
        return None if self.pin is None else self.pin[1]

    @property
    def scpu(self) -> int | None:
        return None if self.pin is None else self.pin[2]


# ---- figures ----------------------------------------------------------------------------------


@dataclass
class Samples:
    """What one side measured over all counted rounds of a scenario."""

    lat: array = field(default_factory=lambda: array("Q"))  # demand-fault latencies, ns
    touches: int = 0
    hits: int = 0  # touches under hit_ns: page already placed by the background stream
    hit_ns: int = 0  # 0: every touch is a fault (no background stream to race it)
    sigbus: int = 0
    seconds: float = 0.0  # touch phases (or bulk transfers), summed
    bytes: int = 0  # bulk: bytes placed
    rounds: int = 0
    cpus: dict[str, set[int]] = field(
        default_factory=lambda: {"toucher": set(), "handler": set(), "source": set()}
    )
    extra: dict[str, int] = field(default_factory=dict)

    def add_touches(self, res: Any, seconds: float) -> None:
        self.rounds += 1
        self.seconds += seconds
        for v, o in zip(res.latency_ns, res.outcome, strict=True):
            if o == OUTCOME_SIGBUS:
                self.sigbus += 1
            elif o == OUTCOME_OK:
                if v < self.hit_ns:
                    self.hits += 1
                else:
                    self.lat.append(v)
        self.touches += len(res.latency_ns)
        self.cpus["toucher"].update(c for c in res.cpus if c >= 0)

    def add_extra(self, d: dict[str, int]) -> None:
        for k, v in d.items():
            if isinstance(v, int):
                self.extra[k] = self.extra.get(k, 0) + v

    def figures(self, page_size: int) -> dict[str, Any]:
        s = sorted(self.lat)
        n = len(s)

        def pct(p: float) -> float | None:
            return round(percentile(s, p) / 1000, 2) if n else None

        faults = n + self.sigbus
        out: dict[str, Any] = {
            "rounds": self.rounds,
            "touches": self.touches,
            "faults": faults,
            "hits": self.hits,
            "sigbus": self.sigbus,
            "latency_us": {
                "p50": pct(50),
                "p90": pct(90),
                "p99": pct(99),
                "p999": pct(99.9),
                "max": round(s[-1] / 1000, 2) if n else None,
                "mean": round(sum(s) / n / 1000, 2) if n else None,
            },
            "seconds": round(self.seconds, 4),
            "faults_per_s": round(faults / self.seconds, 1) if self.seconds and faults else None,
            "bytes_per_s": None,
            "cpus": {k: sorted(v) for k, v in self.cpus.items()},
            "counters": dict(self.extra),
        }
        if self.bytes:
            out["bytes_per_s"] = round(self.bytes / self.seconds) if self.seconds else None
        elif out["faults_per_s"] is not None:
            out["bytes_per_s"] = round(faults * page_size / self.seconds)
        return out


RATIO_KEYS = ("p50", "p90", "p99", "p999", "max")


def ratios(up: dict[str, Any], c: dict[str, Any]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for k in RATIO_KEYS:
        a, b = up["latency_us"][k], c["latency_us"][k]
        out[k] = round(a / b, 3) if a is not None and b else None
    for k in ("faults_per_s", "bytes_per_s"):
        a, b = up[k], c[k]
        out[k] = round(a / b, 3) if a is not None and b else None
    return out


# ---- guest, processes, placement ---------------------------------------------------------------


@dataclass
class Guest:
    """A guest image on disk (for both sources) and what a touch must read."""

    path: Path
    poison_path: Path
    pages: int
    page_size: int
    first_bytes: bytes  # byte 0 of every page
    poisoned: frozenset[int]
    token_path: Path  # the source and the destination authenticate, as deployed

    @property
    def token(self) -> Token:
        return Token.from_file(self.token_path)


def make_guest(
    workdir: Path, name: str, pages: int, page_size: int, poison_fraction: float, seed: int
) -> Guest:
    rng = random.Random(seed)
    path = workdir / f"{name}.img"
    first = bytearray(pages)
    with open(path, "wb") as f:
        per = max(1, (4 << 20) // page_size)
        for start in range(0, pages, per):
            n = min(per, pages - start)
            chunk = os.urandom(n * page_size)
            first[start : start + n] = chunk[::page_size]
            f.write(chunk)
    poisoned = frozenset(
        rng.sample(range(pages), round(pages * poison_fraction)) if poison_fraction else ()
    )
    poison_path = workdir / f"{name}.poison"
    poison_path.write_text("".join(f"{i * page_size:#x}\n" for i in sorted(poisoned)))
    token_path = workdir / f"{name}.token"
    token_path.write_text(secrets.token_hex(32))
    return Guest(path, poison_path, pages, page_size, bytes(first), poisoned, token_path)


def _pythonpath_env() -> dict[str, str]:
    """The environment for child processes: they must import this same uffdpoison."""
    root = str(Path(uffdpoison.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _task_cpus(pid: int) -> set[int]:
    """The CPU each thread of ``pid`` last ran on (/proc/PID/task/*/stat field 39)."""
    out = set()
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with (
                contextlib.suppress(OSError, ValueError, IndexError),
                open(f"/proc/{pid}/task/{tid}/stat") as f,
            ):
                out.add(int(f.read().rsplit(")", 1)[1].split()[36]))
    return out


class Process:
    """A helper process that prints a JSON ``listening`` line first; stdout drained after."""

    def __init__(self, cmd: list[str], preexec: Callable[[], None] | None, what: str) -> None:
        self.what = what
        self._err = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
            preexec_fn=preexec,
            env=_pythonpath_env(),
            text=True,
        )
        assert self.proc.stdout is not None
        try:
            line = self.proc.stdout.readline()
            if not line:
                raise BenchError(
                    f"{what} exited ({self.proc.poll()}) before listening: {self.stderr()}"
                )
            status = json.loads(line)
            self.host: str = status["host"]
            self.port: int = int(status["port"])
            self.metrics: str | None = status.get("metrics")  # with --metrics: where
        except BaseException:
            # Not yet in anyone's list of processes to close (a Ctrl-C while it starts, a bad
            # first line): close it here or it outlives the benchmark, in its namespace.
            self.close()
            raise
        self.lines: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        with contextlib.suppress(ValueError, OSError):
            for line in self.proc.stdout:
                self.lines.append(line)

    def stderr(self) -> str:
        self._err.seek(0)
        return self._err.read().decode(errors="replace").strip()[-2000:]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def cpus(self) -> set[int]:
        return _task_cpus(self.proc.pid)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"{self.what} died ({self.proc.returncode}): {self.stderr()}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(OSError):
            if self.proc.stdin:
                self.proc.stdin.close()
        self._err.close()


def _affinity(cpu: int | None, then: Callable[[], None] | None = None) -> Callable[[], None] | None:
    if cpu is None:
        return then

    def pre() -> None:
        if then is not None:
            then()
        os.sched_setaffinity(0, {cpu})

    return pre


@contextlib.contextmanager
def _processes() -> Iterator[list[Process]]:
    procs: list[Process] = []
    try:
        yield procs
    finally:
        for p in reversed(procs):
            p.close()


def start_up_source(
    procs: list[Process], cfg: Config, guest: Guest, host: str, *, cap: int | None = None,
    pair: NetnsPair | None = None, options: Sequence[str] = (),
) -> Process:  # fmt: skip
    """The uffdpoison source for ``guest`` in its own process (``options``: more of its own);
    ``cap``: its push's bandwidth."""
    pre = _affinity(cfg.scpu, pair.preexec_src() if pair else None)
    up_cmd = [
        sys.executable, "-P", "-m", "uffdpoison", "source", "--listen", f"{host}:0",
        "--image", str(guest.path), "--poison-list", str(guest.poison_path),
        "--token-file", str(guest.token_path),
    ]  # fmt: skip
    if cfg.tls_dir is not None:
        up_cmd += ["--tls", "--tls-cert", str(cfg.tls_dir / "server.pem"),
                   "--tls-key", str(cfg.tls_dir / "server.key")]  # fmt: skip
    if cap:
        up_cmd += ["--max-bandwidth", str(cap)]
    up = Process([*up_cmd, *options], pre, "uffdpoison source")
    procs.append(up)
    return up


def start_c_source(
    procs: list[Process], cfg: Config, guest: Guest, host: str, pair: NetnsPair | None = None
) -> Process:
    """The C reference's source for ``guest`` in its own process."""
    pre = _affinity(cfg.scpu, pair.preexec_src() if pair else None)
    c_cmd = [
        sys.executable, "-P", "-m", "uffdpoison.bench.csource", "--listen", f"{host}:0",
        "--image", str(guest.path), "--poison-list", str(guest.poison_path),
        "--page-size", str(guest.page_size),
    ]  # fmt: skip
    if cfg.scpu is not None:
        c_cmd += ["--cpu", str(cfg.scpu)]
    c = Process(c_cmd, pre, "C source")
    procs.append(c)
    return c


def start_delay(
    procs: list[Process], target: Process, delay: float, pair: NetnsPair, scpu: int | None
) -> Process:
    cmd = [
        sys.executable, "-P", "-m", "uffdpoison.bench.delayproxy", "--listen", f"{pair.src_addr}:0",
        "--to", target.address, "--delay", repr(delay),
    ]  # fmt: skip
    p = Process(cmd, _affinity(scpu, pair.preexec_src()), "delay proxy")
    procs.append(p)
    return p


@contextlib.contextmanager
def _pinned_thread(cpu: int | None) -> Iterator[None]:
    """Pin the calling thread (the trio handler thread) for the block."""
    if cpu is None:
        yield
        return
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


def _registered(
    stack: contextlib.ExitStack, kind: str, size: int
) -> tuple[memory.Mapping, Userfaultfd]:
    """A mapping of ``kind`` registered MISSING on a fresh userfaultfd, both closed by ``stack``."""
    m = stack.enter_context(memory.of_kind(kind, size))
    uffd = stack.enter_context(Userfaultfd.create())
    uffd.register(m.addr, size, RegisterMode.MISSING)
    return m, uffd


def touch_order(cfg: Config, rnd: int) -> list[int]:
    """The page indices a round touches (the same for both sides in a round)."""
    if cfg.pattern == "sequential":
        return list(range(cfg.pages))
    return random.Random(cfg.seed * 1000 + rnd).sample(range(cfg.region_pages), cfg.pages)


def _verify(res: Any, order: Sequence[int], guest: Guest, side: str) -> None:
    bad = []
    for k, page in enumerate(order):
        o = res.outcome[k]
        if page in guest.poisoned:
            if o != OUTCOME_SIGBUS:
                bad.append(f"page {page}: poisoned but read without SIGBUS")
        elif o != OUTCOME_OK:
            bad.append(f"page {page}: outcome {o} (not read)")
        elif res.value[k] != guest.first_bytes[page]:
            bad.append(f"page {page}: wrong byte")
        if len(bad) >= 5:
            break
    if bad:
        raise BenchError(f"{side}: wrong results: {'; '.join(bad)}")


# ---- rounds ------------------------------------------------------------------------------------


def up_round(
    cfg: Config,
    source: str,
    guest: Guest,
    order: Sequence[int],
    bg: bool,
    *,
    timing: bool = True,
    scrape: Sequence[str] = (),
) -> tuple[Any, float, set[int], dict[str, int]]:
    """uffdpoison destination (embedded, same process) touching ``order``. ``timing``: the
    data plane records fault latencies (as it does unless measured); ``scrape``: metrics
    endpoints (``HOST:PORT``) to scrape while it touches, with this session's own added."""
    ps = guest.page_size
    size = guest.pages * ps
    with memory.of_kind(cfg.memory, size) as m:
        toucher = Toucher(
            array("Q", (m.addr + i * ps for i in order)),
            threads=cfg.threads,
            page_size=ps,
            cpus=cfg.tcpus,
        )
        region = Region(base=m.addr, size=size, offset=0, page_size=ps)
        started: list[bool] = []

        async def main() -> tuple[float, set[int], dict[str, int]]:
            with trio.fail_after(cfg.timeout):
                async with serve_memory(
                    [region], source, hugetlb=cfg.memory == "hugetlb", background=bg,
                    token=guest.token, tls=cfg.client_tls(),
                ) as server:  # fmt: skip
                    server.session.plane.set_timing(timing)
                    async with _scraping(server, scrape) as scrapes:
                        cpus = {current_cpu()}
                        t0 = time.perf_counter()
                        toucher.start()
                        started.append(True)
                        await _join(toucher)
                        seconds = time.perf_counter() - t0
                        cpus.add(current_cpu())
                    return seconds, cpus, dict(server.stats) | scrapes

        try:
            with _pinned_thread(cfg.hcpu):
                seconds, cpus, stats = trio.run(main)
        finally:
            if started and not toucher.join(cfg.timeout):
                raise BenchError(f"uffdpoison: toucher hung ({toucher.pending} pending)")
        return toucher.results, seconds, cpus, stats


@contextlib.asynccontextmanager
async def _scraping(server: PageServer, endpoints: Sequence[str]) -> AsyncIterator[dict[str, int]]:
    """With ``endpoints``: this session's metrics served over HTTP as the daemon serves them,
    and a thread that scrapes it and ``endpoints`` every SCRAPE_EVERY s; on exit the scrapes
    made and the bytes read, in the dict yielded."""
    counts = {"scrapes": 0, "scraped_bytes": 0}
    if not endpoints:
        yield counts
        return
    async with http_endpoint(("127.0.0.1", 0), server.registry) as own:
        assert own is not None
        stop = threading.Event()
        failed: list[str] = []

        def scrape() -> None:
            while True:  # the first at once: a short round is scraped too
                for where in (own, *endpoints):
                    try:
                        with urllib.request.urlopen(f"http://{where}/metrics", timeout=10) as r:
                            counts["scraped_bytes"] += len(r.read())
                    except OSError as e:
                        failed.append(f"scraping {where}: {e}")
                        return
                    counts["scrapes"] += 1
                if stop.wait(SCRAPE_EVERY):
                    return

        scraper = threading.Thread(target=scrape, name="uffdpoison-bench-scraper", daemon=True)
        scraper.start()
        try:
            yield counts
        finally:
            stop.set()
            await trio.to_thread.run_sync(scraper.join)
        if failed:
            raise BenchError(failed[0])


async def _join(toucher: Toucher) -> None:
    """Wait for the toucher in a worker thread (blocked in C, GIL released): polling from the
    trio thread would put timer wake-ups on the handler's own thread and into its figures."""
    await trio.to_thread.run_sync(toucher.join, abandon_on_cancel=True)


def _connect(host: str, port: int) -> socket.socket:
    s = socket.create_connection((host, port), timeout=10)
    s.settimeout(None)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def c_round(
    cfg: Config, host: str, port: int, guest: Guest, order: Sequence[int], bg: bool
) -> tuple[Any, float, set[int], dict[str, int]]:
    """The C reference: RemoteHandler (+ BulkPuller at the cap when ``bg``) touching ``order``."""
    ps = guest.page_size
    size = guest.pages * ps
    with contextlib.ExitStack() as stack:
        m, uffd = _registered(stack, cfg.memory, size)
        s = stack.enter_context(_connect(host, port))
        h = stack.enter_context(
            RemoteHandler(uffd.fileno(), m.addr, size, sock=s, page_size=ps, cpu=cfg.hcpu)
        )
        bulk = None
        if bg:
            s2 = stack.enter_context(_connect(host, port))
            bulk = stack.enter_context(
                BulkPuller(
                    uffd.fileno(), m.addr, size, sock=s2, page_size=ps,
                    chunk_pages=chunk_pages(BG_CHUNK, ps), rate=cfg.bg_cap, cpu=cfg.hcpu,
                )
            )  # fmt: skip
        toucher = Toucher(
            array("Q", (m.addr + i * ps for i in order)),
            threads=cfg.threads,
            page_size=ps,
            cpus=cfg.tcpus,
        )
        t0 = time.perf_counter()
        res = toucher.run(cfg.timeout)
        seconds = time.perf_counter() - t0
        hst = h.stop()
        stats = {"requests": hst.requests, "copies": hst.copies, "zeropages": hst.zeropages,
                 "poisons": hst.poisons, "eexist": hst.eexist}  # fmt: skip
        if hst.errors:
            raise BenchError(f"C handler: {hst.errors} errors, last {os.strerror(hst.last_errno)}")
        cpus = {hst.cpu}
        if bulk is not None:
            bst = bulk.stop()
            stats["bulk_pages"] = bst.placed
            if bst.errors:
                raise BenchError(f"C bulk puller: last error {os.strerror(bst.last_errno)}")
        return res, seconds, cpus, stats


def _record(name: str, cfg: Config, params: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "status": "ok",
        "reason": None,
        "description": SCENARIOS[name],
        "params": params,
        "uffdpoison": None,
        "c": None,
        "ratio": None,
    }


def _finish(rec: dict[str, Any], up: Samples, c: Samples, ps: int) -> dict[str, Any]:
    rec["uffdpoison"] = up.figures(ps)
    rec["c"] = c.figures(ps)
    rec["ratio"] = ratios(rec["uffdpoison"], rec["c"])
    rec["_samples"] = {"uffdpoison": up.lat, "c": c.lat}  # for --plot; not in the JSON
    return rec


# One round of one side: the toucher's results, seconds, handler CPUs, counters.
Round = Callable[[Sequence[int]], tuple[Any, float, set[int], dict[str, int]]]


def _versus_c(
    cfg: Config, guest: Guest, up_src: Process, c_src: Process, up_addr: str, bg: bool
) -> dict[str, tuple[Round, Process]]:
    """The two sides of a demand scenario: uffdpoison and the C reference."""
    return {
        "uffdpoison": (lambda order: up_round(cfg, up_addr, guest, order, bg), up_src),
        "c": (lambda order: c_round(cfg, c_src.host, c_src.port, guest, order, bg), c_src),
    }


def _demand(
    name: str,
    cfg: Config,
    guest: Guest,
    sides: dict[str, tuple[Round, Process]],
    bg: bool,
    params: dict[str, Any],
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """Rounds of both ``sides`` ("uffdpoison" and "c", each a round and its source), the order
    alternating, on the same touch orders."""
    rec = _record(name, cfg, params)
    hit = HIT_NS if bg else 0
    up, c = Samples(hit_ns=hit), Samples(hit_ns=hit)
    for r in range(cfg.warmup + cfg.rounds):
        order = touch_order(cfg, r)
        for side in ("uffdpoison", "c") if r % 2 == 0 else ("c", "uffdpoison"):
            progress(f"{name}: round {r + 1}/{cfg.warmup + cfg.rounds} {side}")
            one_round, src = sides[side]
            res, secs, cpus, stats = one_round(order)
            acc = up if side == "uffdpoison" else c
            src.check_alive()
            _verify(res, order, guest, side)
            if r < cfg.warmup:
                continue
            acc.add_touches(res, secs)
            acc.cpus["handler"].update(cpus)
            acc.cpus["source"].update(src.cpus())
            acc.add_extra(stats)
    return _finish(rec, up, c, guest.page_size)


def _demand_params(cfg: Config, bg: bool) -> dict[str, Any]:
    return {
        "pages_touched": cfg.pages,
        "region_pages": cfg.region_pages,
        "page_size": cfg.page_size,
        "memory": cfg.memory,
        "threads": cfg.threads,
        "pattern": cfg.pattern,
        "poison_fraction": cfg.poison_fraction,
        "background": bg,
        "bg_cap_bytes_per_s": cfg.bg_cap if bg else None,
        "c_bg_chunk_pages": chunk_pages(BG_CHUNK, cfg.page_size) if bg else None,
        "hit_threshold_us": HIT_NS / 1000 if bg else None,
    }


# ---- scenarios ---------------------------------------------------------------------------------


class Runner(Owned):
    """Runs scenarios with one Config; owns the guest images (a temp dir) and hugetlb pages."""

    def __init__(self, cfg: Config, progress: Callable[[str], None] = lambda s: None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.progress = progress
        self._stack = contextlib.ExitStack()
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.workdir = Path(
            self._stack.enter_context(
                tempfile.TemporaryDirectory(prefix="uffdpoison-bench-", dir=shm)
            )
        )
        self._guest: Guest | None = None
        self._bulk_guest: Guest | None = None

    def close(self) -> None:
        self._stack.close()

    def reserve(self, scenarios: Sequence[str]) -> None:
        """Reserve the huge pages the scenarios need (one region at a time, both sides)."""
        if self.cfg.memory != "hugetlb":
            return
        need = self.cfg.region_pages
        if "bulk" in scenarios:
            need = max(need, self.cfg.bulk_size // HUGE)
        try:
            self._stack.enter_context(memory.reserve_hugepages(need))
        except OSError as e:
            raise BenchError(f"cannot reserve {need} huge pages for --memory hugetlb: {e}") from e

    @property
    def guest(self) -> Guest:
        if self._guest is None:
            c = self.cfg
            self._guest = make_guest(
                self.workdir, "guest", c.region_pages, c.page_size, c.poison_fraction, c.seed
            )
        return self._guest

    @property
    def bulk_guest(self) -> Guest:
        if self._bulk_guest is None:
            c = self.cfg
            self._bulk_guest = make_guest(
                self.workdir, "bulk", c.bulk_size // c.page_size, c.page_size, 0.0, c.seed + 7
            )
        return self._bulk_guest

    def run(self, name: str) -> dict[str, Any]:
        """One scenario's record; a scenario that cannot run here is recorded as skipped, one
        that failed as failed (with the reason)."""
        fn = {
            "loopback": lambda: self.loopback(False),
            "loopback+bg": lambda: self.loopback(True),
            "netns": lambda: self.netns(False),
            "netns+bg": lambda: self.netns(True),
            "bulk": self.bulk,
            "metrics": self.metrics,
        }.get(name)
        if fn is None:
            raise BenchError(f"unknown scenario {name!r} (known: {', '.join(SCENARIOS)})")
        t0 = time.monotonic()
        try:
            rec = fn()
        except Skip as e:
            rec = _record(name, self.cfg, {})
            rec.update(status="skipped", reason=str(e))
        except Exception as e:  # recorded as this scenario's failure; the others still run
            rec = _record(name, self.cfg, {})
            why = str(e) or (
                f"a round took longer than --timeout {self.cfg.timeout} s"
                if isinstance(e, trio.TooSlowError | TimeoutError)
                else repr(e)
            )
            rec.update(status="failed", reason=f"{type(e).__name__}: {why}")
        rec["wall_seconds"] = round(time.monotonic() - t0, 2)
        return rec

    def loopback(self, bg: bool) -> dict[str, Any]:
        cfg = self.cfg
        name = "loopback+bg" if bg else "loopback"
        guest = self.guest
        with _processes() as procs:
            self.progress(f"{name}: starting sources")
            up = start_up_source(procs, cfg, guest, "127.0.0.1", cap=cfg.bg_cap if bg else None)
            c = start_c_source(procs, cfg, guest, "127.0.0.1")
            sides = _versus_c(cfg, guest, up, c, up.address, bg)
            return _demand(name, cfg, guest, sides, bg, _demand_params(cfg, bg), self.progress)

    def metrics(self) -> dict[str, Any]:
        """Loopback demand faults, metrics on ("uffdpoison") against off ("c")."""
        cfg, guest = self.cfg, self.guest
        with _processes() as procs:
            self.progress("metrics: starting sources")
            on = start_up_source(procs, cfg, guest, "127.0.0.1", options=["--metrics", "0"])
            off = start_up_source(procs, cfg, guest, "127.0.0.1")
            assert on.metrics is not None
            sides: dict[str, tuple[Round, Process]] = {
                "uffdpoison": (lambda o: up_round(cfg, on.address, guest, o, False,
                                                  scrape=[on.metrics or ""]), on),
                "c": (lambda o: up_round(cfg, off.address, guest, o, False, timing=False), off),
            }  # fmt: skip
            params = _demand_params(cfg, False) | {
                "sides": {"uffdpoison": "metrics on", "c": "metrics off"},
                "scrape_every_s": SCRAPE_EVERY,
            }
            return _demand("metrics", cfg, guest, sides, False, params, self.progress)

    def netns(self, bg: bool) -> dict[str, Any]:
        cfg = self.cfg
        name = "netns+bg" if bg else "netns"
        guest = self.guest
        params = _demand_params(cfg, bg)
        params.update(rate_bytes_per_s=cfg.rate, delay_s=cfg.delay)
        try:
            pair = NetnsPair(cfg.rate)
            pair.__enter__()
        except NetnsUnavailable as e:
            raise Skip(str(e)) from e
        try:
            with _processes() as procs:
                self.progress(f"{name}: starting sources in {pair.src}")
                cap = cfg.bg_cap if bg else None
                up = start_up_source(procs, cfg, guest, pair.src_addr, cap=cap, pair=pair)
                c = start_c_source(procs, cfg, guest, pair.src_addr, pair)
                if cfg.delay > 0:
                    up = start_delay(procs, up, cfg.delay, pair, cfg.scpu)
                    c = start_delay(procs, c, cfg.delay, pair, cfg.scpu)
                params.update(namespaces=[pair.src, pair.dst], source_addr=pair.src_addr)
                with pair.enter_dst():
                    sides = _versus_c(cfg, guest, up, c, up.address, bg)
                    return _demand(name, cfg, guest, sides, bg, params, self.progress)
        finally:
            pair.close()

    def bulk(self) -> dict[str, Any]:
        cfg = self.cfg
        guest = self.bulk_guest
        ps = guest.page_size
        size = guest.pages * ps
        rec = _record(
            "bulk",
            cfg,
            {
                "size": size,
                "page_size": ps,
                "memory": cfg.memory,
                "rounds": cfg.bulk_rounds,
                "c_chunk_pages": chunk_pages(BULK_CHUNK, ps),
                "timing": "connect to every page placed, wall clock",
            },
        )
        up, c = Samples(), Samples()
        check = random.Random(cfg.seed).sample(range(guest.pages), min(guest.pages, 256))
        with _processes() as procs:
            self.progress("bulk: starting sources")
            up_src = start_up_source(procs, cfg, guest, "127.0.0.1")
            c_src = start_c_source(procs, cfg, guest, "127.0.0.1")
            for r in range(cfg.warmup + cfg.bulk_rounds):
                for side in ("uffdpoison", "c") if r % 2 == 0 else ("c", "uffdpoison"):
                    self.progress(f"bulk: round {r + 1}/{cfg.warmup + cfg.bulk_rounds} {side}")
                    if side == "uffdpoison":
                        secs, cpus, res, stats = self._up_bulk(up_src.address, guest, check)
                        src, acc = up_src, up
                    else:
                        secs, cpus, res, stats = self._c_bulk(c_src, guest, check)
                        src, acc = c_src, c
                    src.check_alive()
                    _verify(res, check, guest, side)
                    if r < cfg.warmup:
                        continue
                    acc.rounds += 1
                    acc.seconds += secs
                    acc.bytes += size
                    acc.cpus["handler"].update(cpus)
                    acc.cpus["source"].update(src.cpus())
                    acc.add_extra(stats)
        rec = _finish(rec, up, c, ps)
        rec["ratio"] = {k: None for k in RATIO_KEYS} | {
            "faults_per_s": None,
            "bytes_per_s": ratios(rec["uffdpoison"], rec["c"])["bytes_per_s"],
        }
        return rec

    def _up_bulk(
        self, source: str, guest: Guest, check: Sequence[int]
    ) -> tuple[float, set[int], Any, dict[str, int]]:
        cfg = self.cfg
        ps = guest.page_size
        size = guest.pages * ps
        with memory.of_kind(cfg.memory, size) as m:
            region = Region(base=m.addr, size=size, offset=0, page_size=ps)
            after = Toucher(array("Q", (m.addr + i * ps for i in check)), page_size=ps)

            async def main() -> tuple[float, set[int], dict[str, int]]:
                with trio.fail_after(cfg.timeout):
                    t0 = time.perf_counter()
                    async with serve_memory(
                        [region], source, hugetlb=cfg.memory == "hugetlb", background=True,
                        token=guest.token, tls=cfg.client_tls(),
                    ) as server:  # fmt: skip
                        cpus = {current_cpu()}
                        await server.wait_complete()
                        secs = time.perf_counter() - t0
                        cpus.add(current_cpu())
                        after.start()
                        await _join(after)
                        return secs, cpus, dict(server.stats)

            with _pinned_thread(cfg.hcpu):
                secs, cpus, stats = trio.run(main)
            return secs, cpus, after.results, stats

    def _c_bulk(
        self, src: Process, guest: Guest, check: Sequence[int]
    ) -> tuple[float, set[int], Any, dict[str, int]]:
        cfg = self.cfg
        ps = guest.page_size
        size = guest.pages * ps
        with contextlib.ExitStack() as stack:
            m, uffd = _registered(stack, cfg.memory, size)
            t0 = time.perf_counter()
            s = stack.enter_context(_connect(src.host, src.port))
            b = BulkPuller(
                uffd.fileno(), m.addr, size, sock=s, page_size=ps,
                chunk_pages=chunk_pages(BULK_CHUNK, ps), cpu=cfg.hcpu,
            )  # fmt: skip
            with b:
                if not b.wait(cfg.timeout):
                    raise BenchError(f"C bulk pull did not finish in {cfg.timeout} s")
                secs = time.perf_counter() - t0
                st = b.stop()
            if st.errors or st.placed != guest.pages:
                raise BenchError(
                    f"C bulk pull placed {st.placed}/{guest.pages} pages, {st.errors} errors "
                    f"(last: {os.strerror(st.last_errno)})"
                )
            # Nothing handles faults now: every checked page must already be there.
            res = Toucher(array("Q", (m.addr + i * ps for i in check)), page_size=ps).run(30)
            return secs, {st.cpu}, res, {"requests": st.requests, "pages": st.placed}
