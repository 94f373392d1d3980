"""Hostile bodies, generated: Tollgate's parse against independent parsers of what it forwards.

For every body Tollgate accepts, the bytes it would forward (`ParsedBody.encode`) are read
again by parsers that share none of its code: json.loads, the stdlib email parser, and the
simulated upstream (starlette's form parser, which honours `charset=`, then Pillow for the
images, then OpenAI's validation). Every field they see must be the one Tollgate priced.
Then the whole app, in process: whatever arrives, never a 500, and every refusal is
OpenAI-shaped and carries Tollgate's request id.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import io
import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from openai.types import image_create_variation_params, image_edit_params, image_generate_params
from PIL import Image
from starlette.testclient import TestClient

from proxy.core.auth import key_hash
from proxy.core.errors import InvalidRequest
from proxy.core.models import Endpoint, ImageRequest, InputImage
from proxy.core.parsing import ParsedBody, parse_request
from proxy.simulator.forms import parse_json
from proxy.simulator.refusals import ApiError
from proxy.simulator.validation import validate
from tests.bound_oracle import raw_request
from tests.conftest import in_process, write_config

DEFAULT_MODEL = "gpt-image-2"
# What OpenAI's Images API accepts, from the official SDK's types (not from Tollgate's list).
_FILES = {"image", "mask", "markup"}
OPENAI_PARAMS: dict[tuple[Endpoint, bool], set[str]] = {
    ("generations", False): {*image_generate_params.ImageGenerateParamsStreaming.__annotations__},
    ("edits", True): {*image_edit_params.ImageEditParamsStreaming.__annotations__} - _FILES,
    ("edits", False): {*image_edit_params.ImageEditParamsStreaming.__annotations__, "moderation"}
    - _FILES,
    ("variations", True): {
        *image_create_variation_params.ImageCreateVariationParams.__annotations__
    }
    - _FILES,
}
FUZZ = settings(
    max_examples=250,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _image(width: int, height: int, fmt: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (90, 20, 200)).save(out, fmt)
    return out.getvalue()


def _two_ihdr() -> bytes:
    data = _image(1, 1, "PNG")
    fields = struct.pack(">II", 2048, 16) + b"\x08\x02\x00\x00\x00"
    chunk = struct.pack(">I", 13) + b"IHDR" + fields
    return data[:33] + chunk + struct.pack(">I", zlib.crc32(b"IHDR" + fields)) + data[33:]


def _two_sof() -> bytes:
    data = _image(16, 16, "JPEG")
    at = data.index(b"\xff\xc0")
    length = struct.unpack_from(">H", data, at + 2)[0]
    sof = bytearray(data[at : at + 2 + length])
    struct.pack_into(">HH", sof, 5, 1024, 1024)
    return data[:-2] + bytes(sof) + data[-2:]


IMAGES = [
    _image(32, 24, "PNG"),
    _image(40, 40, "JPEG"),
    _image(24, 48, "WEBP"),
    _two_ihdr(),
    _two_sof(),
    _image(8, 8, "PNG") + _image(600, 600, "PNG"),
    b"GIF89a not really",
    b"",
]
MODELS = ["gpt-image-2", "gpt-image-1-mini", "gpt-image-1.5", "gpt-image-1", "dall-e-2", ""]
TEXTS = [
    *MODELS,
    "auto", "low", "medium", "high", "xhigh", "standard", "hd",
    "1024x1024", "1536x1024", "256x256", "²⁰⁴⁸x¹⁰²⁴", "１０２４x１０２４", "1024X1024",
    "true", "false", "True", "1", "10", "9223372036854775808", "-1", " 2", "٣",
    "png", "jpeg", "webp", "gif", "transparent", "b64_json", "url",
    "a cat", "ünïcödé", "\ud800", "a\x00b", "+AG0-odel", "\udfff\ud800",
]  # fmt: skip
NAMES = [
    *sorted(set().union(*OPENAI_PARAMS.values())),
    "Model", "MODEL", "modeL", "n ", " n", "+AG0-odel", "q+AHU-ality", "+AG4-", "_charset_",
    "svg", "svg[model]", "complexity", "frame_count", "images", "mask", "extra",
]  # fmt: skip
CHARSETS = [None, "utf-8", "UTF-8", "us-ascii", "utf-7", "utf-16", "latin-1", '"utf-8"']


# --- strategies ----------------------------------------------------------------------------------

json_scalars = st.one_of(
    st.sampled_from(TEXTS),
    st.text(max_size=8),
    st.sampled_from([0, 1, 2, 3, 10, 11, -1, 2**31, 2**63, 10**30]),
    st.integers(),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False, allow_infinity=False),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)


def _data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
good_references = st.one_of(
    st.just({"file_id": "file-abc"}),
    st.just({"image_url": "https://example.com/a.png"}),
    st.sampled_from(["PNG", "JPEG", "WEBP"]).map(
        lambda fmt: {"image_url": _data_url(_image(48, 32, fmt), MIME[fmt])}
    ),
)
references = st.one_of(
    st.just({"file_id": "file-abc"}),
    st.just({"image_url": "https://example.com/a.png"}),
    st.sampled_from(IMAGES).map(lambda data: {"image_url": _data_url(data)}),
    st.sampled_from(IMAGES[:3]).map(lambda data: {"image_url": _data_url(data, "image/jpeg")}),
    st.just({"image_url": "x", "file_id": "y"}),
    json_values,
)


GOOD_VALUES: dict[str, list[Any]] = {
    "model": MODELS,
    "quality": ["auto", "low", "medium", "high", ""],
    "size": ["auto", "1024x1024", "1536x1024", "256x256", ""],
    "n": [1, 2, 3, None],
    "stream": [True, False],
    "partial_images": [0, 1, 3],
    "input_fidelity": ["high", "low"],
    "output_format": ["png", "jpeg", "webp"],
    "background": ["auto", "opaque"],
    "user": ["u-1", "", "ünï"],
    "safety_identifier": ["s-1", ""],
    "response_format": ["b64_json"],
}
HOSTILITY = st.sampled_from([0, 0, 0, 0, 0, 1, 1, 2, 3])
"""How many hostile parameters join a body that is otherwise plausible."""


def _plausible(draw: st.DrawFn, endpoint: Endpoint) -> list[tuple[str, Any]]:
    names = sorted(OPENAI_PARAMS[endpoint, endpoint != "generations"] & set(GOOD_VALUES))
    chosen = draw(st.lists(st.sampled_from(names), unique=True, max_size=6))
    return [(name, draw(st.sampled_from(GOOD_VALUES[name]))) for name in chosen]


def _hostile(draw: st.DrawFn) -> list[tuple[str, Any]]:
    count = draw(HOSTILITY)
    return draw(
        st.lists(st.tuples(st.sampled_from(NAMES), json_values), min_size=count, max_size=count)
    )


@st.composite
def json_bodies(draw: st.DrawFn) -> tuple[Endpoint, bytes]:
    """A JSON object written by hand, so that keys may repeat."""
    endpoint: Endpoint = draw(st.sampled_from(["generations", "edits"]))
    hostile = draw(st.booleans())
    pairs: list[tuple[str, Any]] = []
    if draw(st.integers(0, 9)):
        pairs.append(("prompt", draw(st.sampled_from(["a cat"] * 6 + ["", "\ud800", "ü" * 10]))))
    if endpoint == "edits" and draw(st.integers(0, 9)):
        refs = references if hostile else good_references
        pairs.append(("images", draw(st.lists(refs, min_size=1, max_size=3))))
        if draw(st.integers(0, 3)) == 0:
            pairs.append(("mask", draw(refs)))
    pairs += _plausible(draw, endpoint) + (_hostile(draw) if hostile else [])
    if hostile and draw(st.integers(0, 3)) == 0 and pairs:
        pairs.append(draw(st.sampled_from(pairs)))  # a duplicate key
    pairs = draw(st.permutations(pairs))
    text = "{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in pairs) + "}"
    return endpoint, text.encode("utf-8", "surrogatepass")


def _casing(draw: st.DrawFn, name: str) -> str:
    return draw(st.sampled_from([name, name.lower(), name.upper(), name.title()]))


def _form_text(value: Any) -> bytes:
    text = value if isinstance(value, str) else json.dumps(value)
    return text.encode("utf-8", "surrogatepass")


@st.composite
def multipart_bodies(draw: st.DrawFn) -> tuple[Endpoint, bytes, str]:
    """A form written by hand; half of them hostile (charsets, duplicates, odd images and
    headers), the others plausible, so that many reach the differential checks."""
    endpoint: Endpoint = draw(st.sampled_from(["edits", "edits", "variations"]))
    hostile = draw(st.booleans())
    parts: list[tuple[str, bytes, bool]] = []
    if endpoint == "edits" and draw(st.integers(0, 9)):
        parts.append(("prompt", b"a cat", False))
    fields = _plausible(draw, endpoint) + (_hostile(draw) if hostile else [])
    parts += [(name, _form_text(value), False) for name, value in fields]
    if draw(st.integers(0, 9)):
        name = "image" if endpoint == "variations" else draw(st.sampled_from(["image", "image[]"]))
        parts.append((name, draw(st.sampled_from(IMAGES[:3])), True))
    for _ in range(draw(HOSTILITY) if hostile else 0):
        name = draw(st.sampled_from(["image", "image[]", "image[]", "mask", "markup", "Image"]))
        parts.append((name, draw(st.sampled_from(IMAGES)), True))
    if hostile and draw(st.integers(0, 3)) == 0 and parts:
        parts.append(draw(st.sampled_from(parts)))
    parts = draw(st.permutations(parts))
    boundary = "fuzz-" + draw(st.sampled_from(["b", "0123456789", "x-y_z"]))
    charsets = st.sampled_from([None] * 6 + CHARSETS if hostile else [None, "utf-8", "UTF-8"])
    filenames = ['"a.png"', '"ü.png"', "*=UTF-8''a.png"] if hostile else ['"a.png"', '"ü.png"']
    chunks = []
    for name, value, is_file in parts:
        disposition = f'{_casing(draw, "Content-Disposition")}: form-data; name="{name}"'
        if is_file or draw(st.integers(0, 7)) == 0:
            filename = draw(st.sampled_from(filenames))
            disposition += "; filename" + ("" if filename.startswith("*") else "=") + filename
        headers = [disposition]
        charset = draw(charsets)
        if charset or is_file:
            kind = "image/png" if is_file else "text/plain"
            suffix = f"; charset={charset}" if charset else ""
            headers.append(f"{_casing(draw, 'Content-Type')}: {kind}{suffix}")
        if hostile and draw(st.integers(0, 7)) == 0:
            encoding = draw(st.sampled_from(["binary", "8bit", "base64", "quoted-printable"]))
            headers.append(f"Content-Transfer-Encoding: {encoding}")
        head = "\r\n".join(headers).encode("utf-8", "surrogatepass")
        chunks.append(b"--" + boundary.encode() + b"\r\n" + head + b"\r\n\r\n" + value + b"\r\n")
    body = b"".join(chunks) + f"--{boundary}--\r\n".encode()
    content_type = f"multipart/form-data; boundary={boundary}"
    charset = draw(charsets)
    if charset:
        content_type += f"; charset={charset}"
    return endpoint, body, content_type


# --- independent readers of the forwarded bytes ------------------------------------------------


def _tollgate(endpoint: Endpoint, content_type: str, body: bytes) -> ParsedBody | None:
    try:
        parsed = parse_request(endpoint, content_type, body, DEFAULT_MODEL)
    except InvalidRequest as exc:
        event(f"refused: {exc.message[:40]}")
        return None
    event("accepted")
    return parsed


def _scalars(request: ImageRequest) -> dict[str, Any]:
    return {
        "model": request.model,
        "quality": request.quality,
        "size": request.size,
        "n": request.n,
        "stream": request.stream,
        "partial_images": request.partial_images,
        "input_fidelity": request.input_fidelity,
    }


def _as_read(fields: dict[str, Any]) -> dict[str, Any]:
    """What a reader of `fields` takes each priced parameter to be (absent → default)."""
    return {
        "model": fields["model"],
        "quality": fields.get("quality", "auto"),
        "size": fields.get("size", "auto"),
        "n": int(fields.get("n", 1)),
        "stream": fields.get("stream") in (True, "true"),
        "partial_images": int(fields.get("partial_images", 0)),
        "input_fidelity": fields.get("input_fidelity"),
    }


def _same_order(request: ImageRequest, raw: Any) -> None:
    """OpenAI's validation of what the simulator read gives what Tollgate priced."""
    try:
        order = validate(raw)
    except ApiError:
        return
    assert order.model.name == request.model
    assert order.n == request.n
    assert order.stream == request.stream
    assert order.partial_images == request.partial_images
    if request.quality != "auto":
        assert order.quality == request.quality
    if request.size != "auto":
        assert order.size == request.size
    for seen, priced in zip(order.images, request.images, strict=True):
        if priced.width is not None and seen.width is not None:
            assert seen == priced


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    assert len({k for k, _ in pairs}) == len(pairs)
    return dict(pairs)


