"""Client bodies → ImageRequest, and bodies written back with changes."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import httpx
import pytest
from PIL import Image

from proxy.core import parsing
from proxy.core.errors import InvalidRequest
from proxy.core.models import Endpoint, InputImage
from proxy.core.multipart import MAX_PARTS, parse_multipart
from proxy.core.parsing import MAX_DEPTH, MAX_VALUES, ParsedBody, json_object, parse_request

JSON = "application/json"
DEFAULT_MODEL = "gpt-image-2"


def image_bytes(width: int, height: int, fmt: str = "PNG", mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, (width, height), (200, 30, 30) if mode == "RGB" else (0, 0, 0, 0)).save(
        out, fmt
    )
    return out.getvalue()


def generations(fields: dict[str, Any]) -> ParsedBody:
    return parse_request("generations", JSON, json.dumps(fields).encode(), DEFAULT_MODEL)


def multipart(
    data: dict[str, Any], files: list[tuple[str, tuple[str, bytes, str]]]
) -> tuple[bytes, str]:
    """A body exactly as httpx (and so the openai SDK) writes it."""
    sent = httpx.Request("POST", "http://test/v1/images/edits", data=data, files=files)
    return sent.read(), sent.headers["content-type"]


def edit(
    data: dict[str, Any],
    files: list[tuple[str, tuple[str, bytes, str]]],
    endpoint: Endpoint = "edits",
) -> ParsedBody:
    body, content_type = multipart(data, files)
    return parse_request(endpoint, content_type, body, DEFAULT_MODEL)


def png(name: str, width: int = 64, height: int = 48) -> tuple[str, tuple[str, bytes, str]]:
    return name, ("img.png", image_bytes(width, height), "image/png")


def data_url(width: int, height: int, fmt: str = "PNG") -> str:
    mime = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}[fmt]
    return f"data:{mime};base64," + base64.b64encode(image_bytes(width, height, fmt)).decode()


def invalid(endpoint: Endpoint, content_type: str, body: bytes) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        parse_request(endpoint, content_type, body, DEFAULT_MODEL)
    return caught.value


# --- JSON generations --------------------------------------------------------------------------


def test_generation_defaults() -> None:
    request = generations({"prompt": "a cat"}).request
    assert request.endpoint == "generations"
    assert request.model == DEFAULT_MODEL
    assert (request.quality, request.size, request.n) == ("auto", "auto", 1)
    assert (request.stream, request.partial_images) == (False, 0)
    assert request.images == () and request.mask is None
    assert request.user is None


def test_generation_reads_every_priced_field() -> None:
    request = generations(
        {
            "prompt": "ünï",
            "model": "gpt-image-2.5-flare",
            "quality": "xhigh",
            "size": "1536x864",
            "n": 3,
            "stream": True,
            "partial_images": 2,
            "output_format": "webp",
        }
    ).request
    assert request.model == "gpt-image-2.5-flare"
    assert request.prompt_bytes == len("ünï".encode())
    assert (request.quality, request.size, request.n) == ("xhigh", "1536x864", 3)
    assert (request.stream, request.partial_images) == (True, 2)
    assert ("output_format", "webp") in request.params
    assert ("n", "3") in request.params


def test_null_fields_take_their_defaults() -> None:
    request = generations({"prompt": "x", "model": None, "n": None, "quality": None}).request
    assert (request.model, request.n, request.quality) == (DEFAULT_MODEL, 1, "auto")


@pytest.mark.parametrize(
    ("fields", "user"),
    [
        ({"user": "u-1"}, "u-1"),
        ({"safety_identifier": "s-1"}, "s-1"),
        ({"user": "u-1", "safety_identifier": "s-1"}, "s-1"),
        ({"user": "u-1", "safety_identifier": ""}, "u-1"),
    ],
)
def test_safety_identifier_takes_precedence_over_user(fields: dict[str, str], user: str) -> None:
    assert generations({"prompt": "x", **fields}).request.user == user


@pytest.mark.parametrize("name", ["user", "safety_identifier"])
def test_an_end_user_id_past_its_length_is_refused_before_it_names_a_budget(name: str) -> None:
    # Incompressible 3-byte characters: 15 kB, past what PostgreSQL indexes in a counter's key.
    long = "".join(chr(0x4E00 + i * 7919 % 20000) for i in range(5000))
    with pytest.raises(InvalidRequest) as caught:
        generations({"prompt": "x", name: long})
    assert caught.value.param == name
    assert "maximum length 256" in str(caught.value)
    assert generations({"prompt": "x", name: "\U0001f600" * 256}).request.user is not None


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": 42}, "prompt"),
        ({"prompt": "x" * 32_001}, "prompt"),
        ({"prompt": "x", "n": "2"}, "n"),
        ({"prompt": "x", "n": 1.5}, "n"),
        ({"prompt": "x", "n": True}, "n"),
        ({"prompt": "x", "stream": "true"}, "stream"),
        ({"prompt": "x", "stream": 1}, "stream"),
        ({"prompt": "x", "partial_images": 2}, "partial_images"),
        ({"prompt": "x", "stream": True, "partial_images": 4}, "partial_images"),
        ({"prompt": "x", "stream": True, "partial_images": -1}, "partial_images"),
        ({"prompt": "x", "model": 2}, "model"),
        ({"prompt": "x", "quality": ["high"]}, "quality"),
        ({"prompt": "x", "size": 1024}, "size"),
        # Forwarded as written: priced only when written as OpenAI's sizes are.
        ({"prompt": "x", "size": "01024x1024"}, "size"),
        ({"prompt": "x", "size": "1024x01024"}, "size"),
        ({"prompt": "x", "size": "0x0"}, "size"),
    ],
)
def test_generation_refusals_name_the_parameter(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        generations(fields)
    assert caught.value.param == param


def test_prompt_of_exactly_the_maximum_length_is_accepted() -> None:
    assert generations({"prompt": "x" * 32_000}).request.prompt_bytes == 32_000


@pytest.mark.parametrize("body", [b"{not json", b"", b"\xff\xfe"])
def test_body_that_is_not_json_is_refused(body: bytes) -> None:
    assert invalid("generations", JSON, body).param is None


@pytest.mark.parametrize("number", [b"1e400", b"-1e400", b"1" + b"0" * 400 + b".5"])
def test_a_number_past_a_floats_range_is_refused(number: bytes) -> None:
    """It was read as infinity, and a body re-encoded from it (a Responses request's) was
    forwarded with `Infinity`, which is not JSON."""
    with pytest.raises(InvalidRequest) as caught:
        json_object(b'{"model": "gpt-5.5", "temperature": ' + number + b"}")
    assert "out of range" in caught.value.message


@pytest.mark.parametrize("body", [b"[]", b'"prompt"', b"null", b"3"])
def test_json_that_is_not_an_object_is_refused(body: bytes) -> None:
    error = invalid("generations", JSON, body)
    assert "object" in error.message


def nested(depth: int, kind: str = "array") -> bytes:
    """A generations body whose `metadata` makes it `depth` levels deep in all."""
    levels = depth - 1
    if kind == "array":
        inner = "[" * levels + "]" * levels
    else:
        inner = '{"a": ' * (levels - 1) + "{}" + "}" * (levels - 1)
    return f'{{"prompt": "a cat", "metadata": {inner}}}'.encode()


@pytest.mark.parametrize("kind", ["array", "object"])
@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 5_000, 50_000])
def test_json_nested_deeper_than_the_bound_is_refused_not_raised(depth: int, kind: str) -> None:
    # 5,000 and 50,000 levels once escaped as a RecursionError: a 500 with no ledger row.
    with pytest.raises(InvalidRequest, match=f"more than {MAX_DEPTH} deep"):
        json_object(nested(depth, kind))


@pytest.mark.parametrize("item", [b"{}", b"[]", b"0", b'"ab"'])
def test_json_holding_more_values_than_the_bound_is_refused_before_it_is_decoded(
    item: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """8 MiB of `{},` once decoded into 2.8 million dicts: 390 MiB and 4.6 s of the event
    loop for one request, gigabytes for a 128 MiB Responses body."""

    def never(text: str) -> None:
        raise AssertionError("decoded")

    body = b'{"prompt": "a cat", "metadata": [' + b",".join([item] * (MAX_VALUES + 1)) + b"]}"
    monkeypatch.setattr(parsing._DECODER, "decode", never)
    with pytest.raises(InvalidRequest, match=f"more than {MAX_VALUES:,} values"):
        json_object(body)


def test_json_with_a_large_string_and_few_values_is_read() -> None:
    """A data URL is one value however large: it is searched for brackets and commas, not
    counted byte by byte."""
    data = "data:image/png;base64," + "A" * 4_000_000
    body = json.dumps({"prompt": "a, b, c", "images": [{"image_url": data}]}).encode()
    assert json_object(body)["images"][0]["image_url"] == data


def test_json_with_values_up_to_the_bound_is_read() -> None:
    body = b'{"prompt": "a cat", "metadata": [' + b",".join([b"0"] * (MAX_VALUES - 2)) + b"]}"
    assert len(json_object(body)["metadata"]) == MAX_VALUES - 2


@pytest.mark.parametrize("kind", ["array", "object"])
def test_json_nested_to_the_bound_is_read(kind: str) -> None:
    assert json_object(nested(MAX_DEPTH, kind))["metadata"]


@pytest.mark.parametrize(
    ("endpoint", "content_type"),
    [
        ("generations", "multipart/form-data; boundary=abc"),
        ("generations", "text/plain"),
        ("generations", ""),
        ("edits", "text/plain"),
        ("edits", "application/x-www-form-urlencoded"),
        ("variations", JSON),
        ("variations", "text/plain"),
    ],
)
def test_wrong_content_type_is_refused(endpoint: Endpoint, content_type: str) -> None:
    error = invalid(endpoint, content_type, b'{"prompt": "x"}')
    assert "content type" in error.message


def test_json_content_type_with_charset_is_accepted() -> None:
    parsed = parse_request(
        "generations", "application/json; charset=utf-8", b'{"prompt": "x"}', DEFAULT_MODEL
    )
    assert parsed.request.prompt_bytes == 1


# --- multipart edits -----------------------------------------------------------------------------


def test_multipart_edit_with_a_single_image() -> None:
    request = edit({"prompt": "add a hat", "model": "gpt-image-1"}, [png("image", 64, 48)]).request
    assert request.endpoint == "edits"
    assert request.model == "gpt-image-1"
    assert request.images == (InputImage(64, 48),)
    assert request.mask is None


def test_multipart_edit_with_repeated_image_array() -> None:
    files = [png("image[]", 64, 48), png("image[]", 32, 96), png("image[]", 16, 16)]
    request = edit({"prompt": "merge"}, files).request
    assert request.images == (InputImage(64, 48), InputImage(32, 96), InputImage(16, 16))


def test_multipart_edit_reads_the_mask() -> None:
    mask = ("mask", ("mask.png", image_bytes(64, 48, mode="RGBA"), "image/png"))
    request = edit({"prompt": "x"}, [png("image", 64, 48), mask]).request
    assert request.mask == InputImage(64, 48)


def test_multipart_edit_accepts_markup_and_does_not_count_it_as_an_input_image() -> None:
    markup = ("markup", ("markup.png", image_bytes(64, 48, mode="RGBA"), "image/png"))
    request = edit({"prompt": "x"}, [png("image", 64, 48), markup]).request
    assert request.images == (InputImage(64, 48),)
    assert request.markup == InputImage(64, 48)  # priced as one, apart from the images


@pytest.mark.parametrize(
    ("fmt", "mime"), [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")]
)
def test_multipart_edit_reads_real_image_dimensions(fmt: str, mime: str) -> None:
    files = [("image", (f"a.{fmt.lower()}", image_bytes(1536, 1024, fmt), mime))]
    assert edit({"prompt": "x"}, files).request.images == (InputImage(1536, 1024),)


@pytest.mark.parametrize("field", ["image", "image[]", "mask", "markup"])
def test_multipart_part_that_is_not_an_image_is_refused(field: str) -> None:
    files = [png("image")] if field != "image" and field != "image[]" else []
    files.append((field, ("notes.txt", b"hello, not an image", "text/plain")))
    with pytest.raises(InvalidRequest) as caught:
        edit({"prompt": "x"}, files)
    assert caught.value.param == field


def test_multipart_duplicate_plain_image_is_refused() -> None:
    with pytest.raises(InvalidRequest) as caught:
        edit({"prompt": "x"}, [png("image"), png("image")])
    assert caught.value.param == "image"
    assert "image[]" in caught.value.message


def test_multipart_edit_without_an_image_is_refused() -> None:
    with pytest.raises(InvalidRequest) as caught:
        edit({"prompt": "x"}, [png("mask")])
    assert caught.value.param == "image"


def test_multipart_edit_with_17_images_is_refused() -> None:
    with pytest.raises(InvalidRequest) as caught:
        edit({"prompt": "x"}, [png("image[]", 16, 16)] * 17)
    assert caught.value.param == "image"


def test_multipart_edit_without_a_prompt_is_refused() -> None:
    with pytest.raises(InvalidRequest) as caught:
        edit({"model": "gpt-image-1"}, [png("image")])
    assert caught.value.param == "prompt"


def test_multipart_scalars_get_their_types_back() -> None:
    data = {"prompt": "x", "n": "2", "stream": "true", "partial_images": "3", "quality": "low"}
    request = edit(data, [png("image")]).request
    assert (request.n, request.stream, request.partial_images) == (2, True, 3)
    assert request.quality == "low"


@pytest.mark.parametrize("value", ["false", "False", "FALSE"])
def test_multipart_stream_false_is_false(value: str) -> None:
    assert edit({"prompt": "x", "stream": value}, [png("image")]).request.stream is False


@pytest.mark.parametrize(
    ("data", "param"),
    [
        ({"prompt": "x", "n": "two"}, "n"),
        ({"prompt": "x", "stream": "yes"}, "stream"),
        ({"prompt": "x", "partial_images": "1"}, "partial_images"),
        ({"prompt": "x", "stream": "true", "partial_images": "9"}, "partial_images"),
        ({"prompt": "x", "output_compression": "high"}, "output_compression"),
    ],
)
def test_multipart_scalar_refusals_name_the_parameter(data: dict[str, str], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        edit(data, [png("image")])
    assert caught.value.param == param


def test_multipart_variation_defaults_to_dall_e_2_and_needs_no_prompt() -> None:
    request = edit({}, [png("image", 256, 256)], endpoint="variations").request
    assert request.model == "dall-e-2"
    assert request.images == (InputImage(256, 256),)
    assert request.prompt_bytes == 0


def test_multipart_variation_with_two_images_is_refused() -> None:
    with pytest.raises(InvalidRequest) as caught:
        edit({}, [png("image[]"), png("image[]")], endpoint="variations")
    assert caught.value.param == "image"


def test_multipart_without_a_boundary_is_refused() -> None:
    invalid("edits", "multipart/form-data", b"--x\r\n")


@pytest.mark.parametrize("endpoint", ["edits", "variations"])
def test_a_boundary_longer_than_the_parser_takes_is_refused_not_raised(endpoint: Endpoint) -> None:
    # python-multipart refuses a boundary past 256 bytes when the parser is built: that
    # FormParserError once escaped as a 500 with no ledger row.
    boundary = "b" * 300
    body = f'--{boundary}\r\nContent-Disposition: form-data; name="prompt"\r\n\r\ncat\r\n'
    body += f"--{boundary}--\r\n"
    error = invalid(endpoint, f"multipart/form-data; boundary={boundary}", body.encode())
    assert "Malformed multipart body" in error.message


def test_a_multipart_body_of_more_parts_than_a_request_holds_stops_being_parsed() -> None:
    """8 MiB of empty parts once took the parser 2.8 s of the event loop (45 s at the edits
    limit) before the names were checked; parsing now stops past `MAX_PARTS`."""
    part = b'--b\r\nContent-Disposition: form-data; name="image[]"\r\n\r\n\r\n'
    assert len(parse_multipart(part * MAX_PARTS + b"--b--\r\n", b"b")) == MAX_PARTS
    with pytest.raises(InvalidRequest, match=f"more than {MAX_PARTS} parts"):
        parse_multipart(part * 200_000 + b"--b--\r\n", b"b")


def test_malformed_multipart_body_is_refused() -> None:
    invalid("edits", "multipart/form-data; boundary=abc", b"this is not multipart at all")


# --- JSON edits ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_json_edit_reads_dimensions_of_data_url_images(fmt: str) -> None:
    body = {"prompt": "x", "images": [{"image_url": data_url(320, 200, fmt)}]}
    parsed = parse_request("edits", JSON, json.dumps(body).encode(), DEFAULT_MODEL)
    assert parsed.request.images == (InputImage(320, 200),)


def test_json_edit_http_urls_and_file_ids_have_unknown_dimensions() -> None:
    body = {
        "prompt": "x",
        "images": [{"image_url": "https://example.com/a.png"}, {"file_id": "file-abc"}],
        "mask": {"file_id": "file-mask"},
    }
    request = parse_request("edits", JSON, json.dumps(body).encode(), DEFAULT_MODEL).request
    assert request.images == (InputImage(), InputImage())
    assert request.images[0].width is None and request.images[0].height is None
    assert request.mask == InputImage()


def test_json_edit_reads_a_data_url_mask() -> None:
    body = {
        "prompt": "x",
        "images": [{"image_url": data_url(64, 64)}],
        "mask": {"image_url": data_url(64, 64)},
    }
    request = parse_request("edits", JSON, json.dumps(body).encode(), DEFAULT_MODEL).request
    assert request.mask == InputImage(64, 64)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({}, "images"),
        ({"images": []}, "images"),
        ({"images": "https://example.com/a.png"}, "images"),
        ({"images": [{"file_id": "f"}] * 17}, "images"),
        ({"images": ["https://example.com/a.png"]}, "images[0]"),
        ({"images": [{}]}, "images[0]"),
        ({"images": [{"file_id": "f"}, {"image_url": "u", "file_id": "f"}]}, "images[1]"),
        ({"images": [{"image_url": "data:image/png;base64,!!!notbase64"}]}, "images[0]"),
        (
            {"images": [{"image_url": "data:image/png;base64," + base64.b64encode(b"t").decode()}]},
            "images[0]",
        ),
        ({"images": [{"file_id": "f"}], "mask": {"url": "x"}}, "mask"),
    ],
)
def test_json_edit_bad_image_references_are_refused(fields: dict[str, Any], param: str) -> None:
    body = json.dumps({"prompt": "x", **fields}).encode()
    assert invalid("edits", JSON, body).param == param


# --- writing the body back ---------------------------------------------------------------------


def test_encode_without_changes_writes_canonical_json_with_the_model() -> None:
    raw = b'{ "prompt" : "x",  "quality":"high", "user": "", "size": null }'
    parsed = parse_request("generations", JSON, raw, DEFAULT_MODEL)
    body, content_type = parsed.encode({})
    assert body == b'{"prompt":"x","model":"gpt-image-2","quality":"high"}'
    assert content_type == JSON


def test_encode_without_changes_writes_multipart_afresh() -> None:
    body, content_type = multipart({"prompt": "x"}, [png("image")])
    parsed = parse_request("edits", content_type, body, DEFAULT_MODEL)
    forwarded, forwarded_type = parsed.encode({})
    assert forwarded_type != content_type and forwarded_type.startswith(
        "multipart/form-data; boundary=tollgate-"
    )
    again = parse_request("edits", forwarded_type, forwarded, DEFAULT_MODEL)
    assert again.request == parsed.request.with_changes(params=(("model", DEFAULT_MODEL),))


def test_encode_json_changes_only_the_given_key() -> None:
    fields = {"prompt": "x", "quality": "high", "size": "1024x1024", "n": 2, "user": "u"}
    parsed = generations(fields)
    body, content_type = parsed.encode({"quality": "low"})
    assert content_type == JSON
    assert json.loads(body) == {**fields, "model": DEFAULT_MODEL, "quality": "low"}


def test_encode_json_adds_a_missing_model() -> None:
    parsed = generations({"prompt": "x"})
    body, _ = parsed.encode({"model": DEFAULT_MODEL})
    assert json.loads(body) == {"prompt": "x", "model": DEFAULT_MODEL}


def test_encode_multipart_changes_quality_and_keeps_the_image_bytes() -> None:
    image = image_bytes(64, 48)
    mask = image_bytes(64, 48, mode="RGBA")
    files = [
        ("image[]", ("a.png", image, "image/png")),
        ("image[]", ("b.jpg", image_bytes(30, 20, "JPEG"), "image/jpeg")),
        ("mask", ("m.png", mask, "image/png")),
    ]
    parsed = edit({"prompt": "add a hat", "quality": "high", "n": "2"}, files)
    body, content_type = parsed.encode({"quality": "low"})
    assert content_type.startswith("multipart/form-data; boundary=")
    again = parse_request("edits", content_type, body, DEFAULT_MODEL)
    assert again.request == parsed.request.with_changes(
        quality="low", params=(("model", DEFAULT_MODEL), ("quality", "low"), ("n", "2"))
    )
    # Each image keeps its bytes; its filename and content type say what they are.
    assert [(u.name, bytes(u.data), u.format) for u in again.uploads] == [
        ("image[]", image, "png"),
        ("image[]", files[1][1][1], "jpeg"),
        ("mask", mask, "png"),
    ]
    assert b'filename="image.jpeg"\r\nContent-Type: image/jpeg' in body


def test_encode_multipart_adds_a_missing_model() -> None:
    parsed = edit({"prompt": "x"}, [png("image", 64, 48)])
    body, content_type = parsed.encode({"model": "gpt-image-1.5"})
    again = parse_request("edits", content_type, body, DEFAULT_MODEL)
    assert again.request.model == "gpt-image-1.5"
    assert again.request.images == (InputImage(64, 48),)
    assert again.request.prompt_bytes == 1


# --- what is refused, and what is the same as absent ----------------------------------------------


def raw_multipart(parts: list[tuple[str, bytes]], options: str = "") -> tuple[bytes, str]:
    """A multipart body from (header block, value) pairs written by hand."""
    chunks = [b"--b\r\n" + head.encode() + b"\r\n\r\n" + value + b"\r\n" for head, value in parts]
    return b"".join(chunks) + b"--b--\r\n", "multipart/form-data; boundary=b" + options


def cd(params: str, *headers: str) -> str:
    """A part's header block: `Content-Disposition: form-data; PARAMS` and more headers."""
    return "\r\n".join((f"Content-Disposition: form-data; {params}", *headers))


IMAGE_PART = (cd('name="image"; filename="a.png"'), image_bytes(8, 8))
MASK_PART = (cd('name="mask"; filename="m.png"'), image_bytes(8, 8))
PROMPT_PART = (cd('name="prompt"'), b"x")
UTF7 = "Content-Type: text/plain; charset=utf-7"


@pytest.mark.parametrize(
    ("parts", "options"),
    [
        ([PROMPT_PART, IMAGE_PART], "; charset=utf-7"),
        ([PROMPT_PART, IMAGE_PART], '; charset="UTF-16"'),
        ([(cd('name="prompt"', UTF7), b"x"), IMAGE_PART], ""),
        ([(cd("name*=UTF-8''prompt"), b"x"), IMAGE_PART], ""),
        ([PROMPT_PART, (cd("name=\"image\"; filename*=UTF-8''a.png"), image_bytes(8, 8))], ""),
        ([(cd('name="prompt"; name="model"'), b"x"), IMAGE_PART], ""),
        ([('Content-Disposition: attachment; name="prompt"', b"x"), IMAGE_PART], ""),
        ([(cd('name="prompt"', "Content-Transfer-Encoding: base64"), b"eA=="), IMAGE_PART], ""),
        ([(cd('name="prompt"', cd('name="model"')), b"x"), IMAGE_PART], ""),
        ([(cd('name="prompt"', "X-Extra: 1"), b"x"), IMAGE_PART], ""),
        ([PROMPT_PART, (cd('name="n"'), b"1"), (cd('name="n"'), b"10"), IMAGE_PART], ""),
        ([PROMPT_PART, (cd('name="n"'), "１".encode()), IMAGE_PART], ""),
        ([PROMPT_PART, (cd('name="n"'), b" 1"), IMAGE_PART], ""),
        ([PROMPT_PART, (cd('name="n"'), b"9" * 5000), IMAGE_PART], ""),
        ([PROMPT_PART, (cd('name="mod\xc3\xa9l"'), b"x"), IMAGE_PART], ""),
        ([PROMPT_PART, (cd('name="user"'), b"\xed\xa0\x80"), IMAGE_PART], ""),
        ([PROMPT_PART, IMAGE_PART, MASK_PART, MASK_PART], ""),
    ],
)
def test_ambiguous_multipart_is_refused(parts: list[tuple[str, bytes]], options: str) -> None:
    body, content_type = raw_multipart(parts, options)
    invalid("edits", content_type, body)


def test_random_header_casing_and_utf8_charsets_are_accepted() -> None:
    prompt = (
        'CONTENT-DISPOSITION: FORM-DATA; NAME="prompt"\r\ncontent-type: text/plain; charset=UTF-8'
    )
    image = cd('name="image"; filename="ü.png"', "Content-Type: application/octet-stream")
    body, content_type = raw_multipart(
        [(prompt, "é".encode()), ("content-disposition: form-data; name=n", b"2"),
         (image, image_bytes(8, 6))],
        "; charset=us-ascii",
    )  # fmt: skip
    request = parse_request("edits", content_type, body, DEFAULT_MODEL).request
    assert (request.prompt_bytes, request.n, request.images) == (2, 2, (InputImage(8, 6),))


def test_data_urls_are_strict_base64_of_what_they_say() -> None:
    good = data_url(16, 16)
    for url in (
        good[:40] + "\n" + good[40:],  # a lenient decoder skips it, another stops there
        good.replace("image/png", "image/jpeg"),
        good.replace(";base64", ""),
        "ftp://example.com/a.png",
    ):
        body = json.dumps({"prompt": "x", "images": [{"image_url": url}]}).encode()
        assert invalid("edits", JSON, body).param == "images[0]"
