"""What the fuzzer feeds (``uffdpoison.bench.fuzz``): the sans-IO protocol, and the C data
planes over socket pairs with a control plane that judges as the product's sessions do.

Each target's ``run(case)`` returns the input's outcome (a short class: an event ending, a
``ProtocolError``'s message with its numbers taken out, a note's reason) or raises
``Violation`` (an invariant broke: state changed by a refused frame, a placement or an answer
from a frame the protocol refuses, unbounded buffering). Any other exception is a crash of the
target. A hang is the caller's to see (it watches the time each input takes).
"""

from __future__ import annotations

import contextlib
import re
import select
import socket
import threading
from array import array
from collections.abc import Callable
from typing import Any

from uffdpoison.bench.fuzzgen import (
    DEST_MEM_PAGES,
    MEM_PAGES,
    PS,
    REGION_FIRST,
    REGION_PAGES,
    SESSION,
    SRC_PAGES,
    SRC_POISONED,
    SRC_ZERO,
    Case,
    V,
    cached_page,
    source_image,
)
from uffdpoison.protocol import codec, layout
from uffdpoison.protocol.connection import Connection, open_pair
from uffdpoison.protocol.events import (
    CLOSED,
    NEED_DATA,
    Challenge,
    Channel,
    Done,
    Error,
    Event,
    Hello,
    PageKind,
    Pages,
    Proof,
    ProtocolError,
    Request,
    Side,
    Welcome,
    _Sentinel,
)
from uffdpoison.protocol.framing import FrameSplitter

# What a receiver may hold of a frame it has not seen whole (docs/PROTOCOL.md "Limits").
FRAME_LIMIT = layout.PREFIX_SIZE + layout.MAX_HEADER + layout.MAX_PAYLOAD


class Violation(Exception):
    """An invariant of the target broke on this input."""


_NUMBERS = re.compile(r"0x[0-9a-f]+|\d+|(?<=magic )[0-9a-f]{2} [0-9a-f]{2}")
_BYTES = re.compile(r"b'(?:[^'\\]|\\.)*'|b\"(?:[^\"\\]|\\.)*\"")


def klass(message: str) -> str:
    """A message as an outcome class: numbers and quoted bytes taken out, msgpack's own
    detail cut."""
    m = _NUMBERS.sub("N", _BYTES.sub("B", message))
    head, sep, rest = m.partition("not valid msgpack: ")
    return head + sep + rest.split(":", 1)[0] if sep else m


# ---------------------------------------------------------------- the sans-IO protocol


def buffered(conn: Connection) -> tuple[int, int]:
    """Bytes a connection holds: of the frame being received, and of whole frames waiting."""
    sp: FrameSplitter = conn._splitter
    partial = len(sp._stash) + (len(sp._pending[1]) if sp._pending is not None else 0)
    whole = sum(len(h) + (len(p) if p is not None else 0) for h, p in sp._frames)
    return partial, whole


def _snapshot(conn: Connection) -> tuple[Any, ...]:
    out = tuple((k, o.next, o.end, o.digests) for k, o in conn._out.items())
    return (
        conn.state,
        conn.channel,
        conn.page_size,
        conn.memory_size,
        conn.session,
        conn.hello,
        conn.welcome,
        conn.our_done,
        conn.their_done,
        out,
    )


def _round_trip(ev: Event) -> None:
    """A received control event encodes again (the send checks agree) and decodes to itself.
    (Request and Pages have one encoding: what was received is what would be sent.)"""
    if isinstance(ev, (Request, Pages)):
        return
    try:
        parts = codec.encode(ev, codec.payload_of(ev))
    except ProtocolError as e:
        raise Violation(f"received {type(ev).__name__} cannot be sent back: {e}") from None
    header = bytes(parts[0][layout.PREFIX_SIZE :])
    payload = memoryview(parts[1]) if len(parts) > 1 else None
    if codec.decode(header, payload) != ev:
        raise Violation(f"{type(ev).__name__} does not survive encode/decode")


