"""``uffdpoison demo`` (the README's main job), run small as a user would run it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "uffdpoison", "demo", "--quiet", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(("memory", "size"), [("anon", "16M"), ("shmem", "8M"), ("hugetlb", "16M")])
def test_demo_verifies_every_page(tmp_path: Path, memory: str, size: str) -> None:
    out = tmp_path / "summary.json"
    proc = run_demo("--memory", memory, "--size", size, "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads(out.read_text())
    assert summary["schema"] == "uffdpoison.demo/1"
    assert summary["ok"] and summary["mismatch_count"] == 0
    g = summary["guest"]
    assert summary["faults"]["sigbus_first_pass"] == g["poisoned"] > 0
    assert summary["faults"]["sigbus_after_completion"] == g["poisoned"]
    assert summary["pages"]["present"] + summary["pages"]["poisoned"] == g["pages"]
    assert summary["placed"]["refused"] == 0
    assert "every byte matched" in proc.stdout


def test_demo_setup_error_exits_2() -> None:
    proc = run_demo("--size", "1000")
    assert proc.returncode == 2
    assert "multiple of the page size" in proc.stderr
