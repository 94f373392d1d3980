"""Canonical request paths: one spelling per path, anything else refused (pure)."""

from __future__ import annotations

import pytest

from proxy.core.paths import canonical, plain_query, under


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        (b"/v1/images/generations", "/v1/images/generations"),
        (b"/healthz", "/healthz"),
        (b"/v1/models/ft:gpt-4o-mini:org:custom:id9", "/v1/models/ft:gpt-4o-mini:org:custom:id9"),
        (b"/v1/models/ft%3Agpt-image", "/v1/models/ft:gpt-image"),  # decoded once
        (b"/v1/files/file-abc_123~x/content", "/v1/files/file-abc_123~x/content"),
        (b"/v1/x/.well-known", "/v1/x/.well-known"),  # a dot that is not a dot-segment
        (b"/v1/x/...", "/v1/x/..."),
        (b"/v1/x/...;y", "/v1/x/...;y"),
        (b"/v1/x/a;..", "/v1/x/a;.."),
    ],
)
def test_a_plain_path_is_its_own_canonical_form(raw: bytes, path: str) -> None:
    assert canonical(raw) == path


@pytest.mark.parametrize(
    "raw",
    [
        b"/v1/models/../images/generations",
        b"/v1/models/./x",
        b"/v1/models/%2e%2e/images/generations",
        b"/v1/models/%2E%2e/images/generations",
        b"/v1/models/.%2e/images",
        b"/v1/models/%2e",
        b"/v1/models/..%2fimages",
        b"/v1/models%2fimages",
        b"/v1/models/%2F",
        b"/v1/models/%252e%252e/images",  # a second round of encoding
        b"/v1/models/%25",
        b"/v1/models/..\\images",
        b"/v1/models/%5cimages",
        b"//v1/images/generations",
        b"/v1//images",
        b"/v1/images/generations/",
        b"/",
        b"",
        b"v1/images/generations",
        b"http://upstream/v1/images/generations",
        b"/v1/models/a b",
        b"/v1/models/%20",
        b"/v1/models/a%00b",
        b"/v1/models/a%0d%0ab",
        b"/v1/models/\x7f",
        b"/v1/models/caf\xc3\xa9",
        b"/v1/models/caf%C3%A9",
        b"/v1/models/%ff",
        b"/v1/models/%zz",
        b"/v1/models/a#b",
        b"/v1/models/a?b",
        b"/v1/models/..;/images/generations",  # `..` with a parameter, to some readers
        b"/v1/models/..;x/images",
        b"/v1/models/.;/x",
        b"/v1/models/%2e%2e%3b/images",
    ],
)
def test_a_path_another_reader_could_take_differently_is_refused(raw: bytes) -> None:
    assert canonical(raw) is None


def test_prefixes_cover_whole_segments() -> None:
    assert under("/v1/models", "/v1/models")
    assert under("/v1/models/x", "/v1/models")
    assert not under("/v1/modelsx", "/v1/models")


@pytest.mark.parametrize(
    ("raw", "query"),
    [(b"", ""), (b"a=1&b=2", "a=1&b=2"), (b"after=x%2Fy&limit=5", "after=x%2Fy&limit=5")],
)
def test_a_plain_query_is_forwarded_as_is(raw: bytes, query: str) -> None:
    assert plain_query(raw) == query


@pytest.mark.parametrize("raw", [b"a=%zz", b"a=1#frag", b"a= 1", b"a=\x00", b"a=\xc3\xa9"])
def test_a_query_a_url_parser_would_reread_is_refused(raw: bytes) -> None:
    assert plain_query(raw) is None
