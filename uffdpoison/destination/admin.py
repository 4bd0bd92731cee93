"""The daemon's local control socket (``dest --control PATH``): one JSON request a connection,
one JSON answer, then close.

    {"cmd": "status"}                         -> {"ok": true, "source": ..., "sessions": [...]}
    {"cmd": "set-source", "source": "H:PORT"} -> {"ok": true, "source": "H:PORT"}

A bad request gets ``{"ok": false, "error": reason}``. The socket file is 0600: the daemon's
user (and root) may use it. ``request`` is the client (``uffdpoison status`` and
``uffdpoison set-source``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
from typing import TYPE_CHECKING, Any

import trio

from uffdpoison.destination.handoff import prepare_socket
from uffdpoison.kernel.hist import combined
from uffdpoison.metrics import resident_pages
from uffdpoison.transport import parse_address

if TYPE_CHECKING:
    from uffdpoison.destination.daemon import HandoffDaemon

log = logging.getLogger(__name__)

MAX_REQUEST = 4096
TIMEOUT = 5.0


def status(daemon: HandoffDaemon) -> dict[str, Any]:
    """What ``status`` answers: the source, and per session its VMM, state, progress and the
    fault-serve latency so far (from the data plane's histogram)."""
    sessions = []
    for name, s in daemon.sessions.items():
        x = s.sample()
        served = combined(x.timing.latency)
        sessions.append({
            "session": name,
            "pid": daemon.vmm_pids.get(name),
            "state": x.state,
            "source": s.source,
            "pauses": x.pauses,
            "pages": x.pages,
            "resident": resident_pages(x.pages),
            "total": sum(x.pages.values()),
            "placed": x.placed,
            "faults_served": served.count,
            "latency_us": {q: _us(served.quantile(v)) for q, v in (("p50", 0.5), ("p99", 0.99))},
            "rtt_us": _us(x.rtt_s),
        })  # fmt: skip
    ready = daemon.source_info is not None
    return {"ok": True, "source": daemon.source, "source_ready": ready, "sessions": sessions}


def _us(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e6, 1)


def _answer(daemon: HandoffDaemon, raw: bytes) -> dict[str, Any]:
    try:
        req = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        return {"ok": False, "error": f"request is not JSON: {e}"}
    cmd = req.get("cmd") if isinstance(req, dict) else None
    if cmd == "status":
        return status(daemon)
    if cmd == "set-source":
        addr = req.get("source")
        try:
            if not isinstance(addr, str):
                raise ValueError("set-source needs a 'source' string")
            parse_address(addr, what="source address")
        except ValueError as e:
            return {"ok": False, "error": str(e)}
        daemon.set_source(addr)
        return {"ok": True, "source": addr}
    return {"ok": False, "error": f"unknown command {cmd!r} (status, set-source)"}


async def serve_control(
    daemon: HandoffDaemon,
    path: str,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    sock = trio.socket.from_stdlib_socket(prepare_socket(path, 0o600, None))
    try:
        task_status.started()
        async with trio.open_nursery() as nursery:
            while True:
                conn, _ = await sock.accept()
                nursery.start_soon(_one, daemon, conn)
    finally:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(path)


async def _one(daemon: HandoffDaemon, conn: trio.socket.SocketType) -> None:
    stream = trio.SocketStream(conn)
    with trio.move_on_after(TIMEOUT):
        try:
            raw = b""
            while b"\n" not in raw and len(raw) <= MAX_REQUEST:
                chunk = await stream.receive_some(MAX_REQUEST)
                if not chunk:
                    break
                raw += chunk
            if len(raw) > MAX_REQUEST:
                answer = {"ok": False, "error": f"request exceeds {MAX_REQUEST} bytes"}
            else:
                answer = _answer(daemon, raw)
            await stream.send_all((json.dumps(answer) + "\n").encode())
        except trio.BrokenResourceError:
            pass  # the client went away
    await stream.aclose()


def request(path: str, cmd: dict[str, Any], timeout: float = TIMEOUT) -> dict[str, Any]:
    """One request to a daemon's control socket (blocking); OSError if it cannot be reached."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall((json.dumps(cmd) + "\n").encode())
        raw = b""
        while chunk := s.recv(1 << 16):
            raw += chunk
    try:
        answer = json.loads(raw)
    except ValueError as e:
        raise OSError(f"control socket {path}: not a JSON answer: {e}") from None
    if not isinstance(answer, dict):
        raise OSError(f"control socket {path}: not a JSON object")
    return answer


def ask(path: str, cmd: dict[str, Any], who: str) -> dict[str, Any] | None:
    """``request`` for a command line (``who``: its name): the answer, or None after one line
    on stderr saying why there is none (the daemon unreachable, or refusing)."""
    try:
        answer = request(path, cmd)
    except OSError as e:
        print(f"{who}: cannot reach {path}: {e}", file=sys.stderr)
        return None
    if not answer.get("ok"):
        print(f"{who}: {answer.get('error')}", file=sys.stderr)
        return None
    return answer
