"""Run ``uffdpoison source`` as a child process, as a source host would (demo, benchmarks)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

from uffdpoison.owned import Owned
from uffdpoison.transport import format_address


def _drain(stream: IO[str]) -> None:
    for _ in stream:
        pass


class SourceStartError(RuntimeError):
    """The source process exited before it was listening."""


class SourceProcess(Owned):
    """A child ``uffdpoison source`` serving ``image``, listening once constructed
    (``address``). ``kill()`` ends it at once (SIGKILL, as a crash would); ``start()`` then
    serves again on the same address. ``prefix`` runs it under another command (``taskset -c
    1``, ``ip netns exec NS``). ``close()`` terminates it (then kills it)."""

    def __init__(
        self,
        image: str | Path,
        *,
        poison_list: str | Path | None = None,
        max_bandwidth: str | None = None,
        listen: str = "127.0.0.1:0",
        prefix: Sequence[str] = (),
        options: Sequence[str] = (),
    ) -> None:
        """``options``: more of ``uffdpoison source``'s, as given."""
        # -P: never let the working directory shadow the installed package (a source checkout
        # without its compiled extension, say).
        self._cmd = [*prefix, sys.executable, "-P", "-m", "uffdpoison", "source", "--image",
                     str(image)]  # fmt: skip
        if poison_list is not None:
            self._cmd += ["--poison-list", str(poison_list)]
        if max_bandwidth:
            self._cmd += ["--max-bandwidth", max_bandwidth]
        self._cmd += options
        self.proc: subprocess.Popen[str] | None = None
        self.address = listen
        self.start()

    def start(self) -> str:
        """Start it (again) on ``address``; returns the address it listens on."""
        proc = subprocess.Popen([*self._cmd, "--listen", self.address], stdout=subprocess.PIPE,
                                text=True)  # fmt: skip
        self.proc = proc
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise SourceStartError(f"source process exited ({proc.wait()}) before listening")
        status = json.loads(line)
        self.address = format_address(status["host"], status["port"])
        self.metrics: str | None = status.get("metrics")  # with --metrics: where it serves
        # The rest of the status stream is read and dropped: a pipe nobody reads fills after
        # some hundred sessions and the source would block writing to it.
        threading.Thread(
            target=_drain, args=(proc.stdout,), name="uffdpoison-source-stdout", daemon=True
        ).start()
        return self.address

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def source_process(
    image: str | Path,
    *,
    poison_list: str | Path | None = None,
    max_bandwidth: str | None = None,
    listen: str = "127.0.0.1:0",
    prefix: Sequence[str] = (),
) -> Iterator[str]:
    """Serve ``image`` from a child ``uffdpoison source``; yields its ``HOST:PORT``."""
    with SourceProcess(
        image, poison_list=poison_list, max_bandwidth=max_bandwidth, listen=listen, prefix=prefix
    ) as sp:
        yield sp.address
