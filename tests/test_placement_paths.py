"""Only the page ledger places pages, by construction.

The kernel lets COPY, CONTINUE, shmem ZEROPAGE (and MOVE) replace a poison marker
(KERNEL-FACTS "Poison: what overwrites what"), so the product cannot reach them except through
``csrc/ledger.c``, which checks each page's state first. In C the placement ioctls are declared
only by ``csrc/uffd_place.h``; in Python no public class has them, and only the private
``uffdpoison.kernel._raw`` (for the tests that pin the kernel facts) binds them.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import uffdpoison
from uffdpoison.kernel import Userfaultfd

ROOT = Path(__file__).resolve().parent.parent
_PLACE_OPS = {"copy", "zeropage", "continue_", "poison", "move"}
# The product's C that may include the placement ioctls: their definitions and the ledger.
# The harness (benchmark reference, not product) places without a ledger on purpose.
_C_ALLOWED = {"uffd_place.c", "ledger.c", "harness/cref.c", "harness/bulkpull.c"}


def test_only_the_ledger_includes_the_placement_ioctls_in_c() -> None:
    csrc = ROOT / "csrc"
    users = {
        p.relative_to(csrc).as_posix()
        for p in [*csrc.rglob("*.c"), *csrc.rglob("*.h")]
        if re.search(r'#include\s+"uffd_place\.h"', p.read_text())
    }
    assert users == _C_ALLOWED
    uffd_h = (csrc / "uffd.h").read_text()
    assert not re.search(r"up_uffd_(copy|zeropage|continue|poison|move)\s*\(", uffd_h)


def _product_modules() -> list[str]:
    out = []
    for info in pkgutil.walk_packages(uffdpoison.__path__, "uffdpoison."):
        name = info.name
        if name.startswith(("uffdpoison.harness", "uffdpoison.bench")) or name.endswith("__main__"):
            continue
        out.append(name)
    return out


def test_no_public_class_of_the_product_places_pages() -> None:
    """Only ``Ledger`` has placement methods; no other public class has any of them."""
    assert not _PLACE_OPS & set(dir(Userfaultfd))
    for name in _product_modules():
        if any(part.startswith("_") for part in name.split(".")):
            continue
        mod = importlib.import_module(name)
        for cname, cls in inspect.getmembers(mod, inspect.isclass):
            if cname.startswith("_") or cls.__module__ != name or cname == "Ledger":
                continue
            assert not _PLACE_OPS & set(vars(cls)), f"{name}.{cname} can place pages"


def test_no_product_module_imports_the_raw_ioctls() -> None:
    for p in (ROOT / "uffdpoison").rglob("*.py"):
        rel = p.relative_to(ROOT / "uffdpoison").as_posix()
        if rel == "kernel/_raw.py":
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                names = [mod] + [f"{mod}.{a.name}" for a in node.names]
            assert not any(n.endswith("kernel._raw") for n in names), rel
