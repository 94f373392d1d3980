"""BodyMeter's long-string filter: the parser sees the same JSON, less the big strings."""

from __future__ import annotations

import json
import random

import pytest

from proxy.metering import SHORT_STRING, BodyMeter, MalformedAnswer, _ShortStrings

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
    strings = _ShortStrings()
    out = b"".join(strings.filter(c) for c in chunks(data, random.Random(seed)))
    parsed = json.loads(out)
    original = json.loads(data)
    assert parsed["usage"] == original["usage"]
    assert parsed["note"] == original["note"]
    assert parsed["long_note"] == "" and len(original["long_note"]) > SHORT_STRING
    assert [d["b64_json"] for d in parsed["data"]] == ["", ""]


@pytest.mark.parametrize("seed", range(4))
def test_usage_and_image_count_survive_any_chunking(seed: int) -> None:
    meter = BodyMeter()
    for c in chunks(answer(images=3), random.Random(seed)):
        meter.feed(c)
    usage, images = meter.finish()
    assert images == 3
    assert usage is not None and usage.image_output == 272 and usage.text_input == 12


def test_an_answer_cut_inside_an_image_is_malformed() -> None:
    data = answer()
    meter = BodyMeter()
    meter.feed(data[: len(data) // 3])
    with pytest.raises(MalformedAnswer):
        meter.finish()


def test_an_answer_that_is_not_json_is_malformed() -> None:
    meter = BodyMeter()
    with pytest.raises(MalformedAnswer):
        meter.feed(b'<html>"oops"</html>')
        meter.finish()
