"""matplotlib for the commands' ``--plot``: an optional extra (``pip install 'uffdpoison[plot]'``),
asked for by name when it is missing, and drawn off-screen (no display needed)."""

from __future__ import annotations

import sys
from typing import Any


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def missing_matplotlib(command: str) -> bool:
    """True, after one line on stderr saying how to install it, when matplotlib is missing."""
    if have_matplotlib():
        return False
    print(
        f"{command}: --plot needs matplotlib, which is not installed "
        "(pip install 'uffdpoison[plot]' or pip install matplotlib)",
        file=sys.stderr,
    )
    return True


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (files only, no window)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
