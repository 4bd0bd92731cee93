"""Smoke tests of ``uffdpoison bench``: every scenario runs tiny against the real kernel, the
JSON document follows its schema, helpers clean up. No timing assertions (only lower bounds
that physics guarantees, like an injected delay)."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from array import array
from pathlib import Path
from typing import Any

import pytest

from uffdpoison.bench import command, minor, netns
from uffdpoison.bench.scenarios import RATIO_KEYS, SCENARIOS, BenchError, Config, Runner
from uffdpoison.harness.bulkpull import BulkPuller
from uffdpoison.harness.cref import (
    REPLY,
    PageSource,
    pingpong,
    poison_bitmap,
    request_bytes,
)
from uffdpoison.harness.toucher import Toucher
from uffdpoison.kernel import RegisterMode, Userfaultfd, anon
from uffdpoison.plotting import have_matplotlib

IS_ROOT = os.geteuid() == 0
LAT_KEYS = ("p50", "p90", "p99", "p999", "max", "mean")


def tiny(**kw: Any) -> Config:
    base: dict[str, Any] = dict(
        pages=150, span=2, rounds=1, warmup=0, bulk_size=1 << 20, bulk_rounds=1, timeout=30.0
    )
    base.update(kw)
    return Config(**base)


def children() -> set[int]:
    """Live (not zombie) child processes of this process."""
    me = str(os.getpid())
    out = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me and fields[0] != "Z":
            out.add(int(pid))
    return out


def check_figures(f: dict[str, Any], *, latency: bool = True) -> None:
    assert f["rounds"] >= 1
    lat = f["latency_us"]
    assert set(lat) == set(LAT_KEYS)
    if latency:
        assert f["faults"] > 0
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p999"] <= lat["max"]
        assert f["faults_per_s"] > 0
    assert f["bytes_per_s"] > 0
    assert set(f["cpus"]) == {"toucher", "handler", "source"}
    allowed = os.sched_getaffinity(0)
    assert f["cpus"]["handler"] and set(f["cpus"]["handler"]) <= allowed


def check_document(doc: dict[str, Any]) -> None:
    """The documented schema uffdpoison.bench/1 (docs/BENCHMARKS.md)."""
    assert doc["schema"] == "uffdpoison.bench/1"
    assert {"command", "started", "seconds", "environment", "config", "scenarios", "goals"} <= set(
        doc
    )
    env = doc["environment"]
    for k in ("kernel", "cpus", "affinity", "python", "trio", "uffdpoison", "placement"):
        assert env[k], k
    for rec in doc["scenarios"]:
        assert rec["name"] in SCENARIOS
        assert rec["status"] in ("ok", "skipped", "failed")
        assert "_samples" not in rec
        if rec["status"] != "ok":
            assert rec["reason"], f"{rec['name']}: {rec['status']} without a reason"
            continue
        assert rec["reason"] is None
        assert set(rec["ratio"]) == {*RATIO_KEYS, "faults_per_s", "bytes_per_s"}
        demand = rec["name"] != "bulk"
        for side in ("uffdpoison", "c"):
            check_figures(rec[side], latency=demand)
        if demand:
            up, c = rec["uffdpoison"]["latency_us"], rec["c"]["latency_us"]
            assert rec["ratio"]["p50"] == pytest.approx(up["p50"] / c["p50"], rel=1e-2)
    for g in doc["goals"]:
        assert {"name", "scenario", "metric", "target", "value", "met", "note"} == set(g)
        if g["value"] is not None:
            assert g["met"] in (True, False)
    json.dumps(doc)  # serializable as is


def test_every_scenario_tiny_and_cleans_up() -> None:
    before = children()
    doc = command.run(tiny(), list(SCENARIOS), command="test")
    pub = command.public(doc)
    check_document(pub)
    by = {r["name"]: r for r in pub["scenarios"]}
    assert list(by) == list(SCENARIOS)
    for name, rec in by.items():
        if name.startswith("netns") and not IS_ROOT:
            assert rec["status"] == "skipped" and "root" in rec["reason"]
            continue
        assert rec["status"] == "ok", f"{name}: {rec['reason']}"
    for name in ("loopback", "netns"):
        if by[name]["status"] == "ok":
            for side in ("uffdpoison", "c"):
                f = by[name][side]
                assert f["touches"] == f["faults"] == 150  # every touch was a demand fault
    assert by["loopback+bg"]["params"]["background"] is True
    on, off = by["metrics"]["uffdpoison"]["counters"], by["metrics"]["c"]["counters"]
    assert on["scrapes"] >= 2 and on["scraped_bytes"] > 0 and off["scrapes"] == 0
    assert on["faults"] == off["faults"] == 150  # both sides are uffdpoison, each fault served
    assert by["bulk"]["uffdpoison"]["bytes_per_s"] > 0
    # Raw samples stay available for --plot, one per counted fault.
    raw = {r["name"]: r for r in doc["scenarios"]}["loopback"]
    assert len(raw["_samples"]["c"]) == 150
    assert netns.leftovers() == []
    assert children() <= before, "helper processes left running"


def test_poison_and_pinning_are_applied() -> None:
    cpu = min(os.sched_getaffinity(0))
    doc = command.run(
        tiny(poison_fraction=0.1, pin=(cpu, cpu, cpu), threads=2), ["loopback"], command="t"
    )
    rec = doc["scenarios"][0]
    assert rec["status"] == "ok", rec["reason"]
    up, c = rec["uffdpoison"], rec["c"]
    # Same touch order and poison list on both sides: the same number of SIGBUS, some > 0
    # (300 region pages, 30 poisoned, 150 touched).
    assert up["sigbus"] == c["sigbus"] > 0
    assert up["faults"] == c["faults"] == 150
    for f in (up, c):
        assert f["cpus"]["toucher"] == f["cpus"]["handler"] == f["cpus"]["source"] == [cpu]
    assert doc["config"]["pin"] == {"toucher": cpu, "handler": cpu, "source": cpu}


@pytest.mark.skipif(not IS_ROOT, reason="network namespaces need root")
def test_netns_rate_and_delay() -> None:
    delay = 0.002
    doc = command.run(
        tiny(pages=40, rate=50 << 20, delay=delay), ["netns", "netns+bg"], command="t"
    )
    for rec in doc["scenarios"]:
        assert rec["status"] == "ok", rec["reason"]
        assert rec["params"]["delay_s"] == delay and rec["params"]["rate_bytes_per_s"] == 50 << 20
        if rec["name"] == "netns+bg":
            continue  # the stream may have sent a page before its fault: any latency goes
        for side in ("uffdpoison", "c"):
            # The delay line holds each direction for `delay`: no round trip can be shorter.
            assert rec[side]["latency_us"]["p50"] >= 2 * delay * 1e6
    assert netns.leftovers() == []


@pytest.mark.skipif(not IS_ROOT, reason="network namespaces need root")
def test_netns_pair_is_removed_on_error() -> None:
    with pytest.raises(RuntimeError, match="boom"), netns.NetnsPair(rate=10 << 20) as pair:
        assert pair.src in os.listdir("/var/run/netns")
        raise RuntimeError("boom")
    assert netns.leftovers() == []


def test_hugetlb_tiny() -> None:
    if not IS_ROOT:
        pytest.skip("reserving huge pages needs root")
    cfg = tiny(memory="hugetlb", pages=3, span=1, bulk_size=4 << 20)
    try:
        doc = command.run(cfg, ["loopback", "bulk"], command="t")
    except BenchError as e:
        pytest.skip(str(e))
    for rec in doc["scenarios"]:
        assert rec["status"] == "ok", rec["reason"]
    assert doc["config"]["page_size"] == 2 << 20
    assert doc["scenarios"][0]["c"]["faults"] == 3


def test_shmem_sequential() -> None:
    doc = command.run(tiny(memory="shmem", pattern="sequential"), ["loopback"], command="t")
    rec = doc["scenarios"][0]
    assert rec["status"] == "ok", rec["reason"]
    assert rec["params"]["memory"] == "shmem" and rec["params"]["pattern"] == "sequential"


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    command.add_arguments(p)
    return p.parse_args(argv)


def test_main_writes_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    args = parse(
        ["--scenarios", "loopback", "--pages", "60", "--rounds", "1", "--warmup", "0",
         "--json", str(out), "--quiet"]
    )  # fmt: skip
    assert command.main(args) == 0
    text = capsys.readouterr().out
    assert "loopback" in text and "ratio" in text and "goals:" in text
    doc = json.loads(out.read_text())
    check_document(doc)
    goals = {g["name"]: g for g in doc["goals"]}
    assert goals["loopback demand p50 <= 1.25x C"]["value"] is not None
    assert goals["bulk >= 2 GB/s on loopback"]["note"] == "scenario bulk not run"


def test_plot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    png = tmp_path / "cdf.png"
    argv = ["--scenarios", "loopback", "--pages", "30", "--rounds", "1", "--warmup", "0", "--quiet",
            "--plot", str(png)]  # fmt: skip
    if have_matplotlib():
        assert command.main(parse(argv)) == 0
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert command.main(parse(argv)) == 2


def test_bad_options_are_named(capsys: pytest.CaptureFixture[str]) -> None:
    assert command.main(parse(["--scenarios", "wan"])) == 2
    assert "unknown scenario" in capsys.readouterr().err
    assert command.main(parse(["--pin", "0,1"])) == 2
    assert "--pin" in capsys.readouterr().err
    assert command.main(parse(["--pin", "0,0,999"])) == 2
    assert "not available" in capsys.readouterr().err
    assert command.main(parse(["--pages", "0"])) == 2
    with pytest.raises(BenchError, match="unknown scenario"), Runner(tiny()) as r:
        r.run("wan")


def test_bulk_puller_places_everything_at_its_cap() -> None:
    pages = 512
    data = bytearray(os.urandom(pages * 4096))
    data[10 * 4096 : 20 * 4096] = bytes(10 * 4096)  # a zero run
    rate = 4 << 20
    with (
        PageSource(data, poison=poison_bitmap(pages, [3, 300])) as src,
        anon(pages * 4096) as mem,
        Userfaultfd.create() as uffd,
    ):
        uffd.register(mem.addr, mem.size, RegisterMode.MISSING)
        with src.connect() as s:
            b = BulkPuller(uffd.fileno(), mem.addr, mem.size, sock=s, chunk_pages=32, rate=rate)
            with b:
                assert b.wait(30)
                st = b.stop()
        assert st.done and st.errors == 0 and st.placed == pages
        assert st.bytes == (pages - 12) * 4096  # zero and poisoned pages carry no data
        assert st.elapsed_ns >= (st.bytes - 32 * 4096) / rate * 1e9  # the cap held
        # Nothing handles faults now: every page must be there, poison included.
        res = Toucher(array("Q", range(mem.addr, mem.addr + mem.size, 4096))).run(30)
        assert res.sigbus == 2 and res.ok == pages - 2
        assert [i for i in range(pages) if res.outcome[i]] == [3, 300]
        assert all(res.value[i] == data[i * 4096] for i in range(pages) if i not in (3, 300))


def test_bulk_puller_bad_arguments() -> None:
    a, b = socket.socketpair()
    with a, b, pytest.raises(ValueError, match="chunk_pages"):
        BulkPuller(3, 4096, 4096, sock=a, chunk_pages=0)


@pytest.mark.skipif(not IS_ROOT, reason="network namespaces need root")
def test_ctrl_c_removes_namespaces_and_helpers() -> None:
    import signal
    import subprocess
    import time

    p = subprocess.Popen(
        [sys.executable, "-m", "uffdpoison", "bench", "--scenarios", "netns", "--quiet"],
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    prefix = f"upb-{p.pid}-"
    try:
        deadline = time.monotonic() + 20
        kids: set[int] = set()
        while not (kids and any(n.startswith(prefix) for n in os.listdir("/var/run/netns"))):
            assert p.poll() is None and time.monotonic() < deadline, "bench never got going"
            time.sleep(0.02)
            kids = {int(x) for x in os.listdir("/proc") if x.isdigit() and _ppid(int(x)) == p.pid}
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130, err
    assert "interrupted" in err
    assert not [n for n in os.listdir("/var/run/netns") if n.startswith(prefix)]
    time.sleep(0.2)
    assert not [k for k in kids if os.path.exists(f"/proc/{k}") and _ppid(k) not in (0, None)]


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[1])


def _fake(name: str, **figs: Any) -> dict[str, Any]:
    """A scenario record carrying only what goal evaluation reads."""
    rec: dict[str, Any] = {"name": name, "status": "ok", "params": {"bg_cap_bytes_per_s": 1}}
    for side in ("uffdpoison", "c"):
        rec[side] = {"latency_us": {"p99": figs.get(f"{side}_p99")}, "bytes_per_s": figs.get("bps")}
    rec["ratio"] = {"p50": figs.get("p50"), "p99": figs.get("p99")}
    return rec


def test_goal_evaluation() -> None:
    goals = {
        g["name"]: g
        for g in command.evaluate_goals(
            [
                _fake("loopback", p50=1.2, p99=1.3, uffdpoison_p99=100.0),
                _fake("loopback+bg", uffdpoison_p99=160.0),
                _fake("bulk", bps=2.5e9),
            ]
        )
    }
    assert goals["loopback demand p50 <= 1.25x C"]["met"] is True
    assert goals["loopback demand p99 <= 1.25x C"]["met"] is False
    bg = goals["demand p99 with background <= 1.5x idle"]
    assert bg["value"] == 1.6 and bg["met"] is False and "cap" in bg["note"]
    assert goals["bulk >= 2 GB/s on loopback"]["met"] is True
    skipped = {"name": "netns", "status": "skipped", "reason": "x"}
    none = command.evaluate_goals([skipped])
    assert all(g["met"] is None and g["note"] for g in none)


def test_size_and_pages_conflict(capsys: pytest.CaptureFixture[str]) -> None:
    assert command.main(parse(["--pages", "10", "--size", "8M"])) == 2
    assert "--pages or --size" in capsys.readouterr().err
    assert command.main(parse(["--size", "5000"])) == 2
    assert "multiple of 4096" in capsys.readouterr().err
    cfg = command.config_from_args(parse(["--size", "8M", "--memory", "hugetlb"]))
    assert cfg.pages == 4 and cfg.page_size == 2 << 20 and cfg.span == 1


def test_a_scenario_that_cannot_finish_is_recorded_not_fatal(tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    argv = ["--scenarios", "loopback,loopback+bg", "--pages", "20", "--rounds", "1",
            "--warmup", "0", "--timeout", "0.000001", "--json", str(out), "--quiet"]  # fmt: skip
    before = children()
    assert command.main(parse(argv)) == 1  # loopback could not run: non-zero, after the table
    doc = json.loads(out.read_text())
    check_document(doc)
    rec = {r["name"]: r for r in doc["scenarios"]}
    assert rec["loopback"]["status"] == "failed"
    assert "--timeout" in rec["loopback"]["reason"]
    assert rec["loopback+bg"]["status"] == "failed"  # the next scenario still ran, recorded
    goal = next(g for g in doc["goals"] if g["scenario"] == "loopback")
    assert goal["met"] is None and goal["note"] == "scenario loopback failed"
    assert children() <= before


def test_threaded_c_source_serves_connections_independently() -> None:
    pages = 64
    data = bytearray(os.urandom(pages * 4096))
    req = request_bytes(0, 1)
    with PageSource(data, poison=poison_bitmap(pages, [5]), threaded=True) as src:
        a, b = src.connect(), src.connect()
        with a, b:
            # b's request is answered while a's 64-page reply sits unread in a's socket.
            a.sendall(request_bytes(0, pages))
            ns = pingpong(b, req, REPLY.size + 4096, 50)
            assert len(ns) == 50
            got = bytearray()
            while len(got) < 3 * REPLY.size + (pages - 1) * 4096:
                chunk = a.recv(1 << 20)
                assert chunk
                got += chunk
            off, count, kind = REPLY.unpack_from(got, 0)
            assert (off, count, kind) == (0, 5, 0)
            assert bytes(got[REPLY.size : REPLY.size + 5 * 4096]) == bytes(data[: 5 * 4096])
        # More connections over its life than the connection table holds: finished ones are
        # reaped.
        for _ in range(80):
            with src.connect() as c:
                assert len(pingpong(c, req, REPLY.size + 4096, 1)) == 1
        st = src.stats()
    assert st.connections == 82 and st.errors == 0


def test_minor_mode_measures_every_class_against_the_c_reference(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--mode minor``: every class measured on both sides, one touch per page per round
    (poisoned pages in the MINOR rounds only), and no helper process left behind."""
    out = tmp_path / "minor.json"
    before = children()
    args = parse(["--mode", "minor", "--pages", "96", "--rounds", "1", "--json", str(out)])
    assert command.main(args) == 0
    assert "clean-epoch" in capsys.readouterr().out
    res = json.loads(out.read_text())
    poisoned, stale = 3, 9  # pages 1, 33, 65; a tenth of the rest
    assert res["memory"] == "shmem" and res["pages"] == 96
    touches = {k: res[k]["touches"] for k in minor.CLASSES}
    assert touches == {"missing": 96 - poisoned, "clean-epoch": 96 - poisoned,
                       "clean-digest": 96 - poisoned - stale, "data": stale,
                       "poisoned": 2 * poisoned}  # fmt: skip
    for k in minor.CLASSES:
        assert 0 < res[k]["p50_us"] <= res[k]["p99_us"]
        assert 0 < res[k]["cref"]["p50_us"] <= res[k]["cref"]["p99_us"]
    assert children() <= before


def test_minor_mode_needs_a_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert command.main(parse(["--mode", "minor", "--memory", "anon"])) == 2
    assert "needs --memory shmem or hugetlb" in capsys.readouterr().err
