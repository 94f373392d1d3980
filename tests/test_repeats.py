"""What makes a request a repeat (`proxy.web.repeats`, `Door.digest`): the same content
whatever its framing, marked by an SDK retry count or an Idempotency-Key."""

from __future__ import annotations

import json

import pytest
from starlette.requests import Request

from proxy.config import load_config
from proxy.core.auth import key_hash
from proxy.core.multipart import Upload, encode_multipart
from proxy.core.parsing import parse_request
from proxy.core.settings import Config
from proxy.doors import ImagesDoor, ResponsesDoor
from proxy.web.repeats import marks, repeatable
from tests.conftest import write_config

DEFAULT = "gpt-image-2"


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Config:
    root = tmp_path_factory.mktemp("repeats")
    write_config(root, "http://upstream.invalid/v1", teams={
        "design": f"name: design\nkeys:\n  - {{id: a, sha256: {key_hash('tg_a')}}}\n",
    })  # fmt: skip
    return load_config(root)


def request(**headers: str) -> Request:
    raw = [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
    return Request({"type": "http", "method": "POST", "path": "/", "headers": raw})


def test_only_an_sdk_request_or_a_keyed_one_may_be_a_repeat() -> None:
    assert not repeatable(request())
    assert repeatable(request(x_stainless_retry_count="0"))
    assert repeatable(request(idempotency_key="k-1"))
    assert not repeatable(request(idempotency_key=""))


def test_a_first_attempt_is_not_a_repeat_and_a_retry_is() -> None:
    first = marks(request(x_stainless_retry_count="0"), "design", "generations", b"d")
    retry = marks(request(x_stainless_retry_count="1"), "design", "generations", b"d")
    assert not first.repeat and retry.repeat
    assert first.content == retry.content and first.key is None
    keyed = marks(request(idempotency_key="k-1"), "design", "generations", b"d")
    assert keyed.repeat and keyed.key is not None


@pytest.mark.parametrize("count", [b"\xb2", b"\xb9", b"1\xbd", b"\xb3\xb2"])
def test_a_retry_count_of_other_than_ascii_digits_is_no_retry(count: bytes) -> None:
    """Header values are read as latin-1, where `²` is a digit to `str.isdigit` and not to
    `int`: such a count once raised ValueError, a 500 with no ledger row."""
    headers = [(b"x-stainless-retry-count", count)]
    sent = Request({"type": "http", "method": "POST", "path": "/", "headers": headers})
    assert not marks(sent, "design", "generations", b"d").repeat


def test_the_same_content_elsewhere_is_another_request() -> None:
    headers = request(x_stainless_retry_count="1")
    one = marks(headers, "design", "generations", b"d").content
    assert marks(headers, "research", "generations", b"d").content != one
    assert marks(headers, "design", "edits", b"d").content != one
    assert marks(headers, "design", "generations", b"e").content != one
    key = request(idempotency_key="k")
    assert marks(key, "design", "x", b"d").key != marks(key, "research", "x", b"d").key


def test_an_edit_digests_the_same_whatever_its_multipart_framing(config: Config) -> None:
    fields = {"model": "gpt-image-2", "prompt": "add a lighthouse", "quality": "low"}
    png = _png()
    door = ImagesDoor("edits")
    uploads = (Upload("image", png, "png"),)
    bodies = [encode_multipart(fields, uploads) for _ in range(2)]  # a new boundary each
    assert bodies[0][1] != bodies[1][1]
    digests = {door.digest(parse_request("edits", ct, body, DEFAULT)) for body, ct in bodies}
    assert len(digests) == 1
    body, content_type = encode_multipart({**fields, "prompt": "another"}, uploads)
    assert door.digest(parse_request("edits", content_type, body, DEFAULT)) not in digests


def test_an_edit_digests_the_same_whatever_the_order_of_its_image_and_mask_parts(
    config: Config,
) -> None:
    """A form's parts of different names are one request in any order: a key reused with
    the mask sent before the image is the same request, not a conflict (nor, for a retry
    without a key, a second payment); the order of several images still counts."""
    fields = {"model": "gpt-image-2", "prompt": "add a lighthouse", "quality": "low"}
    png, other = _png(), _png(color=(0, 0, 255))
    door = ImagesDoor("edits")

    def digest(*uploads: Upload) -> bytes:
        body, content_type = encode_multipart(fields, uploads)
        return door.digest(parse_request("edits", content_type, body, DEFAULT))

    image, mask = Upload("image", png, "png"), Upload("mask", other, "png")
    assert digest(image, mask) == digest(mask, image)
    one, two = Upload("image[]", png, "png"), Upload("image[]", other, "png")
    assert digest(one, two, mask) == digest(mask, one, two)
    assert digest(one, two) != digest(two, one)


def test_a_responses_body_digests_its_fields_not_their_order(config: Config) -> None:
    team = config.teams[0]
    door = ResponsesDoor()
    one = {"model": "gpt-5.5", "input": "a cat", "max_output_tokens": 64}
    two = dict(reversed(list(one.items())))
    first = door.parse("application/json", json.dumps(one).encode(), config, team)
    second = door.parse("application/json", json.dumps(two).encode(), config, team)
    assert door.digest(first) == door.digest(second)


def _png(color: object = "white") -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(out, "PNG")
    return out.getvalue()
