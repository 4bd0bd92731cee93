"""What the commands print: status records on stdout (one JSON object a line, for a
supervisor to read) and a progress line on stderr (redrawn on a terminal, throttled in a log)."""

from __future__ import annotations

import json
import sys
import time
from typing import Any


def emit(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


class Progress:
    def __init__(self, enabled: bool = True, every: float | None = None) -> None:
        """``every``: at most one line in this many seconds (default 0.2 on a terminal, 2 in a
        log); a line shown with ``force`` always goes out."""
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.every = every if every is not None else 0.2 if self.tty else 2.0
        self._last = 0.0

    def show(self, text: str, *, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self._last < self.every):
            return
        self._last = now
        sys.stderr.write(f"\r\x1b[K{text}" if self.tty else text + "\n")
        sys.stderr.flush()

    def done(self) -> None:
        """End the line, so what follows starts on its own."""
        if self.enabled and self.tty:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
