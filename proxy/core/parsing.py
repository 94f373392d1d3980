"""Image requests out of client bodies, and the bodies Tollgate forwards (pure).

Generations are JSON; edits are multipart (`image`, repeated `image[]`, `mask`,
`markup`) or JSON (`images: [{image_url}|{file_id}]`); variations are multipart.

What goes upstream is built from Tollgate's own parse, never the client's bytes:
a parser that reads a body differently (a `charset=utf-7` part name, a duplicate
JSON key, a second PNG header) would otherwise be billed for a request Tollgate
did not price. So every parameter is one OpenAI accepts on that endpoint and
Tollgate either prices or knows to be price-neutral; anything else is refused,
as are duplicates, charsets other than UTF-8, integers outside a sane range or
written in other than ASCII digits, and strings holding NUL or lone surrogates.
Empty and absent are the same: the default applies, and the model is always
written out. `ParsedBody.encode` writes canonical JSON, or multipart afresh
(proxy.core.multipart: the form-data wire format, read and written).
"""

from __future__ import annotations

import binascii
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from python_multipart.multipart import parse_options_header

from proxy.core.dimensions import measure_image
from proxy.core.errors import InvalidRequest
from proxy.core.image_tokens import parse_size
from proxy.core.models import Endpoint, ImageRequest, InputImage
from proxy.core.multipart import (
    Part,
    Scalar,
    Upload,
    check_charset,
    encode_multipart,
    form_text,
    parse_multipart,
)

MAX_PROMPT_CHARS = 32_000
MAX_PARTIAL_IMAGES = 3
MAX_IMAGES = 16
MAX_INTEGER = 2**31 - 1
"""No integer parameter means anything near this; past it a value is refused before it is
priced or recorded (a 64-bit ledger column overflows at 2**63)."""
IMAGE_FIELDS = ("image", "image[]", "mask", "markup")
AUTO = "auto"
DIGITS = re.compile(r"[0-9]+", re.ASCII)
UNSAFE_CHARS = re.compile("[\x00\ud800-\udfff]")
DATA_URL = re.compile(r"data:image/(png|jpeg|jpg|webp);base64,", re.ASCII)

JSON_TYPE: tuple[bytes, dict[bytes, bytes]] = (b"application/json", {})
Kind = Literal["text", "integer", "boolean"]


@dataclass(frozen=True, slots=True)
class Param:
    """How one scalar parameter is read: its type, and its values when it has few."""

    kind: Kind = "text"
    choices: tuple[str, ...] = ()


PARAMS: Mapping[str, Param] = {
    "prompt": Param(),
    "model": Param(),
    "n": Param("integer"),
    "size": Param(),
    "quality": Param(),
    "stream": Param("boolean"),
    "partial_images": Param("integer"),
    "input_fidelity": Param(choices=("high", "low")),
    # Price-neutral: they change how the image is delivered, not how many tokens it costs.
    "background": Param(choices=("transparent", "opaque", "auto")),
    "output_format": Param(choices=("png", "jpeg", "webp")),
    "output_compression": Param("integer"),
    "moderation": Param(choices=("low", "auto")),
    "response_format": Param(choices=("url", "b64_json")),
    "style": Param(choices=("vivid", "natural")),
    "user": Param(),
    "safety_identifier": Param(),
}
_GENERATION = frozenset(PARAMS) - {"input_fidelity"}
_EDIT = frozenset(PARAMS) - {"moderation", "style"}
ACCEPTED: Mapping[tuple[Endpoint, bool], frozenset[str]] = {
    # (endpoint, multipart) → the scalar parameters OpenAI's Images API takes there.
    ("generations", False): _GENERATION,
    ("edits", True): _EDIT,
    ("edits", False): _EDIT | {"moderation"},
    ("variations", True): frozenset({"model", "n", "size", "response_format", "user"}),
}
UNPRICED = frozenset({"complexity", "frame_count", "frame_duration_ms", "svg"})
"""Accepted by OpenAI, but their cost (planning, GIF frames, SVG models) is not in the price
book: Tollgate cannot bound it, so it refuses them rather than forward unpriced spend."""


