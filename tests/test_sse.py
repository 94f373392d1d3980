"""Server-sent event framing: events split out of any chunking, an event's name and data."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from proxy.core.sse import EventSplitter, sse_event, sse_event_parts


def chunks(data: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


MIXED = b"event: a\n\ndata: 1\r\n\r\nevent: b\ndata: 2\n\n\n\ndata: 3\r\n\r\n: comment\n\n"


@pytest.mark.parametrize("size", [1, 2, 3, 5, 1 << 30])
def test_event_splitter_finds_every_separator_whatever_the_chunks(size: int) -> None:
    splitter = EventSplitter()
    found = [e for chunk in chunks(MIXED, size) for e in splitter.feed(chunk)]
    assert found == [b"event: a", b"data: 1", b"event: b\ndata: 2", b"", b"data: 3", b": comment"]
    assert splitter.rest() == b""


def test_event_splitter_keeps_what_follows_the_last_separator() -> None:
    splitter = EventSplitter()
    assert splitter.feed(b"data: 1\n\ndata: 2\r\n\r") == [b"data: 1"]
    assert splitter.rest() == b"data: 2\r\n\r"
    assert splitter.rest() == b""


@pytest.mark.parametrize("cr", [0, 1, 2], ids=["first", "middle", "last"])
def test_an_event_in_several_parts_with_a_carriage_return_is_given_joined(cr: int) -> None:
    # A carriage return ends a line: the parts are searched for one as they come, and an
    # event holding one is read whole (the data is `a`, then a line `b...` that is no field).
    pieces = [b"data: a", b"aa", b"aa"]
    pieces[cr] += b"\rb"
    splitter = EventSplitter()
    events = [e for piece in [*pieces, b"\n\n"] for e in splitter.feed_parts(piece)]
    assert events == [[b"".join(pieces)]]
    assert sse_event_parts(events[0]) == (b"", [b"a" + b"aa" * cr], 0)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"event: x.completed\ndata: {}", (b"x.completed", b"{}")),
        (b"data:a\ndata:   b\ndata:", (b"", b"a\nb\n")),
        (b"event:  padded \n: comment", (b"padded", None)),
        (b"event: y\r\ndata: 1\r\ndata: 2", (b"y", b"1\n2")),
        (b"event: z\rdata: 3", (b"z", b"3")),
    ],
)
def test_sse_event_reads_name_and_data_lines(raw: bytes, expected: tuple[bytes, bytes]) -> None:
    assert sse_event(raw) == expected


class Searched(bytes):
    """Bytes that count how many of them are searched for a line feed."""

    line_feeds = 0

    def __contains__(self, sub: object) -> bool:
        return isinstance(sub, bytes) and self.find(sub) >= 0

    def find(self, sub: bytes, start: int | None = None, end: int | None = None) -> int:  # type: ignore[override]
        at = super().find(sub, start, end)
        if sub == b"\n":
            first = start or 0
            last = len(self) if end is None else min(end, len(self))
            Searched.line_feeds += (at + 1 if at >= 0 else last) - first
        return at


@pytest.mark.parametrize("held", [False, True], ids=["whole", "ending"])
def test_a_chunk_is_searched_once_for_line_feeds(held: bool) -> None:
    # A completed image's last chunk: megabytes of base64, then its event's blank line.
    splitter = EventSplitter()
    first = b'event: image_generation.completed\ndata: {"b64_json":"'
    if held:
        assert splitter.feed_parts(first) == []
    chunk = Searched((b"" if held else first) + b"A" * 100_000 + b'"}\n\nevent: next')
    Searched.line_feeds = 0
    (event,) = splitter.feed_parts(chunk)
    assert b"".join(event) == first + b"A" * 100_000 + b'"}'
    assert Searched.line_feeds <= len(chunk)
