"""Usage out of upstream answers: OpenAI's usage object, JSON bodies in chunks, SSE streams."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from proxy.core.errors import MalformedAnswer
from proxy.core.metering import MAX_TOKENS, SMALL_BODY, BodyMeter, SseMeter, usage_from_openai
from proxy.core.models import Usage
from proxy.core.short_strings import LONG_NUMBER

USAGE = {
    "input_tokens": 50,
    "input_tokens_details": {"text_tokens": 20, "image_tokens": 30},
    "output_tokens": 7024,
    "total_tokens": 7074,
}


def chunks(data: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


# --- usage_from_openai --------------------------------------------------------------------------


def test_usage_without_output_details_counts_all_output_as_image_output() -> None:
    assert usage_from_openai(USAGE) == Usage(text_input=20, image_input=30, image_output=7024)


def test_usage_with_output_details_splits_image_and_text_output() -> None:
    raw = {**USAGE, "output_tokens": 4260}
    raw["output_tokens_details"] = {"image_tokens": 4160, "text_tokens": 100}
    assert usage_from_openai(raw) == Usage(
        text_input=20, image_input=30, image_output=4160, text_output=100
    )


def test_output_above_its_details_is_unclassified_not_lost() -> None:
    raw = {**USAGE, "output_tokens": 4300}
    raw["output_tokens_details"] = {"image_tokens": 4160, "text_tokens": 100}
    assert usage_from_openai(raw) == Usage(
        text_input=20, image_input=30, image_output=4160, text_output=100, unclassified_output=40
    )


def test_a_detail_of_an_unknown_kind_is_unclassified_and_counted_once() -> None:
    raw = {**USAGE, "output_tokens": 4260}
    raw["output_tokens_details"] = {"image_tokens": 4160, "audio_tokens": 100}
    assert usage_from_openai(raw) == Usage(
        text_input=20, image_input=30, image_output=4160, unclassified_output=100
    )
    # Details above the total: the unknown kind is still counted.
    raw["output_tokens"] = 4160
    assert usage_from_openai(raw) == Usage(
        text_input=20, image_input=30, image_output=4160, unclassified_output=100
    )
    raw = {**USAGE, "input_tokens": 60}
    raw["input_tokens_details"] = {"text_tokens": 20, "image_tokens": 30, "video_tokens": 4}
    assert usage_from_openai(raw) == Usage(
        text_input=20, image_input=30, image_output=7024, unclassified_input=10
    )


def test_stream_completed_events_carry_text_and_unknown_output_into_the_sum() -> None:
    meter = SseMeter()
    for output, details in (
        (300, {"image_tokens": 272, "text_tokens": 28}),
        (290, {"image_tokens": 272, "audio_tokens": 18}),
    ):
        event = {
            "type": "image_generation.completed",
            "b64_json": "x" * 5000,
            "usage": {"input_tokens": 0, "output_tokens": output, "output_tokens_details": details},
        }
        meter.feed(b"event: image_generation.completed\ndata: " + json.dumps(event).encode())
        meter.feed(b"\n\n")
    meter.finish()
    assert meter.usage == Usage(image_output=544, text_output=28, unclassified_output=18)


def test_usage_without_input_details_counts_all_input_as_text() -> None:
    raw = {"input_tokens": 12, "output_tokens": 196, "total_tokens": 208}
    assert usage_from_openai(raw) == Usage(text_input=12, image_output=196)


def test_usage_reads_cached_input_when_reported() -> None:
    raw = {
        **USAGE,
        "input_tokens_details": {
            "text_tokens": 5,
            "image_tokens": 6,
            "cached_text_tokens": 7,
            "cached_image_tokens": 8,
        },
    }
    usage = usage_from_openai(raw)
    assert usage is not None
    assert (usage.cached_text_input, usage.cached_image_input) == (7, 8)


@pytest.mark.parametrize("raw", [None, "usage", 42, [USAGE], True])
def test_usage_that_is_not_an_object_is_none(raw: Any) -> None:
    assert usage_from_openai(raw) is None


GOOD = {"input_tokens": 12, "input_tokens_details": {"text_tokens": 12}, "output_tokens": 272}


@pytest.mark.parametrize(
    "raw",
    [
        {**GOOD, "input_tokens": "12"},
        {**GOOD, "output_tokens": "272"},
        {**GOOD, "output_tokens": -272},
        {**GOOD, "output_tokens": 272.0},
        {**GOOD, "output_tokens": True},
        {**GOOD, "output_tokens": 2**31},
        {**GOOD, "input_tokens_details": {"text_tokens": -5}},
        {**GOOD, "input_tokens_details": {"image_tokens": "5"}},
        {**GOOD, "output_tokens_details": {"image_tokens": 1.5}},
        {"input_tokens": 12},
        {"output_tokens": 272},
        {"total_tokens": 284},
        {},
    ],
)
def test_a_usage_with_a_count_that_is_missing_or_not_a_whole_token_count_is_none(
    raw: dict[str, Any],
) -> None:
    """Such a usage says nothing reliable about what was billed: the answer is charged its
    bound, flagged, never the $0 its counts would read as."""
    assert usage_from_openai(GOOD) is not None
    assert usage_from_openai(raw) is None


def test_a_usage_with_counts_up_to_the_most_believed_is_read() -> None:
    raw = {"input_tokens": 0, "output_tokens": MAX_TOKENS}
    assert usage_from_openai(raw) == Usage(image_output=MAX_TOKENS)


def test_a_detail_of_an_unknown_kind_that_is_no_count_is_left_to_the_total() -> None:
    raw = {**GOOD, "input_tokens_details": {"text_tokens": 10, "cached": {"text_tokens": 1}}}
    assert usage_from_openai(raw) == Usage(text_input=10, unclassified_input=2, image_output=272)


# --- BodyMeter ---------------------------------------------------------------------------------


@pytest.fixture(params=[0, SMALL_BODY, 100], ids=["streamed", "held", "held-then-streamed"])
def small(request: pytest.FixtureRequest) -> int:
    """BodyMeter's ways to read an answer, which must agree: every byte through ijson, the
    whole answer held and read at `finish()`, or held until it grows past 100 bytes."""
    value: int = request.param
    return value


def body(*, usage_first: bool = False, images: int = 2, with_usage: bool = True) -> bytes:
    data = [{"b64_json": "QUJD" * 500} for _ in range(images)]
    fields: list[tuple[str, Any]] = [("created", 1), ("data", data), ("size", "1024x1024")]
    if with_usage:
        fields.insert(0 if usage_first else len(fields), ("usage", USAGE))
    return json.dumps(dict(fields)).encode()


def meter_body(data: bytes, size: int, small: int = SMALL_BODY) -> tuple[Usage | None, int]:
    meter = BodyMeter(small)
    for chunk in chunks(data, size):
        meter.feed(chunk)
    return meter.finish()


@pytest.mark.parametrize("size", [1, 7, 1 << 30], ids=["1-byte", "7-byte", "one-shot"])
@pytest.mark.parametrize("usage_first", [False, True], ids=["usage-last", "usage-first"])
def test_body_meter_finds_usage_and_counts_images_in_any_chunking(
    size: int, usage_first: bool, small: int
) -> None:
    assert meter_body(body(usage_first=usage_first, images=3), size, small) == (
        Usage(text_input=20, image_input=30, image_output=7024),
        3,
    )


@pytest.mark.parametrize("size", [1, 7, 1 << 30], ids=["1-byte", "7-byte", "one-shot"])
def test_body_meter_without_usage_gives_none_and_the_image_count(size: int, small: int) -> None:
    assert meter_body(body(with_usage=False, images=2), size, small) == (None, 2)


def test_body_meter_ignores_usage_nested_inside_data_items(small: int) -> None:
    data = json.dumps({"data": [{"b64_json": "x", "usage": USAGE}]}).encode()
    assert meter_body(data, 5, small) == (None, 1)


def test_body_meter_counts_an_empty_data_list_as_no_images(small: int) -> None:
    assert meter_body(json.dumps({"data": [], "usage": USAGE}).encode(), 3, small)[1] == 0


def test_body_meter_reads_a_body_bigger_than_small_by_streaming() -> None:
    data = body(images=40)
    assert len(data) > SMALL_BODY
    assert meter_body(data, 16384) == (Usage(text_input=20, image_input=30, image_output=7024), 40)


@pytest.mark.parametrize(
    ("data", "found"),
    [
        # Only object items of a top-level `data` list are images; only an object is usage.
        (b'{"data": [1, {}, [{}], "x", null]}', (None, 1)),
        (b'{"data": "none", "usage": 3}', (None, 0)),
        (
            b'{"usage": {"input_tokens": 0, "output_tokens": 5}, "x": {"data": [{}]}}',
            (Usage(image_output=5), 0),
        ),
        # A top-level array or scalar holds neither.
        (b'[{"usage": {"input_tokens": 0, "output_tokens": 5}, "data": [{}]}]', (None, 0)),
        (b"42", (None, 0)),
        (b"null", (None, 0)),
        # ijson's dotted prefixes: what it finds where `data.item` is not a list item.
        (b'{"data": {"item": {}}}', (None, 1)),
        (b'{"data.item": {}, "data": [{}]}', (None, 2)),
        # Repeated keys: every `data` counts; the last `usage` object wins.
        (b'{"data": [{}], "data": [{}, {}]}', (None, 3)),
        (
            b'{"usage": {"input_tokens": 0, "output_tokens": 5}, "usage": 3}',
            (Usage(image_output=5), 0),
        ),
        (
            b'{"usage": {"input_tokens": 0, "output_tokens": 5, "output_tokens": 7}}',
            (Usage(image_output=7), 0),
        ),
        # Escapes: a key spelled with one is the same key; a lone surrogate is passed.
        (b'{"\\u0075sage": {"input_tokens": 0, "output_tokens": 5}}', (Usage(image_output=5), 0)),
        (b'{"data": [{"revised_prompt": "\\ud800"}]}', (None, 1)),
        (b'{"data": [{}]}\x0c', (None, 1)),  # yajl takes a form feed as white space
        (b'{"usage": {"output_tokens": 1.0, "input_tokens": 1e3}}', (None, 0)),
    ],
)
def test_body_meter_reads_odd_but_valid_json_the_same_either_way(
    data: bytes, found: tuple[Usage | None, int], small: int
) -> None:
    assert meter_body(data, 3, small) == found
    assert meter_body(data, 1 << 30, small) == found


def test_body_meter_raises_malformed_answer_on_truncated_json(small: int) -> None:
    data = body()
    with pytest.raises(MalformedAnswer):
        meter_body(data[: len(data) // 2], 7, small)


@pytest.mark.parametrize(
    "data",
    [
        b"<html>Bad gateway</html>",
        b"not json at all",
        b"{]",
        b'{"a": 1} {"b": 2}',
        b'{"a": 1} x',
        b'{"a": NaN}',
        b'{"a": -Infinity}',
        b'{"a": [1,]}',
        b"\xef\xbb\xbf{}",
        b'{"a": "\\x"}',
        b'{"a": "\x01"}',
        b'{"a": "\xff"}',
        b'{"a": "\xed\xa0\x80"}',  # an encoded surrogate
        b'{"a": "\\udc00x"}',
    ],
)
def test_body_meter_raises_malformed_answer_on_a_body_that_is_not_json(
    data: bytes, small: int
) -> None:
    with pytest.raises(MalformedAnswer):
        meter_body(data, 4, small)


def test_body_meter_raises_malformed_answer_on_an_empty_body(small: int) -> None:
    with pytest.raises(MalformedAnswer):
        meter_body(b"", 1, small)


# --- Numbers too long for ijson ------------------------------------------------------------------
# ijson's C backend crashes the process on an integer of some 4,300 digits and raises
# decimal.InvalidOperation on an exponent past 10**18: such an answer is malformed, on every path.

LONG_NUMBERS = {
    "5000-digit integer": b"1" * 5000,
    "negative 5000-digit integer": b"-" + b"7" * 5000,
    "5000-digit fraction": b"1." + b"1" * 5000,
    "5000-digit exponent": b"1e" + b"9" * 5000,
    "long signed exponent": b"1.5E-" + b"0" * 4990 + b"1",
    "just too long": b"1" * (LONG_NUMBER + 1),
    "exponent out of decimal's range": b"1e9999999999999999999",
}


def with_number(number: bytes, where: str) -> bytes:
    """An answer with `number` in its usage, in a `data` item, or as the whole answer."""
    if where == "alone":
        return number
    image = b'{"b64_json": "' + b"QUJD" * 300 + b'"'
    usage = b'{"input_tokens": 5, "output_tokens": 7'
    if where == "usage":
        usage += b', "total_tokens": ' + number
    else:
        image += b', "seed": ' + number
    return b'{"created": 1, "data": [' + image + b'}], "usage": ' + usage + b"}}"


def split_in_number(data: bytes, number: bytes) -> list[bytes]:
    """`data` cut in three: just before the number, in its middle, and just after it."""
    start = data.index(number)
    middle, end = start + len(number) // 2, start + len(number)
    return [data[:start], data[start:middle], data[middle:end], data[end:]]


@pytest.mark.parametrize("where", ["usage", "data", "alone"])
@pytest.mark.parametrize("number", list(LONG_NUMBERS.values()), ids=list(LONG_NUMBERS))
def test_body_meter_refuses_a_number_too_long_in_any_chunking(
    number: bytes, where: str, small: int
) -> None:
    data = with_number(number, where)
    for size in (1, 7, 50, 4096, 1 << 30):
        with pytest.raises(MalformedAnswer):
            meter_body(data, size, small)
    meter = BodyMeter(small)
    with pytest.raises(MalformedAnswer):
        for piece in split_in_number(data, number):
            meter.feed(piece)
        meter.finish()


@pytest.mark.parametrize("where", ["usage", "data"])
def test_body_meter_reads_numbers_up_to_the_limit_and_long_digits_in_strings(
    where: str, small: int
) -> None:
    data = with_number(b"0." + b"1" * (LONG_NUMBER - 2), where)
    for size in (1, 7, 1 << 30):
        assert meter_body(data, size, small) == (Usage(text_input=5, image_output=7), 1)
    # Digits in strings, long or short, are no numbers.
    digits = json.dumps({"data": [{"b64_json": "1" * 5000, "revised_prompt": "2" * 900}]})
    assert meter_body(digits.encode(), 7, small) == (None, 1)


def test_body_meter_reads_a_big_exponent_in_decimal_range_the_same_either_way(small: int) -> None:
    data = (
        b'{"usage": {"input_tokens": 0, "output_tokens": 3, "total_tokens": 1e99999}, "data": [{}]}'
    )
    assert meter_body(data, 3, small) == (Usage(image_output=3), 1)


def test_a_number_too_long_in_a_big_streamed_answer_is_refused_as_it_passes() -> None:
    data = with_number(b"9" * 5000, "usage").replace(b"QUJD" * 300, b"QUJD" * 20_000)
    assert len(data) > SMALL_BODY
    meter = BodyMeter()
    with pytest.raises(MalformedAnswer):
        for chunk in chunks(data, 16384):
            meter.feed(chunk)  # refused here, before finish()
    with pytest.raises(MalformedAnswer):  # and for good: no later chunk is parsed
        meter.feed(b"1]")


NO_CRASH = r"""
import sys
from proxy.core.errors import MalformedAnswer
from proxy.core.metering import BodyMeter, SseMeter

