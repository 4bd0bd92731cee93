"""Prometheus metrics and live status of real migrations: a daemon and a source as processes
(and an embedded session), scraped over HTTP with prometheus_client's own parser while the
migration runs and after, against the session's own counters, the guest's truth and
``uffdpoison status --json``."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from array import array
from pathlib import Path

import trio
from destination_helpers import Guest, ToyVMM, make_guest, start_source
from live_process import PS, live_process, page_bytes
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from test_daemon import check_touches
from test_reliability import DestProcess, _cli

from uffdpoison.destination.embed import serve_memory
from uffdpoison.destination.regions import Region
from uffdpoison.harness.toucher import OUTCOME_OK, Toucher
from uffdpoison.kernel import memory
from uffdpoison.source.backends import ProcessBackend
from uffdpoison.source.spawn import SourceProcess

SERVED = ("data", "zero", "poisoned", "clean", "present", "local")


class Scrape:
    """One scrape's samples, parsed by prometheus_client."""

    def __init__(self, text: str) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = [s for f in self.families.values() for s in f.samples]

    def get(self, name: str, **labels: str) -> float:
        """The sum of ``name``'s samples whose labels include ``labels``."""
        found = [s.value for s in self.samples
                 if s.name == name and labels.items() <= s.labels.items()]  # fmt: skip
        assert found, f"no {name} {labels}"
        return sum(found)


async def scrape(address: str) -> Scrape:
    def get() -> str:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
            return str(r.read().decode())

    return Scrape(await trio.to_thread.run_sync(get))


def served_faults(placed: dict[str, int]) -> int:
    """Faults the data plane served, by its own counters (each was timed once)."""
    unserved = placed["coalesced"] + placed["unknown_address"] + placed["minor_faults"]
    return placed["faults"] - unserved


def check_fault_counters(m: Scrape, placed: dict[str, int]) -> None:
    """The metrics' faults against the session's own counters (nothing in flight)."""
    assert m.get("uffdpoison_faults_total") == placed["faults"]
    assert m.get("uffdpoison_faults_total", kind="minor") == placed["minor_faults"] == 0
    assert m.get("uffdpoison_fault_outcomes_total") == placed["faults"]  # each has one outcome
    assert m.get("uffdpoison_fault_outcomes_total", outcome="coalesced") == placed["coalesced"]
    assert m.get("uffdpoison_fault_outcomes_total", outcome="present") == placed["woken_present"]
    local = placed["repoisoned"] + placed["zero_after_remove"]
    assert m.get("uffdpoison_fault_outcomes_total", outcome="local") == local
    assert m.get("uffdpoison_fault_serve_seconds_count") == served_faults(placed) > 0
    for cls in SERVED:  # the histogram of a class holds exactly that class's faults
        assert m.get("uffdpoison_fault_serve_seconds_count", **{"class": cls}) == m.get(
            "uffdpoison_fault_outcomes_total", outcome=cls
        )
    assert m.get("uffdpoison_fault_serve_seconds_bucket", le="+Inf") == served_faults(placed)


def live_guest(n: int, poison: list[int], zero: list[int]) -> Guest:
    image = bytearray()
    for i in range(n):
        image += bytes(PS) if i in poison or i in zero else page_bytes(i)
    return Guest(image, PS, poison, zero)


