"""The scrubber: every form of the key masked in bytes, text and headers, across chunks."""

from __future__ import annotations

import base64
import itertools
import json
import random
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.core.scrubbing import (
    HELD_ECHO,
    MIN_KEY_LENGTH,
    ChunkScrubber,
    Fragments,
    Scrubber,
    encodings,
    mask,
)

KEY = "sk-proj-Xy9_abc-DEF0123456789ghijklmnopQRSTUVwxyz_-42"
SCRUB = Scrubber.of_key(KEY)


def forms(key: str = KEY) -> list[bytes]:
    """What an echo of the key may look like, as it would reach a team."""
    raw = key.encode()
    return [
        raw,
        b"Bearer " + raw,
        json.dumps({"authorization": f"Bearer {key}"}).encode(),
        base64.b64encode(b"Bearer " + raw),
        base64.b64encode(raw),
        base64.b64encode(b"user:" + raw),
        base64.b64encode(b"u:" + raw + b"!"),
    ]


def leaks(data: bytes, key: str = KEY) -> bool:
    """Whether `data` gives the key away: plainly, or in base64 at any offset."""
    raw = key.encode()
    if raw in data:
        return True
    for run in re.findall(rb"[A-Za-z0-9+/]+=*", data):
        for start in range(4):
            piece = run[start:]
            if raw in base64.b64decode(piece[: len(piece) // 4 * 4] or b"", validate=False):
                return True
    return False


def scrub_chunks(chunks: list[bytes], scrubber: Scrubber = SCRUB) -> list[bytes]:
    stream = scrubber.stream()
    out = [stream.feed(chunk) for chunk in chunks]
    out.append(stream.finish())
    return out


@pytest.mark.parametrize("form", range(len(forms())))
def test_every_form_of_the_key_is_masked_with_the_same_length(form: int) -> None:
    text = b'{"before": 1, "echo": "' + forms()[form] + b'", "after": 2}'
    assert leaks(text)
    out = SCRUB.data(text)
    assert not leaks(out)
    assert len(out) == len(text)
    assert b"[redacted]" in out


def test_json_stays_valid_and_only_the_key_changes() -> None:
    body = {"data": [{"b64_json": "iVBORw0KGgo" * 50}], "echo": f"Bearer {KEY}", "n": 1}
    out = json.loads(SCRUB.data(json.dumps(body).encode()))
    assert out["echo"] == "Bearer " + mask(len(KEY))
    assert out["data"] == body["data"] and out["n"] == 1


def test_every_occurrence_is_masked() -> None:
    text = f"{KEY}{KEY} and {KEY}".encode()
    assert SCRUB.data(text) == f"{mask(len(KEY)) * 2} and {mask(len(KEY))}".encode()


@pytest.mark.parametrize("form", range(len(forms())))
def test_a_key_split_across_two_chunks_at_every_position(form: int) -> None:
    body = b"data: {" + forms()[form] + b"}\n\n"
    whole = SCRUB.data(body)
    for cut in range(len(body) + 1):
        out = scrub_chunks([body[:cut], body[cut:]])
        assert b"".join(out) == whole, cut
        assert not any(leaks(piece) for piece in out)


@pytest.mark.parametrize("form", [0, 3, 5])
def test_a_key_split_across_three_chunks_at_every_pair_of_positions(form: int) -> None:
    body = b"x" + forms()[form] + b"y"
    whole = SCRUB.data(body)
    for first, second in itertools.combinations(range(len(body) + 1), 2):
        out = scrub_chunks([body[:first], body[first:second], body[second:]])
        assert b"".join(out) == whole, (first, second)


def test_random_chunkings_of_a_body_with_keys_and_near_misses() -> None:
    """Keys, pieces of keys (which are left as they are) and base64 noise, cut at random."""
    rng = random.Random(20261201)
    near_misses = [KEY[:-1], KEY[: len(KEY) // 2], KEY[1:], "sk-", "sk-proj-Xy9"]
    parts = [KEY, f"Bearer {KEY}", base64.b64encode(f"Bearer {KEY}".encode()).decode()]
    for _ in range(200):
        pieces = [
            rng.choice(parts + near_misses)
            if rng.random() < 0.3
            else base64.b64encode(rng.randbytes(rng.randrange(1, 40))).decode()
            for _ in range(rng.randrange(1, 12))
        ]
        body = "".join(pieces).encode()
        cuts = sorted(rng.sample(range(len(body) + 1), min(len(body) + 1, rng.randrange(1, 8))))
        chunks = [body[a:b] for a, b in itertools.pairwise([0, *cuts, len(body)])]
        out = b"".join(scrub_chunks(chunks))
        assert out == SCRUB.data(body)
        assert KEY.encode() not in out and len(out) == len(body)


def test_nothing_is_held_back_when_a_chunk_cannot_end_inside_a_key() -> None:
    stream = SCRUB.stream()
    event = b'event: image_generation.partial_image\ndata: {"b64_json": "AAAA"}\n\n'
    assert stream.feed(event) == event
    assert stream.feed(b'{"n": 1}') == b'{"n": 1}'
    assert stream.finish() == b""


def test_a_chunk_ending_with_the_start_of_the_key_holds_only_that_start() -> None:
    stream = SCRUB.stream()
    assert stream.feed(b"data: Bearer sk-pr") == b"data: Bearer "
    assert stream.feed(b"ose\n\n") == b"sk-prose\n\n"


def test_a_held_start_that_the_body_never_completes_goes_out_at_the_end() -> None:
    chunks = scrub_chunks([b"ends with sk-proj-"])
    assert b"".join(chunks) == b"ends with sk-proj-"


def test_header_values_are_scrubbed_and_a_header_named_after_the_key_dropped() -> None:
    pairs = [
        ("x-request-id", "req_1"),
        ("x-echo-authorization", f"Bearer {KEY}"),
        (f"x-{KEY}", "1"),
        ("x-debug", base64.b64encode(f"Bearer {KEY}".encode()).decode()),
    ]
    scrubbed = SCRUB.pairs(pairs)
    assert scrubbed is not None
    assert [k for k, _ in scrubbed] == ["x-request-id", "x-echo-authorization", "x-debug"]
    assert scrubbed[0] == ("x-request-id", "req_1")
    assert scrubbed[1] == ("x-echo-authorization", "Bearer " + mask(len(KEY)))
    assert not any(leaks(f"{k}: {v}".encode()) for k, v in scrubbed)


@pytest.mark.parametrize("cut", [1, 10, len(KEY) - 1])
def test_a_header_holding_the_key_with_blanks_inside_is_dropped(cut: int) -> None:
    """A folded header line (`obs-fold`) reaches Tollgate joined with a space."""
    folded = f"Bearer {KEY[:cut]} \t{KEY[cut:]}"
    scrubbed = SCRUB.pairs([("x-request-id", "req 1"), ("x-echo", folded)])
    assert scrubbed == [("x-request-id", "req 1")]


def test_headers_without_the_key_are_not_copied() -> None:
    assert SCRUB.pairs([("x-request-id", "req_1"), ("content-type", "application/json")]) is None


def test_escaped_forms_are_added_only_for_keys_that_need_them() -> None:
    # The key, its base64 at three alignments, and its UTF-16 and UTF-32 (either order).
    assert len(encodings(KEY)) == 6
    odd = 'sk-with/slash"quote'
    scrubber = Scrubber.of_key(odd)
    for text in (json.dumps({"a": odd}), odd.replace("/", "\\/"), "q=sk-with%2Fslash%22quote"):
        out = scrubber.data(text.encode())
        assert b"[redacted]" in out, text


WIDE = ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"]


def read_json(data: bytes) -> object:
    """`data` as a JSON reader takes it (the encoding told by its first bytes), or None."""
    try:
        return json.loads(data)
    except ValueError:
        return None


@pytest.mark.parametrize("codec", WIDE)
def test_a_body_in_utf_16_or_utf_32_is_read_by_json_readers_without_the_key(codec: str) -> None:
    text = json.dumps({"object": "list", "data": [], "echo": f"Bearer {KEY}", "n": 1})
    body = text.encode(codec)
    assert KEY in json.dumps(read_json(body))
    out = SCRUB.data(body)
    assert len(out) == len(body)
    assert read_json(out) == {**json.loads(text), "echo": f"Bearer {mask(len(KEY))}"}
    for cut in range(len(body)):
        # A cut may leave one byte order's form whole before the other's: either is masked.
        whole = b"".join(scrub_chunks([body[:cut], body[cut:]]))
        assert len(whole) == len(body) and KEY not in json.dumps(read_json(whole)), cut


def test_missing_and_toy_keys_scrub_nothing() -> None:
    assert not Scrubber.of_key(None)
    assert not Scrubber.of_key("x" * (MIN_KEY_LENGTH - 1))
    assert Scrubber.of_key("x" * MIN_KEY_LENGTH)
    nothing = ChunkScrubber(Scrubber.of_key(""))
    assert nothing.feed(b"abc") == b"abc" and nothing.finish() == b""


def test_a_key_that_overlaps_itself_is_masked_across_chunks() -> None:
    key = "sk-aaaaaaaaaaaa"
    scrubber = Scrubber.of_key(key)
    body = b"sk-aaaa sk-aaa" + key.encode() + b"aa"
    whole = scrubber.data(body)
    assert key.encode() not in whole
    for cut in range(len(body) + 1):
        assert b"".join(scrub_chunks([body[:cut], body[cut:]], scrubber)) == whole


def test_a_key_split_between_a_header_name_and_its_value_is_not_the_key() -> None:
    half = len(KEY) // 2
    assert SCRUB.pairs([(KEY[:half], KEY[half:]), ("x-request-id", "req_1")]) is None


@pytest.mark.parametrize("form", encodings(KEY))
def test_every_form_of_the_key_in_a_header_value_is_found(form: str) -> None:
    scrubbed = SCRUB.pairs([("x-request-id", "req_1"), ("x-echo", f"a {form} b")])
    assert scrubbed is not None and form not in scrubbed[1][1]


def escaped(key: str, rng: random.Random, share: float = 0.5) -> str:
    """`key` as a JSON writer may spell it: some of its characters as `\\uXXXX` escapes."""
    return "".join(f"\\u{ord(c):04{rng.choice('xX')}}" if rng.random() < share else c for c in key)


def test_a_key_written_with_json_escapes_is_masked_and_the_json_still_reads() -> None:
    """Every JSON reader decodes `\\u002d` to `-`: a key with any of its characters
    escaped reaches the team as the key itself unless it is masked too."""
    rng = random.Random(7)
    for spelled in [escaped(KEY, rng, 1.0), *(escaped(KEY, rng) for _ in range(50))]:
        body = (
            json.dumps({"a": 1}).encode()[:-1]
            + (f', "echo": "Bearer {spelled}", "note": "caf\\u00e9", "k": "{spelled}"}}').encode()
        )
        assert KEY in json.loads(body)["echo"]
        out = SCRUB.data(body)
        found = json.loads(out)
        assert KEY not in found["echo"] and KEY not in found["k"]
        assert found["note"] == "café" and len(out) == len(body)


@pytest.mark.parametrize("seed", range(20))
def test_a_key_written_with_json_escapes_is_masked_across_any_chunking(seed: int) -> None:
    rng = random.Random(seed)
    spelled = escaped(KEY, rng)
    body = (
        f'{{"data": [{{"b64_json": "QUJD"}}], "echo": "{spelled}", "x": "\\u00e9\\u4e2d"}}'
    ).encode()
    cuts = sorted(rng.sample(range(1, len(body)), 6))
    chunks = [body[a:b] for a, b in itertools.pairwise([0, *cuts, len(body)])]
    out = b"".join(scrub_chunks(chunks))
    assert len(out) == len(body)
    assert KEY not in json.loads(out)["echo"]
    assert json.loads(out)["x"] == "\u00e9\u4e2d"


def test_escapes_that_spell_no_key_are_left_as_they_are() -> None:
    near = KEY[:-1].replace("-", "\\u002d")
    body = f'{{"near": "{near}", "text": "caf\\u00e9 \\u0041BC"}}'.encode()
    assert SCRUB.data(body) == body


ECHOES = [
    f"{KEY[:6]}***{KEY[-4:]}",  # OpenAI's `Incorrect API key provided: sk-pro***kb0A`
    f"{KEY[:8]}{'*' * 40}{KEY[-4:]}",
    f"sk-***{KEY[-4:]}",
    f"***{KEY[-3:]}",
    f"{KEY[:3]}***",
]


@pytest.mark.parametrize("echo", ECHOES)
def test_a_masked_echo_of_the_key_is_masked_whole(echo: str) -> None:
    body = json.dumps({"error": {"message": f"Incorrect API key provided: {echo}. See"}})
    masked = SCRUB.data(body.encode())
    assert (
        json.loads(masked)["error"]["message"]
        == f"Incorrect API key provided: {mask(len(echo))}. See"
    )
    assert SCRUB.quoted_in(body.encode())
    assert SCRUB.text(f"key {echo}") == f"key {mask(len(echo))}"
    assert SCRUB.pairs([("x-ratelimit-echo", echo)]) == [("x-ratelimit-echo", mask(len(echo)))]


@pytest.mark.parametrize("echo", ECHOES[:3])
def test_a_masked_echo_split_across_chunks_is_masked_whole(echo: str) -> None:
    body = f'data: {{"message": "key {echo} refused"}}'.encode()
    expected = SCRUB.data(body)
    for cut in range(len(body) + 1):
        for second in range(cut, len(body) + 1):
            chunks = [body[:cut], body[cut:second], body[second:]]
            assert b"".join(scrub_chunks(chunks)) == expected, (cut, second)


@pytest.mark.parametrize(
    "echo",
    [f"{KEY[:6]}***{KEY[-4:]}***x", f"sk-***{KEY[-4:]}***", f"{KEY[:6]}***{KEY[-4:]}**bold**"],
)
def test_a_masked_echo_followed_by_more_stars_is_masked_whole_across_chunks(echo: str) -> None:
    # A chunk that ends after the later stars must not cut the held echo at them: the end
    # of the key before them would go out with no start of it left to be found next to it.
    body = f'data: {{"message": "key {echo} refused"}}'.encode()
    expected = SCRUB.data(body)
    assert KEY[-4:].encode() not in expected
    for cut in range(len(body) + 1):
        for second in range(cut, len(body) + 1):
            chunks = [body[:cut], body[cut:second], body[second:]]
            assert b"".join(scrub_chunks(chunks)) == expected, (cut, second)


@pytest.mark.parametrize(
    "text",
    [
        "**bold** and ***very*** bold, a***b, 2**10",
        f"***{KEY[-2:]} two characters of the end, {KEY[:2]}*** two of the start",
        f"{KEY[1:]}***",  # the key without its first character is no start of it
        "[redacted]*******",
    ],
)
def test_stars_next_to_no_piece_of_the_key_are_left_as_they_are(text: str) -> None:
    assert SCRUB.data(text.encode()) == text.encode()
    assert not SCRUB.quoted_in(text.encode())


_KEY_CHARACTER = re.compile(rb"[A-Za-z0-9_-]")
_TAIL_REFERENCE = re.compile(rb"[A-Za-z0-9_*-]*\*[A-Za-z0-9_-]*\Z")


def _echoes_one_by_one(fragments: Fragments, data: bytes) -> bytes:
    """Masked echoes found the plain way: each run of three or more `*`s with the whole run
    of key characters on either side of it, read a character at a time; echoes whose runs
    share key characters are masked as one."""
    spans: list[list[int]] = []
    for stars in re.finditer(rb"\*{3,}", data):
        first, last = stars.start(), stars.end()
        while first > 0 and _KEY_CHARACTER.fullmatch(data[first - 1 : first]):
            first -= 1
        while last < len(data) and _KEY_CHARACTER.fullmatch(data[last : last + 1]):
            last += 1
        if not fragments.quotes(data[first : stars.start()], data[stars.end() : last]):
            continue
        if spans and first < spans[-1][1]:
            spans[-1][1] = last
        else:
            spans.append([first, last])
    for first, last in spans:
        data = data[:first] + mask(last - first).encode() + data[last:]
    return data


def _held_by_regex(data: bytes) -> int:
    if b"*" not in data[-HELD_ECHO:]:
        return 0
    found = _TAIL_REFERENCE.search(data, max(len(data) - HELD_ECHO, 0))
    return len(found[0]) if found is not None else 0


@given(
    st.lists(
        st.sampled_from(
            [
                "*",
                "**",
                "***",
                "****",
                " ",
                ".",
                KEY[:3],
                KEY[:7],
                KEY[-3:],
                KEY[-6:],
                "sk-",
                "ab",
                "x" * 40,
                "\n",
                "é",
            ]
        ),
        max_size=30,
    )
)
def test_masked_echoes_are_read_as_one_by_one(pieces: list[str]) -> None:
    data = "".join(pieces).encode()
    fragments = Fragments(KEY.encode())
    assert fragments.masked(data) == _echoes_one_by_one(fragments, data)
    assert Fragments.held(data) == _held_by_regex(data)
    assert Fragments.held(b"y" * 2000 + data) == _held_by_regex(b"y" * 2000 + data)


def test_a_long_run_of_letters_before_stars_is_read_once() -> None:
    """200,000 letters and then `***`: a regular expression for a run of key characters and
    `*`s retried the run from each of its letters (minutes of a stopped event loop); each
    letter is now looked at once."""
    data = b"a" * 200_000 + b"*** " + f"{KEY[:6]}***{KEY[-4:]}".encode()
    masked = Fragments(KEY.encode()).masked(data)
    assert masked == b"a" * 200_000 + b"*** " + mask(len(KEY[:6]) + 3 + 4).encode()


@pytest.mark.parametrize(
    "text",
    [
        f"x***{KEY[:6]}***{KEY[-4:]}",
        f"a***b x***{KEY[:6]}***{KEY[-4:]}***y",
        f"{KEY[:6]}***ab***{KEY[-4:]}",
    ],
)
def test_an_echo_after_an_unrelated_run_of_stars_is_masked_whole(text: str) -> None:
    """`x***sk-pro***kb0A`: the key's start after the first `***` was read as the end of
    that run alone, not also as the start of the echo after it, and went out."""
    masked = SCRUB.data(text.encode())
    assert KEY[:6].encode() not in masked
    assert KEY[-4:].encode() not in masked
    assert len(masked) == len(text.encode())
    chunked = b"".join(scrub_chunks([text[:5].encode(), text[5:12].encode(), text[12:].encode()]))
    assert KEY[:6].encode() not in chunked and KEY[-4:].encode() not in chunked


@pytest.mark.parametrize("known", [3, 10, len(KEY) - 4])
def test_whether_stars_are_masked_tells_no_more_of_the_key_than_its_ends(known: int) -> None:
    """A team can have the upstream echo text of its choosing (a file's content): were
    `sk-proj-X***` masked only when `X` is the key's next character, each guess would come
    back answered, and the key be read a character at a time, from either end."""
    other = "A" if KEY[known] != "A" else "B"
    starts = [f"{KEY[:known]}{c}***" for c in (KEY[known], other)]
    end = len(KEY) - known - 1
    ends = [f"***{c}{KEY[-known:]}" for c in (KEY[end], other)]
    for right, wrong in (starts, ends):
        assert SCRUB.data(f"a {right} b".encode()) == f"a {mask(len(right))} b".encode()
        assert SCRUB.data(f"a {wrong} b".encode()) == f"a {mask(len(wrong))} b".encode()
