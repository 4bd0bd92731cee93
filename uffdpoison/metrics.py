"""Prometheus metrics: the daemons' ``--metrics HOST:PORT`` and an embedded session's registry.

Everything is read when scraped: the data planes' counters and latency histograms live in C
(csrc/hist.c) and are copied out then; nothing is recorded per fault in Python. A collector
turns one snapshot into metric families, prometheus_client writes the exposition format and
serves HTTP from a thread of its own. The snapshot is taken on the trio thread that owns the
sessions (``from_any_thread``), so a scrape never races a session's end. docs/OPERATIONS.md,
"Metrics", lists every metric.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import trio
from prometheus_client import start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import CollectorRegistry

from uffdpoison.kernel.hist import SOURCE_REPLIES, Histogram, Timing
from uffdpoison.transport import format_address, parse_address

T = TypeVar("T")

STATES = ("active", "paused", "recovering", "complete", "failed")
FAULT_CLASSES = (*SOURCE_REPLIES, "present", "local")  # how a destination fault was served
REQUEST_CLASSES = (*SOURCE_REPLIES, "mixed")  # what a source's reply to a request held
PLACEMENT_OPS = (("copy", "copied"), ("zeropage", "zeroed"), ("poison", "poisoned"),
                 ("continue", "continued"))  # fmt: skip


def metrics_arg(text: str) -> tuple[str, int]:
    """``--metrics``: ``PORT`` (on loopback) or ``HOST:PORT``, for argparse."""
    try:
        return parse_address(f"127.0.0.1:{text}" if text.isdigit() else text, what="--metrics")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


@dataclass(frozen=True, slots=True)
class DestSample:
    """One destination session as a scrape sees it."""

    session: str
    state: str
    pages: dict[str, int]  # ledger pages by state (missing ... removed)
    placed: dict[str, int]  # the data plane's counters (up_dest_stats)
    timing: Timing
    pauses: int
    outstanding: int  # demand requests unanswered
    rtt_s: float | None  # the URGENT connection's smoothed RTT (None: not connected)


@dataclass(frozen=True, slots=True)
class SourceSample:
    """A source: its sessions' counters and latencies, the ended ones' included."""

    sessions: int
    poisoned: int  # units known poisoned now
    stats: dict[str, int]  # summed up_src_stats
    latency: dict[str, Histogram] = field(default_factory=dict)  # by class, summed


@dataclass
class SourceTotals:
    """Source sessions' counters and latencies summed (a scrape adds the live ones to the
    ended ones' totals)."""

    stats: dict[str, int] = field(default_factory=dict)
    latency: dict[str, Histogram] = field(default_factory=dict)

    def add(self, stats: dict[str, int], timing: Timing) -> None:
        for k, v in stats.items():
            self.stats[k] = self.stats.get(k, 0) + v
        for c, h in timing.latency.items():
            self.latency[c] = self.latency.get(c, Histogram()) + h

    def copied(self) -> SourceTotals:
        return SourceTotals(dict(self.stats), dict(self.latency))


def _counter(name: str, doc: str, labels: Sequence[str] = ()) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=list(labels))