class ProtocolTarget:
    """A ``Connection`` of the case's side and channel, driven as an application would: the
    source answers a Hello with a Welcome and each Request with ZERO pages, the destination
    sends its Hello first and its requests after the Welcome."""

    def run(self, case: Case) -> str:
        side, ch = Side(case.side), Channel(case.channel)
        conn = Connection(side, ch if side is Side.DESTINATION else None)
        if side is Side.DESTINATION:
            session = SESSION if ch is Channel.BULK else None
            conn.send(Hello(V, ch, session, 0, case.want_poison_list))
        outcome = "need-data"
        chunks = case.chunks() + ([b""] if case.eof else [])
        for k, chunk in enumerate(chunks):
            conn.receive_data(chunk)
            try:
                outcome = self._drain(conn, case)
            except ProtocolError as e:
                self._after_failure(conn, e, chunks[k + 1 :])
                return "error: " + klass(str(e))
            partial, whole = buffered(conn)
            if partial > FRAME_LIMIT or whole:
                raise Violation(f"buffers {partial} + {whole} bytes after draining")
        return outcome

    @staticmethod
    def _after_failure(conn: Connection, e: ProtocolError, rest: list[bytes]) -> None:
        """Failed for good: the same error again, and nothing more buffered."""
        before = sum(buffered(conn))
        for chunk in rest:
            with contextlib.suppress(ProtocolError):  # data after EOF: refused, as it should be
                conn.receive_data(chunk)
        try:
            conn.next_event()
        except ProtocolError as again:
            if again is not e:
                raise Violation(f"a failed connection raised another error: {again}") from None
        else:
            raise Violation("a failed connection returned an event")
        if sum(buffered(conn)) > before:
            raise Violation(
                f"a failed connection buffered {sum(buffered(conn)) - before} more bytes"
            )

    def _drain(self, conn: Connection, case: Case) -> str:
        while True:
            before = _snapshot(conn)
            try:
                ev = conn.next_event()
            except ProtocolError:
                if _snapshot(conn) != before:
                    raise Violation("a refused frame changed the connection") from None
                raise
            if isinstance(ev, _Sentinel):
                return "need-data" if ev is NEED_DATA else "closed"
            _round_trip(ev)
            self._react(conn, ev, case)

    @staticmethod
    def _react(conn: Connection, ev: Event, case: Case) -> None:
        replies: list[Event] = []
        if isinstance(ev, Hello) and ev.auth is not None:  # any MAC: this target checks rules
            replies.append(Challenge(bytes(32), bytes(32)))
        elif isinstance(ev, Challenge):
            replies.append(Proof(bytes(32)))
        elif isinstance(ev, Hello | Proof):
            hello = conn.hello
            assert hello is not None
            ps = hello.page_size or PS
            plist = memoryview(b"") if hello.want_poison_list else None
            epoch = hello.epoch or (bytes(16) if hello.epoch == b"" else None)  # vouched
            replies.append(
                Welcome(V, hello.session or SESSION, ps, MEM_PAGES * ps, 0, 0, plist, epoch)
            )
        elif isinstance(ev, Welcome):
            for rid, off, n, digests in case.requests:
                replies.append(Request(rid, off, n, memoryview(bytes(8 * n)) if digests else None))
        elif isinstance(ev, Request):
            replies.append(Pages(ev.id, PageKind.ZERO, ev.offset, ev.count))
        elif isinstance(ev, Done) and not conn.our_done:
            replies.append(Done())
        for reply in replies:
            # not ours to send in every state (a mutated Welcome's geometry): refused, fine
            with contextlib.suppress(ProtocolError):
                conn.send(reply)


# ---------------------------------------------------------------- the C data planes


def _cached_digests(case: Case, first: int, n: int) -> memoryview | None:
    """A MINOR-mode dest case's Request digests: its cached pages' (u64 LE), else None."""
    if not case.minor:
        return None
    from uffdpoison.kernel.digest import page_digests

    cached = b"".join(cached_page(p, PS) for p in range(first, first + n))
    return memoryview(page_digests(cached, PS).tobytes())


