"""``uffdpoison demo`` (the README's main job), run small as a user would run it."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from uffdpoison import demo
from uffdpoison.cli import build_parser
from uffdpoison.plotting import have_matplotlib
from uffdpoison.timeline import SAMPLE_KEYS


def run_demo(*args: str, quiet: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "uffdpoison", "demo", *(["--quiet"] if quiet else []), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    ("memory", "size", "mode"),
    [("anon", "16M", "missing"), ("shmem", "8M", "missing"), ("hugetlb", "16M", "missing"),
     ("shmem", "8M", "minor"), ("hugetlb", "16M", "minor")],
)  # fmt: skip
def test_demo_verifies_every_page(tmp_path: Path, memory: str, size: str, mode: str) -> None:
    out = tmp_path / "summary.json"
    proc = run_demo("--memory", memory, "--size", size, "--mode", mode, "--json", str(out))
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
    if mode == "minor":  # precopied: every page confirmed, none sent again
        pl = summary["placed"]
        assert summary["precopy"]["pages"] == pl["confirmed"] == g["pages"] - g["poisoned"]
        assert pl["copied"] == pl["zero"] == 0


def test_demo_minor_mode_needs_a_file() -> None:
    proc = run_demo("--mode", "minor", "--memory", "anon")
    assert proc.returncode == 2 and "needs --memory shmem or hugetlb" in proc.stderr


def test_demo_setup_error_exits_2() -> None:
    proc = run_demo("--size", "1000")
    assert proc.returncode == 2
    assert "multiple of the page size" in proc.stderr


def test_demo_json_timeline_and_no_progress_off_a_terminal(tmp_path: Path) -> None:
    out = tmp_path / "summary.json"
    proc = run_demo("--size", "8M", "--json", str(out), quiet=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr == ""  # stderr is a pipe: no progress line, not even a throttled one
    summary = json.loads(out.read_text())
    tl, pages, g = summary["timeline"], summary["pages"], summary["guest"]
    # Numbers only, in arrays (and the bin sizes).
    for key, value in tl.items():
        values = value if isinstance(value, list) else [value]
        assert all(isinstance(v, int | float) and not isinstance(v, bool) for v in values), key
    n = len(tl["sample_ms"])
    assert n >= 2 and all(len(tl[k]) == n for k in SAMPLE_KEYS)
    assert tl["sample_ms"] == sorted(tl["sample_ms"])
    for k in SAMPLE_KEYS:  # counters only grow
        assert tl[k] == sorted(tl[k]), k
    # The last sample is the end state: every page resident and touched.
    last = {k: tl[k][-1] for k in SAMPLE_KEYS}
    assert last["demand_placed"] + last["push_placed"] == pages["present"]
    assert last["poisoned"] == pages["poisoned"] == g["poisoned"]
    assert last["touched"] == g["pages"]
    assert last["demand_requests"] == summary["faults"]["demand_requests"]
    # From the toucher: every faulting touch in a 10 ms bin, every poisoned page's touch.
    assert tl["fault_bin_ms"] == 10 and tl["latency_window_ms"] in (10, 50)
    assert sum(tl["faults"]) == summary["latency_us"]["faulting_touches"]
    m = len(tl["latency_ms"])
    assert m == len(tl["latency_p50_us"]) == len(tl["latency_p99_us"]) >= 1
    assert all(a <= b for a, b in zip(tl["latency_p50_us"], tl["latency_p99_us"], strict=True))
    assert len(tl["poison_touch_ms"]) == len(tl["poison_touch_us"]) == g["poisoned"]
    assert tl["poison_touch_ms"] == sorted(tl["poison_touch_ms"])
    assert tl["poison_touch_ms"][0] >= 0 and tl["poison_touch_ms"][-1] <= tl["sample_ms"][-1]
    # The arrays are compact: one line each in the file.
    assert len(out.read_text().splitlines()) < 120


def test_demo_plot_draws_the_timeline(tmp_path: Path) -> None:
    if not have_matplotlib():
        pytest.skip("matplotlib is not installed (pip install 'uffdpoison[plot]')")
    png = tmp_path / "timeline.png"
    proc = run_demo("--size", "8M", "--max-bandwidth", "16M", "--plot", str(png))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1000, 860)


def test_demo_plot_without_matplotlib_exits_2_saying_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    args = build_parser().parse_args(["demo", "--plot", str(tmp_path / "t.png")])
    assert demo.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'uffdpoison[plot]'" in err
    assert not (tmp_path / "t.png").exists()
