"""Out-of-line CFFI build of ``uffdpoison._native``, the product's C, from csrc/.

Each component is two files side by side, in the manner of pyca/cryptography's ``_cffi_src``:
``NAME.h`` (its declarations) and ``NAME.c``. What Python may see is declared once, in the
header, between its ``--- cffi`` markers: that part of each header, in the order of
``COMPONENTS`` (dependencies first), is the cdef, with two translations cffi needs (a value
that is not an integer literal becomes ``...``, computed by the compiler, and so does an
array length that names a constant). ``wire.h`` is generated from
``uffdpoison/protocol/layout.py`` first (``gen_wire.py``). The benchmark/test harness
(``csrc/harness/``) is another extension, built by ``csrc/harness/build_harness.py``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
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
    "tls",  # TLS through OpenSSL's libssl (built without it when its headers are missing)
    "chan",  # one channel's socket and buffers; the control plane's instructions
    "notes",  # what a data plane tells its control plane
    "guest",  # the source's guest memory reader
    "hist",  # latency histograms of the data planes (metrics), read on a scrape
    "source_plane",  # the source's data plane
    "dest_plane",  # the destination's data plane
]
COMPILE_ARGS = ["-O2", "-g", "-Wall", "-Wextra", "-Wno-unused-parameter", "-D_GNU_SOURCE"]


_SEEN = re.compile(r"/\* --- cffi: .*?\*/\n(.*?)/\* --- end cffi --- \*/", re.DOTALL)
_NOT_LITERAL = re.compile(r"^(#define\s+\w+)\s+(?!-?\d+\s*(?:/\*.*)?$)\S.*$", re.MULTILINE)
_NAMED_LENGTH = re.compile(r"\[[A-Z_][A-Z0-9_]*\]")
# Types from system headers that the declarations use as opaque members.
_PRELUDE = "typedef struct { ...; } pthread_mutex_t;\n"


def cdef_of(header: Path) -> str:
    """The part of ``header`` Python sees, in cffi's cdef dialect."""
    text = "\n".join(_SEEN.findall(header.read_text()))
    return _NAMED_LENGTH.sub("[...]", _NOT_LITERAL.sub(r"\1 ...", text))


def openssl() -> list[str]:
    """The libraries to link when OpenSSL's headers and libraries are here (pkg-config, else
    the usual include directory), else []: TLS is then left out of the build, and asking for it
    says so. UFFDPOISON_TLS=0 leaves it out regardless."""
    if os.environ.get("UFFDPOISON_TLS") == "0":
        return []
    if shutil.which("pkg-config"):
        pc = subprocess.run(["pkg-config", "--libs", "openssl"], capture_output=True, text=True)
        if pc.returncode == 0:
            return [flag[2:] for flag in pc.stdout.split() if flag.startswith("-l")]
    if any(Path(d, "openssl", "ssl.h").exists() for d in ("/usr/include", "/usr/local/include")):
        return ["ssl", "crypto"]
    return []


def extension(
    module: str,
    folder: Path,
    components: Sequence[str],
    *,
    extra: Sequence[Path] = (),
    libraries: Sequence[str] = (),
) -> FFI:
    """An FFI for ``module`` from ``components`` of ``folder`` (plus C-only sources
    ``extra``); headers are searched in ``folder`` and in csrc/. With ``libraries`` (OpenSSL's)
    UP_HAVE_TLS is defined."""
    ffi = FFI()
    ffi.cdef(_PRELUDE + "\n".join(cdef_of(folder / f"{n}.h") for n in components))
    sources = [folder / f"{n}.c" for n in components] + list(extra)
    ffi.set_source(
        module,
        "\n".join(f'#include "{n}.h"' for n in components),
        sources=[str(p.relative_to(ROOT)) for p in sources],
        include_dirs=sorted({str(folder), str(HERE)}),
        extra_compile_args=[*COMPILE_ARGS, "-pthread", *(["-DUP_HAVE_TLS"] if libraries else [])],
        extra_link_args=["-pthread"],
        libraries=list(libraries),
    )
    return ffi


def _generate_wire_h() -> None:
    spec = importlib.util.spec_from_file_location("_uffdpoison_gen_wire", HERE / "gen_wire.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    gen.generate()


_generate_wire_h()
ffibuilder = extension("uffdpoison._native", HERE, COMPONENTS, libraries=openssl())

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
