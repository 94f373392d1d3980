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

The rules of each scalar parameter are `proxy.core.image_params`; the input images of
an edit or a variation, uploaded or referenced, `proxy.core.input_images`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from python_multipart.multipart import parse_options_header

from proxy.core.errors import InvalidRequest
from proxy.core.image_params import (
    ACCEPTED,
    AUTO,
    check_names,
    check_text,
    part_text,
    typed_fields,
)
from proxy.core.input_images import IMAGE_FIELDS, json_image_ref, json_images, multipart_images
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
JSON_TYPE: tuple[bytes, dict[bytes, bytes]] = (b"application/json", {})


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
    form = read_form(endpoint, content_type, body)
    if isinstance(form, dict):
        return _json_request(endpoint, form, default_model)
    return _multipart_request(endpoint, form, default_model)


def read_form(endpoint: Endpoint, content_type: str, body: bytes) -> dict[str, Any] | list[Part]:
    """A client body for `endpoint` read as its content type says, not yet understood: a
    JSON object, or multipart parts; InvalidRequest with OpenAI's wording when it is
    neither (or of a content type `endpoint` does not take)."""
    media_type, options = (
        JSON_TYPE if content_type == "application/json" else parse_options_header(content_type)
    )
    if media_type == b"application/json" and endpoint != "variations":
        check_charset(options, "the request")
        return json_object(body)
    if media_type == b"multipart/form-data" and endpoint != "generations":
        check_charset(options, "the request")
        boundary = options.get(b"boundary")
        if not boundary:
            raise InvalidRequest("Multipart body without a boundary.")
        return parse_multipart(body, boundary)
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


def _json_request(endpoint: Endpoint, given: dict[str, Any], default_model: str) -> ParsedBody:
    """A JSON body: generations, or edits whose images are references (URLs or file ids)."""
    check_names(given, ACCEPTED[endpoint, False], ("images", "mask") if endpoint == "edits" else ())
    fields = typed_fields(given, endpoint, multipart=False)
    images: tuple[InputImage, ...] = ()
    mask = None
    references: dict[str, Any] | None = None
    if endpoint == "edits":
        references = {}
        images, references["images"] = json_images(given.get("images"))
        if given.get("mask") is not None:
            mask, references["mask"] = json_image_ref(given["mask"], "mask")
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
        text[part.name] = part_text(part)
    check_names(text, ACCEPTED[endpoint, True], ())
    fields = typed_fields(text, endpoint, multipart=True)
    uploads, images, mask, markup = multipart_images(endpoint, parts)
    return _parsed(endpoint, fields, images, mask, default_model, uploads=uploads, markup=markup)


MAX_DEPTH = 128
"""How deeply a JSON body may nest arrays and objects. The decoder, the checks and the
encoder all recurse once per level, and the interpreter's recursion limit (about 1,000
frames, less whatever the server's own stack holds) would otherwise decide, as a 500 with
no ledger row, which of them fails first, and whether before or after the reservation.
Far above any real body (a JSON schema in a Responses request nests a few dozen deep)."""


MAX_VALUES = 100_000
"""How many arrays, objects and commas a JSON body may hold, counted before it is decoded
(commas inside strings too: an upper bound of its values). The body limits bound bytes,
not what decoding them costs: 8 MiB of `{},` decode into 2.8 million dicts, 390 MiB and
4.6 s of a worker's event loop, and a 128 MiB Responses body into gigabytes. At this
bound a body decodes within ~25 MiB; real bodies hold a few thousand (a conversation of
100,000 commas of prose would be past every model's context window)."""


def json_object(body: bytes) -> dict[str, Any]:
    """A JSON object body, read strictly (no repeated key, no NaN, no lone surrogate or NUL,
    nothing nested more than `MAX_DEPTH` deep, at most `MAX_VALUES` values); InvalidRequest
    in OpenAI's words otherwise."""
    values = _values(body, MAX_VALUES)
    if values > MAX_VALUES:
        raise InvalidRequest(
            f"The JSON body of your request holds more than {MAX_VALUES:,} values (arrays, "
            "objects and comma-separated items): send fewer, or large data as one string "
            "(an image as a data URL or a file id)."
        )
    try:
        fields = _DECODER.decode(body.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"We could not parse the JSON body of your request: {exc}") from None
    except RecursionError:
        raise too_deep() from None
    if not isinstance(fields, dict):
        raise InvalidRequest("The JSON body of your request must be an object.")
    if values > MAX_DEPTH:  # a body with fewer cannot nest deeper, and is not walked
        _check_depth(fields)
    # Strict UTF-8 has no surrogates and JSON no raw NUL: only a \u escape can make either
    # (a one-byte search is memchr, much faster than searching for b"\\u").
    if b"\\" in body:
        _check_strings(fields, "the request")
    return fields


def _values(body: bytes, cap: int) -> int:
    """How many `{`, `[` and `,` bytes `body` holds, counted up to `cap + 1`. Each is found
    with memchr (`bytes.find`), so a 4 MB data URL, which has none, is searched in ~0.3 ms
    where `bytes.count` takes 9 ms; a hostile body stops being counted past `cap`."""
    if len(body) <= cap:  # cannot hold more; `count` is quicker on a short body
        return body.count(b"{") + body.count(b"[") + body.count(b",")
    count = 0
    for char in b"{[,":
        at = body.find(char)
        while at != -1:
            count += 1
            if count > cap:
                return count
            at = body.find(char, at + 1)
    return count


def too_deep() -> InvalidRequest:
    return InvalidRequest(
        "We could not parse the JSON body of your request: it nests arrays and objects "
        f"more than {MAX_DEPTH} deep."
    )


def _check_depth(fields: dict[str, Any]) -> None:
    """Raise when `fields` nests more than `MAX_DEPTH` deep (walked without recursion)."""
    stack: list[tuple[Any, int]] = [(fields, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise too_deep()
        for item in value.values() if isinstance(value, dict) else value:
            if isinstance(item, (dict, list)):
                stack.append((item, depth + 1))


def _check_strings(value: Any, name: str) -> None:
    if isinstance(value, str):
        check_text(value, name)
    elif isinstance(value, dict):
        for key, item in value.items():
            check_text(key, name)
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


def _finite(text: str) -> float:
    """A JSON number with a fraction or exponent, refused past a float's range: read as
    infinity, it would be forwarded re-encoded as `Infinity`, which is not JSON."""
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"{text} is out of range")
    return value


# Built once: json.loads and json.dumps with options build a new coder on every call.
_DECODER = json.JSONDecoder(
    object_pairs_hook=_no_duplicates, parse_constant=_no_constant, parse_float=_finite
)
_ENCODER = json.JSONEncoder(separators=(",", ":"))


def _parsed(
    endpoint: Endpoint,
    given: dict[str, Scalar],
    images: tuple[InputImage, ...],
    mask: InputImage | None,
    default_model: str,
    *,
    uploads: tuple[Upload, ...] = (),
    references: Mapping[str, Any] | None = None,
    markup: InputImage | None = None,
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
        markup=markup,
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
