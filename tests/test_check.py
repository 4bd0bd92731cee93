"""``uffdpoison check`` reports what this kernel offers and exits by whether POISON works."""

from __future__ import annotations

import argparse
import json

import pytest

from uffdpoison import check


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    p = argparse.ArgumentParser()
    check.add_arguments(p)
    rc = check.main(p.parse_args(list(argv)))
    return rc, capsys.readouterr().out


def _nr_hugepages() -> int:
    with open("/proc/sys/vm/nr_hugepages") as f:
        return int(f.read())


def test_json_report(capsys: pytest.CaptureFixture[str]) -> None:
    before = _nr_hugepages()
    rc, out = _run(capsys, "--json")
    assert _nr_hugepages() == before  # the hugetlb probe put the count back
    r = json.loads(out)
    assert rc == 0 and r["ok"] is True
    assert r["create"]["syscall"] == "ok"
    assert "POISON" in r["features"] and "THREAD_ID" in r["features"]
    assert r["poison"]["ok"] is True and "EEXIST" in r["poison"]["detail"]
    reg = r["register"]
    assert set(reg["anon MISSING"]["ioctls"]) >= {"WAKE", "COPY", "ZEROPAGE", "POISON"}
    assert "CONTINUE" not in reg["anon MISSING"]["ioctls"]
    assert "CONTINUE" in reg["shmem MISSING|MINOR"]["ioctls"]
    huge = reg["hugetlb MISSING|MINOR"]
    if huge["ok"]:
        assert "ZEROPAGE" not in huge["ioctls"] and "POISON" in huge["ioctls"]
    else:
        assert "skipped" in huge


def test_text_report(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = _run(capsys, "--no-hugetlb")
    assert rc == 0
    assert "POISON: works" in out and "uffdpoison can run here" in out
    assert "anon MISSING" in out and "hugetlb" not in out.split("ioctls offered")[1]
