"""A byte stream split into frames as it arrives (receive side of a ``Connection``).

Each payload is copied exactly once, from the chunk given into the buffer the frame keeps; the
chunk is not kept, so a transport may reuse its receive buffer. A framing error (bad prefix,
oversize) is raised in its turn, after the frames before it.
"""

from __future__ import annotations

from collections import deque

from uffdpoison.protocol import layout
from uffdpoison.protocol.codec import PREFIX, prefix_problem
from uffdpoison.protocol.events import ProtocolError

Frame = tuple[bytes, memoryview | None]  # header, payload


class FrameSplitter:
    def __init__(self) -> None:
        self._frames: deque[tuple[bytes, bytearray | None]] = deque()
        self._stash = bytearray()  # a prefix or header split across chunks
        # header, payload so far, its announced length: the buffer grows with the bytes that
        # arrive, so a prefix announcing MAX_PAYLOAD costs nothing until the peer sends them
        self._pending: tuple[bytes, bytearray, int] | None = None
        self._error: ProtocolError | None = None
        self.eof = False

    @property
    def idle(self) -> bool:
        """Nothing received is waiting: no whole frame, no part of one, no framing error."""
        return (
            not self._frames
            and not self._stash
            and self._pending is None
            and self._error is None
            and not self.eof
        )

    @property
    def bytes_wanted(self) -> int:
        """Bytes that would complete the frame being received (or the next prefix)."""
        if self._pending is not None:
            return self._pending[2] - len(self._pending[1])
        have = len(self._stash)
        if have < layout.PREFIX_SIZE:
            return layout.PREFIX_SIZE - have
        _, hl, pl = PREFIX.unpack_from(self._stash)
        return layout.PREFIX_SIZE + hl + pl - have

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes from the stream; b"" is the peer's EOF."""
        if self.eof:
            if data:
                raise ProtocolError("data received after EOF")
            return
        if not data:
            self.eof = True
            return
        if self._error is not None:
            return  # the stream cannot be resynchronised: drop the rest
        mv = data if isinstance(data, memoryview) else memoryview(data)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        pos, n = 0, mv.nbytes
        while pos < n:
            if self._pending is not None:
                header, buf, pl = self._pending
                take = min(pl - len(buf), n - pos)
                buf += mv[pos : pos + take]
                pos += take
                if len(buf) == pl:
                    self._frames.append((header, buf))
                    self._pending = None
                continue
            stash = self._stash
            if not stash and n - pos >= layout.PREFIX_SIZE:
                # Common case: the prefix (usually the whole frame) is in this chunk.
                magic, hl, pl = PREFIX.unpack_from(mv, pos)
                if self._bad_prefix(magic, hl, pl):
                    return
                start = pos + layout.PREFIX_SIZE + hl
                if start <= n:
                    header = bytes(mv[pos + layout.PREFIX_SIZE : start])
                    if pl == 0:
                        self._frames.append((header, None))
                        pos = start
                    elif start + pl <= n:
                        self._frames.append((header, bytearray(mv[start : start + pl])))
                        pos = start + pl
                    else:
                        self._start_payload(header, pl)
                        pos = start
                    continue
            # Prefix or header split across chunks: gather them in the stash.
            if len(stash) < layout.PREFIX_SIZE:
                take = min(layout.PREFIX_SIZE - len(stash), n - pos)
                stash += mv[pos : pos + take]
                pos += take
                if len(stash) < layout.PREFIX_SIZE:
                    return
                if self._bad_prefix(*PREFIX.unpack_from(stash)):
                    return
            _, hl, pl = PREFIX.unpack_from(stash)
            take = min(layout.PREFIX_SIZE + hl - len(stash), n - pos)
            stash += mv[pos : pos + take]
            pos += take
            if len(stash) == layout.PREFIX_SIZE + hl:
                header = bytes(stash[layout.PREFIX_SIZE :])
                stash.clear()
                if pl == 0:
                    self._frames.append((header, None))
                else:
                    self._start_payload(header, pl)

    def _bad_prefix(self, magic: bytes, hl: int, pl: int) -> bool:
        problem = prefix_problem(magic, hl, pl)
        if problem is None:
            return False
        self._error = ProtocolError(problem)
        self._stash.clear()
        return True

    def _start_payload(self, header: bytes, pl: int) -> None:
        self._pending = (header, bytearray(), pl)

    def next_frame(self) -> Frame | None:
        """The next whole frame, or None (need more data, or EOF at a frame boundary: see
        ``eof``). Raises the framing error, or a truncation at EOF."""
        if self._frames:
            header, payload = self._frames.popleft()
            return header, None if payload is None else memoryview(payload)
        if self._error is not None:
            raise self._error
        if not self.eof:
            return None
        if self._pending is not None:
            raise ProtocolError(
                f"truncated frame at EOF: payload has {len(self._pending[1])} of "
                f"{self._pending[2]} bytes"
            )
        if len(self._stash) >= layout.PREFIX_SIZE:
            _, hl, _ = PREFIX.unpack_from(self._stash)
            raise ProtocolError(
                f"truncated frame at EOF: header has {len(self._stash) - layout.PREFIX_SIZE} of "
                f"{hl} bytes"
            )
        if self._stash:
            raise ProtocolError(
                f"truncated frame at EOF: prefix has {len(self._stash)} of "
                f"{layout.PREFIX_SIZE} bytes"
            )
        return None
