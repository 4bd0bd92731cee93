"""A migration's timeline: ``uffdpoison demo --plot``, and the ``timeline`` of its ``--json``.

Two sources, one clock (``CLOCK_MONOTONIC``), one origin (the moment the vCPU threads start):

* :class:`Sampler` reads the session's counters every ~10 ms while the migration runs: a few
  numbers a sample, appended to arrays (never an object per page or per fault);
* :func:`touch_series` bins what the C toucher recorded per touch (when it finished, how long it
  took): faults per 10 ms, latency percentiles per window, when each poisoned page was touched.

:func:`plot` draws from the JSON-able dict alone, so what is drawn is what ``--json`` holds.
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from uffdpoison.plotting import pyplot
from uffdpoison.stats import percentile

SAMPLE_S = 0.01  # how often the session's counters are read
FAULT_BIN_MS = 10
LATENCY_WINDOWS_MS = (10, 50)  # 10 ms while the faults spread over less than 2 s, else 50 ms
SAMPLE_KEYS = ("demand_placed", "push_placed", "poisoned", "touched", "demand_requests")


class Sampler:
    """The session's counters over time, ``origin_ns`` (``time.monotonic_ns()``) being 0."""

    def __init__(self, origin_ns: int) -> None:
        self.origin_ns = origin_ns
        self.ms = array("d")
        self.series = {k: array("Q") for k in SAMPLE_KEYS}

    def sample(self, stats: Mapping[str, int], counts: Mapping[str, int], touched: int) -> None:
        """One sample: ``stats`` and ``counts`` as ``PageServer.stats`` / ``page_counts()``
        give them, ``touched`` the touches finished so far.

        Resident pages split three ways: poison markers (the ledger's POISONED pages), pages the
        background push placed (its pages less those it found already there) and the rest,
        placed on demand."""
        poisoned = counts["poisoned"]
        data = counts["present"]
        pushed = min(data, max(0, stats["push_pages"] - stats["already"]))
        self.ms.append(round((time.monotonic_ns() - self.origin_ns) / 1e6, 2))
        for key, value in zip(
            SAMPLE_KEYS,
            (data - pushed, pushed, poisoned, touched, stats["demand_requests"]),
            strict=True,
        ):
            self.series[key].append(value)

    def as_dict(self) -> dict[str, Any]:
        return {"sample_ms": self.ms.tolist()} | {k: v.tolist() for k, v in self.series.items()}


