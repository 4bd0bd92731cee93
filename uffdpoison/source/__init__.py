"""The source side: serves guest memory (image, live process, buffer) to destinations."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Backend": "backends",
    "ImageBackend": "backends",
    "MemoryBackend": "backends",
    "ProcessBackend": "backends",
    "Run": "backends",
    "RunKind": "backends",
    "SourceError": "backends",
    "SourceGone": "backends",
    "parse_poison_list": "backends",
    "SourceServer": "server",
    "serve": "server",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    # Lazy, so `python -m uffdpoison.source.server` does not import the module twice.
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'uffdpoison.source' has no attribute {name!r}")
    return getattr(importlib.import_module(f"uffdpoison.source.{module}"), name)
