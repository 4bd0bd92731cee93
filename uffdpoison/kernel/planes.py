"""Typed bindings of the C data planes (csrc/dest_plane.c, csrc/source_plane.c).

A data plane owns a session's userfaultfd (destination) and data sockets for the whole
session; Python is its control plane. The two talk through *notes* (C → Python: an event with
its reason, read from an eventfd) and *instructions* (Python → C: thread-safe calls: send a
control frame, release a held frame, close a channel, stop). Nothing else crosses: no fd, no
buffered byte, no request table changes owner (docs/DESIGN.md, "The data planes").
"""

from __future__ import annotations

import enum
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from uffdpoison.kernel._ffi import ffi, lib
from uffdpoison.kernel.hist import Timing, read_timing
from uffdpoison.kernel.ledger import Ledger
from uffdpoison.kernel.tls import Tls

__all__ = [
    "DestPlane",
    "DestRegion",
    "Flag",
    "Guest",
    "Note",
    "NoteKind",
    "Pacer",
    "SourcePlane",
    "have",
]

_NO_NICE = -(2**31)  # INT32_MIN: leave the thread's priority as it is


class NoteKind(enum.IntEnum):
    CONTROL = lib.UP_NOTE_CONTROL  # a frame on `channel` awaits a verdict: held(channel)
    BAD_FRAME = lib.UP_NOTE_BAD_FRAME  # the peer broke the protocol; text says how
    EOF = lib.UP_NOTE_EOF
    SOCK_ERROR = lib.UP_NOTE_SOCK_ERROR
    READ_FAILED = lib.UP_NOTE_READ_FAILED  # source: request a at offset b is unreadable
    GONE = lib.UP_NOTE_GONE  # source: the served process exited
    PUSH_DONE = lib.UP_NOTE_PUSH_DONE
    FATAL = lib.UP_NOTE_FATAL  # a local failure: err, text
    TARGET_GONE = lib.UP_NOTE_TARGET_GONE  # destination: the VMM's memory is gone
    DETACHED = lib.UP_NOTE_DETACHED  # a channel closed as told: its socket is ours again


class Flag(enum.IntFlag):
    PROGRESS = lib.UP_FLAG_PROGRESS
    LOG = lib.UP_FLAG_LOG
    COMPLETE = lib.UP_FLAG_COMPLETE


class Note(NamedTuple):
    kind: NoteKind
    channel: int
    err: int
    a: int
    b: int
    text: str

    def describe(self) -> str:
        """One line: the reason, with the errno's text where there is one."""
        if self.err:
            return f"{self.text}: {os.strerror(self.err)}" if self.text else os.strerror(self.err)
        return self.text or self.kind.name.lower().replace("_", " ")