@dataclass(frozen=True)
class ParsedBody:
    """A client body understood, and everything needed to write it out again."""

    request: ImageRequest
    fields: Mapping[str, Scalar]
    """The scalar parameters to forward, validated and typed, the model always included."""
    names_model: bool
    """False when the client gave no model (or an empty one) and the default was applied."""
    multipart: bool = False
    uploads: tuple[Upload, ...] = ()
    references: Mapping[str, Any] | None = None
    """JSON edits: `images` and `mask`, each reference rebuilt with its one key."""

    def encode(self, changes: Mapping[str, str]) -> tuple[bytes, str]:
        """The body to forward with `changes` (field → new value): always written afresh."""
        fields = {**self.fields, **changes} if changes else self.fields
        if not self.multipart:
            text = _ENCODER.encode(fields)
            if self.references:
                text = text[:-1] + "".join(_encode_references(self.references)) + "}"
            return text.encode(), "application/json"
        return encode_multipart(fields, self.uploads)


def _encode_references(references: Mapping[str, Any]) -> Iterator[str]:
    """`,"images":[…],"mask":{…}` without the JSON encoder's escaping pass over data URLs:
    one that was accepted is strict base64 behind a fixed prefix, with nothing to escape
    (the encoder's pass over megabytes of base64 costs far more than a copy)."""
    for key, value in references.items():
        yield f",{_ENCODER.encode(key)}:"
        if isinstance(value, list):
            yield "[" + ",".join(_encode_reference(ref) for ref in value) + "]"
        else:
            yield _encode_reference(value)


def _encode_reference(ref: Mapping[str, str]) -> str:
    url = ref.get("image_url")
    if url is not None and url.startswith("data:"):
        return '{"image_url":"' + url + '"}'
    return _ENCODER.encode(ref)


def parse_request(
    endpoint: Endpoint, content_type: str, body: bytes, default_model: str
) -> ParsedBody:
    """Understand a client body for `endpoint`; raises InvalidRequest with OpenAI's wording."""
    media_type, options = (
        JSON_TYPE if content_type == "application/json" else parse_options_header(content_type)
    )
    if media_type == b"application/json" and endpoint != "variations":
        check_charset(options, "the request")
        return _json_request(endpoint, body, default_model)
    if media_type == b"multipart/form-data" and endpoint != "generations":
        check_charset(options, "the request")
        boundary = options.get(b"boundary")
        if not boundary:
            raise InvalidRequest("Multipart body without a boundary.")
        return _multipart_request(endpoint, parse_multipart(body, boundary), default_model)
    expected = (
        "application/json"
        if endpoint == "generations"
        else (
            "multipart/form-data"
            if endpoint == "variations"
            else "multipart/form-data or application/json"
        )
    )
    raise InvalidRequest(
        f"Unsupported content type {content_type or '(none)'!r} for /v1/images/{endpoint}: "
        f"send {expected}."
    )


def _json_request(endpoint: Endpoint, body: bytes, default_model: str) -> ParsedBody:
    """A JSON body: generations, or edits whose images are references (URLs or file ids)."""
    given = json_object(body)
    _check_names(
        given, ACCEPTED[endpoint, False], ("images", "mask") if endpoint == "edits" else ()
    )
    fields = _typed(given, endpoint, multipart=False)
    images: tuple[InputImage, ...] = ()
    mask = None
    references: dict[str, Any] | None = None
    if endpoint == "edits":
        references = {}
        images, references["images"] = _json_images(given.get("images"))
        if given.get("mask") is not None:
            mask, references["mask"] = _json_image_ref(given["mask"], "mask")
    return _parsed(endpoint, fields, images, mask, default_model, references=references)


