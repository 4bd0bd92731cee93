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


def _drain(stream: IO[str]) -> None:
    for _ in stream:
        pass


class SourceStartError(RuntimeError):
    """The source process exited before it was listening."""


@contextlib.contextmanager
def source_process(
    image: str | Path,
    *,
    poison_list: str | Path | None = None,
    max_bandwidth: str | None = None,
    listen: str = "127.0.0.1:0",
    prefix: Sequence[str] = (),
) -> Iterator[str]:
    """Serve ``image`` from a child ``uffdpoison source``; yields its ``HOST:PORT``.

    ``prefix`` runs it under another command (``taskset -c 1``, ``ip netns exec NS``). The child
    is terminated (then killed) on exit.
    """
    # -P: never let the working directory shadow the installed package (a source checkout
    # without its compiled extension, say).
    cmd = [
        *prefix,
        sys.executable,
        "-P",
        "-m",
        "uffdpoison",
        "source",
        "--listen",
        listen,
        "--image",
        str(image),
    ]
    if poison_list is not None:
        cmd += ["--poison-list", str(poison_list)]
    if max_bandwidth:
        cmd += ["--max-bandwidth", max_bandwidth]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise SourceStartError(f"source process exited ({proc.wait()}) before listening")
        status = json.loads(line)
        host = status["host"]
        # The rest of the status stream is read and dropped: a pipe nobody reads fills after
        # some hundred sessions and the source would block writing to it.
        threading.Thread(
            target=_drain, args=(proc.stdout,), name="uffdpoison-source-stdout", daemon=True
        ).start()
        yield f"[{host}]:{status['port']}" if ":" in host else f"{host}:{status['port']}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
