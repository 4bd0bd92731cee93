"""systemd's notify protocol, spoken by ``uffdpoison dest`` and ``uffdpoison source`` run as real
child processes: the test binds the Unix datagram socket ``$NOTIFY_SOCKET`` names, as systemd
does, and reads what arrives."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from uffdpoison import sdnotify

SYSTEMD_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


@contextlib.contextmanager
def notify_socket(tmp_path: Path, *, abstract: bool = False) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket and the ``$NOTIFY_SOCKET`` value naming it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        if abstract:
            name = f"uffdpoison-test-notify-{os.getpid()}-{tmp_path.name}"
            sock.bind("\0" + name)
            value = "@" + name
        else:
            value = str(tmp_path / "notify.sock")
            sock.bind(value)
        sock.settimeout(30)
        yield sock, value
    finally:
        sock.close()


@contextlib.contextmanager
def child(argv: list[str], **env: str) -> Iterator[subprocess.Popen[bytes]]:
    base = {k: v for k, v in os.environ.items() if k not in SYSTEMD_VARS}
    proc = subprocess.Popen(
        [sys.executable, "-m", "uffdpoison", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=base | env,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        assert proc.stdout is not None
        proc.stdout.close()


def receive(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def listening_line_already_written(proc: subprocess.Popen[bytes]) -> dict[str, object]:
    """The first stdout line, which must be there already (written before READY=1 was sent)."""
    assert proc.stdout is not None
    readable, _, _ = select.select([proc.stdout], [], [], 0)
    assert readable, "READY=1 arrived before the listening line was written"
    first: dict[str, object] = json.loads(proc.stdout.readline())
    assert first["event"] == "listening"
    return first


def stop_with_sigterm(proc: subprocess.Popen[bytes], sock: socket.socket) -> None:
    proc.send_signal(signal.SIGTERM)
    assert receive(sock) == "STOPPING=1"
    assert proc.wait(timeout=30) == 0


def source_argv(tmp_path: Path) -> list[str]:
    image = tmp_path / "guest.img"
    image.write_bytes(os.urandom(8 * 4096))
    return ["source", "--listen", "127.0.0.1:0", "--image", str(image)]


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_source_is_ready_once_listening_and_says_stopping(tmp_path: Path, abstract: bool) -> None:
    with (
        notify_socket(tmp_path, abstract=abstract) as (sock, value),
        child(source_argv(tmp_path), NOTIFY_SOCKET=value) as proc,
    ):
        assert receive(sock) == "READY=1"
        first = listening_line_already_written(proc)
        # Ready means serving: a destination can connect now.
        socket.create_connection(("127.0.0.1", int(str(first["port"]))), timeout=10).close()
        stop_with_sigterm(proc, sock)


def test_dest_is_ready_once_its_sockets_listen_and_says_stopping(tmp_path: Path) -> None:
    handoff, control = str(tmp_path / "handoff.sock"), str(tmp_path / "control.sock")
    argv = ["dest", "--source", "127.0.0.1:1", "--handoff", handoff, "--control", control,
            "--state-dir", str(tmp_path / "state")]  # fmt: skip
    with notify_socket(tmp_path) as (sock, value), child(argv, NOTIFY_SOCKET=value) as proc:
        assert receive(sock) == "READY=1"
        first = listening_line_already_written(proc)
        assert first["path"] == handoff
        for path in (handoff, control):  # a VMM and `uffdpoison status` can connect now
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(path)
        stop_with_sigterm(proc, sock)
    assert not os.path.exists(handoff)


def test_watchdog_pings_at_half_the_interval(tmp_path: Path) -> None:
    with (
        notify_socket(tmp_path) as (sock, value),
        child(source_argv(tmp_path), NOTIFY_SOCKET=value, WATCHDOG_USEC="200000") as proc,
    ):
        assert receive(sock) == "READY=1"
        sock.settimeout(2)  # a ping every 0.1 s
        assert [receive(sock) for _ in range(5)] == ["WATCHDOG=1"] * 5
        proc.send_signal(signal.SIGTERM)
        sock.settimeout(30)
        while (state := receive(sock)) == "WATCHDOG=1":
            pass
        assert state == "STOPPING=1"
        assert proc.wait(timeout=30) == 0


def test_watchdog_for_another_process_or_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process
    assert sdnotify.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    monkeypatch.setenv("WATCHDOG_USEC", "0")
    assert sdnotify.watchdog_interval() is None


def test_without_notify_socket_nothing_is_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    # A socket nobody listens on: logged, not raised (supervision never stops the daemon).
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert sdnotify.notify("READY=1") is False
