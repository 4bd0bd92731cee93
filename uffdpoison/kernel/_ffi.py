"""The one import of the compiled extension; everything else imports ``ffi``/``lib`` from here."""

from uffdpoison._native import ffi, lib

__all__ = ["ffi", "lib"]
