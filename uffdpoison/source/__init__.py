"""The source side: serves guest memory (image, live process, buffer) to destinations."""

from uffdpoison.source.backends import (
    Backend,
    ImageBackend,
    MemoryBackend,
    ProcessBackend,
    Run,
    RunKind,
    SourceError,
    SourceGone,
    parse_poison_list,
)
from uffdpoison.source.server import SourceServer, serve

__all__ = [
    "Backend",
    "ImageBackend",
    "MemoryBackend",
    "ProcessBackend",
    "Run",
    "RunKind",
    "SourceError",
    "SourceGone",
    "SourceServer",
    "parse_poison_list",
    "serve",
]