class _Plane:
    """What both planes share: notes and the per-channel instructions. ``_fn(name)`` is the
    plane's C function of that name."""

    _prefix: str
    _ptr: Any

    def __init__(self, ptr: Any) -> None:
        if ptr == ffi.NULL:
            err = ffi.errno
            raise OSError(err, f"{type(self).__name__}: {os.strerror(err)}")
        self._ptr = ptr
        self._running = 0  # loops in C now (changed with the GIL held)
        self._notes = getattr(lib, f"{self._prefix}_notes")(ptr)
        self._buf = ffi.new("up_note[]", 64)
        self._flags = ffi.new("uint32_t *")
        self.notes_fd: int = lib.up_notes_fd(self._notes)

    def _fn(self, name: str) -> Any:
        return getattr(lib, f"{self._prefix}_{name}")

    def _raw(self) -> Any:
        if self._ptr is None:
            raise ValueError(f"{type(self).__name__} is closed")
        return self._ptr

    def take_notes(self) -> tuple[Flag, list[Note]]:
        """The flags raised and the notes left since the last call (oldest first)."""
        notes: list[Note] = []
        flags = Flag(0)
        while True:
            n = lib.up_notes_take(self._notes, self._buf, 64, self._flags)
            flags |= Flag(self._flags[0])
            for k in range(n):
                r = self._buf[k]
                text = ffi.string(r.text).decode("utf-8", "replace")
                notes.append(Note(NoteKind(r.what), r.channel, r.err, r.a, r.b, text))
            if n < 64:
                return flags, notes

    def _chan(self, channel: int) -> Any:
        c = self._fn("chan")(self._raw(), channel)
        if c == ffi.NULL:
            raise ValueError(f"no channel {channel}")
        return c

    def send(self, channel: int, data: bytes) -> None:
        """Queue a control frame (encoded by the protocol) on ``channel``."""
        rc = lib.up_chan_send(self._chan(channel), data, len(data))
        if rc < 0:
            raise OSError(-rc, f"queueing a control frame: {os.strerror(-rc)}")

    def release(self, channel: int) -> None:
        """The held frame on ``channel`` is judged: consume it and read on."""
        lib.up_chan_release(self._chan(channel))

    def close_channel(self, channel: int) -> None:
        """Send what is queued on ``channel``, then let go of it (the peer sees EOF)."""
        lib.up_chan_close(self._chan(channel))

    def held(self, channel: int) -> bytes:
        """The frame held on ``channel`` (prefix, header, payload), b"" if none."""
        p = ffi.new("const uint8_t **")
        n = lib.up_chan_held(self._chan(channel), p)
        return bytes(ffi.buffer(p[0], n)) if n else b""

    def _stats(self, ctype: str) -> dict[str, int]:
        s = ffi.new(f"{ctype} *")
        self._fn("get_stats")(self._raw(), s)
        return {name: getattr(s, name) for name, _ in ffi.typeof(ctype).fields}

    def timing(self) -> Timing:
        """Latency histograms (and, destination, bytes received), copied out of C now."""
        return read_timing(self._fn("get_timing"), self._raw())

    def set_timing(self, on: bool) -> None:
        """Record latencies (the default) or not: off only to measure what recording costs."""
        self._fn("set_timing")(self._raw(), int(on))

    def _loop(self, *args: int) -> int:
        ptr = self._raw()
        self._running += 1
        try:
            return int(self._fn("run")(ptr, *args))
        finally:
            self._running -= 1

    def close(self) -> None:
        """Free the plane; no loop of it may be running (stop it and wait first)."""
        if self._running:
            raise RuntimeError(f"{type(self).__name__}: a loop is still running")
        if self._ptr is not None:
            self._fn("free")(self._ptr)
            self._ptr = None


# ------------------------------------------------------------------ destination


@dataclass(frozen=True, slots=True)
class DestRegion:
    """One registered region: host ``base``, ``size``, guest ``offset``, its ledger."""

    base: int
    size: int
    offset: int
    ledger: Ledger


def _region_array(regions: Sequence[DestRegion]) -> Any:
    arr = ffi.new("up_dest_region[]", len(regions))
    for k, r in enumerate(regions):
        arr[k].base, arr[k].size, arr[k].offset = r.base, r.size, r.offset
        arr[k].ledger = r.ledger.raw
    return arr


