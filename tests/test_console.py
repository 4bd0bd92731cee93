"""The progress line: redrawn in place on a terminal (a real pseudo-terminal here), nothing at
all when stderr is a pipe or a file."""

from __future__ import annotations

import contextlib
import os
import select
import sys
from collections.abc import Iterator

import pytest

from uffdpoison.console import Progress


@contextlib.contextmanager
def terminal() -> Iterator[int]:
    """stderr on a pseudo-terminal; yields the controller's fd, to read what was written. Not a
    fixture: pytest's capture sets sys.stderr again after the fixtures are set up."""
    controller, terminal_fd = os.openpty()
    stderr = open(terminal_fd, "w", encoding="utf-8")  # noqa: SIM115 (closed below)
    saved, sys.stderr = sys.stderr, stderr
    try:
        yield controller
    finally:
        sys.stderr = saved
        stderr.close()
        os.close(controller)


def written(controller: int) -> str:
    """What reached the terminal: everything until it stays quiet for 0.3 s (the pty hands
    data over asynchronously)."""
    out = b""
    while select.select([controller], [], [], 0.3)[0]:
        out += os.read(controller, 4096)
    return out.decode()


def test_on_a_terminal_the_line_is_redrawn_and_throttled() -> None:
    with terminal() as tty:
        progress = Progress(every=3600)
        progress.show("touched 1/4")
        progress.show("touched 2/4")  # within `every`: not drawn
        progress.show("guest: 4 pages", force=True)
        progress.done()
        assert written(tty) == "\r\x1b[Ktouched 1/4\r\x1b[Kguest: 4 pages\r\x1b[K"


def test_disabled_on_a_terminal_writes_nothing() -> None:
    with terminal() as tty:
        progress = Progress(enabled=False)
        progress.show("touched 1/4", force=True)
        progress.done()
        assert written(tty) == ""


def test_not_a_terminal_writes_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    assert not sys.stderr.isatty()
    progress = Progress(every=0)
    for k in range(3):
        progress.show(f"touched {k}/3")
    progress.show("guest: 3 pages", force=True)
    progress.done()
    assert capsys.readouterr().err == ""
