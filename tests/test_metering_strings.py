"""BodyMeter's long-string filter: the parser sees the same JSON, less the big strings.

Also: a held answer and a streamed one give the same result, for mangled answers too."""

from __future__ import annotations

import json
import random

import pytest

from proxy.core.errors import MalformedAnswer
from proxy.core.metering import SMALL_BODY, BodyMeter
from proxy.core.short_strings import LONG_NUMBER, SHORT_STRING, ShortStrings

USAGE = {
    "input_tokens": 12,
    "input_tokens_details": {"text_tokens": 12, "image_tokens": 0},
    "output_tokens": 272,
    "total_tokens": 284,
}


def answer(images: int = 2, image_bytes: int = 300_000) -> bytes:
    tricky = 'quote " backslash \\ unicode \u00e9 \\u0022 end\\'
    body = {
        "created": 1,
        "data": [{"b64_json": "QUJD" * (image_bytes // 4)} for _ in range(images)],
        "note": tricky,
        "long_note": tricky * 200,
        "usage": USAGE,
    }
    return json.dumps(body).encode()


def chunks(data: bytes, rng: random.Random) -> list[bytes]:
    out, i = [], 0
    while i < len(data):
        size = rng.choice((1, 2, 3, 7, 64, 1000, 16384))
        out.append(data[i : i + size])
        i += size
    return out


@pytest.mark.parametrize("seed", range(8))
def test_filtered_stream_is_the_json_with_long_strings_emptied(seed: int) -> None:
    data = answer(image_bytes=5_000)
    strings = ShortStrings()
    out = b"".join(strings.filter(c) for c in chunks(data, random.Random(seed)))
    parsed = json.loads(out)
    original = json.loads(data)
    assert parsed["usage"] == original["usage"]
    assert parsed["note"] == original["note"]
    assert parsed["long_note"] == "" and len(original["long_note"]) > SHORT_STRING
    assert [d["b64_json"] for d in parsed["data"]] == ["", ""]


@pytest.mark.parametrize("seed", range(8))
def test_splitting_on_quotes_drops_the_same_strings_as_stepping(seed: int) -> None:
    rng = random.Random(seed)
    data = json.dumps({"a": "x" * 2000, "b": "y" * SHORT_STRING, "c": ["z" * 1025, 1]}).encode()
    split, step = ShortStrings(), ShortStrings()
    pieces = chunks(data, rng)
    assert b"".join(split.filter(c) for c in pieces) == b"".join(step._step(c) for c in pieces)


@pytest.mark.parametrize("seed", range(8))
def test_a_chunk_without_a_quote_inside_a_string_ends_its_escapes_as_stepping_does(
    seed: int,
) -> None:
    # Chunks inside a string that hold no quote are passed over whole: runs of backslashes
    # (and escaped quotes) cut anywhere must leave the escape state where stepping does.
    rng = random.Random(seed)
    bits = ("\\", '"', "a", "\\\\")
    strings = ["".join(rng.choice(bits) for _ in range(rng.randint(0, 40)))]
    long = "x" * rng.choice((10, SHORT_STRING, 3000)) + "\\" * rng.randint(0, 5)
    strings.append(long + strings[0])
    data = json.dumps({"a": strings, "n": 1}).encode()
    for _ in range(20):
        pieces = chunks(data, rng)
        split, step = ShortStrings(), ShortStrings()
        out = b"".join(split.filter(c) for c in pieces)
        assert out == b"".join(step._step(c) for c in pieces)
        assert json.loads(out)["n"] == 1


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("small", [0, SMALL_BODY], ids=["streamed", "held"])
def test_usage_and_image_count_survive_any_chunking(seed: int, small: int) -> None:
    meter = BodyMeter(small)
    for c in chunks(answer(images=3), random.Random(seed)):
        meter.feed(c)
    usage, images = meter.finish()
    assert images == 3
    assert usage is not None and usage.image_output == 272 and usage.text_input == 12


@pytest.mark.parametrize("small", [0, 1 << 30], ids=["streamed", "held"])
def test_an_answer_cut_inside_an_image_is_malformed(small: int) -> None:
    data = answer()
    meter = BodyMeter(small)
    meter.feed(data[: len(data) // 3])
    with pytest.raises(MalformedAnswer):
        meter.finish()


@pytest.mark.parametrize("small", [0, SMALL_BODY], ids=["streamed", "held"])
def test_an_answer_that_is_not_json_is_malformed(small: int) -> None:
    meter = BodyMeter(small)
    with pytest.raises(MalformedAnswer):
        meter.feed(b'<html>"oops"</html>')
        meter.finish()


# Bytes that make JSON odd or wrong, spliced into real answers.
MANGLERS = [b'"', b"\\", b"{", b"}", b"[", b"]", b",", b":", b"NaN", b'"usage"', b'"data"',
            b"{}", b"\\u", b"\\ud800", b"\\udc00", b"\xff", b"\xed\xa0\x80", b"\x0c",
            b"1e5", b"-", b'"data.item"', b'"item"', b"0"]  # fmt: skip


def mangled(rng: random.Random) -> bytes:
    data = bytearray(answer(images=rng.randint(0, 3), image_bytes=rng.choice((4, 400, 4000))))
    for _ in range(rng.randint(0, 3)):
        at = rng.randint(0, len(data))
        if rng.random() < 0.5:
            data[at:at] = rng.choice(MANGLERS)
        else:
            del data[at : at + rng.randint(1, 5)]
    return bytes(data)


def outcome(pieces: list[bytes], small: int) -> object:
    meter = BodyMeter(small)
    try:
        for piece in pieces:
            meter.feed(piece)
        return meter.finish()
    except MalformedAnswer:
        return MalformedAnswer


@pytest.mark.parametrize("seed", range(10))
def test_held_and_streamed_answers_agree_even_when_mangled(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(50):
        data = mangled(rng)
        pieces = chunks(data, rng)
        streamed = outcome(pieces, 0)
        assert outcome(pieces, SMALL_BODY) == streamed, data[:200]
        assert outcome(pieces, rng.randint(1, len(data) + 1)) == streamed, data[:200]


# --- Numbers too long for ijson: refused by the filter -----------------------------------------

NUMBER_CHARS = b"-+.eE0123456789"


def longest_number(data: bytes) -> int:
    """The longest run of number characters outside strings, byte by byte."""
    longest = run = 0
    inside = escape = False
    for byte in data:
        if inside:
            if escape:
                escape = False
            elif byte == ord("\\"):
                escape = True
            elif byte == ord('"'):
                inside = False
        elif byte == ord('"'):
            inside, run = True, 0
        elif byte in NUMBER_CHARS:
            run += 1
            longest = max(longest, run)
        else:
            run = 0
    return longest


def filtered(pieces: list[bytes], strings: ShortStrings | None = None) -> bytes | None:
    """The filter's output, or None when it refuses."""
    strings = strings or ShortStrings()
    try:
        return b"".join(strings.filter(piece) for piece in pieces)
    except MalformedAnswer:
        return None


def numbers_and_strings(rng: random.Random) -> bytes:
    """Numbers about as long as the limit, strings of digits, escapes, stray bytes."""
    parts = []
    for _ in range(rng.randint(1, 12)):
        kind = rng.random()
        if kind < 0.4:
            size = rng.choice((1, 3, 20, LONG_NUMBER - 1, LONG_NUMBER, LONG_NUMBER + 1, 300))
            parts.append(bytes(rng.choice(NUMBER_CHARS) for _ in range(size)))
        elif kind < 0.7:
            size = rng.choice((0, 5, LONG_NUMBER + 5, SHORT_STRING + 10))
            body = b"".join(rng.choice((b"7", b"e", b"\\\\", b'\\"', b"x")) for _ in range(size))
            parts.append(b'"' + body + b'"')
        else:
            parts.append(rng.choice((b", ", b":", b"[", b"}", b" ", b"x", b"\\", b'"')))
    return b"".join(parts)


@pytest.mark.parametrize("seed", range(20))
def test_the_filter_refuses_exactly_the_numbers_too_long_in_any_chunking(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(40):
        data = numbers_and_strings(rng)
        too_long = longest_number(data) > LONG_NUMBER
        whole = filtered([data])
        assert (whole is None) == too_long, data
        for pieces in (chunks(data, rng), [data[i : i + 1] for i in range(len(data))]):
            assert filtered(pieces) == whole, data


@pytest.mark.parametrize("escapes", [False, True], ids=["jump", "step"])
@pytest.mark.parametrize("cut", [0, 1, 40, 60, 99, 100])
def test_a_number_split_across_chunks_is_measured_whole(escapes: bool, cut: int) -> None:
    before = b'{"a\\"": 1, "n": ' if escapes else b'{"a": 1, "n": '
    for length, refused in ((LONG_NUMBER, False), (LONG_NUMBER + 1, True)):
        number = b"-1." + b"2" * (length - 5) + b"e3"
        data = before + number + b"}"
        at = len(before) + cut
        pieces = [data[:at], data[at : at + 30], data[at + 30 :]]
        assert filtered(pieces) == (None if refused else data)


def test_digits_in_strings_are_not_numbers() -> None:
    data = json.dumps({"long": "1" * 5000, "short": "2" * 900, "k" + "3" * 200: 1}).encode()
    for pieces in ([data], [data[i : i + 1] for i in range(len(data))]):
        assert filtered(pieces) is not None


def test_the_filter_refuses_every_chunk_after_a_number_too_long() -> None:
    strings = ShortStrings()
    assert strings.filter(b'{"n": ' + b"1" * 60) == b'{"n": ' + b"1" * 60
    with pytest.raises(MalformedAnswer):
        strings.filter(b"1" * 60)
    with pytest.raises(MalformedAnswer):
        strings.filter(b"}")


def filtered_from(prefix: bytes, pieces: list[bytes]) -> bytes | None:
    """`filtered(pieces)`, its first piece read from after `prefix` in one chunk with it."""
    strings = ShortStrings()
    try:
        first = strings.filter(prefix + pieces[0], len(prefix))
        return first + b"".join(strings.filter(piece) for piece in pieces[1:])
    except MalformedAnswer:
        return None


@pytest.mark.parametrize("seed", range(20))
def test_a_chunk_read_from_a_start_is_filtered_as_its_bytes_from_there(seed: int) -> None:
    rng = random.Random(seed)
    prefixes = (b"data: ", b'event: x\ndata: "\\', b"1" * (LONG_NUMBER + 5) + b" ")
    for _ in range(20):
        data = numbers_and_strings(rng) if rng.random() < 0.8 else answer(1, 5_000)
        pieces = chunks(data, rng)
        for prefix in prefixes:
            # The bytes before the start are none of the stream's: their quotes, escapes
            # and digits change nothing.
            assert filtered_from(prefix, pieces) == filtered(pieces), (prefix, pieces)