def touch_series(
    origin_ns: int,
    done_ns: Sequence[int],
    latency_ns: Sequence[int],
    outcome: Sequence[int],
    *,
    sigbus: int,
    fault_ns: int,
) -> dict[str, Any]:
    """What the toucher recorded, on the sampler's clock. A touch slower than ``fault_ns`` that
    did not raise SIGBUS (outcome ``sigbus``) took a fault; a touch not run (``done_ns`` 0)
    counts nowhere. Two passes over the arrays; what is kept per fault is a C integer in an
    array (its latency, in its window's), never an object."""

    def touches() -> Iterator[tuple[int, int, bool]]:
        """(done, latency, faulted) of each touch that faulted or raised SIGBUS."""
        for done, lat, out in zip(done_ns, latency_ns, outcome, strict=True):
            if done and (out == sigbus or lat > fault_ns):
                yield done, lat, out != sigbus

    last = max((done for done, _, faulted in touches() if faulted), default=None)
    span_ms = 0.0 if last is None else (last - origin_ns) / 1e6
    window = LATENCY_WINDOWS_MS[0] if span_ms < 2000 else LATENCY_WINDOWS_MS[1]
    bins = [0] * (0 if last is None else int(span_ms // FAULT_BIN_MS) + 1)
    per_window: dict[int, array] = {}
    poison_ms, poison_us = array("d"), array("d")
    for done, lat, faulted in touches():
        ms = (done - origin_ns) / 1e6
        if faulted:
            bins[int(ms // FAULT_BIN_MS)] += 1
            per_window.setdefault(int(ms // window), array("Q")).append(lat)
        else:
            poison_ms.append(round(ms, 2))
            poison_us.append(round(lat / 1000, 1))
    starts = sorted(per_window)
    p50, p99 = [], []
    for w in starts:
        lat_sorted = sorted(per_window[w])
        p50.append(round(percentile(lat_sorted, 50) / 1000, 1))
        p99.append(round(percentile(lat_sorted, 99) / 1000, 1))
    order = sorted(range(len(poison_ms)), key=poison_ms.__getitem__)
    return {
        "fault_bin_ms": FAULT_BIN_MS,
        "faults": bins,
        "latency_window_ms": window,
        "latency_ms": [w * window for w in starts],
        "latency_p50_us": p50,
        "latency_p99_us": p99,
        "poison_touch_ms": [poison_ms[k] for k in order],
        "poison_touch_us": [poison_us[k] for k in order],
    }


def plot(doc: Mapping[str, Any], path: str) -> None:
    """Draw ``doc`` (the demo's JSON document) as three panels over one time axis: resident
    pages by who placed them, demand faults per 10 ms, fault latency with poisoned touches."""
    plt = pyplot()
    tl, cfg, guest = doc["timeline"], doc["config"], doc["guest"]
    span_ms = max(tl["sample_ms"][-1] if tl["sample_ms"] else 0.0, 1.0)
    div, unit = (1000.0, "s") if span_ms >= 2000 else (1.0, "ms")

    def t(values: Sequence[float]) -> list[float]:
        return [v / div for v in values]

    def kpages(values: Sequence[int]) -> list[float]:
        return [v / 1000 for v in values]

    fig, (top, mid, low) = plt.subplots(
        3, 1, sharex=True, figsize=(10, 8.6), height_ratios=[3, 1.5, 2.4]
    )
    bw, threads = cfg["max_bandwidth"], cfg["threads"]
    push = f"capped (--max-bandwidth {bw})" if bw else "uncapped"
    fig.suptitle(
        f"uffdpoison demo: a {cfg['size'] >> 20} MiB {cfg['memory']} guest migrated by postcopy "
        f"({guest['pages']} pages, {guest['poisoned']} poisoned) — "
        f"{'every check held' if doc['ok'] else 'MISMATCH'}\n"
        f"source on loopback; {threads} vCPU thread{'s' if threads > 1 else ''} touching every "
        f"page in random order; background push {push}",
        fontsize=11,
    )
    x = t(tl["sample_ms"])
    markers = tl["poisoned"][-1] if tl["poisoned"] else 0
    early = markers > 0 and tl["poisoned"][0] == markers
    top.stackplot(
        x,
        kpages(tl["poisoned"]),
        kpages(tl["demand_placed"]),
        kpages(tl["push_placed"]),
        labels=[
            f"poison markers ({markers}{', all placed before the vCPUs started' if early else ''})",
            "placed on demand (a vCPU faulted on it)",
            "placed by the background push",
        ],
        colors=["#d62728", "#1f77b4", "#aec7e8"],
    )
    top.plot(x, kpages(tl["touched"]), "k--", lw=1.2, label="pages touched by the vCPUs")
    top.axhline(guest["pages"] / 1000, color="0.3", lw=0.8, ls=":")
    top.set_ylim(0, guest["pages"] / 1000 * 1.06)
    top.set_title("Resident guest pages, by who placed them", loc="left", fontsize=10)
    top.set_ylabel("pages (thousands)")
    top.legend(loc="upper left", fontsize=8.5)

    bin_ms = tl["fault_bin_ms"]
    starts = t([i * bin_ms for i in range(len(tl["faults"]))])
    mid.bar(starts, tl["faults"], width=bin_ms / div, align="edge", color="#1f77b4")
    mid.set_title(
        f"Demand faults per {bin_ms} ms (touches that waited for their page)",
        loc="left",
        fontsize=10,
    )
    mid.set_ylabel(f"faults / {bin_ms} ms")

    w = tl["latency_window_ms"]
    lx = t([s + w / 2 for s in tl["latency_ms"]])
    low.plot(lx, tl["latency_p99_us"], "o-", color="#ff7f0e", ms=3, lw=1.2, label="p99")
    low.plot(lx, tl["latency_p50_us"], "o-", color="#1f77b4", ms=3, lw=1.2, label="p50")
    if tl["poison_touch_ms"]:
        low.scatter(
            t(tl["poison_touch_ms"]),
            tl["poison_touch_us"],
            marker="x",
            s=14,
            color="#d62728",
            lw=0.8,
            zorder=3,
            label="poisoned page touched (time to its SIGBUS)",
        )
    low.set_yscale("log")
    low.set_title(f"Fault latency per {w} ms window (log scale)", loc="left", fontsize=10)
    low.legend(
        loc="lower right", bbox_to_anchor=(1, 1), ncols=3, fontsize=8.5, frameon=False,
        borderaxespad=0.2,
    )  # fmt: skip
    low.set_ylabel("latency (µs)")
    low.set_xlabel(f"time since the vCPU threads started ({unit})")
    for ax in (top, mid, low):
        ax.grid(True, alpha=0.3)
        ax.set_xlim(0, span_ms / div)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
