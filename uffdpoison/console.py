"""What the commands print: status records on stdout (one JSON object a line, for a
supervisor to read) and a progress line on stderr (redrawn in place, on a terminal only: a log
or a pipe gets none)."""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Any


def emit(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


class Progress:
    def __init__(self, enabled: bool = True, every: float = 0.2) -> None:
        """One line on stderr, redrawn at most every ``every`` seconds (a line shown with
        ``force`` always is), when ``enabled`` and stderr is a terminal; otherwise nothing."""
        self.enabled = enabled and sys.stderr.isatty()
        self.every = every
        self._last = -math.inf  # the first line is always drawn

    def show(self, text: str, *, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self._last < self.every):
            return
        self._last = now
        sys.stderr.write(f"\r\x1b[K{text}")
        sys.stderr.flush()

    def done(self) -> None:
        """Clear the line, so what follows starts on its own."""
        if self.enabled:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
