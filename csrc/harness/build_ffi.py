"""Out-of-line CFFI build of ``uffdpoison._harness``: the benchmark/test harness, not product.

Same layout as the product's ``csrc/build_ffi.py`` (``NAME.h`` / ``NAME.c`` / ``NAME.cdef`` side
by side), but the components are an explicit list, not a glob, in this order:

1. ``toucher``  the C "vCPU" stand-in: threads that touch guest memory and survive SIGBUS;
2. ``cref``     the C reference ("the floor"): local/remote fault handlers, a minimal TCP page
                source, a ping-pong client;
3. ``bulkpull`` the C reference's background stream; it uses ``cref``'s wire format and
                ``up_cref_read_all``, so it comes after ``cref``.

Their cdefs are concatenated and their headers included in that order. The harness also needs
two product sources, compiled in here by path rather than copied: ``csrc/uffd.c`` (the ioctl
wrappers, ``uffd.h``, ``uffd_uapi.h``) and ``csrc/digest.c`` (``up_xxh64``, ``digest.h``). Their
declarations are not exposed to Python from ``_harness``; ``uffdpoison._native`` exposes them.
"""

from __future__ import annotations

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent  # csrc/harness
CSRC = HERE.parent  # csrc
ROOT = CSRC.parent  # the project root (setup.py's directory)

COMPONENTS = ["toucher", "cref", "bulkpull"]
PRODUCT_SOURCES = ["uffd.c", "digest.c"]  # in csrc/, linked into the harness as-is


def build() -> FFI:
    ffi = FFI()
    ffi.cdef("\n".join((HERE / f"{n}.cdef").read_text() for n in COMPONENTS))
    sources = [HERE / f"{n}.c" for n in COMPONENTS] + [CSRC / s for s in PRODUCT_SOURCES]
    ffi.set_source(
        "uffdpoison._harness",
        "\n".join(f'#include "{n}.h"' for n in COMPONENTS),
        sources=[str(p.relative_to(ROOT)) for p in sources],
        include_dirs=[str(HERE), str(CSRC)],
        extra_compile_args=[
            "-O2",
            "-g",
            "-Wall",
            "-Wextra",
            "-Wno-unused-parameter",
            "-D_GNU_SOURCE",
            "-pthread",
        ],
        extra_link_args=["-pthread"],
    )
    return ffi


ffibuilder = build()

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
