"""Smoke test of the local fault-path benchmark: sane figures, no timing assertions."""

from __future__ import annotations

import os

import pytest

from uffdpoison.bench import local


def check(res: dict, pages: int, rounds: int) -> None:
    for name in ("python", "c"):
        s = res[name]
        assert s["touches"] == pages * rounds
        assert 0 < s["p50_ns"] <= s["p90_ns"] <= s["p99_ns"] <= s["max_ns"]
        assert s["mean_ns"] > 0
        assert res["cpus"][name], f"{name} handler CPU not reported"
    assert res["ratio_p50"] == pytest.approx(res["python"]["p50_ns"] / res["c"]["p50_ns"], 1e-2)
    allowed = os.sched_getaffinity(0)
    assert all(c in allowed for cs in res["cpus"].values() for c in cs)


def test_same_cpu_placement_pins_everything_to_one_cpu() -> None:
    before = os.sched_getaffinity(0)
    res = local.run(pages=40, rounds=2, placement="same")
    check(res, 40, 2)
    assert os.sched_getaffinity(0) == before  # the handler pin is undone
    cpu = min(os.sched_getaffinity(0))
    assert res["cpus"] == {"toucher": [cpu], "python": [cpu], "c": [cpu]}


def test_cross_cpu_placement() -> None:
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip(f"cross placement needs two CPUs, this process has {allowed}")
    res = local.run(pages=40, rounds=1, placement="cross")
    check(res, 40, 1)
    assert res["cpus"]["toucher"] == [allowed[0]]
    assert res["cpus"]["python"] == res["cpus"]["c"] == [allowed[1]]


def test_free_placement_and_main() -> None:
    check(local.run(pages=20, rounds=1, placement="free"), 20, 1)
    assert local.main(["--pages", "10", "--rounds", "1", "--placement", "same", "--json"]) == 0


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="placement must be one of"):
        local.run(pages=10, rounds=1, placement="diagonal")
    with pytest.raises(ValueError, match="pages and rounds"):
        local.run(pages=0, rounds=1, placement="same")
