"""Page digests, in C.

The digest is XXH64 with seed 0 (implemented in csrc/digest.c, no library); the wire
protocol uses it in MINOR mode to ask "is my page-cache copy current?".
"""

from __future__ import annotations

import array

from uffdpoison.kernel._ffi import ffi, lib

Buffer = bytes | bytearray | memoryview


def digest(data: Buffer) -> int:
    """XXH64(data, seed=0)."""
    return lib.up_xxh64(ffi.from_buffer(data), len(data), 0)


def _pages(data: Buffer, page_size: int) -> int:
    n = memoryview(data).nbytes
    if page_size <= 0 or n % page_size:
        raise ValueError(f"buffer of {n} bytes is not a whole number of {page_size}-byte pages")
    return n // page_size


def page_digests(data: Buffer, page_size: int) -> array.array:
    """XXH64 of each page, as array('Q')."""
    n = _pages(data, page_size)
    out = array.array("Q", bytes(8 * n))
    if n:
        lib.up_page_digests(
            ffi.from_buffer(data), n * page_size, page_size, ffi.from_buffer("uint64_t[]", out)
        )
    return out
