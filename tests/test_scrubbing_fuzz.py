"""The scrubber's fast searches against the plainest scrubber there is, on generated bodies.

Both searches are checked: Hyperscan's one pass for every form (where it runs, which the
test requires of the machines that run it) and the form-by-form search of the platforms it
does not. The oracle replaces every form of the key with its mask, one `bytes.replace` after
another, over the whole body: what any search (an anchor byte, `memmem`) and any
chunking must give.
"""

from __future__ import annotations

import base64
import concurrent.futures
import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.core.scrubbing import Scrubber, contains, encodings

FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Few letters: needles and their near misses turn up often in the haystacks.
small_bytes = st.binary(max_size=64).map(lambda b: bytes(b"ab-c"[x % 4] for x in b))
keys = st.text(alphabet="abcAB01-_/+=", min_size=8, max_size=40).map(lambda tail: "sk-" + tail)


def oracle(scrubber: Scrubber, data: bytes) -> bytes:
    for needle in scrubber.needles:
        data = data.replace(needle.data, needle.masked)
    return data


@st.composite
def bodies(draw: st.DrawFn) -> tuple[str, bytes, list[int]]:
    """A key, a body of noise, pieces of the key and whole echoes of it in every form,
    and where to cut the body into chunks."""
    key = draw(keys)
    raw = key.encode()
    echoes = [
        raw,
        b"Bearer " + raw,
        base64.b64encode(b"Bearer " + raw),
        base64.b64encode(b"u:" + raw + b"!"),
        base64.b64encode(raw),
        raw[: draw(st.integers(1, len(raw)))],
        base64.b64encode(raw)[1:-1],
    ]
    noise = st.binary(max_size=30).map(lambda b: base64.b64encode(b) + b'"\n')
    parts = draw(st.lists(st.one_of(st.sampled_from(echoes), noise), max_size=10))
    body = b"".join(parts)
    cuts = draw(st.lists(st.integers(0, len(body)), max_size=6))
    return key, body, sorted(cuts)


@FUZZ
@given(small_bytes, small_bytes)
def test_contains_agrees_with_in(data: bytes, needle: bytes) -> None:
    assert contains(data, needle) == (needle in data)


@pytest.mark.parametrize("patterns", [True, False], ids=["hyperscan", "form-by-form"])
@FUZZ
@given(bodies())
def test_scrubbing_whole_and_in_chunks_agrees_with_replacing_every_form(
    patterns: bool, case: tuple[str, bytes, list[int]]
) -> None:
    key, body, cuts = case
    scrubber = Scrubber(encodings(key), patterns=patterns)
    assert scrubber.searches_at_once == patterns
    expected = oracle(scrubber, body)
    assert scrubber.data(body) == expected
    stream = scrubber.stream()
    chunks = [body[a:b] for a, b in itertools.pairwise([0, *cuts, len(body)])]
    out = [stream.feed(chunk) for chunk in chunks]
    assert b"".join([*out, stream.finish()]) == expected


def test_threads_scrubbing_at_once_each_get_their_own_scratch_space() -> None:
    scrubber = Scrubber.of_key("sk-upstream-real-key-for-tests")
    assert scrubber.searches_at_once
    echo = base64.b64encode(b"Bearer sk-upstream-real-key-for-tests")
    body = b"x" * 200_000 + echo + b"y" * 200_000
    expected = oracle(scrubber, body)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        found = list(pool.map(lambda _: scrubber.data(body), range(64)))
    assert found == [expected] * 64
    assert echo not in expected
