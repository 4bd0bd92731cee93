"""Two network namespaces joined by a veth pair, for the ``netns`` benchmark scenario.

``NetnsPair`` creates ``upb-<pid>-<n>-src`` and ``upb-<pid>-<n>-dst`` with pyroute2, joins them by
a veth pair, gives the ends addresses of a private /30 that exists only inside these two
namespaces, optionally shapes the source's egress with a tbf qdisc, and removes everything (the
veth pair goes with its namespaces) on exit, also on failure or Ctrl-C.

The source side runs as processes started inside the source namespace (``preexec``); the
destination side is the calling thread, which ``enter_dst()`` moves into the destination
namespace for a block (network namespaces are per thread: other threads are unaffected).
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import signal
import threading
from collections.abc import Callable, Iterator

CLONE_NEWNET = 0x40000000
SRC_ADDR = "10.77.0.1"  # only ever configured inside our own namespaces
DST_ADDR = "10.77.0.2"
PREFIX = 30
_counter = itertools.count()


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold a Ctrl-C until the block is done, then raise it. pyroute2 creates a namespace in a
    forked child: interrupted half way, the child could create it after we removed it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if pending:
        raise KeyboardInterrupt


class NetnsUnavailable(Exception):
    """This machine or user cannot create network namespaces (the reason is the message)."""


# Loaded once here: _setns also runs in a forked child before exec (preexec_fn), where a
# dlopen could wait forever on a loader lock some other thread held at fork time.
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"setns: {os.strerror(e)}")


class NetnsPair:
    """See the module docstring. ``rate``: tbf rate on the source's egress in bytes/s (None:
    unshaped)."""

    def __init__(self, rate: int | None = None) -> None:
        n = next(_counter)
        self.src = f"upb-{os.getpid()}-{n}-src"
        self.dst = f"upb-{os.getpid()}-{n}-dst"
        self._vsrc = f"upb{os.getpid() % 100000}{n}s"
        self._vdst = f"upb{os.getpid() % 100000}{n}d"
        self.rate = rate
        self.src_addr = SRC_ADDR
        self.dst_addr = DST_ADDR
        self._created: list[str] = []
        self._fds: list[int] = []

    def __enter__(self) -> NetnsPair:
        try:
            with _sigint_deferred():
                return self._setup()
        except KeyboardInterrupt:  # held during a setup that completed: undo it, then stop
            self.close()
            raise

    def _setup(self) -> NetnsPair:
        try:
            from pyroute2 import IPRoute, NetNS, netns
        except ImportError as e:  # pragma: no cover - pyroute2 is a dependency
            raise NetnsUnavailable(f"pyroute2 is not installed: {e}") from e
        if os.geteuid() != 0:
            raise NetnsUnavailable("creating network namespaces needs root")
        try:
            for name in (self.src, self.dst):
                # Noted before it exists: a Ctrl-C inside create() must still remove it.
                self._created.append(name)
                netns.create(name)
            with IPRoute() as ipr:
                ipr.link("add", ifname=self._vsrc, kind="veth", peer={"ifname": self._vdst})
                for ifname, ns in ((self._vsrc, self.src), (self._vdst, self.dst)):
                    ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], net_ns_fd=ns)
            for ns, ifname, addr in (
                (self.src, self._vsrc, self.src_addr),
                (self.dst, self._vdst, self.dst_addr),
            ):
                with NetNS(ns) as nsr:
                    idx = nsr.link_lookup(ifname=ifname)[0]
                    nsr.addr("add", index=idx, address=addr, prefixlen=PREFIX)
                    nsr.link("set", index=idx, state="up")
                    nsr.link("set", index=nsr.link_lookup(ifname="lo")[0], state="up")
                    if self.rate and ns == self.src:
                        # burst: at least 64 KiB or 10 ms worth; latency bounds the queue.
                        burst = max(64 << 10, self.rate // 100)
                        nsr.tc("add", "tbf", idx, rate=self.rate, burst=burst, latency="200ms")
            self._fds = [
                os.open(f"/var/run/netns/{n}", os.O_RDONLY | os.O_CLOEXEC)
                for n in (self.src, self.dst)
            ]
        except BaseException as e:
            self._teardown()
            if isinstance(e, OSError | ImportError):
                raise NetnsUnavailable(f"cannot set up network namespaces: {e}") from e
            raise
        return self

    def close(self) -> None:
        with _sigint_deferred():
            self._teardown()

    def _teardown(self) -> None:
        from pyroute2 import netns

        for fd in self._fds:
            os.close(fd)
        self._fds = []
        while self._created:
            name = self._created.pop()
            with contextlib.suppress(OSError):
                netns.remove(name)

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_source_link(self, up: bool) -> None:
        """Cut the link (down: packets vanish, no FIN, no RST) or mend it."""
        from pyroute2 import NetNS

        with NetNS(self.src) as nsr:
            nsr.link(
                "set", index=nsr.link_lookup(ifname=self._vsrc)[0], state="up" if up else "down"
            )

    def preexec_src(self, then: Callable[[], None] | None = None) -> Callable[[], None]:
        """A ``preexec_fn`` that moves the child into the source namespace (then runs ``then``)."""
        fd = self._fds[0]

        def enter() -> None:
            _setns(fd)
            if then is not None:
                then()

        return enter

    @contextlib.contextmanager
    def enter_dst(self) -> Iterator[None]:
        """Run the calling thread in the destination namespace for the block."""
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(self._fds[1])
            try:
                yield
            finally:
                _setns(home)
        finally:
            os.close(home)


def leftovers() -> list[str]:
    """Namespaces named like ours from this process that still exist (for tests)."""
    prefix = f"upb-{os.getpid()}-"
    try:
        names = os.listdir("/var/run/netns")
    except FileNotFoundError:
        return []
    return [n for n in names if n.startswith(prefix)]
