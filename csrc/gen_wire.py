"""Generate ``csrc/wire.h`` from the one table of the wire, ``uffdpoison/protocol/layout.py``.

Run by ``csrc/build_ffi.py`` on every build (the header is not kept in git), or by hand:
``python csrc/gen_wire.py``; ``python csrc/gen_wire.py --doc`` prints docs/PROTOCOL.md's
generated tables. The table is loaded by path: at build time neither the package nor msgpack
can be imported.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
LAYOUT = HERE.parent / "uffdpoison" / "protocol" / "layout.py"
HEADER = HERE / "wire.h"


def _layout() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_uffdpoison_layout", LAYOUT)
    assert spec is not None and spec.loader is not None
    layout = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = layout  # dataclasses look the module up while the class is made
    try:
        spec.loader.exec_module(layout)
    finally:
        del sys.modules[spec.name]
    return layout


def generate() -> Path:
    text = _layout().c_header()
    if not HEADER.exists() or HEADER.read_text() != text:
        HEADER.write_text(text)
    return HEADER


if __name__ == "__main__":
    print(_layout().doc_tables() if sys.argv[1:] == ["--doc"] else generate())
