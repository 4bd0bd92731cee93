"""Out-of-line CFFI build of ``uffdpoison._native`` from the C sources in csrc/.

Each component of the kernel boundary is three files side by side, in the manner of
pyca/cryptography's ``_cffi_src``:

* ``NAME.h``    C declarations (and guarded uapi definitions newer than the build host's headers),
* ``NAME.c``    the implementation,
* ``NAME.cdef`` what Python may see, in cffi's cdef dialect.

Components are picked up by globbing, so adding one needs no edit here. The glob is not
recursive: ``csrc/harness/`` is the benchmark/test harness, built separately as
``uffdpoison._harness`` by ``csrc/harness/build_ffi.py``.
"""

from __future__ import annotations

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent


def _components() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.cdef"))


def build() -> FFI:
    ffi = FFI()
    names = _components()
    ffi.cdef("\n".join((HERE / f"{n}.cdef").read_text() for n in names))
    ffi.set_source(
        "uffdpoison._native",
        "\n".join(f'#include "{n}.h"' for n in names),
        sources=[str(p.relative_to(HERE.parent)) for p in sorted(HERE.glob("*.c"))],
        include_dirs=[str(HERE)],
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