def _multipart_request(endpoint: Endpoint, parts: list[Part], default_model: str) -> ParsedBody:
    """A multipart body: edits and variations with uploaded images, each text field once."""
    text: dict[str, str] = {}
    for part in parts:
        if part.name in IMAGE_FIELDS:
            continue
        if part.name in text:
            raise InvalidRequest(
                f"Duplicate parameter: '{part.name}'. It may be given only once.",
                param=part.name,
            )
        text[part.name] = _utf8(part)
    _check_names(text, ACCEPTED[endpoint, True], ())
    fields = _typed(text, endpoint, multipart=True)
    uploads, images, mask = _multipart_images(endpoint, parts)
    return _parsed(endpoint, fields, images, mask, default_model, uploads=uploads)


def _check_names(
    given: Mapping[str, Any], accepted: frozenset[str], nested: tuple[str, ...]
) -> None:
    for name in given:
        if name in accepted or name in nested:
            continue
        if name in UNPRICED or name.startswith("svg["):
            raise InvalidRequest(
                f"Tollgate cannot price '{name}', so it does not forward it.", param=name
            )
        raise InvalidRequest(f"Unrecognized request argument supplied: {name}", param=name)


def _utf8(part: Part) -> str:
    try:
        text = bytes(part.data).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest(f"Field '{part.name}' is not UTF-8 text.", param=part.name) from None
    _check_text(text, part.name)
    return text


def _check_text(text: str, name: str) -> None:
    if "\x00" in text if text.isascii() else UNSAFE_CHARS.search(text):
        raise InvalidRequest(
            f"Invalid value for '{name}': NUL characters and lone surrogates are not text.",
            param=name,
        )


def json_object(body: bytes) -> dict[str, Any]:
    """A JSON object body, read strictly (no repeated key, no NaN, no lone surrogate or NUL);
    InvalidRequest in OpenAI's words otherwise."""
    try:
        fields = _DECODER.decode(body.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"We could not parse the JSON body of your request: {exc}") from None
    if not isinstance(fields, dict):
        raise InvalidRequest("The JSON body of your request must be an object.")
    # Strict UTF-8 has no surrogates and JSON no raw NUL: only a \u escape can make either
    # (a one-byte search is memchr, much faster than searching for b"\\u").
    if b"\\" in body:
        _check_strings(fields, "the request")
    return fields


def _check_strings(value: Any, name: str) -> None:
    if isinstance(value, str):
        _check_text(value, name)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key, name)
            _check_strings(item, key if name == "the request" else name)
    elif isinstance(value, list):
        for item in value:
            _check_strings(item, name)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    fields = dict(pairs)
    if len(fields) != len(pairs):
        seen: set[str] = set()
        name = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise InvalidRequest(f"Duplicate parameter: {name!r}. It may be given only once.")
    return fields


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


# Built once: json.loads and json.dumps with options build a new coder on every call.
_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
_ENCODER = json.JSONEncoder(separators=(",", ":"))


def _typed(given: Mapping[str, Any], endpoint: Endpoint, *, multipart: bool) -> dict[str, Scalar]:
    """The scalar parameters with their types checked; empty and null ones left out."""
    fields: dict[str, Scalar] = {}
    for name, value in given.items():
        param = PARAMS.get(name)
        if param is None or value is None or value == "":
            continue
        if param.kind == "integer":
            fields[name] = _integer(name, value, multipart)
        elif param.kind == "boolean":
            fields[name] = _boolean(name, value, multipart)
        else:
            if not isinstance(value, str):
                raise InvalidRequest(f"Invalid type for '{name}': expected a string.", param=name)
            if param.choices and value not in param.choices:
                raise InvalidRequest(
                    f"Invalid value for '{name}': {value!r}. Supported values are: "
                    f"{', '.join(param.choices)}.",
                    param=name,
                )
            fields[name] = value
    size = fields.get("size")
    if isinstance(size, str) and size != AUTO and parse_size(size) is None:
        raise InvalidRequest(
            f"Invalid value for 'size': {size!r}. Expected 'auto' or WIDTHxHEIGHT.", param="size"
        )
    compression = fields.get("output_compression")
    if isinstance(compression, int) and compression > 100:
        raise InvalidRequest(
            f"Invalid value for 'output_compression': {compression}. Expected 0 to 100.",
            param="output_compression",
        )
    return fields


