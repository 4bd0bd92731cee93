"""Every data placement the product makes passes the ledger's poison check.

The kernel lets COPY, CONTINUE, shmem ZEROPAGE (and MOVE) replace a poison marker
(KERNEL-FACTS "Poison: what overwrites what"), so only ``csrc/ledger.c`` may issue them, after
checking the page's state. ``csrc/uffd.c`` defines the wrappers; the C reference
(``csrc/harness/cref.c``, ``csrc/harness/bulkpull.c``, benchmarks only) places without a ledger
on purpose: it is the floor.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_DATA_OPS = re.compile(
    r"\bup_uffd_(copy|zeropage|continue|move)\s*\(|\bUFFDIO_(COPY|ZEROPAGE|CONTINUE|MOVE)\b"
)
_C_ALLOWED = {"uffd.c", "ledger.c", "harness/cref.c", "harness/bulkpull.c"}


def _code(text: str) -> str:
    """C without its comments (they name the ioctls they explain)."""
    return re.sub(r"/\*.*?\*/|//[^\n]*", "", text, flags=re.DOTALL)


def test_only_the_ledger_issues_data_placements_in_c() -> None:
    csrc = ROOT / "csrc"
    users = {
        p.relative_to(csrc).as_posix()
        for p in csrc.rglob("*.c")
        if _DATA_OPS.search(_code(p.read_text()))
    }
    assert users <= _C_ALLOWED, f"data placement outside the ledger: {users - _C_ALLOWED}"
    assert "ledger.c" in users


def test_python_places_data_only_through_the_ledger() -> None:
    """No product module calls the raw wrappers (kernel/uffd.py binds them for the tests that
    pin the kernel facts), and only the benchmarks import the ledger-free C reference."""
    for p in (ROOT / "uffdpoison").rglob("*.py"):
        rel = p.relative_to(ROOT / "uffdpoison").as_posix()
        text = p.read_text()
        if rel != "kernel/uffd.py":
            assert not re.search(r"lib\.up_uffd_(copy|zeropage|continue|move)\b", text), rel
            assert not re.search(r"\buffd\.(copy|zeropage|continue_|move)\(", text), rel
        if not rel.startswith(("bench/", "harness/")):
            assert not re.search(r"^\s*(from|import)\s+\S*(cref|bulkpull)", text, re.MULTILINE), rel
