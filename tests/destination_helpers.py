"""Shared pieces of the destination tests: a synthetic guest, an in-process source, and a toy VMM
process driven over pipes (examples/toy_vmm.py)."""

from __future__ import annotations

import contextlib
import json
import random
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from live_process import PS, live_process, page_bytes

from uffdpoison.kernel.digest import page_digests
from uffdpoison.source.backends import MemoryBackend
from uffdpoison.source.server import serve

ROOT = Path(__file__).resolve().parent.parent
TOY_VMM = ROOT / "examples" / "toy_vmm.py"


@dataclass
class Guest:
    image: bytearray
    page_size: int
    poisoned: list[int] = field(default_factory=list)  # page indices
    zero: list[int] = field(default_factory=list)

    @property
    def npages(self) -> int:
        return len(self.image) // self.page_size

    def digests(self) -> list[int]:
        return list(page_digests(self.image, self.page_size))

    def backend(self, *, known: bool = True) -> MemoryBackend:
        offs = [i * self.page_size for i in self.poisoned] if known else []
        return MemoryBackend(self.image, offs, page_size=4096)


def make_guest(
    npages: int,
    page_size: int = 4096,
    *,
    poisoned: list[int] | None = None,
    zero: list[int] | None = None,
    seed: int = 7,
) -> Guest:
    rng = random.Random(seed)
    image = bytearray(rng.randbytes(npages * page_size))
    zero = zero if zero is not None else [i for i in range(npages) if i % 5 == 3]
    poisoned = poisoned if poisoned is not None else [i for i in range(npages) if i % 11 == 4]
    for i in zero:
        image[i * page_size : (i + 1) * page_size] = bytes(page_size)
    return Guest(image, page_size, sorted(poisoned), sorted(zero))


@contextlib.contextmanager
def poisoned_process(npages: int, poison: list[int]) -> Iterator[tuple[int, int, Guest]]:
    """A live process (tests/live_process.py) with poison markers on ``poison``. Yields (pid,
    address, the matching Guest)."""
    with live_process(npages, poison) as (proc, addr):
        image = bytearray()
        for i in range(npages):
            image += bytes(PS) if i in poison else page_bytes(i)
        yield proc.pid, addr, Guest(image, PS, sorted(poison), [])


async def start_source(nursery: trio.Nursery, backend: Any, **kwargs: Any) -> str:
    host, port = await nursery.start(
        lambda task_status: serve(backend, "127.0.0.1:0", task_status=task_status, **kwargs)
    )
    return f"{host}:{port}"


class ToyVMM:
    """examples/toy_vmm.py as a child process; one JSON answer per command."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self._buf = bytearray()
        self.handed_off: dict[str, Any] = {}

    @classmethod
    async def start(
        cls,
        handoff: str,
        size: int,
        *,
        memory: str = "anon",
        offset: int = 0,
        timeout: float = 20.0,
        minor: str | None = None,
        memory_file: str | None = None,
    ) -> ToyVMM:
        """``minor``: an image file the VMM fills its memory file's page cache from (MINOR
        mode: the memory file is handed over too); ``memory_file``: map that file instead (a
        daemon's precopy)."""
        proc = await trio.lowlevel.open_process(
            [
                sys.executable,
                str(TOY_VMM),
                "--handoff",
                handoff,
                "--size",
                str(size),
                "--memory",
                memory,
                "--offset",
                str(offset),
                "--timeout",
                str(timeout),
                *(["--minor", minor] if minor else []),
                *(["--memory-file", memory_file] if memory_file else []),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        vmm = cls(proc)
        vmm.handed_off = await vmm._line()
        return vmm

    async def _line(self, timeout: float = 60.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        with trio.fail_after(timeout):
            while b"\n" not in self._buf:
                chunk = await self.proc.stdout.receive_some(1 << 20)
                if not chunk:
                    raise EOFError(f"toy VMM exited ({await self.proc.wait()})")
                self._buf += chunk
        line, _, rest = bytes(self._buf).partition(b"\n")
        self._buf = bytearray(rest)
        return json.loads(line)

    async def command(self, text: str, timeout: float = 60.0) -> dict[str, Any]:
        assert self.proc.stdin is not None
        await self.proc.stdin.send_all(text.encode() + b"\n")
        return await self._line(timeout)

    async def touch(self, pages: list[int] | str = "all") -> dict[str, Any]:
        arg = pages if isinstance(pages, str) else ",".join(map(str, pages))
        return await self.command(f"touch {arg}")

    async def close(self) -> int:
        if self.proc.returncode is None:
            assert self.proc.stdin is not None
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self.proc.stdin.send_all(b"exit\n")
            with trio.move_on_after(10):
                return await self.proc.wait()
            self.proc.kill()
        return await self.proc.wait()
