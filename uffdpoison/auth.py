"""Mutual authentication with a shared secret: an HMAC-SHA256 challenge-response inside the
handshake, before any page or page list crosses (docs/SECURITY.md).

    destination  Hello(auth = Nd)            Nd: 32 fresh random bytes
    source       Challenge(Ns, Ms)           Ms = HMAC(K, "uffdpoison/3 source" | T)
    destination  Proof(Md)                   Md = HMAC(K, "uffdpoison/3 destination" | T)
    source       Welcome(session, ...)       URGENT: session = HMAC(K, "uffdpoison/3 session" | T)

T, the transcript, is the Hello's fields and both nonces (canonical msgpack). Each side checks
the other's MAC in constant time before it sends anything of the guest; the secret never
crosses the wire; fresh nonces from both sides make every transcript new, so a recorded
exchange cannot be replayed; and the session token is bound to the transcript, so a Welcome
from another handshake is refused. Without TLS this authenticates the peers, not the frames
that follow (use ``--tls`` on links an attacker can write to).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import secrets

import msgpack

from uffdpoison.protocol import AUTH_NONCE, Hello

MIN_SECRET = 16  # bytes: a shorter secret could be guessed
MAX_SECRET = 4096
_DOMAIN = b"uffdpoison/3 "


class TokenError(ValueError):
    """A token file that cannot be used (missing, unreadable, too short); the message says."""


class Token:
    """A shared secret (the bytes of a token file, surrounding whitespace removed)."""

    __slots__ = ("_key",)

    def __init__(self, secret: bytes) -> None:
        if not MIN_SECRET <= len(secret) <= MAX_SECRET:
            raise TokenError(f"a token must be {MIN_SECRET}..{MAX_SECRET} bytes, not {len(secret)}")
        self._key = secret

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Token:
        try:
            with open(path, "rb") as f:
                secret = f.read(MAX_SECRET + 1).strip()
        except OSError as e:
            raise TokenError(f"cannot read token file {os.fspath(path)!r}: {e.strerror}") from None
        try:
            return cls(secret)
        except TokenError as e:
            raise TokenError(f"token file {os.fspath(path)!r}: {e}") from None

    def __repr__(self) -> str:
        return "<Token>"  # never the secret

    def mac(self, role: str, transcript: bytes) -> bytes:
        return hmac.new(
            self._key, _DOMAIN + role.encode() + b" " + transcript, hashlib.sha256
        ).digest()

    def verify(self, role: str, transcript: bytes, mac: bytes) -> bool:
        return hmac.compare_digest(self.mac(role, transcript), mac)

    def session(self, transcript: bytes) -> bytes:
        """The URGENT Welcome's session token for this handshake."""
        return self.mac("session", transcript)[:16]


def token_arg(path: str) -> Token:
    """``--token-file PATH`` for argparse: the token, or one line saying why not."""
    try:
        return Token.from_file(path)
    except TokenError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def nonce() -> bytes:
    return secrets.token_bytes(AUTH_NONCE)


def transcript(hello: Hello, source_nonce: bytes) -> bytes:
    fields = [hello.version, int(hello.channel), hello.session, hello.page_size,
              hello.want_poison_list, hello.resume, hello.auth, source_nonce,
              *([hello.epoch] if hello.epoch is not None else [])]  # fmt: skip
    return msgpack.packb(fields, use_bin_type=True)
