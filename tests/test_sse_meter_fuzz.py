"""`SseMeter` fed a stream in any chunks meters what it meters from the stream whole.

A long event's data is filtered part by part as its parts come (`DataSoFar`), and read
from its parts at its end otherwise: every chunking must give the same usage, counts and
error, for events OpenAI sends and for mangled ones (carriage returns, a number too long,
escapes, `[DONE]`, partial images, a stream cut inside an event).
"""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.core.metering import SseMeter
from proxy.core.short_strings import LONG_NUMBER

FUZZ = settings(
    max_examples=500,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

USAGE = {"input_tokens": 50, "output_tokens": 272, "total_tokens": 322}


def completed(b64: str, usage: object = USAGE) -> bytes:
    data = {"type": "image_generation.completed", "b64_json": b64, "usage": usage}
    return b"data: " + json.dumps(data).encode()


EVENTS = [
    b"event: image_generation.completed\n" + completed("QUJD" * 400),
    b"event: image_generation.completed\n" + completed("QUJD" * 400).replace(b"data: ", b"data:"),
    completed("QUJD" * 300, {**USAGE, "input_tokens": 7}),
    completed("QU\\u0042D" * 300),
    completed("QUJD" * 300).replace(b"QUJD", b"QU\rJD", 1),
    completed("QUJD" * 300, {"input_tokens": int("9" * (LONG_NUMBER + 1)), "output_tokens": 1}),
    completed("QUJD" * 300, {"input_tokens": "x", "output_tokens": 1}),
    b"event: image_generation.partial_image\ndata: " + b'{"b64_json": "' + b"QUJD" * 300 + b'"}',
    b'data: {"type": "image_generation.partial_image", "b64_json": "' + b"QUJD" * 300 + b'"}',
    b'event: error\ndata: {"type": "error", "error": {"message": "' + b"m" * 2000 + b'"}}',
    b"data: [DONE]",
    b"data: [DO",
    b": comment",
    b"data:      ",
    b"data: {not json " + b"x" * 2000,
]


def metered(meter: SseMeter) -> tuple[object, ...]:
    return (meter.usage, meter.completed, meter.partials, meter.unreadable, meter.unmetered,
            meter.error)  # fmt: skip


def meter(chunks: list[bytes]) -> tuple[object, ...]:
    sse = SseMeter()
    for chunk in chunks:
        sse.feed(chunk)
    sse.finish()
    return metered(sse)


@FUZZ
@given(
    st.lists(st.sampled_from(EVENTS), max_size=5),
    st.sampled_from([b"\n\n", b"\r\n\r\n"]),
    st.booleans(),
    st.lists(st.integers(0, 12_000), max_size=20),
)
def test_any_chunking_meters_what_the_whole_stream_meters(
    events: list[bytes], separator: bytes, cut_short: bool, cuts: list[int]
) -> None:
    stream = b"".join(event + separator for event in events)
    if cut_short and stream:
        stream = stream[: len(stream) - 1 - len(separator)]
    points = sorted(min(cut, len(stream)) for cut in cuts)
    pieces = [stream[a:b] for a, b in itertools.pairwise([0, *points, len(stream)])]
    assert meter(pieces) == meter([stream])


SHORT = [b"data: [DONE]", b"data:  [DONE]", b"data:[DO", b"data:", b'data: {"type": "error"}']


@pytest.mark.parametrize("event", SHORT)
def test_a_short_event_cut_at_any_two_bytes_meters_as_whole(event: bytes) -> None:
    stream = event + b"\n\n"
    whole = meter([stream])
    for a in range(len(stream) + 1):
        for b in range(a, len(stream) + 1):
            assert meter([stream[:a], stream[a:b], stream[b:]]) == whole, (a, b)