def _check_json(endpoint: Endpoint, parsed: ParsedBody) -> None:
    forwarded, content_type = parsed.encode({})
    fields = json.loads(forwarded, object_pairs_hook=_no_duplicates)
    nested = {"images", "mask"} if endpoint == "edits" else set()
    assert set(fields) <= OPENAI_PARAMS[endpoint, False] | nested
    assert _as_read(fields) == _scalars(parsed.request)
    assert parsed.request.user == (fields.get("safety_identifier") or fields.get("user"))
    # Data URLs as a lenient decoder and Pillow read them: the size Tollgate priced.
    refs = [*fields.get("images", ()), *([fields["mask"]] if "mask" in fields else [])]
    priced = [*parsed.request.images, *([parsed.request.mask] if parsed.request.mask else [])]
    for ref, bound in zip(refs, priced, strict=True):
        url = ref.get("image_url", "")
        if url.startswith("data:") and bound.width is not None:
            data = base64.b64decode(url.partition(",")[2])
            assert InputImage(*Image.open(io.BytesIO(data)).size) == bound
    again = parse_request(endpoint, content_type, forwarded, DEFAULT_MODEL)
    assert again.request.with_changes(params=()) == parsed.request.with_changes(params=())
    _same_order(parsed.request, parse_json(endpoint, forwarded))