number = b"1" * 5000
answer = b'{"data": [{"b64_json": "x"}], "usage": {"output_tokens": ' + number + b'}}'
for small in (0, 1 << 30, 10):
    for size in (1, 7, 1 << 30):
        meter = BodyMeter(small)
        try:
            for start in range(0, len(answer), size):
                meter.feed(answer[start : start + size])
            meter.finish()
        except MalformedAnswer:
            print("malformed")
sse = SseMeter()
sse.feed(b'data: {"type": "image_generation.completed", "usage": {"output_tokens": ')
sse.feed(number + b'}}' + b"\n\n")
sse.finish()
print("sse", sse.completed)
"""


def test_the_ijson_crash_no_longer_takes_the_process_down() -> None:
    # A segfault would take pytest with it: run the crash in a child process.
    done = subprocess.run(
        [sys.executable, "-c", NO_CRASH], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n") == ["malformed"] * 9 + ["sse 0", ""]


# --- SseMeter ---------------------------------------------------------------------------------


def event(kind: str, payload: dict[str, Any], sep: str = "\n") -> bytes:
    return f"event: {kind}{sep}data: {json.dumps(payload)}{sep}{sep}".encode()


def completed(output: int, text: int = 0, kind: str = "image_generation.completed") -> bytes:
    usage = {
        "input_tokens": text,
        "input_tokens_details": {"text_tokens": text, "image_tokens": 0},
        "output_tokens": output,
        "total_tokens": text + output,
    }
    return event(kind, {"type": kind, "b64_json": "QUJD", "usage": usage})


def partial(index: int, kind: str = "image_generation.partial_image") -> bytes:
    return event(kind, {"type": kind, "b64_json": "QUJD" * 10, "partial_image_index": index})


STREAM = partial(0) + partial(1) + completed(7224, text=9) + partial(0) + completed(7224)


def meter_stream(data: bytes, size: int) -> SseMeter:
    meter = SseMeter()
    for chunk in chunks(data, size):
        meter.feed(chunk)
    meter.finish()
    return meter


@pytest.mark.parametrize("size", [1, 7, 1 << 30], ids=["1-byte", "7-byte", "one-shot"])
def test_sse_meter_sums_usage_of_every_completed_event(size: int) -> None:
    meter = meter_stream(STREAM, size)
    assert meter.usage == Usage(text_input=9, image_output=2 * 7224)
    assert meter.completed == 2
    assert meter.partials == 3
    assert meter.error is None


def test_sse_meter_counts_edit_events_too() -> None:
    data = partial(0, "image_edit.partial_image") + completed(500, kind="image_edit.completed")
    meter = meter_stream(data, 1 << 30)
    assert (meter.partials, meter.completed, meter.usage.image_output) == (1, 1, 500)


def test_sse_meter_handles_crlf_separators() -> None:
    kind = "image_generation.completed"
    usage = {"input_tokens": 3, "output_tokens": 196, "total_tokens": 199}
    data = event("image_generation.partial_image", {"type": "x.partial_image"}, "\r\n") + event(
        kind, {"type": kind, "usage": usage}, "\r\n"
    )
    meter = meter_stream(data, 5)
    assert meter.usage == Usage(text_input=3, image_output=196)
    assert (meter.completed, meter.partials) == (1, 1)


SMALL_STREAM = partial(0) + completed(296, text=4)


@pytest.mark.parametrize("split", range(1, len(SMALL_STREAM)))
def test_sse_meter_handles_an_event_split_at_any_byte(split: int) -> None:
    meter = SseMeter()
    meter.feed(SMALL_STREAM[:split])
    meter.feed(SMALL_STREAM[split:])
    meter.finish()
    assert meter.usage == Usage(text_input=4, image_output=296)
    assert (meter.completed, meter.partials) == (1, 1)


CRLF_STREAM = event("image_generation.partial_image", {"type": "a.partial_image"}, "\r\n") + event(
    "image_generation.completed",
    {"type": "image_generation.completed", "usage": {"input_tokens": 0, "output_tokens": 42}},
    "\r\n",
)


@pytest.mark.parametrize("split", range(1, len(CRLF_STREAM)))
def test_sse_meter_handles_a_crlf_event_split_at_any_byte(split: int) -> None:
    meter = SseMeter()
    meter.feed(CRLF_STREAM[:split])
    meter.feed(CRLF_STREAM[split:])
    meter.finish()
    assert (meter.usage.image_output, meter.completed, meter.partials) == (42, 1, 1)


def test_sse_meter_reads_a_last_event_without_its_blank_line_on_finish() -> None:
    meter = SseMeter()
    meter.feed(completed(100).rstrip(b"\n"))
    assert meter.completed == 0
    meter.finish()
    assert (meter.completed, meter.usage.image_output) == (1, 100)


def test_sse_meter_finish_twice_counts_once() -> None:
    meter = SseMeter()
    meter.feed(completed(100).rstrip(b"\n"))
    meter.finish()
    meter.finish()
    assert meter.completed == 1


def test_sse_meter_ignores_a_done_terminator() -> None:
    meter = meter_stream(completed(100) + b"data: [DONE]\n\n", 3)
    assert (meter.completed, meter.usage.image_output, meter.error) == (1, 100, None)


def test_sse_meter_records_an_error_event() -> None:
    error = {"message": "Your request was rejected", "type": "invalid_request_error", "code": "x"}
    meter = meter_stream(partial(0) + event("error", {"type": "error", "error": error}), 4)
    assert meter.error == error
    assert meter.completed == 0
    assert meter.usage == Usage()


def test_sse_meter_counts_partials_identified_only_by_their_type() -> None:
    data = b'data: {"type": "image_generation.partial_image", "b64_json": "QUJD"}\n\n'
    assert meter_stream(data, 1 << 30).partials == 1


def test_sse_meter_counts_a_completed_event_identified_only_by_its_type() -> None:
    data = (
        b'data: {"type": "image_generation.completed", '
        b'"usage": {"input_tokens": 0, "output_tokens": 7}}\n\n'
    )
    meter = meter_stream(data, 1 << 30)
    assert (meter.completed, meter.usage.image_output) == (1, 7)


def test_sse_meter_ignores_comments_and_garbage_events() -> None:
    data = b": keep-alive\n\ndata: not json\n\n" + completed(9)
    meter = meter_stream(data, 2)
    assert (meter.completed, meter.usage.image_output, meter.error) == (1, 9, None)
    assert meter.unreadable == 1  # `not json`: the proxy charges such a stream's bound


def test_sse_meter_reads_a_completed_event_without_tokenizing_its_image() -> None:
    """The image's base64 reaches ijson emptied; the usage after it is read all the same."""
    kind = "image_generation.completed"
    image = "QUJD" * 500_000  # 2 MB
    data = event(
        kind,
        {"type": kind, "b64_json": image, "usage": {"input_tokens": 0, "output_tokens": 4160}},
    )
    meter = meter_stream(data, 1 << 16)
    assert (meter.completed, meter.usage.image_output, meter.unreadable) == (1, 4160, 0)