def _integer(name: str, value: Any, multipart: bool) -> int:
    if multipart and isinstance(value, str):
        if DIGITS.fullmatch(value) is None:
            raise InvalidRequest(
                f"Invalid value for '{name}': expected an integer in ASCII digits.", param=name
            )
        # Never int() of thousands of digits: past 10 it is out of range anyway.
        value = int(value) if len(value) <= 10 else MAX_INTEGER + 1
    elif isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"Invalid type for '{name}': expected an integer.", param=name)
    if not 0 <= value <= MAX_INTEGER:
        raise InvalidRequest(
            f"Invalid value for '{name}': expected an integer from 0 to {MAX_INTEGER}.",
            param=name,
        )
    return int(value)


def _boolean(name: str, value: Any, multipart: bool) -> bool:
    if multipart and isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if isinstance(value, bool):
        return value
    expected = "true or false" if multipart else "a boolean"
    raise InvalidRequest(f"Invalid type for '{name}': expected {expected}.", param=name)


def _json_images(refs: Any) -> tuple[tuple[InputImage, ...], list[dict[str, str]]]:
    if not isinstance(refs, list) or not refs:
        raise InvalidRequest("Missing required parameter: 'images'.", param="images")
    if len(refs) > MAX_IMAGES:
        raise InvalidRequest(f"Too many images: at most {MAX_IMAGES}.", param="images")
    read = [_json_image_ref(ref, f"images[{i}]") for i, ref in enumerate(refs)]
    return tuple(image for image, _ in read), [ref for _, ref in read]


def _json_image_ref(ref: Any, param: str) -> tuple[InputImage, dict[str, str]]:
    """One `{image_url}` or `{file_id}`: the size of a data URL's image (a URL or a file id
    is priced at the model's ceiling), and the reference rebuilt with its one key."""
    if not isinstance(ref, dict) or len(ref) != 1 or not ref.keys() <= {"image_url", "file_id"}:
        raise InvalidRequest(
            f"'{param}' must hold exactly one of image_url or file_id.", param=param
        )
    ((key, value),) = ref.items()
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"'{param}.{key}' must be a non-empty string.", param=param)
    if key == "file_id" or value.startswith(("https://", "http://")):
        # Tollgate never fetches URLs nor files: their size is unknown.
        return InputImage(), {key: value}
    header = DATA_URL.match(value)
    if header is None:
        raise InvalidRequest(
            f"'{param}.image_url' must be an http(s) URL or a base64 data URL of a PNG, JPEG "
            "or WebP image.",
            param=param,
        )
    try:
        # Strict: a decoder that skipped what Python's lenient one drops would see other bytes.
        data = binascii.a2b_base64(value[header.end() :], strict_mode=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"'{param}.image_url' is not valid base64.", param=param) from None
    fmt, image = measure_image(data, param)
    if fmt != header[1].replace("jpg", "jpeg"):
        raise InvalidRequest(
            f"'{param}.image_url' says image/{header[1]} but holds a {fmt.upper()} image.",
            param=param,
        )
    return image, {key: value}