def _email_parts(content_type: str, body: bytes) -> list[tuple[str, str | None, bytes]]:
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    assert message.is_multipart()
    found = []
    for part in message.iter_parts():  # type: ignore[attr-defined]
        assert part.get_content_charset() is None
        assert part.get("content-transfer-encoding") is None
        name = part.get_param("name", header="content-disposition")
        found.append((name, part.get_filename(), part.get_payload(decode=True)))
    return found


def _check_multipart(endpoint: Endpoint, parsed: ParsedBody) -> None:
    forwarded, content_type = parsed.encode({})
    request = parsed.request
    # The stdlib email parser: plain names, no charsets, each scalar once, images as sent.
    parts = _email_parts(content_type, forwarded)
    scalars = {name: payload for name, filename, payload in parts if filename is None}
    assert len(scalars) == sum(filename is None for _, filename, _ in parts)
    assert set(scalars) <= OPENAI_PARAMS[endpoint, True]
    assert _as_read({k: v.decode() for k, v in scalars.items()}) == _scalars(request)
    files = [(name, payload) for name, filename, payload in parts if filename is not None]
    priced = [*request.images, *([request.mask] if request.mask else [])]
    sizes = [
        InputImage(*Image.open(io.BytesIO(data)).size) for name, data in files if name != "markup"
    ]
    for seen, bound in zip(sorted(sizes, key=str), sorted(priced, key=str), strict=False):
        if bound.width is not None:
            assert seen in priced
    assert len(sizes) == len(priced)
    # The simulated upstream: starlette's form parser (charset-aware) and Pillow.
    raw = raw_request(endpoint, forwarded, content_type)
    assert {k: str(v) for k, v in raw.fields.items()} == {k: v.decode() for k, v in scalars.items()}
    _same_order(request, raw)
    again = parse_request(endpoint, content_type, forwarded, DEFAULT_MODEL)
    assert again.request.with_changes(params=()) == request.with_changes(params=())


