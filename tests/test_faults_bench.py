"""``python -m uffdpoison.bench.faults``: a few real source crashes in CI (100 in
docs/RELIABILITY.md)."""

from __future__ import annotations

import json
from pathlib import Path

from uffdpoison.bench import faults


def test_source_killed_and_restarted_every_run_completes(tmp_path: Path) -> None:
    out = tmp_path / "faults.json"
    argv = ["--runs", "3", "--size", "16M", "--kill-window", "0.05", "--json", str(out)]
    assert faults.main([*argv, "--quiet"]) == 0
    doc = json.loads(out.read_text())
    assert doc["failure"] is None and doc["summary"]["runs"] == 3
    resumed = [r for r in doc["runs"] if "pause_to_resumed_s" in r]
    assert resumed, "no kill landed mid-migration"
    for r in resumed:
        assert r["resumed_after_listening_s"] < 1.0  # the goal: within 1 s of listening
