"""A live process whose anonymous memory carries real uffd poison markers: what the process
source reads through /proc/PID/mem and /proc/PID/pagemap. Shared by the source and daemon tests."""

from __future__ import annotations

import contextlib
import struct
import subprocess
import sys
from collections.abc import Iterable, Iterator

PS = 4096

# argv: npages, then comma-separated page lists: poisoned, zero-filled, never touched; and
# "keep" to keep the userfaultfd open (untouched pages then stay holes: a remote read is EIO).
# Raw ctypes, no uffdpoison import: the markers come from the kernel, not from the code tested.
_CHILD = """
import ctypes, mmap, os, struct, sys
PS = 4096
n = int(sys.argv[1])
poison, zero, untouched = ({int(x) for x in a.split(",") if x} for a in sys.argv[2:5])
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
m = mmap.mmap(-1, n * PS, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
for i in range(n):
    if i not in poison and i not in untouched:
        m[i * PS : (i + 1) * PS] = bytes(PS) if i in zero else struct.pack("<Q", i + 1) * (PS // 8)
fd = libc.syscall(323, os.O_CLOEXEC | os.O_NONBLOCK)  # userfaultfd
assert fd >= 0, ctypes.get_errno()
api = (ctypes.c_uint64 * 3)(0xAA, 0, 0)
assert libc.ioctl(fd, 0xC018AA3F, api) == 0, ctypes.get_errno()  # UFFDIO_API
reg = (ctypes.c_uint64 * 4)(addr, n * PS, 1, 0)  # MODE_MISSING
assert libc.ioctl(fd, 0xC020AA00, reg) == 0, ctypes.get_errno()  # UFFDIO_REGISTER
for i in sorted(poison):
    arg = (ctypes.c_uint64 * 4)(addr + i * PS, PS, 0, 0)
    assert libc.ioctl(fd, 0xC020AA08, arg) == 0, ctypes.get_errno()  # UFFDIO_POISON
if sys.argv[5:] != ["keep"]:
    os.close(fd)  # markers survive it; untouched pages then read as zeros
print(addr, flush=True)
for line in sys.stdin:  # "poison I": page I is poisoned now (keep only), "ok" once it is
    i = int(line.split()[1])
    assert libc.madvise(ctypes.c_void_p(addr + i * PS), PS, 4) == 0  # MADV_DONTNEED
    arg = (ctypes.c_uint64 * 4)(addr + i * PS, PS, 0, 0)
    assert libc.ioctl(fd, 0xC020AA08, arg) == 0, ctypes.get_errno()
    print("ok", flush=True)
"""


def poison_now(proc: subprocess.Popen[str], page: int) -> None:
    """Poison ``page`` of a live process started with ``keep`` (a page going bad while the
    guest runs)."""
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(f"poison {page}\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "ok"


def page_bytes(i: int) -> bytes:
    """What page ``i`` of a live process holds (unless poisoned, zero or untouched)."""
    return struct.pack("<Q", i + 1) * (PS // 8)


def _csv(pages: Iterable[int]) -> str:
    return ",".join(map(str, pages))


@contextlib.contextmanager
def live_process(
    npages: int,
    poison: Iterable[int] = (),
    zero: Iterable[int] = (),
    untouched: Iterable[int] = (),
    *,
    keep: bool = False,
) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """Yields (the process, the address of its memory); killed for real on the way out."""
    argv = [sys.executable, "-c", _CHILD, str(npages), _csv(poison), _csv(zero), _csv(untouched)]
    proc = subprocess.Popen(
        [*argv, *(["keep"] if keep else [])],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the live process failed to set up (exit {proc.wait()})")
        yield proc, int(line)
    finally:
        proc.kill()
        proc.wait()
