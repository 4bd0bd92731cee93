"""Out-of-line CFFI build of ``uffdpoison._native``, the product's C, from csrc/.

Each component is files side by side, in the manner of pyca/cryptography's ``_cffi_src``:
``NAME.h`` (C declarations), ``NAME.c`` (the implementation) and, if Python may call it,
``NAME.cdef`` (what Python sees, in cffi's cdef dialect). ``COMPONENTS`` lists them in
dependency order: cdefs are concatenated and headers included in that order. ``wire.h`` is
generated from ``uffdpoison/protocol/layout.py`` first (``gen_wire.py``). The benchmark/test
harness (``csrc/harness/``) is another extension, built by ``csrc/harness/build_ffi.py``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

COMPONENTS = [
    "uffd",  # the userfaultfd: open, API, register, wake, events (uffd_uapi.h: newer uapi)
    "uffd_place",  # the placement ioctls: only the ledger includes uffd_place.h
    "digest",  # XXH64 of pages, the zero-page test
    "memory",  # anonymous, shmem and hugetlb mappings
    "ledger",  # page states and every placement: the never-un-poison invariant
    "frame",  # frames on the wire: fixed layouts (wire.h) and the one C check
    "chan",  # one channel's socket and buffers (C only)
    "notes",  # what a data plane tells its control plane
    "guest",  # the source's guest memory reader
    "source_plane",  # the source's data plane
    "dest_plane",  # the destination's data plane
]
COMPILE_ARGS = ["-O2", "-g", "-Wall", "-Wextra", "-Wno-unused-parameter", "-D_GNU_SOURCE"]


def extension(
    module: str, folder: Path, components: Sequence[str], *, extra: Sequence[Path] = ()
) -> FFI:
    """An FFI for ``module`` from ``components`` of ``folder`` (plus C-only sources
    ``extra``); headers are searched in ``folder`` and in csrc/."""
    ffi = FFI()
    cdefs = [folder / f"{n}.cdef" for n in components]
    ffi.cdef("\n".join(p.read_text() for p in cdefs if p.exists()))
    sources = [folder / f"{n}.c" for n in components] + list(extra)
    ffi.set_source(
        module,
        "\n".join(f'#include "{n}.h"' for n in components),
        sources=[str(p.relative_to(ROOT)) for p in sources],
        include_dirs=sorted({str(folder), str(HERE)}),
        extra_compile_args=[*COMPILE_ARGS, "-pthread"],
        extra_link_args=["-pthread"],
    )
    return ffi


def _generate_wire_h() -> None:
    spec = importlib.util.spec_from_file_location("_uffdpoison_gen_wire", HERE / "gen_wire.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    gen.generate()


_generate_wire_h()
ffibuilder = extension("uffdpoison._native", HERE, COMPONENTS)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