def _gauge(name: str, doc: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


def _histogram(
    name: str, doc: str, labels: Sequence[str], rows: Iterable[tuple[list[str], Histogram]]
) -> HistogramMetricFamily:
    fam = HistogramMetricFamily(name, doc, labels=list(labels))
    for values, h in rows:
        buckets = [("+Inf" if b == float("inf") else repr(b), n) for b, n in h.cumulative()]
        fam.add_metric(values, buckets, h.sum_ns / 1e9)
    return fam


@dataclass(frozen=True, slots=True)
class DestSnapshot:
    sessions: Sequence[DestSample]
    source_ready: bool | None = None  # a daemon's: has its source answered yet


class DestCollector:
    """The destination's metrics: one family each, a ``session`` label on every series."""

    def __init__(self, snapshot: Callable[[], DestSnapshot | None]) -> None:
        """``snapshot``: what to show now (None: nothing, the sessions are gone)."""
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        if snap is None:
            return
        if snap.source_ready is not None:
            yield GaugeMetricFamily("uffdpoison_source_ready",
                                    "1 once the source answered a handshake",
                                    int(snap.source_ready))  # fmt: skip
        yield GaugeMetricFamily("uffdpoison_sessions", "sessions served now", len(snap.sessions))
        yield from _dest_families(snap.sessions)


Values = Iterable[tuple[tuple[str, ...], float]]  # label values (after session), value


def _one(key: str) -> Callable[[DestSample], Values]:
    return lambda x: [((), x.placed[key])]


def _outcomes(x: DestSample) -> Values:
    yield from (((c,), x.timing.latency[c].count) for c in FAULT_CLASSES)
    yield ("coalesced",), x.placed["coalesced"]
    yield ("unknown_address",), x.placed["unknown_address"]
    yield ("blocked",), x.placed["minor_unservable"]  # MINOR without the memory file


# Per destination session: name, counter or gauge, help, labels after ``session``, values.
_DEST: tuple[tuple[str, str, str, tuple[str, ...], Callable[[DestSample], Values]], ...] = (
    ("uffdpoison_faults", "counter", "demand faults read off the userfaultfd, by kind", ("kind",),
     lambda x: [(("missing",), x.placed["faults"] - x.placed["minor_faults"]),
                (("minor",), x.placed["minor_faults"])]),
    ("uffdpoison_fault_outcomes", "counter", "demand faults by how they were served (a fault "
     "whose request is in flight counts once answered)", ("outcome",), _outcomes),
    ("uffdpoison_reply_pages", "counter", "pages in demand replies, by class", ("class",),
     lambda x: (((c,), x.timing.pages[c]) for c in SOURCE_REPLIES)),
    ("uffdpoison_replies", "counter", "demand reply frames placed", (), _one("replies")),
    ("uffdpoison_demand_requests", "counter", "requests sent to the source (a fault's page, or "
     "a run of ensure_present's)", (), _one("demand_requests")),
    ("uffdpoison_requests_outstanding", "gauge", "requests not answered yet", (),
     lambda x: [((), x.outstanding)]),
    ("uffdpoison_placements", "counter", "pages placed, by ioctl", ("op",),
     lambda x: (((op,), x.placed[key]) for op, key in PLACEMENT_OPS)),
    ("uffdpoison_refused_overwrites", "counter", "pages of data refused because a poison "
     "marker is there (each logged; must stay 0)", (), _one("refused")),
    ("uffdpoison_placements_raced", "counter", "placements that found the page placed by "
     "someone else (EEXIST)", (), _one("raced")),
    ("uffdpoison_placements_skipped", "counter", "pages not placed: already there, or data for "
     "a page the guest discarded", ("reason",),
     lambda x: (((r,), x.placed[r]) for r in ("already", "dropped"))),
    ("uffdpoison_remove_events", "counter", "REMOVE/UNMAP events (the guest discarded memory)",
     (), _one("removes")),
    ("uffdpoison_push_pages", "counter", "pages placed from the source's push", (),
     _one("push_pages")),
    ("uffdpoison_received_bytes", "counter", "bytes received from the source", ("channel",),
     lambda x: [(("demand",), x.timing.bytes_urgent), (("push",), x.timing.bytes_bulk)]),
    ("uffdpoison_request_stalls", "counter", "requests unanswered past the request timeout "
     "(the source is taken as lost)", (), _one("stalls")),
    ("uffdpoison_session_pauses", "counter", "times the source was lost", (),
     lambda x: [((), x.pauses)]),
    ("uffdpoison_session_state", "gauge", "1 for the session's state, 0 for the others",
     ("state",), lambda x: (((s,), int(x.state == s)) for s in STATES)),
    ("uffdpoison_session_pages", "gauge", "guest pages by ledger state", ("state",),
     lambda x: (((s,), n) for s, n in x.pages.items())),
    ("uffdpoison_session_resident_pages", "gauge", "pages with nothing left to fetch (placed, "
     "poisoned or discarded)", (), lambda x: [((), resident_pages(x.pages))]),
    ("uffdpoison_session_guest_pages", "gauge", "pages of guest memory served", (),
     lambda x: [((), sum(x.pages.values()))]),
    ("uffdpoison_source_rtt_seconds", "gauge", "smoothed round-trip time to the source (the "
     "kernel's, of the demand connection; absent while not connected)", (),
     lambda x: [] if x.rtt_s is None else [((), x.rtt_s)]),
)  # fmt: skip


def _dest_families(samples: Sequence[DestSample]) -> Iterator[Metric]:
    for name, kind, doc, labels, values in _DEST:
        fam = (_counter if kind == "counter" else _gauge)(name, doc, ("session", *labels))
        for x in samples:
            for vals, v in values(x):
                fam.add_metric([x.session, *vals], v)
        yield fam
    yield _histogram(
        "uffdpoison_fault_serve_seconds",
        "a demand fault read off the userfaultfd until its page was placed and the thread "
        "woken, by how it was served",
        ("session", "class"),
        (([x.session, c], x.timing.latency[c]) for x in samples for c in FAULT_CLASSES),
    )


def resident_pages(pages: dict[str, int]) -> int:
    """Pages with nothing left to fetch (present, poisoned or discarded)."""
    return sum(pages.values()) - pages["missing"] - pages["requested"] - pages["background"]


class SourceCollector:
    """The source's metrics, summed over its sessions (ended ones included: never backwards)."""

    def __init__(self, sample: Callable[[], SourceSample | None]) -> None:
        self._sample = sample

    def collect(self) -> Iterator[Metric]:
        x = self._sample()
        if x is None:
            return
        st = x.stats
        yield GaugeMetricFamily("uffdpoison_source_sessions", "destination sessions now",
                                x.sessions)  # fmt: skip
        yield GaugeMetricFamily("uffdpoison_source_poisoned_pages", "units of guest memory "
                                "known poisoned", x.poisoned)  # fmt: skip
        for name, doc, key in (
            ("requests", "demand requests answered or being answered", "requests"),
            ("request_pages", "units demand requests asked for", "request_pages"),
            ("push_pages", "units offered by the background push", "push_pages"),
            ("read_failures", "requests or pushes whose memory could not be read (not poison)",
             "read_failures"),
        ):  # fmt: skip
            yield CounterMetricFamily(f"uffdpoison_source_{name}", doc, st.get(key, 0))
        sent = _counter("uffdpoison_source_pages_sent", "units sent, both channels, by class",
                        ("class",))  # fmt: skip
        for cls in SOURCE_REPLIES:
            sent.add_metric([cls], st.get(f"{cls}_pages", 0))
        yield sent
        out = _counter("uffdpoison_source_sent_bytes", "bytes sent", ("channel",))
        out.add_metric(["demand"], st.get("bytes_urgent", 0))
        out.add_metric(["push"], st.get("bytes_bulk", 0))
        yield out
        yield _histogram(
            "uffdpoison_source_request_service_seconds",
            "a demand request received until its reply was written, by what the reply held",
            ("class",),
            (([c], x.latency.get(c, Histogram())) for c in REQUEST_CLASSES),
        )


def registry_of(collector: DestCollector | SourceCollector) -> CollectorRegistry:
    reg = CollectorRegistry()
    reg.register(collector)
    return reg


def from_any_thread(fn: Callable[[], T]) -> Callable[[], T | None]:
    """``fn`` to be called from any thread: run on the calling trio thread (the one calling
    this) where the sessions live; None once that trio run is over."""
    token = trio.lowlevel.current_trio_token()

    def call() -> T | None:
        with contextlib.suppress(RuntimeError):
            if trio.lowlevel.current_trio_token() is token:
                return fn()
        try:
            return trio.from_thread.run_sync(fn, trio_token=token)
        except trio.RunFinishedError:
            return None

    return call


@contextlib.asynccontextmanager
async def http_endpoint(
    address: tuple[str, int] | None, registry: CollectorRegistry
) -> AsyncIterator[str | None]:
    """With an ``address`` (port 0: a free one), prometheus_client's HTTP server there in a
    thread for the block, yielding where it listens (``HOST:PORT``); else nothing (None).
    OSError naming --metrics if it cannot listen."""
    if address is None:
        yield None
        return
    host, port = address
    try:
        httpd, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        raise OSError(f"--metrics {format_address(host, port)}: {e.strerror or e}") from None
    try:
        yield format_address(str(httpd.server_address[0]), int(httpd.server_address[1]))
    finally:
        with trio.CancelScope(shield=True):  # scrapes in flight finish on this thread
            await trio.to_thread.run_sync(httpd.shutdown)
        httpd.server_close()
        thread.join()