def _reference(case: Case, side: Side, memory: int) -> tuple[list[Event], str]:
    """The protocol's verdict on the stream the plane is fed, after the same handshake: the
    data events it accepts before it stops, and why it stopped ("ok": every byte accepted;
    "truncated": EOF mid-frame; "error"; "stopped": an Error or a destination's Done, on
    which the product's control plane ends the channel)."""
    ch = Channel(case.channel)
    src, dst = open_pair(ch, memory_size=memory, page_size=PS)
    conn = src if side is Side.SOURCE else dst
    if side is Side.DESTINATION:
        base = REGION_FIRST * PS
        for rid, (first, n, _, _) in enumerate(case.requests, 1):
            dst.send(Request(rid, base + first * PS, n, _cached_digests(case, first, n)))
    accepted: list[Event] = []
    done = False
    for chunk in [*case.chunks(), b""]:
        conn.receive_data(chunk)
        while True:
            try:
                ev = conn.next_event()
            except ProtocolError as e:
                return accepted, "truncated" if "truncated frame at EOF" in str(e) else "error"
            if isinstance(ev, _Sentinel):
                if ev is NEED_DATA:
                    break
                return accepted, "ok"
            if isinstance(ev, Error) or (isinstance(ev, Done) and side is Side.SOURCE):
                return accepted, "stopped"
            if isinstance(ev, Done):
                # The destination's control plane releases the source's Done and the data
                # plane reads on: pushes after it are placed (the plane does not know it);
                # a second Done is refused by the control plane's Connection.
                if done:
                    return accepted, "error"
                done, conn.their_done = True, False
            elif isinstance(ev, Request):
                accepted.append(ev)
                conn.send(Pages(ev.id, PageKind.ZERO, ev.offset, ev.count))  # answered whole
            else:
                accepted.append(ev)
    return accepted, "ok"  # pragma: no cover - the b"" chunk ends it


def _agree(outcome: str, ref: str) -> None:
    """The plane refuses what the protocol refuses and reads on through what it accepts."""
    if outcome == "eof" and ref in ("error", "stopped"):
        raise Violation(f"the plane read through a stream the protocol refuses ({ref})")
    if outcome.startswith(("bad-frame", "judged: error")) and ref == "ok":
        raise Violation(f"the plane refused a stream the protocol accepts: {outcome}")


class _Plane:
    """What both C targets share: one plane per input over a socket pair, its loop in a
    thread, the control plane's part played here (notes in, instructions out)."""

    plane: Any
    control: Connection  # the delegated Connection that judges control frames
    received: bytearray  # what the plane sent us

    def converse(
        self, ch: int, peer: socket.socket, case: Case, on_note: Callable[[Any], str | None]
    ) -> str:
        """Send the case's chunks (then EOF) while reading what the plane sends and its
        notes, until a note ends the input: its outcome."""
        chunks = [memoryview(c) for c in case.chunks()]
        poller = select.poll()
        poller.register(peer, select.POLLIN | select.POLLOUT)
        poller.register(self.plane.notes_fd, select.POLLIN)
        shut = False
        while True:
            for fd, ev in poller.poll(1000):
                if fd == self.plane.notes_fd:
                    for note in self.plane.take_notes()[1]:
                        outcome = on_note(note)
                        if outcome is not None:
                            return outcome
                    continue
                if ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    try:
                        data = peer.recv(1 << 20)
                    except BlockingIOError:
                        data = None
                    except OSError:
                        data = b""
                    if data:
                        self.received += data
                    elif data == b"" and not chunks:
                        poller.modify(peer, 0)  # the plane let go of the channel
                if ev & select.POLLOUT:
                    while chunks:
                        try:
                            n = peer.send(chunks[0])
                        except BlockingIOError:
                            break
                        except OSError:
                            chunks.clear()  # the plane closed the channel
                            break
                        chunks[0] = chunks[0][n:]
                        if not chunks[0]:
                            chunks.pop(0)
                    if not chunks and not shut:
                        shut = True
                        peer.shutdown(socket.SHUT_WR)
                        poller.modify(peer, select.POLLIN)

    def judge(self, ch: int) -> Event | str:
        """The held control frame: the protocol's event, or the ProtocolError's outcome."""
        frame = self.plane.held(ch)
        try:
            self.control.receive_data(frame)
            ev = self.control.next_event()
        except ProtocolError as e:
            return "judged: error: " + klass(str(e))
        assert isinstance(ev, (Hello, Welcome, Request, Pages, Error, Done))
        return ev


