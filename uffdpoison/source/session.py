"""One destination session on the source: its data plane, its channels, what it was told.

After the handshake each channel's socket belongs to the session's ``SourcePlane`` (C) for the
rest of the session: URGENT answers demand Requests, BULK pushes every unit nobody has been
offered, nearest the latest demand first. Trio reads the plane's notes and answers with
instructions: a control frame judged by the protocol (Done, Error), an Error for a request
that cannot be read, Done when the push is over, a last Error and close when it must end.
The session ends when both channels are closed (or URGENT, when there is no BULK).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import trio

from uffdpoison import protocol
from uffdpoison.control import notes, run_loop
from uffdpoison.kernel.hist import Timing
from uffdpoison.kernel.planes import Guest, Note, NoteKind, Pacer, SourcePlane
from uffdpoison.protocol import Channel
from uffdpoison.transport import FrameStream

log = logging.getLogger("uffdpoison.source")

StatusCallback = Callable[[dict[str, Any]], None]


class SourceSession:
    """One destination: the negotiated unit, the data plane, each channel's stream."""

    def __init__(
        self,
        token: bytes,
        unit: int,
        peer: str,
        guest: Guest,
        *,
        pacer: Pacer | None,
        push_nice: int | None,
        base_nice: int | None,
        partial_timeout: float,
        status: StatusCallback,
        on_gone: Callable[[str], None],
        timing: bool = True,
    ) -> None:
        self.token = token
        self.unit = unit
        self.peer = peer
        self.plane = SourcePlane(guest, unit, pacer=pacer, partial_timeout=partial_timeout)
        self.plane.set_timing(timing)
        self.streams: dict[Channel, FrameStream] = {}
        self._nice = (push_nice, base_nice)
        self._status = status
        self._on_gone = on_gone
        self._nursery: trio.Nursery | None = None
        self.started = trio.Event()
        self._open = 0
        self.reasons: list[str] = []
        self.bulk_done = False
        self.final: tuple[dict[str, int], Timing] | None = None  # the plane's, once it ended

    @property
    def name(self) -> str:
        return f"{self.peer}: session {self.token.hex()[:8]}"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Until every channel given to ``add`` has closed; cancelling ends them all."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.started.set()
                task_status.started()
                async for _flags, got in notes(self.plane.notes_fd, self.plane.take_notes):
                    for note in got:
                        self._on_note(note)
        finally:
            self._nursery = None
            for s in self.streams.values():
                s.close()
            counts = self.plane.stats()
            self.final = (counts, self.plane.timing())  # for the server's metrics
            self.plane.close()
            why = "; ".join(self.reasons) or "closed"
            log.info("%s ended (%s): %s", self.name, why, counts)
            self._status(
                {
                    "event": "session-ended",
                    "session": self.token.hex(),
                    "peer": self.peer,
                    "reason": why,
                    "bulk_done": self.bulk_done,
                    "bytes_sent": counts["bytes_urgent"] + counts["bytes_bulk"],
                    **counts,
                }
            )

    def add(self, channel: Channel, stream: FrameStream) -> None:
        """A channel whose Welcome was sent: the data plane owns its socket from now on."""
        assert self._nursery is not None
        stream.conn.delegate_data()
        self.streams[channel] = stream
        self.plane.attach(channel, stream.fileno(), stream.tls)
        self._open += 1
        self._nursery.start_soon(self._serve, channel)

    async def _serve(self, channel: Channel) -> None:
        push_nice, base_nice = self._nice
        try:
            await run_loop(
                lambda: self.plane.run(channel, nice=push_nice, base_nice=base_nice),
                lambda: self.plane.stop(channel),
            )
        finally:
            self._open -= 1
            if self._open == 0 and self._nursery is not None:
                self._nursery.cancel_scope.cancel()  # every channel is closed: the session ends

    # -- what the data plane tells -----------------------------------------------------------

    def _on_note(self, note: Note) -> None:
        ch = Channel(note.channel)
        kind = note.kind
        if kind is NoteKind.CONTROL:
            self._judge(ch, self.plane.held(ch))
        elif kind is NoteKind.BAD_FRAME:
            log.warning("%s: protocol error on %s, closing it: %s", self.name, ch.name, note.text)
            self.end(ch, "bad-request", note.text)
        elif kind is NoteKind.READ_FAILED:
            # Not poison (that is a POISONED reply): the pages cannot be read at all.
            log.error("%s: %s: %s", self.name, ch.name, note.text)
            if ch is Channel.URGENT:
                self._send(ch, protocol.Error(note.a, "read-failed", note.text))
            else:  # the push cannot go on; demand requests still get their own errors
                self.end(ch, "read-failed", note.text)
        elif kind is NoteKind.GONE:
            self._on_gone("the served process exited: its memory can no longer be read")
        elif kind is NoteKind.PUSH_DONE:
            self._send(Channel.BULK, protocol.Done())
            self.bulk_done = True
            log.info("%s: bulk push done", self.name)
            self._status({"event": "bulk-done", "session": self.token.hex(), **self.plane.stats()})
        elif kind in (NoteKind.EOF, NoteKind.SOCK_ERROR):
            what = "closed" if kind is NoteKind.EOF else f"connection lost: {note.describe()}"
            self.reasons.append(f"{ch.name.lower()}: {what}")

    def _judge(self, ch: Channel, frame: bytes) -> None:
        """A control frame the data plane held: the protocol's verdict."""
        conn = self.streams[ch].conn
        try:
            conn.receive_data(frame)
            ev = conn.next_event()
        except protocol.ProtocolError as e:
            log.warning("%s: protocol error on %s, closing it: %s", self.name, ch.name, e)
            self.end(ch, "bad-request", str(e))
            return
        if isinstance(ev, protocol.Done):
            # The destination holds every page it needs: stop pushing, answer Done, close.
            self.reasons.append("destination done")
            if not conn.our_done:
                self._send(ch, protocol.Done())
            self.plane.close_channel(ch)
        elif isinstance(ev, protocol.Error):
            log.warning("%s: destination error %s: %s", self.name, ev.code, ev.message)
            self.reasons.append(f"destination error {ev.code}")
            self.plane.close_channel(ch)
        else:  # pragma: no cover - nothing else passes the protocol here
            self.end(ch, "bad-request", f"unexpected {type(ev).__name__}")

    def _send(self, ch: Channel, event: protocol.Event) -> None:
        stream = self.streams.get(ch)
        if stream is None:
            return
        try:
            self.plane.send(ch, b"".join(stream.conn.send(event)))
        except (protocol.ProtocolError, OSError) as e:
            log.info("%s: cannot send %s on %s: %s", self.name, type(event).__name__, ch.name, e)

    def end(self, ch: Channel, code: str, message: str) -> None:
        """A fatal Error on ``ch`` (once), then close it."""
        if ch not in self.streams:
            return
        self.reasons.append(f"{ch.name.lower()}: {code}: {message}")
        self._send(ch, protocol.Error(None, code, message[: protocol.MAX_MESSAGE]))
        self.plane.close_channel(ch)

    def abort(self, code: str, message: str) -> None:
        """End every channel with a fatal Error."""
        for ch in list(self.streams):
            self.end(ch, code, message)