async def test_daemon_metrics_and_status_follow_a_migration(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """A daemon with --metrics serves a toy VMM from a live process whose poison the source
    learns only by reading (so poisoned pages come back as POISONED replies). The push is held
    to one page (1 byte/s), so nearly every page is a demand fault of a class the guest fixes."""
    n, poison, zero = 256, [40, 150, 220], [7, 8, 9, 100]
    guest = live_guest(n, poison, zero)
    with live_process(n, poison, zero) as (proc, addr):
        backend = ProcessBackend(proc.pid, [(addr, n * PS)], scan_pagemap=False)
        source = await start_source(nursery, backend, max_bandwidth=1)
        control, handoff = str(tmp_path / "control.sock"), str(tmp_path / "h.sock")
        argv = ["--source", source, "--handoff", handoff, "--control", control,
                "--metrics", "127.0.0.1:0", "--state-dir", "none"]  # fmt: skip
        dest = DestProcess(nursery, argv)
        await dest.start()
        where = dest.records[0]["metrics"]
        assert where.startswith("127.0.0.1:")
        vmm = await ToyVMM.start(handoff, len(guest.image))
        try:
            first = list(range(128))
            check_touches(guest, await vmm.touch([150, *first]), [150, *first])
            await vmm.command("discard 8 2")  # a zero and a data page: REMOVE, then zeros
            await vmm.command("discard 40 1")  # poisoned: stays poisoned
            again = await vmm.touch([8, 9, 40])
            assert again["outcome"] == [0, 0, 1]

            # During: the VMM is idle, so the fault counters hold still while we read both.
            (s,) = json.loads(await _cli("status", "--control", control, "--json"))["sessions"]
            during = await scrape(where)
            assert s["state"] == "active" and s["pid"] == vmm.proc.pid
            assert during.get("uffdpoison_session_state", state="active") == 1
            assert during.get("uffdpoison_session_state") == 1  # one state at a time
            check_fault_counters(during, s["placed"])
            assert during.get("uffdpoison_remove_events_total") == s["placed"]["removes"] == 2
            assert s["faults_served"] == served_faults(s["placed"])
            assert 0 < s["latency_us"]["p50"] <= s["latency_us"]["p99"] < 1e6
            assert during.get("uffdpoison_session_resident_pages") < n
            assert during.get("uffdpoison_source_rtt_seconds") > 0
            assert during.get("uffdpoison_source_ready") == 1
            text = await _cli("status", "--control", control)
            assert f"faults {s['faults_served']} p50 " in text and "poisoned 2" in text

            check_touches(guest, await vmm.touch("all"))
            done = await dest.wait_for("session-completed")
            placed, pages = done["placed"], done["pages"]
            after = await scrape(where)
            (s,) = json.loads(await _cli("status", "--control", control, "--json"))["sessions"]
        finally:
            await vmm.close()
    check_fault_counters(after, placed)
    assert placed["push_pages"] <= 1 and placed["refused"] == 0
    # Replies by class: every page the push did not place was asked for, once, one page each.
    replies = {c: after.get("uffdpoison_reply_pages_total", **{"class": c}) for c in
               ("data", "zero", "poisoned", "clean")}  # fmt: skip
    assert sum(replies.values()) == placed["replies"] == after.get("uffdpoison_replies_total")
    truth = {"data": n - len(poison) - len(zero), "zero": len(zero), "poisoned": len(poison),
             "clean": 0}  # fmt: skip
    for cls, want in truth.items():
        assert want - placed["push_pages"] <= replies[cls] <= want, (cls, replies)
    for op, key in (("copy", "copied"), ("zeropage", "zeroed"), ("poison", "poisoned")):
        assert after.get("uffdpoison_placements_total", op=op) == placed[key]
    assert after.get("uffdpoison_refused_overwrites_total") == 0
    assert after.get("uffdpoison_placements_raced_total") == placed["raced"]
    assert after.get("uffdpoison_session_pages", state="poisoned") == pages["poisoned"] == 3
    assert after.get("uffdpoison_session_state", state="complete") == 1
    assert after.get("uffdpoison_session_resident_pages") == n
    assert after.get("uffdpoison_session_guest_pages") == n
    demand = after.get("uffdpoison_received_bytes_total", channel="demand")
    assert demand >= replies["data"] * PS
    # status --json is the same session: pages, state, poisoned, latency.
    assert s["state"] == "complete" and s["pages"] == pages and s["resident"] == s["total"] == n
    assert s["placed"]["refused"] == 0 and s["pages"]["poisoned"] == 3
    assert s["faults_served"] == served_faults(placed)
    assert 0 < s["latency_us"]["p50"] <= s["latency_us"]["p99"]
    assert await dest.stop(2) == 0  # SIGINT: the metrics server stops with the daemon


async def test_source_metrics_and_the_embedding_registry(tmp_path: Path) -> None:
    """``uffdpoison source --metrics`` while an embedded destination (no push) faults pages in:
    the source's requests and their service-time histogram against what the destination
    asked; its totals outlive the session. The embedded session's own registry, scraped from
    another thread, counts the same faults."""
    guest = make_guest(64, poisoned=[5], zero=[1, 2, 3])
    image, plist = tmp_path / "guest.img", tmp_path / "poison.txt"
    image.write_bytes(guest.image)
    plist.write_text("0x5000\n")
    touched = [i for i in range(0, 64, 2) if i != 4]
    with SourceProcess(image, poison_list=plist, options=["--metrics", "127.0.0.1:0"]) as src:
        assert src.metrics is not None
        with memory.of_kind("anon", len(guest.image)) as m:
            region = Region(base=m.addr, size=len(guest.image), offset=0, page_size=PS)
            async with serve_memory([region], src.address, background=False) as server:
                t = Toucher(array("Q", (m.addr + i * PS for i in touched)), page_size=PS)
                t.start()
                assert await trio.to_thread.run_sync(t.join, 30.0)
                assert list(t.results.outcome) == [OUTCOME_OK] * len(touched)
                src_during = await scrape(src.metrics)
                text = await trio.to_thread.run_sync(generate_latest, server.registry)
                stats = server.stats
            with trio.fail_after(10):  # the source sees the connection close
                while (after_end := await scrape(src.metrics)).get("uffdpoison_source_sessions"):
                    await trio.sleep(0.02)
    mine = Scrape(text.decode())
    assert mine.get("uffdpoison_fault_serve_seconds_count") == len(touched) == stats["faults"]
    zeros = len({1, 2, 3} & set(touched))
    assert mine.get("uffdpoison_fault_outcomes_total", session="embedded", outcome="zero") == zeros
    assert mine.get("uffdpoison_fault_outcomes_total", outcome="data") == len(touched) - zeros
    assert src_during.get("uffdpoison_source_sessions") == 1
    for seen in (src_during, after_end):  # the ended session's counters are kept
        assert seen.get("uffdpoison_source_requests_total") == stats["demand_requests"]
        assert seen.get("uffdpoison_source_request_service_seconds_count") == len(touched)
        assert seen.get("uffdpoison_source_pages_sent_total", **{"class": "zero"}) == zeros
        assert seen.get("uffdpoison_source_pages_sent_total", **{"class": "data"}) == (
            len(touched) - zeros
        )
        assert seen.get("uffdpoison_source_pages_sent_total", **{"class": "poisoned"}) == 0
        assert seen.get("uffdpoison_source_poisoned_pages") == 1


async def test_bad_metrics_addresses_are_refused_in_one_line(tmp_path: Path) -> None:
    image = tmp_path / "guest.img"
    image.write_bytes(bytes(PS))
    cases = [
        ("nowhere", 2, "--metrics"),
        ("127.0.0.1:70000", 2, "out of range"),
        ("192.0.2.1:9", 1, "--metrics 192.0.2.1:9: Cannot assign requested address"),
    ]
    for command in ("dest", "source"):
        for value, code, words in cases:
            argv = (["--source", "127.0.0.1:1", "--handoff", str(tmp_path / "h"),
                     "--state-dir", "none"] if command == "dest"
                    else ["--listen", "127.0.0.1:0", "--image", str(image)])  # fmt: skip
            p = await trio.run_process(
                [sys.executable, "-m", "uffdpoison", command, *argv, "--metrics", value],
                capture_stdout=True, capture_stderr=True, check=False,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
            err = p.stderr.decode()
            assert p.returncode == code and "Traceback" not in err, (command, value, err)
            assert words in err.strip().splitlines()[-1], (command, value, err)
