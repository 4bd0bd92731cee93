"""Out-of-line CFFI build of ``uffdpoison._harness``: the benchmark/test harness, not product.

Built like the product (``csrc/build_ffi.py``'s ``extension``: each header's cffi part is the
cdef), from these components in this order:

1. ``toucher``  the C "vCPU" stand-in: threads that touch guest memory and survive SIGBUS;
2. ``cref``     the C reference ("the floor"): local/remote fault handlers, a minimal TCP page
                source, a ping-pong client;
3. ``bulkpull`` the C reference's background stream; it uses ``cref``'s wire format and
                ``up_cref_read_all``, so it comes after ``cref``.

Two product sources are compiled in by path, not copied and not exposed to Python here:
``csrc/uffd.c`` and ``csrc/uffd_place.c`` (the ioctl wrappers) and ``csrc/digest.c`` (``up_xxh64``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

HERE = Path(__file__).resolve().parent
CSRC = HERE.parent

COMPONENTS = ["toucher", "cref", "bulkpull"]
PRODUCT_SOURCES = [CSRC / "uffd.c", CSRC / "uffd_place.c", CSRC / "digest.c"]

_spec = importlib.util.spec_from_file_location("_uffdpoison_build_ffi", CSRC / "build_ffi.py")
assert _spec is not None and _spec.loader is not None
_product = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_product)

ffibuilder = _product.extension("uffdpoison._harness", HERE, COMPONENTS, extra=PRODUCT_SOURCES)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