def have(
    regions: Sequence[DestRegion], page_size: int, poisoned: bool, first: int, count: int
) -> bytes:
    """A resuming session's Have bitmap for units [first, first+count): bit set = not needed
    from the source (``poisoned``: known poisoned), from the ledgers (``up_dest_have``)."""
    bits = ffi.new("uint8_t[]", (count + 7) // 8)
    arr = _region_array(regions)
    lib.up_dest_have(arr, len(regions), page_size, int(poisoned), first, count, bits)
    return bytes(ffi.buffer(bits))


class DestPlane(_Plane):
    """Owns one ``up_dest``; borrows the userfaultfd and the ledgers (keep them open while it
    lives) and, once attached, the sockets (close them after ``run`` returned)."""

    _prefix = "up_dest"

    def __init__(
        self,
        uffd: int,
        page_size: int,
        memory_size: int,
        regions: Sequence[DestRegion],
        poison: Sequence[int] | memoryview = (),
        *,
        request_timeout: float = 0.0,
    ) -> None:
        """``poison``: the handshake's poison list (guest offsets), POISONED in the ledgers
        before this returns. ``request_timeout``: seconds before an unanswered request is
        noted (SOCK_ERROR, ETIMEDOUT); 0 never."""
        if [r.base for r in regions] != sorted(r.base for r in regions):
            raise ValueError("regions must be sorted by base address")
        self._ledgers = [r.ledger for r in regions]  # keep them alive
        arr = _region_array(regions)
        plist = ffi.from_buffer("uint64_t[]", poison) if len(poison) else ffi.NULL
        super().__init__(
            lib.up_dest_new(
                uffd,
                page_size,
                memory_size,
                arr,
                len(regions),
                plist,
                len(poison),
                round(request_timeout * 1000),
            )
        )

    def attach(self, channel: int, fd: int, tls: Tls | None = None) -> None:
        """The channel's socket (and its TLS, which must outlive the plane's use of it)."""
        if lib.up_dest_attach(self._raw(), channel, fd, tls.raw if tls else ffi.NULL) < 0:
            raise ValueError(f"cannot attach channel {channel} now")

    def run(self) -> None:
        """Serve until ``stop()``. Blocks in C without the GIL: run it in a thread."""
        rc = self._loop()
        if rc < 0:
            raise OSError(-rc, f"destination data plane: {os.strerror(-rc)}")

    def stop(self) -> None:
        if self._ptr is not None:
            lib.up_dest_stop(self._ptr)

    def notify(self, delta: int) -> None:
        """+1 while a waiter wants Flag.PROGRESS on every placement, -1 after."""
        lib.up_dest_notify(self._raw(), delta)

    def request(
        self, region: int, first: int, count: int, max_run: int = 0, *, digests: bool = False
    ) -> int:
        """Claim pages [first, first+count) of region ``region`` and ask for what is missing
        (runs of at most ``max_run`` pages; ``digests``, MINOR mode: with the digests of the
        cached copies, hashed here, so call it off the event loop). 0, or -errno (-EAGAIN:
        call again soon)."""
        return int(lib.up_dest_request(self._raw(), region, first, count, max_run, digests))

    def stats(self) -> dict[str, int]:
        return self._stats("up_dest_stats")

    @property
    def outstanding(self) -> int:
        return int(lib.up_dest_outstanding(self._raw()))


# ------------------------------------------------------------------ source


class Guest:
    """What the source serves: ``up_guest``. Borrows the fds and buffers it is given: they
    must outlive it (the backend owns them)."""

    def __init__(
        self,
        *,
        size: int,
        base_page_size: int,
        poison_bits: bytearray,
        data_fd: int = -1,
        ranges: Sequence[tuple[int, int, int]] = (),
        mem: memoryview | None = None,
        pagemap_fd: int = -1,
        is_process: bool = False,
    ) -> None:
        if (mem is None) == (data_fd < 0):
            raise ValueError("a Guest reads from exactly one of mem and data_fd")
        if len(poison_bits) * 8 < size // base_page_size:
            raise ValueError("poison bitmap shorter than the guest memory")
        g = ffi.new("up_guest *")
        self._keep: list[Any] = []  # buffers borrowed from Python objects, released in close()
        g.data_fd, g.pagemap_fd, g.is_process = data_fd, pagemap_fd, int(is_process)
        g.mem = self._borrow(mem) if mem is not None else ffi.NULL
        g.size, g.base_ps, g.sys_ps = size, base_page_size, os.sysconf("SC_PAGE_SIZE")
        g.poison = self._borrow(poison_bits)
        self._ranges = ffi.new("up_guest_range[]", max(1, len(ranges)))
        for k, (goff, foff, length) in enumerate(ranges):
            self._ranges[k].goff, self._ranges[k].foff, self._ranges[k].len = goff, foff, length
        g.nranges, g.ranges = len(ranges), self._ranges
        self.raw: Any = g
        self.size = size

    def _borrow(self, obj: Any) -> Any:
        p = ffi.from_buffer(obj)
        self._keep.append(p)
        return p

    def read(self, offset: int, count: int, unit: int) -> tuple[list[int], bytes]:
        """Read and classify ``count`` units at ``offset`` (what the planes send): the kinds
        (protocol PageKind values) and the bytes read. Raises OSError naming a failure."""
        buf = ffi.new("uint8_t[]", count * unit)
        data = ffi.new("const uint8_t **")
        kinds = ffi.new("uint8_t[]", count)
        why = ffi.new("char[]", 160)
        rc = lib.up_guest_read(self.raw, offset, count, unit, buf, data, kinds, why)
        if rc == lib.UP_GUEST_GONE:
            raise ProcessLookupError("the served process exited")
        if rc:
            raise OSError(ffi.string(why).decode())
        return list(kinds), bytes(ffi.buffer(data[0], count * unit))

    def close(self) -> None:
        self.raw.mem = self.raw.poison = ffi.NULL
        for p in self._keep:
            ffi.release(p)
        self._keep.clear()


class Pacer:
    """A bandwidth cap shared by every session's push (one link)."""

    def __init__(self, bytes_per_s: float) -> None:
        ptr = lib.up_pacer_new(bytes_per_s)
        if ptr == ffi.NULL:
            raise ValueError(f"bandwidth must be positive, got {bytes_per_s}")
        self.raw: Any = ptr

    def close(self) -> None:
        if self.raw is not None:
            lib.up_pacer_free(self.raw)
            self.raw = None


class SourcePlane(_Plane):
    """Owns one ``up_src``: a session's URGENT responder and BULK push."""

    _prefix = "up_src"

    def __init__(
        self, guest: Guest, unit: int, *, pacer: Pacer | None = None, partial_timeout: float = 30.0
    ) -> None:
        self._guest, self._pacer = guest, pacer  # outlive the plane
        super().__init__(
            lib.up_src_new(
                guest.raw,
                pacer.raw if pacer is not None else ffi.NULL,
                unit,
                max(1, round(partial_timeout * 1000)),
            )
        )

    def attach(self, channel: int, fd: int, tls: Tls | None = None) -> None:
        if lib.up_src_attach(self._raw(), channel, fd, tls.raw if tls else ffi.NULL) < 0:
            raise ValueError(f"no channel {channel}")

    def run(self, channel: int, *, nice: int | None = None, base_nice: int | None = None) -> None:
        """Serve ``channel`` until stopped, closed or the peer is gone. Blocks in C without
        the GIL: run it in a thread. BULK runs at ``nice`` and restores ``base_nice``."""
        self._loop(
            channel,
            _NO_NICE if nice is None else nice,
            _NO_NICE if base_nice is None else base_nice,
        )

    def stop(self, channel: int) -> None:
        if self._ptr is not None:
            lib.up_src_stop(self._ptr, channel)

    def stats(self) -> dict[str, int]:
        return self._stats("up_src_stats")

    def vouch(self) -> None:
        """MINOR mode: the destination holds the guest's current precopy epoch; a unit asked
        for with a digest that has not changed since is CLEAN unread (``up_src_vouch``)."""
        lib.up_src_vouch(self._raw())

    def mark(self, poisoned: bool, first: int, count: int, bits: bytes | memoryview) -> None:
        """A resuming destination's Have: units not to push (``poisoned``: and poisoned)."""
        if len(bits) * 8 < count:
            raise ValueError(f"a {len(bits)}-byte bitmap cannot cover {count} units")
        lib.up_src_mark(self._raw(), int(poisoned), first, count, ffi.from_buffer(bits))
