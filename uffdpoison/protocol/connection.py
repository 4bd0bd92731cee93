"""One channel of a session from one side's point of view: the protocol's rules (h11-style).

``Connection`` turns bytes into events (``receive_data`` + ``next_event``) and events into bytes
(``send``), and owns no socket. Every frame, sent or received, passes the same checks; one
that fails raises ``ProtocolError`` naming the problem and changes nothing.

In the product, trio uses a Connection for the handshake and the control frames, while a C
data plane carries the data frames (docs/DESIGN.md). ``delegate_data()`` says so: from then on
the Connection judges control frames only, and request ids are the data plane's to track.
Tests and the fuzzer use it whole, as the reference of every rule.
"""

from __future__ import annotations

import struct
import sys
from typing import Final

from uffdpoison.protocol import codec, layout
from uffdpoison.protocol.events import (
    CLOSED,
    DATA_EVENTS,
    NEED_DATA,
    Challenge,
    Channel,
    Done,
    Error,
    Event,
    Have,
    Hello,
    PageKind,
    Pages,
    Proof,
    ProtocolError,
    Request,
    Side,
    State,
    Welcome,
    _Sentinel,
)
from uffdpoison.protocol.framing import FrameSplitter


class _Out:
    """One outstanding request: the next byte offset a reply must start at, and its end."""

    __slots__ = ("digests", "end", "next")

    def __init__(self, start: int, end: int, digests: bool) -> None:
        self.next = start
        self.end = end
        self.digests = digests


def check_poison_list(mv: memoryview, page_size: int, memory_size: int) -> None:
    """u64 LE byte offsets, page-aligned, strictly ascending, inside the memory."""
    little = sys.byteorder == "little"
    entries = mv.cast("Q") if little else struct.unpack_from(f"<{len(mv) // 8}Q", mv)
    prev = -1
    for i, off in enumerate(entries):
        if off % page_size:
            raise ProtocolError(f"poison_list[{i}] = {off} is not aligned to page size {page_size}")
        if off <= prev:
            raise ProtocolError(f"poison_list[{i}] = {off} is not above the previous entry {prev}")
        if off >= memory_size:
            raise ProtocolError(f"poison_list[{i}] = {off} is past memory_size {memory_size}")
        prev = off


def _check_version(frame: str, v: int) -> None:
    if v != layout.PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version mismatch: {frame} has {v}, this side speaks "
            f"{layout.PROTOCOL_VERSION}"
        )


def _page_size(frame: str, name: str, v: int, *, allow_zero: bool) -> None:
    if v == 0 and allow_zero:
        return
    if v < layout.BASE_PAGE_SIZE or v & (v - 1) or v > layout.MAX_PAYLOAD:
        raise ProtocolError(
            f"{name} of {frame} must be a power of two in {layout.BASE_PAGE_SIZE}.."
            f"{layout.MAX_PAYLOAD}{' or 0' if allow_zero else ''}, got {v}"
        )


