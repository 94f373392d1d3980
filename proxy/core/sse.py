"""Server-sent event framing (pure): a stream's chunks split into events, an event read
into its name and data.

An OpenAI stream's completed-image event carries megabytes of base64 on one `data:`
line, arriving over hundreds of chunks: events are found from their line feeds with
`find` (memchr), held in the parts they came in and read without joining them whole.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any


def error_event(error: Mapping[str, Any], *, inside: bool, **beside: Any) -> bytes:
    """An `error` event whose data carries `error` (OpenAI's error shape), which the
    official SDKs raise as an `APIError`, with the fields `beside` it. When the stream
    stopped `inside` an event, that event is ended first (its reader then fails on it,
    which fails the stream too)."""
    data = json.dumps({"type": "error", **beside, "error": error}, separators=(",", ":"))
    return (b"\n\n" if inside else b"") + b"event: error\ndata: " + data.encode() + b"\n\n"


def sse_event(raw: bytes) -> tuple[bytes, bytes | None]:
    """One server-sent event's name and data (its `data:` lines joined; None without any).

    Its lines are found with `find` (memchr), and a line's data is copied once: the data
    line of a completed image is megabytes. An event with a carriage return takes the
    general path (`splitlines`)."""
    if b"\r" in raw:
        return _sse_lines(raw.splitlines())
    name = b""
    data: list[bytes] = []
    at, size = 0, len(raw)
    while at < size:
        end = raw.find(b"\n", at)
        end = size if end < 0 else end
        if raw.startswith(b"data:", at):
            first = at + 5
            while first < end and raw[first] == SPACE:
                first += 1
            data.append(raw[first:end])
        elif raw.startswith(b"event:", at):
            name = raw[at + 6 : end].strip()
        at = end + 1
    return name, b"\n".join(data) if data else None


SPACE = ord(" ")
DONE = b"[DONE]"


def sse_event_parts(parts: list[bytes]) -> tuple[bytes, list[bytes] | None, int]:
    """`sse_event` of the event `b"".join(parts)`: its name, and its data in pieces that
    join into it once the first is read from the index given last
    (`b"".join(pieces)[start:]`; None without data).

    An event whose last line, a data line, runs on over several parts (a completed image's
    megabytes of base64 arriving in chunks) is read without joining them: its pieces are
    the parts themselves, the first read from where its data begins (`run_on_data`; a
    slice would copy it). Any other event is joined and read by `sse_event`.

    `parts` are an event as `EventSplitter.feed_parts` gives it: no part after the first
    has a line feed, and no part of an event in several has a carriage return (a line end
    too), so none is searched for one: their megabytes were searched as they arrived."""
    if len(parts) > 1:
        first, rest = parts[0], parts[1:]
        found = run_on_data(first)
        if found is not None:
            name, start = found
            if start < len(first):
                return name, [first, *(part for part in rest if part)], start
            pieces: list[bytes] = []
            for piece in rest:
                if not pieces:
                    piece = piece.lstrip(b" ")  # as sse_event strips the data's spaces
                if piece:
                    pieces.append(piece)
            return name, pieces, 0
    name, data = sse_event(b"".join(parts))
    return name, None if data is None else [data], 0


def run_on_data(first: bytes) -> tuple[bytes, int] | None:
    """The name of an event whose first part `first` ends inside its only data line, and
    where in `first` that data begins (past `data:` and its spaces); None for any other.
    The event's later parts (as `EventSplitter.feed_parts` gives them) go on with it."""
    line = first.rfind(b"\n") + 1  # the start of the line that runs on
    if not first.startswith(b"data:", line):
        return None
    name, earlier = sse_event(first[:line])
    if earlier is not None:
        return None
    start = line + 5
    while start < len(first) and first[start] == SPACE:
        start += 1  # as sse_event strips the data's spaces
    return name, start


def _sse_lines(lines: list[bytes]) -> tuple[bytes, bytes | None]:
    name = b""
    data: list[bytes] = []
    for line in lines:
        if line.startswith(b"event:"):
            name = line[6:].strip()
        elif line.startswith(b"data:"):
            data.append(line[5:].lstrip(b" "))
    return name, b"\n".join(data) if data else None


def event_end(buffer: bytes | bytearray, start: int = 0) -> tuple[int, int]:
    """Index and length of the first event separator (a blank line: `\\n\\n` or
    `\\r\\n\\r\\n`) in `buffer` from `start`. Found from its line feeds (memchr): the
    base64 of an image has none, so a 2 MB event is one fast scan."""
    at = buffer.find(b"\n", start)
    while at >= 0:
        if at >= 1 and buffer[at - 1 : at + 3] == b"\r\n\r\n":
            return at - 1, 4
        if buffer[at + 1 : at + 2] == b"\n":
            return at, 2
        at = buffer.find(b"\n", at + 1)
    return -1, 0


EDGE = 3
"""A separator (4 bytes at most) that a chunk completes begins at most this many bytes
before the chunk."""


class EventSplitter:
    """A server-sent event stream's chunks in, its events (the bytes before each blank
    line) out.

    Each chunk is searched once for a separator, and only when it has a line feed (memchr):
    a completed image's event of megabytes arriving in hundreds of chunks would otherwise
    be searched from its start at each one (41 ms for 2 MB in 64 KiB chunks, 578 ms in
    4 KiB chunks). The chunks of an unfinished event are held as they came and joined once,
    when it ends: one copy of the event, where growing one buffer copies it again and again
    as it grows."""

    def __init__(self) -> None:
        self._held: list[bytes] = []
        self._edge = b""  # the last EDGE bytes held, where a separator may begin
        self._joined = False
        """The event held is to be given in one part: a part held after its first has a
        line feed, or one has a carriage return."""

    def feed(self, chunk: bytes) -> list[bytes]:
        """The events `chunk` completes, in order."""
        return [b"".join(parts) for parts in self.feed_parts(chunk)]

    def feed_parts(self, chunk: bytes) -> list[list[bytes]]:
        """The events `chunk` completes, in order, each in the parts it came in (joined,
        they are the event): a long event is not copied whole. No part after an event's
        first has a line feed, and no part of an event in several a carriage return (an
        event whose parts would is given joined, in one part): `sse_event_parts` need not
        search them for one. Each part is searched for a carriage return as it comes, while
        its bytes are still in the CPU's caches, not once the whole event has come."""
        # The first line feed, found once: where the search for a separator starts, and
        # whether the part before one has a line feed (the chunk's last part is its
        # megabytes of base64 then, searched once, not three times).
        line = chunk.find(b"\n")
        if line < 0:  # no separator can end in it
            self._hold(chunk)
            return []
        events: list[list[bytes]] = []
        at = 0
        if self._held:
            edge = self._edge
            end, sep = event_end(edge + chunk[:EDGE])
            if 0 <= end < len(edge):  # a separator that began in what was held
                held = b"".join(self._held)
                events.append([held[: len(held) - len(edge) + end]])
                at = end + sep - len(edge)
            else:
                end, sep = event_end(chunk, line)
                if end < 0:
                    self._joined = True  # held after the first, with a line feed
                    self._hold(chunk)
                    return []
                parts = [*self._held, chunk[:end]] if end else self._held
                # A separator's first line feed is at `end` (`\n\n`) or just after it
                # (`\r\n\r\n`): any before it is the chunk's first.
                if self._joined or line < end or chunk.find(b"\r", 0, end) >= 0:
                    parts = [b"".join(parts)]
                events.append(parts)
                at = end + sep
            self._held, self._edge, self._joined = [], b"", False
        # No separator's line feed comes before the chunk's first.
        while (found := event_end(chunk, max(at, line)))[0] >= 0:
            end, sep = found
            events.append([chunk[at:end]])
            at = end + sep
        if at < len(chunk):
            self._hold(chunk[at:] if at else chunk)
        return events

    def _hold(self, data: bytes) -> None:
        if data:
            self._joined = self._joined or b"\r" in data
            self._held.append(data)
            self._edge = data[-EDGE:] if len(data) >= EDGE else (self._edge + data)[-EDGE:]

    @property
    def held(self) -> Sequence[bytes]:
        """The parts of the event begun and not ended, as they came: the first parts of
        that event when `feed_parts` gives it in several."""
        return self._held

    @property
    def inside(self) -> bool:
        """An event has begun and not ended: the stream stopped now would cut it."""
        return bool(self._held)

    def rest(self) -> bytes:
        """What came after the last separator (the stream ended); nothing is held after."""
        rest = b"".join(self._held)
        self._held, self._edge, self._joined = [], b"", False
        return rest