class DestTarget(_Plane):
    """A ``DestPlane`` on a fresh anonymous region (registered MISSING) and ledger per input,
    one channel attached; the destination's requests (URGENT) made through the plane before
    its loop starts, the handshake's poison list in its ledger. Afterwards every page the
    ledger says is placed must be one the protocol accepted a frame for, with its bytes, and
    no page of the poison list may hold data."""

    def __init__(self) -> None:
        from uffdpoison.kernel import Feature, RegisterMode, Userfaultfd

        self.uffd = Userfaultfd.create(Feature.POISON)
        self._missing, self._minor = RegisterMode.MISSING, RegisterMode.MINOR

    def close(self) -> None:
        self.uffd.close()

    def run(self, case: Case) -> str:
        from uffdpoison.kernel import memory
        from uffdpoison.kernel.ledger import Ledger
        from uffdpoison.kernel.planes import DestPlane, DestRegion

        ch = case.channel
        with (memory.shmem if case.minor else memory.anon)(REGION_PAGES * PS) as m:
            mode, memory_file = self._missing, None
            if case.minor:  # the precopied cache, registered MISSING|MINOR
                m.write(0, b"".join(cached_page(p, PS) for p in range(REGION_PAGES)), alias=True)
                mode, memory_file = mode | self._minor, (m.fd or -1, 0)
            self.uffd.register(m.addr, m.size, mode)
            led = Ledger(self.uffd, m.addr, m.size, PS, memory_file=memory_file)
            try:
                poison = array("Q", [(REGION_FIRST + p) * PS for p in case.poison])
                region = DestRegion(m.addr, m.size, REGION_FIRST * PS, led)
                self.plane = DestPlane(
                    self.uffd.fileno(), PS, DEST_MEM_PAGES * PS, [region], poison
                )
                try:
                    outcome = self._serve(case, ch)
                    ref, why = _reference(case, Side.DESTINATION, DEST_MEM_PAGES * PS)
                    _agree(outcome, why)
                    self._check_pages(case, ref, led, m)
                finally:
                    self.plane.close()
            finally:
                self.uffd.unregister(m.addr, m.size)
                led.close()
        return outcome

    def _serve(self, case: Case, ch: int) -> str:
        ours, peer = socket.socketpair()
        try:
            ours.setblocking(False)
            peer.setblocking(False)
            self.plane.attach(ch, ours.fileno())
            for first, n, _, _ in case.requests:
                rc = self.plane.request(0, first, n, n, digests=case.minor)
                if rc:
                    raise Violation(f"request({first}, {n}) = {rc}")
            self.control = open_pair(Channel(ch), memory_size=DEST_MEM_PAGES * PS)[1]
            self.control.delegate_data()
            self.received = bytearray()
            loop = threading.Thread(target=self.plane.run)
            loop.start()
            try:
                return self.converse(ch, peer, case, lambda note: self._note(ch, note))
            finally:
                self.plane.stop()
                loop.join()
                self._check_requests(case)
        finally:
            ours.close()
            peer.close()

    def _note(self, ch: int, note: Any) -> str | None:
        from uffdpoison.kernel.planes import NoteKind

        if note.kind is NoteKind.CONTROL:
            ev = self.judge(ch)
            if isinstance(ev, Done):  # the product's session: go on
                self.plane.release(ch)
                return None
            return ev if isinstance(ev, str) else f"judged: {type(ev).__name__}"
        if note.kind is NoteKind.BAD_FRAME:
            return "bad-frame: " + klass(note.text)
        if note.kind is NoteKind.EOF:
            return "eof"
        raise Violation(f"unexpected note {note.kind.name}: {note.describe()}")

    def _check_requests(self, case: Case) -> None:
        """What the plane sent: exactly the requests asked for, in order."""
        src = open_pair(Channel(case.channel), memory_size=DEST_MEM_PAGES * PS)[0]
        if self.received:
            src.receive_data(bytes(self.received))
        base = REGION_FIRST * PS
        want = [Request(i, base + f * PS, n, _cached_digests(case, f, n))
                for i, (f, n, _, _) in enumerate(case.requests, 1)]  # fmt: skip
        got = []
        while (ev := src.next_event()) not in (NEED_DATA, CLOSED):
            got.append(ev)
        if got != want:
            raise Violation(f"the plane sent {got}, asked for {want}")

    @staticmethod
    def _check_pages(case: Case, accepted: list[Event], led: Any, m: Any) -> None:
        from uffdpoison.kernel.ledger import PageState

        # The model: the ledger's rules applied to the frames the protocol accepts.
        state = {p: PageState.MISSING for p in range(REGION_PAGES)}
        for p in case.poison:
            state[p] = PageState.POISONED
        content: dict[int, bytes] = {}
        for ev in accepted:
            assert isinstance(ev, Pages)
            for k in range(ev.count):
                p = ev.offset // PS + k - REGION_FIRST
                if p not in state or state[p] in (PageState.PRESENT, PageState.POISONED):
                    continue
                if ev.kind is PageKind.POISONED:
                    state[p] = PageState.POISONED
                elif ev.kind is PageKind.CLEAN:  # MINOR mode: the cached copy, mapped
                    state[p] = PageState.PRESENT
                    content[p] = cached_page(p, PS)
                elif ev.kind in (PageKind.DATA, PageKind.ZERO):
                    state[p] = PageState.PRESENT
                    data = ev.data[k * PS : (k + 1) * PS] if ev.data is not None else None
                    content[p] = bytes(data) if data is not None else bytes(PS)
        for p in range(REGION_PAGES):
            got = led.state(p)
            if p in case.poison and got is not PageState.POISONED:
                raise Violation(f"page {p} of the poison list is {got.name}")
            if got in (PageState.PRESENT, PageState.POISONED) and state[p] is not got:
                raise Violation(f"page {p} is {got.name}: no accepted frame made it so")
            if got is PageState.PRESENT and m.read(p * PS, PS) != content[p]:
                raise Violation(f"page {p} holds other bytes than the accepted frame's")