class Connection:
    """``channel`` None (source side only): learnt from the Hello."""

    def __init__(self, side: Side, channel: Channel | None) -> None:
        if not isinstance(side, Side) or not (channel is None or isinstance(channel, Channel)):
            raise TypeError("Connection(side: Side, channel: Channel | None)")
        if channel is None and side is not Side.SOURCE:
            raise TypeError("only the source learns the channel from the Hello")
        self.side: Final = side
        self.channel = channel
        self._state = State.HANDSHAKE
        self.page_size = 0  # known after the Welcome
        self.memory_size = 0
        self.huge_page_size = 0
        self.session: bytes | None = None
        self.hello: Hello | None = None
        self.challenge: Challenge | None = None  # authenticated handshakes only
        self.proof: Proof | None = None
        self.welcome: Welcome | None = None
        self._out: dict[int, _Out] = {}
        self.delegated = False
        self.have_final = False  # the last Have of a resuming BULK channel has passed
        self.our_done = False
        self.their_done = False
        self._our_abort = False
        self._their_abort = False
        self._splitter = FrameSplitter()
        self._failed: ProtocolError | None = None

    # ---------------------------------------------------------------- public state

    @property
    def state(self) -> State:
        return self._state

    @property
    def outstanding(self) -> int:
        """Requests sent (destination) or received (source) not fully answered yet."""
        return len(self._out)

    @property
    def max_data_pages(self) -> int:
        """Most pages one DATA frame may carry at the page size in force."""
        return min(layout.MAX_PAGES, layout.MAX_PAYLOAD // self.page_size) if self.page_size else 0

    @property
    def failed(self) -> ProtocolError | None:
        """The ProtocolError next_event raised, if any (it raises it again on every call)."""
        return self._failed

    @property
    def idle(self) -> bool:
        """Nothing received is waiting: the stream is at a frame boundary."""
        return self._splitter.idle

    @property
    def bytes_wanted(self) -> int:
        """Bytes that would complete the frame being received (a hint for recv sizes)."""
        return self._splitter.bytes_wanted

    def delegate_data(self) -> None:
        """Requests and Pages on this channel now belong to a data plane elsewhere: this
        Connection refuses them and judges only control frames (Error ids are not checked
        against requests it cannot see)."""
        if self._state is not State.OPEN:
            raise ProtocolError("only an open connection can delegate its data frames")
        self.delegated = True
        self._out.clear()

    # ---------------------------------------------------------------- sending

    def send(self, event: Event) -> list[bytes | memoryview]:
        """Validate and encode one event: the header bytes, then the payload (if any) as the
        caller's own view. Write them in order, do not join them."""
        payload = codec.payload_of(event)
        self._validate(event, payload, ours=True)
        parts = codec.encode(event, payload)
        self._apply(event, ours=True)
        return parts

    # ---------------------------------------------------------------- receiving

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes from the transport; b"" means the peer closed (EOF). A failed connection keeps
        nothing more: the stream cannot be resynchronised."""
        if self._failed is None:
            self._splitter.feed(data)

    def next_event(self) -> Event | _Sentinel:
        """The next complete event, NEED_DATA, or CLOSED (the peer's EOF at a frame boundary)."""
        if self._failed is not None:
            raise self._failed
        try:
            frame = self._splitter.next_frame()
            if frame is None:
                if not self._splitter.eof:
                    return NEED_DATA
                self._state = State.CLOSED
                return CLOSED
            header, payload = frame
            event = codec.decode(header, payload)
            self._validate(event, payload, ours=False)
            self._apply(event, ours=False)
            return event
        except ProtocolError as e:
            self._failed = e
            raise

    # ---------------------------------------------------------------- rules

    def _validate(self, ev: Event, payload: memoryview | None, ours: bool) -> None:
        """Check ev against the connection state; raise ProtocolError, never mutate."""
        sender = self.side if ours else self.side.other
        name = type(ev).__name__
        if ours and self._our_abort:
            raise ProtocolError(f"cannot send {name} after our fatal Error")
        if not ours and self._their_abort:
            raise ProtocolError(f"{name} from the peer after its fatal Error")
        if (self.our_done if ours else self.their_done) and not (
            isinstance(ev, Error) and (ev.id is None or sender is Side.SOURCE)
        ):
            raise ProtocolError(f"{name} sent by {sender.value} after its Done")
        if isinstance(ev, Hello):
            self._check_hello(ev, sender)
            return
        if isinstance(ev, Welcome):
            self._check_welcome(ev, payload, sender)
            return
        if isinstance(ev, Challenge | Proof):
            self._check_auth(ev, sender)
            return
        if self.welcome is None:
            if isinstance(ev, Error) and ev.id is None and self.hello is not None:
                return  # the source refuses the Hello, or the destination gives up
            first = "Hello" if self.hello is None else "Welcome"
            raise ProtocolError(f"{name} before the handshake (expected {first})")
        if self.delegated and isinstance(ev, DATA_EVENTS):
            raise ProtocolError(f"{name} on a channel whose data frames a data plane carries")
        if self._awaiting_have() and not isinstance(ev, Have | Error):
            raise ProtocolError(f"{name} before the resuming destination's last Have")
        if isinstance(ev, Have):
            self._check_have(ev, payload, sender)
        elif isinstance(ev, Pages):
            self._check_pages(ev, payload, sender)
        elif isinstance(ev, Request):
            self._check_request(ev, payload, sender)
        elif isinstance(ev, Error):
            if ev.id is not None:
                if sender is not Side.SOURCE:
                    raise ProtocolError("Error with a request id sent by the destination")
                if not self.delegated and ev.id not in self._out:
                    raise ProtocolError(f"Error for unknown request id {ev.id}")
        elif isinstance(ev, Done) and self.channel is not Channel.BULK:
            raise ProtocolError("Done on the URGENT channel")

    def _check_hello(self, ev: Hello, sender: Side) -> None:
        if sender is not Side.DESTINATION:
            raise ProtocolError("Hello sent by the source (only the destination sends it)")
        if self.hello is not None:
            raise ProtocolError("duplicate Hello")
        _check_version("Hello", ev.version)
        if self.channel is not None and ev.channel is not self.channel:
            raise ProtocolError(
                f"Hello for the {ev.channel.name} channel on the {self.channel.name} channel"
            )
        if ev.channel is Channel.URGENT and ev.session is not None:
            raise ProtocolError("Hello on the URGENT channel must have session None")
        if ev.channel is Channel.BULK and ev.session is None:
            raise ProtocolError("Hello on the BULK channel must carry a session token")
        if ev.resume and ev.channel is not Channel.BULK:
            raise ProtocolError("Hello with resume on the URGENT channel (it is BULK's)")
        if ev.auth is not None and len(ev.auth) != layout.AUTH_NONCE:
            raise ProtocolError(
                f"Hello auth nonce is {len(ev.auth)} bytes, expected {layout.AUTH_NONCE}"
            )
        if ev.epoch is not None and ev.channel is not Channel.URGENT:
            raise ProtocolError("Hello with an epoch on the BULK channel (it is URGENT's)")
        if ev.epoch and len(ev.epoch) != layout.EPOCH:
            raise ProtocolError(f"Hello epoch is {len(ev.epoch)} bytes, expected {layout.EPOCH}")
        _page_size("Hello", "page_size", ev.page_size, allow_zero=True)

    def _check_auth(self, ev: Challenge | Proof, sender: Side) -> None:
        """Hello(auth) → Challenge (source) → Proof (destination) → Welcome."""
        name, want = (
            type(ev).__name__,
            Side.SOURCE if isinstance(ev, Challenge) else Side.DESTINATION,
        )
        if sender is not want:
            raise ProtocolError(
                f"{name} sent by the {sender.value} (only the {want.value} sends it)"
            )
        if self.hello is None or self.hello.auth is None:
            raise ProtocolError(f"{name} without a Hello asking to authenticate")
        if self.welcome is not None or self.proof is not None:
            raise ProtocolError(f"{name} after the handshake was authenticated")
        if isinstance(ev, Challenge) and self.challenge is not None:
            raise ProtocolError("duplicate Challenge")
        if isinstance(ev, Proof) and self.challenge is None:
            raise ProtocolError("Proof before the source's Challenge")

    def _check_welcome(self, ev: Welcome, payload: memoryview | None, sender: Side) -> None:
        if sender is not Side.SOURCE:
            raise ProtocolError("Welcome sent by the destination (only the source sends it)")
        if self.hello is None:
            raise ProtocolError("Welcome before the Hello")
        if self.welcome is not None:
            raise ProtocolError("duplicate Welcome")
        if self.hello.auth is not None and self.proof is None:
            raise ProtocolError(
                "Welcome to a Hello that asked to authenticate, before the Proof (an "
                "unauthenticated source)"
            )
        _check_version("Welcome", ev.version)
        if ev.epoch is not None and (self.hello.epoch is None or ev.epoch != (
                self.hello.epoch or ev.epoch)):  # fmt: skip
            raise ProtocolError("Welcome epoch that answers no epoch the Hello named")
        _page_size("Welcome", "page_size", ev.page_size, allow_zero=False)
        if self.hello.page_size and ev.page_size != self.hello.page_size:
            raise ProtocolError(
                f"Welcome page_size {ev.page_size} differs from the {self.hello.page_size} "
                "the Hello asked for"
            )
        if ev.huge_page_size:
            _page_size("Welcome", "huge_page_size", ev.huge_page_size, allow_zero=False)
        if not ev.memory_size or ev.memory_size % ev.page_size:
            raise ProtocolError(
                f"Welcome memory_size {ev.memory_size} is not a positive multiple of "
                f"page_size {ev.page_size}"
            )
        if self.hello.session is not None and ev.session != self.hello.session:
            raise ProtocolError("Welcome on the BULK channel names another session")
        if ev.poisoned_count > ev.memory_size // ev.page_size:
            raise ProtocolError(
                f"Welcome poisoned_count {ev.poisoned_count} exceeds the number of pages"
            )
        if ev.poison_list is not None:
            if not self.hello.want_poison_list:
                raise ProtocolError("Welcome carries a poison list the Hello did not want")
            n = 0 if payload is None else payload.nbytes
            if n != 8 * ev.poisoned_count:
                raise ProtocolError(
                    f"Welcome poison_list is {n} bytes, expected 8 * poisoned_count = "
                    f"{8 * ev.poisoned_count}"
                )
            if payload is not None:
                check_poison_list(payload, ev.page_size, ev.memory_size)

    def _check_range(self, name: str, offset: int, count: int) -> None:
        ps = self.page_size
        if offset % ps:
            raise ProtocolError(f"{name} offset {offset} is not aligned to page size {ps}")
        if not 1 <= count <= layout.MAX_PAGES:
            raise ProtocolError(f"{name} count {count} outside 1..{layout.MAX_PAGES}")
        if offset + count * ps > self.memory_size:
            raise ProtocolError(
                f"{name} range {offset}+{count}*{ps} runs past memory_size {self.memory_size}"
            )

    def _check_pages(self, ev: Pages, payload: memoryview | None, sender: Side) -> None:
        if sender is not Side.SOURCE:
            raise ProtocolError("Pages sent by the destination (only the source sends it)")
        self._check_range("Pages", ev.offset, ev.count)
        n = 0 if payload is None else payload.nbytes
        if ev.kind is PageKind.DATA:
            if n != ev.count * self.page_size:
                raise ProtocolError(
                    f"DATA payload is {n} bytes, expected count * page_size = "
                    f"{ev.count * self.page_size}"
                )
        elif n:
            raise ProtocolError(f"{ev.kind.name} Pages must carry no payload")
        if ev.id == layout.PUSH_ID:
            if self.channel is not Channel.BULK:
                raise ProtocolError("a push (Pages id 0) on the URGENT channel")
            if ev.kind is PageKind.CLEAN:
                raise ProtocolError("a push cannot be CLEAN (nothing was asked)")
            return
        if self.channel is not Channel.URGENT:
            raise ProtocolError(f"Pages reply (id {ev.id}) on the BULK channel")
        out = self._out.get(ev.id)
        if out is None:
            raise ProtocolError(f"Pages reply for unknown request id {ev.id}")
        if ev.offset != out.next:
            what = "overlaps what was already answered" if ev.offset < out.next else "skips pages"
            raise ProtocolError(
                f"Pages reply for id {ev.id} at offset {ev.offset} {what} "
                f"(next expected offset {out.next})"
            )
        if ev.offset + ev.count * self.page_size > out.end:
            raise ProtocolError(f"Pages reply for id {ev.id} runs past the end of its request")
        if ev.kind is PageKind.CLEAN and not out.digests:
            raise ProtocolError(f"CLEAN reply for id {ev.id}, whose request had no digests")

    def _awaiting_have(self) -> bool:
        """A resuming BULK channel before its last Have: nothing else but an Error."""
        return bool(self.hello and self.hello.resume) and not self.have_final

    def _check_have(self, ev: Have, payload: memoryview | None, sender: Side) -> None:
        if sender is not Side.DESTINATION:
            raise ProtocolError("Have sent by the source (only the destination sends it)")
        if not self._awaiting_have():
            raise ProtocolError("Have without a Hello asking to resume, or after the last Have")
        ps = self.page_size
        if ev.offset % ps:
            raise ProtocolError(f"Have offset {ev.offset} is not aligned to page size {ps}")
        if not ev.count or ev.offset + ev.count * ps > self.memory_size:
            raise ProtocolError(
                f"Have range {ev.offset}+{ev.count}*{ps} is empty or runs past memory_size "
                f"{self.memory_size}"
            )
        n = 0 if payload is None else payload.nbytes
        if n != (ev.count + 7) // 8:
            raise ProtocolError(f"Have bitmap is {n} bytes, expected {(ev.count + 7) // 8}")

    def _check_request(self, ev: Request, payload: memoryview | None, sender: Side) -> None:
        if sender is not Side.DESTINATION:
            raise ProtocolError("Request sent by the source (only the destination sends it)")
        if self.channel is not Channel.URGENT:
            raise ProtocolError("Request on the BULK channel (requests go on URGENT)")
        if ev.id == layout.PUSH_ID:
            raise ProtocolError(f"Request id {layout.PUSH_ID} is reserved for the push")
        self._check_range("Request", ev.offset, ev.count)
        if payload is not None and payload.nbytes != 8 * ev.count:
            raise ProtocolError(
                f"Request digests are {payload.nbytes} bytes, expected 8 * count = {8 * ev.count}"
            )
        if ev.id in self._out:
            raise ProtocolError(f"duplicate request id {ev.id} (still outstanding)")

    def _apply(self, ev: Event, ours: bool) -> None:
        """Record a validated event's effect on the connection state."""
        if isinstance(ev, Pages):
            if ev.id != layout.PUSH_ID:
                out = self._out[ev.id]
                out.next += ev.count * self.page_size
                if out.next == out.end:
                    del self._out[ev.id]
        elif isinstance(ev, Request):
            end = ev.offset + ev.count * self.page_size
            self._out[ev.id] = _Out(ev.offset, end, ev.digests is not None)
        elif isinstance(ev, Have):
            self.have_final = ev.final
        elif isinstance(ev, Challenge):
            self.challenge = ev
        elif isinstance(ev, Proof):
            self.proof = ev
        elif isinstance(ev, Hello):
            self.hello = ev
            self.channel = ev.channel
        elif isinstance(ev, Welcome):
            self.welcome = ev
            self.session = ev.session
            self.page_size = ev.page_size
            self.memory_size = ev.memory_size
            self.huge_page_size = ev.huge_page_size
            self._state = State.OPEN
        elif isinstance(ev, Error):
            if ev.id is not None:
                self._out.pop(ev.id, None)
            else:
                if ours:
                    self._our_abort = True
                else:
                    self._their_abort = True
                self._state = State.ABORTED
        elif isinstance(ev, Done):
            if ours:
                self.our_done = True
            else:
                self.their_done = True
            if self.our_done and self.their_done and self._state is State.OPEN:
                self._state = State.DONE


def open_pair(
    channel: Channel = Channel.URGENT,
    memory_size: int = 1 << 30,
    page_size: int = layout.BASE_PAGE_SIZE,
) -> tuple[Connection, Connection]:
    """A handshaken (source, destination) pair, for tests and benchmarks."""
    src, dst = Connection(Side.SOURCE, None), Connection(Side.DESTINATION, channel)
    session = b"test-session" if channel is Channel.BULK else None
    for data in dst.send(Hello(layout.PROTOCOL_VERSION, channel, session)):
        src.receive_data(data)
    src.next_event()
    welcome = Welcome(layout.PROTOCOL_VERSION, b"test-session", page_size, memory_size, 0, 0, None)
    for data in src.send(welcome):
        dst.receive_data(data)
    dst.next_event()
    return src, dst
