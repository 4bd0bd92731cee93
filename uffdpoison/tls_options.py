"""``--tls`` and its files, for ``uffdpoison source`` and ``uffdpoison dest`` alike."""

from __future__ import annotations

import argparse

from uffdpoison.kernel.tls import TlsContext, TlsError


def add_arguments(p: argparse.ArgumentParser, *, server: bool) -> None:
    g = p.add_argument_group("TLS (every byte encrypted; OpenSSL, TLS 1.3)")
    g.add_argument("--tls", action="store_true", help="encrypt both connections of a session")
    g.add_argument(
        "--tls-cert",
        metavar="PEM",
        help="this side's certificate chain"
        + (" (required)" if server else " (a client certificate, if the source asks for one)"),
    )
    g.add_argument("--tls-key", metavar="PEM", help="its private key (default: in --tls-cert)")
    g.add_argument(
        "--tls-ca",
        metavar="PEM",
        help="accept only destinations with a certificate this CA signed"
        if server
        else "the CA that signed the source's certificate (required)",
    )


def context(args: argparse.Namespace, *, server: bool) -> TlsContext | None:
    """The TLS context the options ask for, or None without --tls. Raises ``ValueError`` with
    one line naming a bad option or file (the command's exit status 2)."""
    given = [o for o in ("tls_cert", "tls_key", "tls_ca") if getattr(args, o)]
    if not args.tls:
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} needs --tls")
        return None
    try:
        return TlsContext(server=server, cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca)
    except TlsError as e:
        raise ValueError(f"--tls: {e.strerror}") from None