@pytest.mark.parametrize(
    "usage",
    [None, {}, {"output_tokens": "4160", "input_tokens": 0}, {"input_tokens": -1}],
    ids=["absent", "empty", "string", "negative"],
)
def test_sse_meter_counts_a_completed_event_without_a_usage_to_believe_as_unmetered(
    usage: Any,
) -> None:
    kind = "image_generation.completed"
    fields = {"type": kind, "b64_json": "QUJD"} | ({} if usage is None else {"usage": usage})
    meter = meter_stream(event(kind, fields) + completed(9), 1 << 30)
    assert (meter.completed, meter.usage.image_output, meter.unmetered) == (2, 9, 1)


@pytest.mark.parametrize(
    "size", [1, 7, 50, 1 << 30], ids=["1-byte", "7-byte", "50-byte", "one-shot"]
)
@pytest.mark.parametrize("number", list(LONG_NUMBERS.values()), ids=list(LONG_NUMBERS))
def test_sse_meter_skips_an_event_with_a_number_too_long(number: bytes, size: int) -> None:
    kind = "image_generation.completed"
    bad = b"event: " + kind.encode() + b'\ndata: {"type": "' + kind.encode()
    bad += b'", "usage": {"output_tokens": 5, "total_tokens": ' + number + b"}}\n\n"
    meter = meter_stream(partial(0) + bad + completed(100), size)
    # Not counted, as for any event that cannot be read: a stream without a readable
    # completed event is charged its estimate and flagged.
    assert (meter.completed, meter.partials, meter.usage.image_output) == (1, 1, 100)
    assert (meter.error, meter.unreadable) == (None, 1)
    assert meter_stream(bad, size).completed == 0


def test_sse_meter_skips_an_event_ijson_cannot_decode() -> None:
    kind = "image_generation.completed"
    for text in (b'"\\udc00x"', b'"\xed\xa0\x80"'):
        bad = b'data: {"type": "' + kind.encode() + b'", "a": ' + text + b"}\n\n"
        meter = meter_stream(bad + completed(100), 1 << 30)
        assert (meter.completed, meter.usage.image_output) == (1, 100)
