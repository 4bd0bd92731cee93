"""``uffdpoison check``: what this kernel's userfaultfd supports, measured, not assumed.

Reports the fd creation paths, the API features, the ioctls offered per memory kind and
registration mode, and whether UFFDIO_POISON works (a marker is placed, then a second POISON
must be EEXIST). Exit 0 when what uffdpoison needs (the POISON ioctl) works, else 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from uffdpoison.kernel import Feature, Ioctl, RegisterMode, UffdError, Userfaultfd, memory
from uffdpoison.kernel.ledger import Ledger
from uffdpoison.kernel.uffd import open_paths, probe_features


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print a JSON report")
    parser.add_argument(
        "--no-hugetlb",
        action="store_true",
        help="skip the hugetlb probe (it reserves one 2 MiB page and restores the count)",
    )


def _names(flags: Ioctl | Feature) -> list[str]:
    return [f.name for f in type(flags) if f in flags and f.name]


def _register(kind: str, mode: RegisterMode) -> dict[str, Any]:
    size = memory.HUGE_PAGE_SIZE if kind == "hugetlb" else memory.PAGE_SIZE
    try:
        with Userfaultfd.create() as u, memory.of_kind(kind, size) as m:
            got = u.register(m.addr, m.size, mode)
            u.unregister(m.addr, m.size)
            return {"ok": True, "ioctls": _names(got)}
    except OSError as e:
        return {"ok": False, "error": str(e)}


def _hugetlb(mode: RegisterMode) -> dict[str, Any]:
    try:
        with memory.reserve_hugepages(1):
            return _register("hugetlb", mode)
    except memory.HugePagesUnavailable as e:
        return {"ok": False, "skipped": str(e)}


def _poison() -> dict[str, Any]:
    """Place a marker through the ledger, then again: the kernel must say EEXIST the second
    time (the ledger counts it ``already``), so the marker is really there."""
    try:
        with Userfaultfd.create() as u, memory.anon(memory.PAGE_SIZE) as m:
            u.register(m.addr, m.size, RegisterMode.MISSING)
            try:
                with Ledger(u, m.addr, m.size, m.page_size) as led:
                    first, second = led.poison(0, 1), led.poison(0, 1)
                if first.placed == 1 and second.already == 1:
                    return {"ok": True, "detail": "marker placed; a second POISON is EEXIST"}
                return {"ok": False, "detail": "a second POISON succeeded: no marker was kept"}
            finally:
                u.unregister(m.addr, m.size)
    except OSError as e:
        return {"ok": False, "detail": str(e)}


def report(*, hugetlb_probe: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {"kernel": os.uname().release, "create": open_paths()}
    try:
        out["features"] = _names(probe_features())
        with Userfaultfd.create() as u:
            out["api_ioctls"] = _names(u.api_ioctls)
            out["created_via"] = u.created_via
    except UffdError as e:
        none = {"features": [], "api_ioctls": [], "register": {}, "ok": False}
        return out | none | {"error": str(e), "poison": {"ok": False, "detail": "no userfaultfd"}}
    both = RegisterMode.MISSING | RegisterMode.MINOR
    reg = {
        "anon MISSING": _register("anon", RegisterMode.MISSING),
        "shmem MISSING": _register("shmem", RegisterMode.MISSING),
        "shmem MISSING|MINOR": _register("shmem", both),
    }
    if hugetlb_probe:
        reg["hugetlb MISSING|MINOR"] = _hugetlb(both)
    out["register"] = reg
    out["poison"] = _poison()
    anon_ioctls = reg["anon MISSING"].get("ioctls", [])
    out["ok"] = bool(out["poison"]["ok"] and "POISON" in anon_ioctls)
    return out


def _text(r: dict[str, Any]) -> str:
    lines = [f"kernel {r['kernel']}", "userfaultfd creation:"]
    lines += [f"  {path:<26} {res}" for path, res in r["create"].items()]
    if "error" in r:
        lines.append(f"no usable userfaultfd: {r['error']}")
    lines.append("API features: " + (" ".join(r["features"]) or "-"))
    lines.append("API ioctls:   " + (" ".join(r["api_ioctls"]) or "-"))
    lines.append("ioctls offered on registration:")
    for what, res in r["register"].items():
        if res["ok"]:
            detail = " ".join(res["ioctls"])
        else:
            detail = "skipped: " + res["skipped"] if "skipped" in res else "FAILED: " + res["error"]
        lines.append(f"  {what:<22} {detail}")
    lines.append(f"POISON: {'works' if r['poison']['ok'] else 'MISSING'} ({r['poison']['detail']})")
    lines.append(
        "uffdpoison can run here" if r["ok"] else "uffdpoison cannot run here: needs UFFDIO_POISON"
    )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    r = report(hugetlb_probe=not getattr(args, "no_hugetlb", False))
    if getattr(args, "json", False):
        json.dump(r, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(_text(r))
    return 0 if r["ok"] else 1
