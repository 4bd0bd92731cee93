"""examples/kvm_vmm.py: a real KVM guest whose RAM is served by uffdpoison, poison included.

The VMM always runs as a child process (a poison SIGBUS gone wrong, or a vCPU blocked for ever,
must not take the test runner with it) and reports in JSON (``--json``).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from destination_helpers import ROOT

from uffdpoison.source.spawn import source_process

EXAMPLE = ROOT / "examples" / "kvm_vmm.py"
PAGE = 4096
KVM_CREATE_VM = 0xAE01


def kvm_unusable() -> str | None:
    """Why this machine cannot run a KVM guest, or None."""
    try:
        kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"cannot open /dev/kvm: {e.strerror}"
    try:
        os.close(fcntl.ioctl(kvm, KVM_CREATE_VM, 0))
    except OSError as e:
        return f"KVM cannot create a VM: {e.strerror}"
    finally:
        os.close(kvm)
    return None


UNUSABLE = kvm_unusable()
pytestmark = pytest.mark.skipif(UNUSABLE is not None, reason=f"no KVM guest here: {UNUSABLE}")


def run_vmm(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLE), *argv], capture_output=True, text=True, timeout=timeout
    )


def guest_checksum(image: bytes, poisoned: list[int]) -> int:
    """The guest's sum, computed here independently: the word at every 256th byte of every page
    that is not poisoned, mod 2**32."""
    total = 0
    for offset in range(0, len(image), 256):
        if offset // PAGE * PAGE not in poisoned:
            total += int.from_bytes(image[offset : offset + 4], "little")
    return total % 2**32


def write_image(tmp_path: Path, *argv: str) -> tuple[Path, bytes, list[int]]:
    path = tmp_path / "guest.img"
    assert run_vmm("--write-image", str(path), *argv).returncode == 0
    poison = [int(line, 16) for line in (tmp_path / "guest.img.poison").read_text().split()]
    return path, path.read_bytes(), poison


def test_default_run_prints_the_report_in_under_30_s() -> None:
    """The documented first command: its own source, 64 MiB, a text report, exit 0."""
    start = time.monotonic()
    proc = run_vmm()
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr
    assert elapsed < 30
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("guest finished")
    assert lines[-1].endswith(": match")
    assert "poisoned pages touched: 4 " in proc.stdout


def test_guest_checksum_matches_and_poison_is_reported_and_kept(tmp_path: Path) -> None:
    """Every page reaches the guest by a KVM demand fault (no push); every poisoned page the
    guest touches is reported at its GPA, skipped, and still poisoned after the run."""
    argv = ("--memory", "16M", "--poison", "6", "--seed", "7")
    path, image, poison = write_image(tmp_path, *argv)
    assert len(poison) == 6
    with source_process(path, poison_list=f"{path}.poison") as source:
        proc = run_vmm(*argv, "--source", source, "--no-background", "--json")
    assert proc.returncode == 0, proc.stderr
    r: dict[str, Any] = json.loads(proc.stdout)
    assert r["outcome"] == "finished"
    assert r["checksum"] == r["expected"] == guest_checksum(image, poison)
    assert r["poisoned_touched"] == poison  # the guest walks every page, in order
    assert r["poison_path"] in (["mmio"], ["sigbus"])
    assert r["guest_skipped"] == len(poison)
    assert r["still_poisoned"] == poison and r["ledger_poisoned"] == len(poison)
    npages = len(image) // PAGE
    assert r["faults"] == {"demand": npages - len(poison), "background": 0}
    assert r["served"]["copied"] + r["served"]["zeroed"] == npages - len(poison)


def test_on_poison_stop_stops_the_guest_at_the_first_poisoned_page(tmp_path: Path) -> None:
    argv = ("--memory", "8M", "--poison", "3")
    path, _, poison = write_image(tmp_path, *argv)
    with source_process(path, poison_list=f"{path}.poison") as source:
        proc = run_vmm(*argv, "--source", source, "--on-poison", "stop", "--json")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["outcome"] == "stopped" and r["checksum"] is None
    assert r["poisoned_touched"] == r["still_poisoned"] == poison[:1]


# The SIGBUS path, as KVM takes it on most hosts (not this kind: it exits with MMIO): the VMM's
# own vCPU loop on plain guest RAM, and a SIGBUS BUS_MCEERR_AR sent to the vCPU thread, as
# kvm_send_hwpoison_signal() does, for the page the guest is about to read.
SIGBUS_DRIVER = """
import contextlib, ctypes, importlib.util, json, os, signal, sys
from uffdpoison.kernel import memory

spec = importlib.util.spec_from_file_location("kvm_vmm", sys.argv[1])
vmm = importlib.util.module_from_spec(spec)
sys.modules["kvm_vmm"] = vmm
spec.loader.exec_module(vmm)
libc = ctypes.CDLL(None, use_errno=True)
SIZE, AT = 8 << 20, 4 << 20
image, _ = vmm.make_image(SIZE, 0, 1)
with memory.anon(SIZE) as ram, contextlib.closing(vmm.Vm(ram)) as vm:
    ram.write(0, image)

    def progress(walked):  # runs on the vCPU thread, between two KVM_RUNs
        if walked == AT:
            info = (ctypes.c_uint64 * 16)(signal.SIGBUS, 4, ram.addr + AT)  # BUS_MCEERR_AR
            rc = libc.syscall(297, os.getpid(), os.getpid(), signal.SIGBUS, info)  # tgsigqueue
            assert rc == 0, os.strerror(ctypes.get_errno())

    out = vmm.run_guest(vm, ram, "skip", lambda hva: False, progress)
print(json.dumps({"finished": out.finished, "paths": sorted(out.paths),
                  "poisoned": out.poisoned, "skipped": out.skipped,
                  "checksum": out.checksum, "expected": vmm.expected_checksum(image, [AT])}))
"""


def test_sigbus_from_kvm_is_handled_like_the_mmio_exit() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SIGBUS_DRIVER, str(EXAMPLE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["finished"] and r["paths"] == ["sigbus"]
    assert r["poisoned"] == [4 << 20] and r["skipped"] == 1
    assert r["checksum"] == r["expected"]


def test_expected_failures_are_one_line_and_exit_2() -> None:
    proc = run_vmm("--memory", "2M", "--source", "127.0.0.1:1")
    assert proc.returncode == 2
    assert proc.stderr.startswith("kvm_vmm: source unreachable") and proc.stderr.count("\n") == 1
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return
    # /dev/kvm that is not KVM, in a mount namespace of its own
    script = f"mount --bind /dev/null /dev/kvm && exec {sys.executable} {EXAMPLE} --memory 2M"
    proc = subprocess.run(
        ["unshare", "--mount", "sh", "-c", script], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("kvm_vmm: KVM cannot create a VM here: ")
    assert proc.stderr.count("\n") == 1
