"""The rooms of docs/DESIGN.md import downward only, checked by construction (an ``ast`` walk).

The benchmark/test harness (toucher, C reference, bulk puller) is not in the product:
``uffdpoison._harness`` (``csrc/harness/``) holds it; the product extension ``uffdpoison._native``
must not, and only the harness's own package, the benchmarks and the demo may import it. The
destination does not import the source, the protocol imports nothing of ours, and only the
kernel package imports the product extension.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import uffdpoison._harness as harness_ext
import uffdpoison._native as native_ext

PKG = Path(__file__).resolve().parent.parent / "uffdpoison"

# Real names from csrc/harness/{toucher,cref,bulkpull}.cdef.
HARNESS_SYMBOLS = (
    "up_toucher_start",
    "up_toucher_join",
    "up_toucher_completed",
    "up_toucher_free",
    "up_toucher_sigbus_current",
    "up_toucher_sigbus_own",
    "up_toucher_sigbus_refs",
    "up_toucher_current_cpu",
    "up_xxh64_buffer",
    "up_cref_uffd_open",
    "up_cref_uffd_register",
    "up_cref_local_start",
    "up_cref_remote_start",
    "up_cref_handler_stats_get",
    "up_cref_handler_stop",
    "up_cref_source_start",
    "up_cref_source_start_ex",
    "up_cref_source_port",
    "up_cref_source_stats_get",
    "up_cref_source_stop",
    "up_cref_pingpong",
    "UP_CREF_KIND_DATA",
    "UP_CREF_FLAG_ZERO_DETECT",
    "UP_CREF_SOURCE_THREADED",
    "up_cref_bulk_start",
    "up_cref_bulk_stats_get",
    "up_cref_bulk_wait",
    "up_cref_bulk_stop",
)
HARNESS_PREFIXES = ("up_toucher_", "up_cref_", "UP_CREF_", "UP_TOUCH_", "up_bulkpull")

# Modules allowed to import the harness (paths relative to uffdpoison/).
ALLOWED = ("harness/", "bench/", "demo.py")
HARNESS_MODULES = ("uffdpoison.harness", "uffdpoison._harness")


def test_product_extension_has_no_harness_symbols() -> None:
    for name in HARNESS_SYMBOLS:
        assert hasattr(harness_ext.lib, name), name
        assert not hasattr(native_ext.lib, name), name
    product = set(dir(native_ext.lib))
    assert not {n for n in product if n.startswith(HARNESS_PREFIXES)}
    assert not product & set(dir(harness_ext.lib))
    for ctype in ("up_toucher *", "up_cref_stats *", "up_cref_bulk_stats *"):
        harness_ext.ffi.typeof(ctype)
        try:
            native_ext.ffi.typeof(ctype)
        except Exception:
            continue
        raise AssertionError(f"{ctype} is declared in uffdpoison._native")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of everything ``path`` imports, relative imports resolved;
    ``from X import Y`` yields both ``X`` and ``X.Y`` (Y may be a submodule)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package.pop()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            yield node.lineno, module
            for alias in node.names:
                yield node.lineno, f"{module}.{alias.name}"
        elif (
            isinstance(node, ast.Call)
            and (
                (isinstance(node.func, ast.Name) and node.func.id == "__import__")
                or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
            )
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.lineno, node.args[0].value


def _is_harness(module: str) -> bool:
    return any(module == m or module.startswith(m + ".") for m in HARNESS_MODULES)


def test_only_bench_demo_and_harness_import_the_harness() -> None:
    offenders = []
    checked = 0
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        if rel.startswith(ALLOWED):
            continue
        checked += 1
        offenders += [f"{rel}:{line}: {m}" for line, m in _imports(path) if _is_harness(m)]
    assert checked > 20  # the walk saw the product
    assert not offenders, offenders


def test_harness_binds_only_its_own_extension() -> None:
    for path in sorted((PKG / "harness").glob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        for line, m in _imports(path):
            assert m not in ("uffdpoison._native", "uffdpoison.kernel._ffi"), f"{rel}:{line}"
            if m == "uffdpoison._harness" or m.startswith("uffdpoison._harness."):
                assert rel == "harness/_ffi.py", f"{rel}:{line}: {m}"


def test_the_walk_sees_imports() -> None:
    # The checker itself: demo.py imports the toucher, the harness imports its _ffi.
    assert any(_is_harness(m) for _, m in _imports(PKG / "demo.py"))
    assert (3, "uffdpoison._harness") in set(_imports(PKG / "harness" / "_ffi.py"))


def _under(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_rooms_import_downward() -> None:
    rules = {
        # room: modules it must not import
        "destination/": ("uffdpoison.source", "uffdpoison.bench", "uffdpoison.demo"),
        "source/": ("uffdpoison.destination", "uffdpoison.bench", "uffdpoison.demo"),
        "protocol/": ("uffdpoison.kernel", "uffdpoison.source", "uffdpoison.destination",
                      "uffdpoison.transport", "uffdpoison.control", "uffdpoison.kernel.ledger"),
    }  # fmt: skip
    offenders = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        for room, banned in rules.items():
            if rel.startswith(room):
                offenders += [f"{rel}:{n}: {m}" for n, m in _imports(path) if _under(m, *banned)]
        if not rel.startswith(("kernel/", "bench/")):
            offenders += [
                f"{rel}:{n}: {m}"
                for n, m in _imports(path)
                if _under(m, "uffdpoison._native", "uffdpoison.kernel._ffi")
            ]
    assert not offenders, offenders