def _multipart_images(
    endpoint: Endpoint, parts: list[Part]
) -> tuple[tuple[Upload, ...], tuple[InputImage, ...], InputImage | None]:
    files = [p for p in parts if p.name in ("image", "image[]")]
    counts = {name: sum(p.name == name for p in parts) for name in IMAGE_FIELDS}
    if counts["image"] > 1:
        raise InvalidRequest(
            "Duplicate parameter: 'image'. To send several images, use the array syntax "
            "'image[]=<value>'.",
            param="image",
        )
    for name in ("mask", "markup"):
        if counts[name] > 1:
            raise InvalidRequest(f"Duplicate parameter: '{name}'.", param=name)
    if not files:
        raise InvalidRequest("Missing required parameter: 'image'.", param="image")
    if endpoint == "variations" and (len(files) > 1 or counts["mask"] or counts["markup"]):
        raise InvalidRequest("Variations take exactly one image.", param="image")
    if len(files) > MAX_IMAGES:
        raise InvalidRequest(f"Too many images: at most {MAX_IMAGES}.", param="image")
    uploads: list[Upload] = []
    images: list[InputImage] = []
    mask = None
    for part in parts:
        if part.name not in IMAGE_FIELDS:
            continue
        fmt, image = measure_image(part.data, part.name)
        uploads.append(Upload(part.name, part.data, fmt))
        if part.name == "mask":
            mask = image
        elif part.name != "markup":
            images.append(image)
    return tuple(uploads), tuple(images), mask


def _parsed(
    endpoint: Endpoint,
    given: dict[str, Scalar],
    images: tuple[InputImage, ...],
    mask: InputImage | None,
    default_model: str,
    *,
    uploads: tuple[Upload, ...] = (),
    references: Mapping[str, Any] | None = None,
) -> ParsedBody:
    prompt = _prompt(endpoint, given)
    named = given.get("model")
    model = (
        named
        if isinstance(named, str)
        else ("dall-e-2" if endpoint == "variations" else default_model)
    )
    stream = given.get("stream") is True
    partial_images = _partial_images(given, stream)
    user = given.get("safety_identifier") or given.get("user")
    fidelity = given.get("input_fidelity")
    request = ImageRequest(
        endpoint=endpoint,
        model=model,
        prompt_bytes=len(prompt.encode()) if prompt is not None else 0,
        n=int(given.get("n", 1)),
        quality=str(given.get("quality", AUTO)),
        size=str(given.get("size", AUTO)),
        stream=stream,
        partial_images=partial_images,
        input_fidelity=fidelity if isinstance(fidelity, str) else None,
        images=images,
        mask=mask,
        user=user if isinstance(user, str) else None,
        params=tuple((name, form_text(value)) for name, value in given.items() if name != "prompt"),
    )
    # The model is always written out: an absent or empty one would be the upstream's choice.
    fields: dict[str, Scalar] = (
        {"model": model, **given}
        if "prompt" not in given
        else {"prompt": given["prompt"], "model": model, **given}
    )
    return ParsedBody(
        request,
        fields,
        names_model=isinstance(named, str),
        multipart=bool(uploads),
        uploads=uploads,
        references=references,
    )


def _prompt(endpoint: Endpoint, given: Mapping[str, Scalar]) -> str | None:
    """The prompt, required and bounded except for variations (which take none)."""
    prompt = given.get("prompt")
    if endpoint != "variations":
        if not isinstance(prompt, str):
            raise InvalidRequest("Missing required parameter: 'prompt'.", param="prompt")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise InvalidRequest(
                f"Invalid 'prompt': string too long. Expected a string with maximum length "
                f"{MAX_PROMPT_CHARS}, but got a string with length {len(prompt)} instead.",
                param="prompt",
            )
    return prompt if isinstance(prompt, str) else None


def _partial_images(given: Mapping[str, Scalar], stream: bool) -> int:
    partial_images = int(given.get("partial_images", 0))
    if partial_images and not stream:
        raise InvalidRequest(
            "'partial_images' is only supported with 'stream': true.", param="partial_images"
        )
    if partial_images > MAX_PARTIAL_IMAGES:
        raise InvalidRequest(
            f"Invalid value for 'partial_images': {partial_images}. Expected 0 to "
            f"{MAX_PARTIAL_IMAGES}.",
            param="partial_images",
        )
    return partial_images