@FUZZ
@given(json_bodies())
def test_forwarded_json_is_read_as_priced(case: tuple[Endpoint, bytes]) -> None:
    endpoint, body = case
    parsed = _tollgate(endpoint, "application/json", body)
    if parsed is not None:
        _check_json(endpoint, parsed)


@FUZZ
@given(multipart_bodies())
def test_forwarded_multipart_is_read_as_priced(case: tuple[Endpoint, bytes, str]) -> None:
    endpoint, body, content_type = case
    parsed = _tollgate(endpoint, content_type, body)
    if parsed is not None:
        _check_multipart(endpoint, parsed)


@FUZZ
@given(json_bodies(), st.sampled_from(["quality", "size", "model"]))
def test_a_downgrade_changes_only_its_field(case: tuple[Endpoint, bytes], knob: str) -> None:
    endpoint, body = case
    parsed = _tollgate(endpoint, "application/json", body)
    if parsed is None:
        return
    value = {"quality": "low", "size": "1024x1024", "model": "gpt-image-1-mini"}[knob]
    forwarded, _ = parsed.encode({knob: value})
    expected = {**_scalars(parsed.request), knob: value}
    assert _as_read(json.loads(forwarded)) == expected


# --- the whole app: never a 500 -----------------------------------------------------------------

