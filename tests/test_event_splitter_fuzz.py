"""`EventSplitter` against the plainest splitter there is, on generated streams and chunks.

The oracle grows one buffer and searches it from the start for each separator: slow, but
plainly right. Any chunking of any stream must give its events and the same rest, and
each event read from its parts (`sse_event_parts`) what `sse_event` reads from it whole.
"""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.core.sse import EventSplitter, event_end, sse_event, sse_event_parts

FUZZ = settings(
    max_examples=500,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Line ends of every kind and little else: separators, near misses, and runs of them.
streams = st.lists(st.sampled_from([b"a", b"data: 1", b"\r", b"\n", b"\r\n", b"\n\n"])).map(
    b"".join
)


def oracle(stream: bytes) -> tuple[list[bytes], bytes]:
    buffer = bytearray(stream)
    events = []
    while (found := event_end(buffer))[0] >= 0:
        end, sep = found
        events.append(bytes(buffer[:end]))
        del buffer[: end + sep]
    return events, bytes(buffer)


@FUZZ
@given(streams, st.lists(st.integers(0, 200), max_size=12))
def test_any_chunking_gives_the_events_of_the_whole_stream(stream: bytes, cuts: list[int]) -> None:
    points = sorted(min(cut, len(stream)) for cut in cuts)
    splitter = EventSplitter()
    events = []
    for a, b in itertools.pairwise([0, *points, len(stream)]):
        events += splitter.feed(stream[a:b])
    assert (events, splitter.rest()) == oracle(stream)


# Events as OpenAI sends them, and lines that are almost theirs.
lines = st.lists(
    st.sampled_from(
        [b"data:", b"data: ", b"data:  {", b"event: x", b"event:", b"event: y.partial_image",
         b": c", b"dat", b"a", b" ", b'"', b"\r", b"\n", b"\r\n", b"\n\n", b"\r\n\r\n"]
    )
).map(b"".join)  # fmt: skip


@FUZZ
@given(lines, st.lists(st.integers(0, 200), max_size=12))
def test_an_event_read_from_its_parts_is_the_event_read_whole(
    stream: bytes, cuts: list[int]
) -> None:
    points = sorted(min(cut, len(stream)) for cut in cuts)
    splitter = EventSplitter()
    read = []
    for a, b in itertools.pairwise([0, *points, len(stream)]):
        events = splitter.feed_parts(stream[a:b])
        # What sse_event_parts counts on: no part after an event's first has a line feed,
        # and no part of an event in several a carriage return.
        assert not any(b"\n" in part for parts in events for part in parts[1:])
        assert not any(b"\r" in part for parts in events if len(parts) > 1 for part in parts)
        read += [sse_event_parts(parts) for parts in events]
    whole = [sse_event(event) for event in oracle(stream)[0]]
    assert [
        (name, None if data is None else b"".join(data)[start:]) for name, data, start in read
    ] == whole
