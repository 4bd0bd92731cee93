"""Typed binding of csrc/tls.c: TLS through OpenSSL, one C object per connection for the
connection's whole life (trio's handshakes, then the data plane's frames)."""

from __future__ import annotations

import errno
import os
from typing import Any

from uffdpoison.kernel._ffi import ffi, lib
from uffdpoison.owned import Owned

WANT_READ = lib.UP_TLS_WANT_READ
WANT_WRITE = lib.UP_TLS_WANT_WRITE


class TlsError(OSError):
    """TLS cannot be set up or its handshake failed; the message says why."""


def available() -> bool:
    """Whether this build has TLS (OpenSSL's headers were there when it was built)."""
    return bool(lib.up_tls_available())


def _path(p: str | os.PathLike[str] | None) -> Any:
    return os.fsencode(p) if p is not None else ffi.NULL


class TlsContext(Owned):
    """Certificates and keys for one side. A server presents ``cert`` (``key``: its key, or in
    the same file) and, given a ``ca``, requires client certificates it signed; a client checks
    the server against ``ca`` and may present ``cert``."""

    def __init__(
        self,
        *,
        server: bool,
        cert: str | os.PathLike[str] | None = None,
        key: str | os.PathLike[str] | None = None,
        ca: str | os.PathLike[str] | None = None,
    ) -> None:
        why = ffi.new("char[]", 160)
        ptr = lib.up_tls_ctx_new(int(server), _path(cert), _path(key), _path(ca), why)
        if ptr == ffi.NULL:
            raise TlsError(errno.EPROTO, ffi.string(why).decode())
        self.raw: Any = ptr
        self.server = server
        self.requires_client_cert = server and ca is not None

    def close(self) -> None:
        if self.raw is not None:
            lib.up_tls_ctx_free(self.raw)
            self.raw = None


class Tls(Owned):
    """TLS on one connected socket (the socket stays the caller's: close it after this)."""

    def __init__(self, ctx: TlsContext, fd: int, host: str = "") -> None:
        why = ffi.new("char[]", 160)
        ptr = lib.up_tls_new(ctx.raw, fd, host.encode(), why)
        if ptr == ffi.NULL:
            raise TlsError(errno.EPROTO, ffi.string(why).decode())
        self.raw: Any = ptr
        self._why = why

    def handshake(self) -> int:
        """One step: 0 done, WANT_READ or WANT_WRITE (wait on the socket, call again)."""
        r = int(lib.up_tls_handshake(self.raw, self._why))
        if r < 0:
            raise TlsError(errno.EPROTO, ffi.string(self._why).decode())
        return r

    def read(self, n: int) -> bytes | None:
        """Up to n bytes; b"" at EOF; None when it would block (``want`` says on what)."""
        buf = ffi.new("uint8_t[]", n)
        r = int(lib.up_tls_read(self.raw, buf, n))
        if r == -errno.EAGAIN:
            return None
        if r < 0:
            raise self._failed(r)
        return bytes(ffi.buffer(buf, r))

    def write(self, data: bytes | memoryview) -> int | None:
        """Bytes written (at least one), or None when it would block."""
        r = int(lib.up_tls_write(self.raw, ffi.from_buffer(data), len(data)))
        if r == -errno.EAGAIN:
            return None
        if r < 0:
            raise self._failed(r)
        return r

    def _failed(self, rc: int) -> OSError:
        if rc == -errno.EPROTO:
            return TlsError(errno.EPROTO, ffi.string(lib.up_tls_why(self.raw)).decode())
        return OSError(-rc, f"TLS: {os.strerror(-rc)}")

    @property
    def want(self) -> int:
        return int(lib.up_tls_want(self.raw))

    def close(self) -> None:
        """Send close_notify if the socket takes it, and free (before the socket closes)."""
        if self.raw is not None:
            lib.up_tls_free(self.raw)
            self.raw = None