KEY = "tg_test_fuzz_key"


@pytest.fixture(scope="module")
def app_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    root: Path = tmp_path_factory.mktemp("fuzz")
    write_config(root, "http://simulated/v1", teams={
        "web": f"name: web\nkeys:\n  - {{id: k, sha256: {key_hash(KEY)}}}\n",
    })  # fmt: skip
    with TestClient(in_process(root), raise_server_exceptions=False) as client:
        yield client


arrivals = st.one_of(
    json_bodies().map(lambda c: (c[0], c[1], "application/json")),
    multipart_bodies(),
    st.tuples(
        st.sampled_from(["generations", "edits", "variations"]),
        st.binary(max_size=64),
        st.sampled_from(["application/json", "multipart/form-data; boundary=x", "", "text/plain"]),
    ),
)


@FUZZ
@given(arrivals, st.sampled_from(["content-type", "Content-Type", "CONTENT-TYPE"]))
def test_the_app_never_answers_500(
    app_client: TestClient, arrival: tuple[Endpoint, bytes, str], header: str
) -> None:
    endpoint, body, content_type = arrival
    answer = app_client.post(
        f"/v1/images/{endpoint}",
        content=body,
        headers={"authorization": f"Bearer {KEY}", header: content_type},
    )
    event(f"status {answer.status_code}")
    assert answer.status_code != 500, answer.text
    assert answer.headers["x-tollgate-request-id"].startswith("tg_req_")
    if answer.status_code >= 300:
        error = answer.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["message"] and error["code"]
