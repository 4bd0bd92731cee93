"""systemd's notify protocol, for ``Type=notify`` units (examples/systemd/): one datagram of
``KEY=VALUE`` lines to the Unix socket ``$NOTIFY_SOCKET`` (a path, or an abstract socket when it
starts with ``@``). Without ``$NOTIFY_SOCKET`` (not started by systemd) every call does nothing.

``READY=1`` once the command listens, ``STOPPING=1`` when it begins to stop, and, when the unit
sets ``WatchdogSec=``, ``WATCHDOG=1`` from the event loop at half the interval (:func:`watchdog`):
a loop that stops turning (wedged) stops the pings, and systemd restarts the unit.
"""

from __future__ import annotations

import logging
import os
import socket

import trio

log = logging.getLogger(__name__)


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``); True when it was sent. A failure is logged, never
    raised: being supervised must not stop the daemon."""
    path = os.environ.get("NOTIFY_SOCKET", "")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    if not address.startswith(("/", "\0")):
        log.warning("NOTIFY_SOCKET=%r: only Unix socket paths and @abstract names are supported",
                    path)  # fmt: skip
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall(state.encode())
    except OSError as e:
        log.warning("cannot notify systemd (%s) of %s: %s", path, state, e)
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between two ``WATCHDOG=1`` pings (half of ``$WATCHDOG_USEC``), or None when no
    watchdog is asked of this process (``$WATCHDOG_PID``, when set, names the one it is for)."""
    pid = os.environ.get("WATCHDOG_PID")
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", "0"))
        if pid is not None and int(pid) != os.getpid():
            return None
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


async def watchdog() -> None:
    """Ping systemd's watchdog from the trio loop, forever (returns at once if none is set)."""
    interval = watchdog_interval()
    if interval is None:
        return
    while True:
        notify("WATCHDOG=1")
        await trio.sleep(interval)
