"""TLS on both connections of a session (OpenSSL from C: the data plane reads and writes
through the same TLS object the handshake made). A relay between the two records the stream:
with TLS no 64-byte window of any page crosses in the clear; without it, they all do."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trustme
from destination_helpers import Guest, make_guest, start_source

from uffdpoison.destination.embed import serve_memory
from uffdpoison.destination.link import SourceUnavailable
from uffdpoison.destination.regions import Region
from uffdpoison.kernel import memory, tls
from uffdpoison.kernel.tls import TlsContext, TlsError

PS = 4096
WINDOW = 64

pytestmark = pytest.mark.skipif(not tls.available(), reason="built without OpenSSL headers")


class Certs:
    def __init__(self, tmp: Path) -> None:
        self.ca = trustme.CA()
        self.dir = tmp
        self.ca_pem = self._write("ca.pem", self.ca.cert_pem.bytes())
        server = self.ca.issue_cert("127.0.0.1", "localhost")
        self.server = self._pair("server", server)
        self.client = self._pair("client", self.ca.issue_cert("destination.example"))
        self.other_ca = self._write("other-ca.pem", trustme.CA().cert_pem.bytes())

    def _write(self, name: str, data: bytes) -> Path:
        (self.dir / name).write_bytes(data)
        return self.dir / name

    def _pair(self, name: str, cert: trustme.LeafCert) -> tuple[Path, Path]:
        chain = b"".join(blob.bytes() for blob in cert.cert_chain_pems)
        return (self._write(f"{name}.pem", chain),
                self._write(f"{name}.key", cert.private_key_pem.bytes()))  # fmt: skip


@pytest.fixture
def certs(tmp_path: Path) -> Iterator[Certs]:
    yield Certs(tmp_path)


async def _relay(nursery: trio.Nursery, target: str, record: bytearray) -> str:
    """A TCP relay to ``target``; what flows from it back to the client is appended to
    ``record``."""
    host, port = target.rsplit(":", 1)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")

    async def pump(src: trio.SocketStream, dst: trio.SocketStream, keep: bool) -> None:
        try:
            while data := await src.receive_some(1 << 16):
                if keep:
                    record.extend(data)
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await dst.aclose()

    async def handle(client: trio.SocketStream) -> None:
        server = await trio.open_tcp_stream(host, int(port))
        async with trio.open_nursery() as n:
            n.start_soon(pump, client, server, False)
            n.start_soon(pump, server, client, True)

    nursery.start_soon(trio.serve_listeners, handle, listeners)
    return f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"


def _windows_seen(guest: Guest, record: bytes) -> int:
    """How many of the guest's aligned 64-byte windows (of data pages) appear in ``record``."""
    want = {bytes(guest.image[k : k + WINDOW]) for k in range(0, len(guest.image), WINDOW)}
    want.discard(bytes(WINDOW))  # zero pages cross as ZERO, never as bytes
    seen = {bytes(record[i : i + WINDOW]) for i in range(len(record) - WINDOW + 1)}
    return len(want & seen)


async def _migrate(nursery: trio.Nursery, guest: Guest, certs: Certs, encrypted: bool) -> bytes:
    server_ctx = TlsContext(server=True, cert=certs.server[0], key=certs.server[1])
    source = await start_source(nursery, guest.backend(), tls=server_ctx if encrypted else None)
    record = bytearray()
    relay = await _relay(nursery, source, record)
    client = TlsContext(server=False, ca=certs.ca_pem) if encrypted else None
    with memory.anon(len(guest.image)) as m:
        region = Region(m.addr, len(guest.image), 0)
        async with serve_memory([region], relay, tls=client) as server:
            await server.ensure_present(m.addr, 8 * PS)  # demand, on URGENT
            await server.wait_complete()  # and the push, on BULK
            assert m.read(0, 8 * PS) == bytes(guest.image[: 8 * PS])
    return bytes(record)


async def test_no_page_crosses_in_the_clear(nursery: trio.Nursery, certs: Certs) -> None:
    guest = make_guest(64, poisoned=[40], zero=[3])
    clear = await _migrate(nursery, guest, certs, encrypted=False)
    assert _windows_seen(guest, clear) > 60 * (PS // WINDOW)  # the check sees plain pages
    encrypted = await _migrate(nursery, guest, certs, encrypted=True)
    assert len(encrypted) > (guest.npages - 2) * PS  # every data page crossed...
    assert _windows_seen(guest, encrypted) == 0  # ...and none of it in the clear


async def test_certificates_are_checked(nursery: trio.Nursery, certs: Certs) -> None:
    guest = make_guest(16, poisoned=[])
    server = TlsContext(server=True, cert=certs.server[0], key=certs.server[1], ca=certs.ca_pem)
    source = await start_source(nursery, guest.backend(), tls=server)
    cases = [
        (TlsContext(server=False, ca=certs.other_ca), "certificate check failed"),
        (TlsContext(server=False, ca=certs.ca_pem), "certificate required"),  # none sent
    ]
    for client, words in cases:
        with memory.anon(16 * PS) as m, pytest.raises(SourceUnavailable, match=words):
            async with serve_memory([Region(m.addr, 16 * PS, 0)], source, tls=client):
                pass
    client = TlsContext(server=False, ca=certs.ca_pem, cert=certs.client[0], key=certs.client[1])
    with memory.anon(16 * PS) as m:
        async with serve_memory([Region(m.addr, 16 * PS, 0)], source, tls=client) as s:
            await s.ensure_present(m.addr, 16 * PS)
            assert m.read(0, 16 * PS) == bytes(guest.image)


def test_tls_options_are_checked(certs: Certs, tmp_path: Path) -> None:
    with pytest.raises(TlsError, match="needs a CA"):
        TlsContext(server=False)
    with pytest.raises(TlsError, match="needs a certificate"):
        TlsContext(server=True)
    with pytest.raises(TlsError, match=str(tmp_path / "missing.pem")):
        TlsContext(server=True, cert=tmp_path / "missing.pem")

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "uffdpoison", *argv], capture_output=True,
                              text=True, timeout=30)  # fmt: skip

    img = tmp_path / "g.img"
    img.write_bytes(os.urandom(PS))
    r = run("source", "--listen", "127.0.0.1:0", "--image", str(img), "--tls-cert", "x")
    assert r.returncode == 2 and "--tls-cert needs --tls" in r.stderr
    r = run("source", "--listen", "0.0.0.0:0", "--image", str(img), "--tls",
            "--tls-cert", str(certs.server[0]), "--tls-key", str(certs.server[1]))  # fmt: skip
    assert r.returncode == 2 and "--tls --tls-ca" in r.stderr  # TLS alone is not a gate
    r = run("dest", "--source", "127.0.0.1:1", "--handoff", str(tmp_path / "h"), "--tls")
    assert r.returncode == 2 and "needs a CA" in r.stderr
