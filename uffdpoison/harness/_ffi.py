"""The one import of the harness extension; the harness modules import ``ffi``/``lib`` from here."""

from uffdpoison._harness import ffi, lib

__all__ = ["ffi", "lib"]