class SourceTarget(_Plane):
    """A ``SourcePlane`` serving a small in-memory guest (data, zero and poisoned pages), one
    channel per input. Every frame it sends must decode, answer only requests the protocol
    accepted (within their ranges), and carry the guest's truth: POISONED for poisoned pages,
    the right bytes for DATA, CLEAN only where the request's digest matched."""

    def __init__(self) -> None:
        from uffdpoison.kernel.digest import page_digests
        from uffdpoison.source.backends import MemoryBackend

        self.image = source_image()
        self.digests = list(page_digests(self.image, PS))
        self.backend = MemoryBackend(bytearray(self.image), [p * PS for p in SRC_POISONED])

    def close(self) -> None:
        self.backend.close()

    def run(self, case: Case) -> str:
        from uffdpoison.kernel.planes import SourcePlane

        ch = case.channel
        self.plane = SourcePlane(self.backend.guest(), PS, partial_timeout=2.0)
        ours, peer = socket.socketpair()
        try:
            ours.setblocking(False)
            peer.setblocking(False)
            self.plane.attach(ch, ours.fileno())
            self.control = open_pair(Channel(ch), memory_size=SRC_PAGES * PS)[0]
            self.control.delegate_data()
            self.received = bytearray()
            loop = threading.Thread(target=self.plane.run, args=(ch,))
            loop.start()
            try:
                outcome = self.converse(ch, peer, case, lambda note: self._note(ch, note))
            finally:
                self.plane.stop(ch)
                loop.join()
            accepted, why = _reference(case, Side.SOURCE, SRC_PAGES * PS)
            _agree(outcome, why)
            self._check_answers(ch, accepted)
        finally:
            self.plane.close()
            ours.close()
            peer.close()
        return outcome

    def _send(self, ch: int, ev: Event) -> None:
        self.plane.send(ch, b"".join(bytes(b) for b in self.control.send(ev)))

    def _end(self, ch: int, message: str) -> None:
        """The product's SourceSession.end: a fatal Error, then close."""
        with contextlib.suppress(ProtocolError):
            self._send(ch, Error(None, "bad-request", message[: layout.MAX_MESSAGE]))
        self.plane.close_channel(ch)

    def _note(self, ch: int, note: Any) -> str | None:
        from uffdpoison.kernel.planes import NoteKind

        if note.kind is NoteKind.CONTROL:
            ev = self.judge(ch)
            if isinstance(ev, str):
                self._end(ch, ev)
                return ev
            if isinstance(ev, Done) and not self.control.our_done:
                self._send(ch, Done())
            self.plane.close_channel(ch)
            return f"judged: {type(ev).__name__}"
        if note.kind is NoteKind.PUSH_DONE:
            self._send(ch, Done())
            return None
        if note.kind is NoteKind.BAD_FRAME:
            self._end(ch, note.text)
            return "bad-frame: " + klass(note.text)
        if note.kind is NoteKind.EOF:
            return "eof"
        raise Violation(f"unexpected note {note.kind.name}: {note.describe()}")

    def _check_answers(self, ch: int, accepted: list[Event]) -> None:
        """The plane answers each request whole before it reads the next: its replies must
        cover the accepted requests in order, each contiguously."""
        asked = [r for r in accepted if isinstance(r, Request)]
        nxt = asked[0].offset if asked else 0
        sp = FrameSplitter()
        sp.feed(bytes(self.received))
        while (f := sp.next_frame()) is not None:
            try:
                ev = codec.decode(*f)
            except ProtocolError as e:
                raise Violation(f"the plane sent a frame that does not decode: {e}") from None
            if isinstance(ev, (Error, Done)):
                continue  # ours: the control plane's
            if not isinstance(ev, Pages):
                raise Violation(f"the plane sent {type(ev).__name__}")
            req = None
            if ch == Channel.BULK:
                if ev.id != layout.PUSH_ID or ev.kind is PageKind.CLEAN:
                    raise Violation(f"a push {ev}")
            else:
                what = f"Pages {ev.id} {ev.offset}+{ev.count}"
                if not asked:
                    raise Violation(f"{what}: no accepted request")
                req, end = asked[0], ev.offset + ev.count * PS
                if ev.id != req.id or ev.offset != nxt or end > req.offset + req.count * PS:
                    raise Violation(f"{what} does not continue the accepted request {req}")
                nxt = end
                if nxt == req.offset + req.count * PS:
                    asked.pop(0)
                    nxt = asked[0].offset if asked else 0
            for k in range(ev.count):
                self._check_page(ev, k, req)

    def _check_page(self, ev: Pages, k: int, req: Request | None) -> None:
        p = ev.offset // PS + k
        if p in SRC_POISONED:
            want = {PageKind.POISONED}
        elif (
            req is not None
            and req.digests is not None
            and (
                int.from_bytes(req.digests[8 * (p - req.offset // PS) :][:8], "little")
                == self.digests[p]
            )
        ):
            want = {PageKind.CLEAN}
        else:
            want = {PageKind.ZERO if p in SRC_ZERO else PageKind.DATA}
        if ev.kind not in want:
            raise Violation(f"page {p} sent as {ev.kind.name}, is {want}")
        if ev.kind is PageKind.DATA:
            assert ev.data is not None
            if bytes(ev.data[k * PS : (k + 1) * PS]) != self.image[p * PS : (p + 1) * PS]:
                raise Violation(f"page {p} sent with other bytes")


TARGET_CLASSES: dict[str, type] = {
    "protocol": ProtocolTarget,
    "dest": DestTarget,
    "source": SourceTarget,
}
