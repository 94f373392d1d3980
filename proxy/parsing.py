"""Image requests out of client bodies, and bodies back out of changed requests (pure).

Generations are JSON; edits are multipart (`image`, repeated `image[]`, `mask`,
`markup`) or JSON (`images: [{image_url}|{file_id}]`); variations are multipart.
Parsing reads only what pricing and policy need: scalar fields and the pixel
dimensions of each uploaded image (from its header, with imagesize). The body
is forwarded byte for byte unless a field must change.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import imagesize
from python_multipart.multipart import MultipartParser, parse_options_header

from proxy.errors import InvalidRequest
from proxy.models import Endpoint, ImageRequest, InputImage

MAX_PROMPT_CHARS = 32_000
MAX_PARTIAL_IMAGES = 3
IMAGE_FIELDS = ("image", "image[]", "mask", "markup")
# A data URL's image header is found within its first bytes; never decode megabytes for it.
DATA_URL_PROBE_CHARS = 349_528  # 256 KiB once decoded


@dataclass(frozen=True, slots=True)
class Part:
    """One multipart part, its bytes untouched."""

    name: str
    data: bytes
    filename: str | None = None
    content_type: str | None = None


@dataclass(frozen=True)
class ParsedBody:
    """A client body understood: the request, and how to write it again with changes."""

    request: ImageRequest
    raw: bytes
    content_type: str
    json: Mapping[str, Any] | None = None
    parts: tuple[Part, ...] = ()

    def encode(self, changes: Mapping[str, str]) -> tuple[bytes, str]:
        """The body to forward with `changes` (field → new value); the raw bytes if none."""
        if not changes:
            return self.raw, self.content_type
        if self.json is not None:
            return json.dumps({**self.json, **changes}).encode(), "application/json"
        parts = [
            replace(p, data=changes[p.name].encode()) if p.name in changes else p
            for p in self.parts
        ]
        missing = [
            Part(name, value.encode())
            for name, value in changes.items()
            if all(p.name != name for p in self.parts)
        ]
        return encode_multipart([*missing, *parts])


def parse_request(
    endpoint: Endpoint, content_type: str, body: bytes, default_model: str
) -> ParsedBody:
    """Understand a client body for `endpoint`; raises InvalidRequest with OpenAI's wording."""
    media_type, options = parse_options_header(content_type)
    if media_type == b"application/json" and endpoint != "variations":
        fields = _json_object(body)
        images = _json_images(fields) if endpoint == "edits" else ()
        mask = _json_image_ref(fields["mask"], "mask") if "mask" in fields else None
        request = _image_request(endpoint, fields, images, mask, default_model)
        return ParsedBody(request, body, content_type, json=fields)
    if media_type == b"multipart/form-data" and endpoint != "generations":
        boundary = options.get(b"boundary")
        if not boundary:
            raise InvalidRequest("Multipart body without a boundary.")
        parts = parse_multipart(body, boundary)
        text_fields: dict[str, Any] = {}
        for part in parts:
            if part.name not in IMAGE_FIELDS:
                try:
                    text_fields[part.name] = part.data.decode()
                except UnicodeDecodeError:
                    raise InvalidRequest(
                        f"Field '{part.name}' is not UTF-8 text.", param=part.name
                    ) from None
        images, mask = _multipart_images(endpoint, parts)
        request = _image_request(endpoint, _typed_form(text_fields), images, mask, default_model)
        return ParsedBody(request, body, content_type, parts=tuple(parts))
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


def parse_multipart(body: bytes, boundary: bytes) -> list[Part]:
    """Split a multipart/form-data body into parts (python-multipart's streaming parser)."""
    parts: list[Part] = []
    headers: dict[bytes, bytes] = {}
    field, value = bytearray(), bytearray()
    data = bytearray()

    def on_header_field(buf: bytes, start: int, end: int) -> None:
        field.extend(buf[start:end])

    def on_header_value(buf: bytes, start: int, end: int) -> None:
        value.extend(buf[start:end])

    def on_header_end() -> None:
        headers[bytes(field).lower()] = bytes(value)
        field.clear()
        value.clear()

    def on_part_data(buf: bytes, start: int, end: int) -> None:
        data.extend(buf[start:end])

    def on_part_end() -> None:
        _, disposition = parse_options_header(headers.get(b"content-disposition", b""))
        name = disposition.get(b"name")
        if name is None:
            raise InvalidRequest("A multipart part has no name.")
        filename = disposition.get(b"filename")
        content_type = headers.get(b"content-type")
        parts.append(
            Part(
                name=name.decode(),
                data=bytes(data),
                filename=filename.decode(errors="replace") if filename is not None else None,
                content_type=content_type.decode(errors="replace") if content_type else None,
            )
        )
        headers.clear()
        data.clear()

    parser = MultipartParser(
        boundary,
        {
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )
    try:
        parser.write(body)
        parser.finalize()
    except InvalidRequest:
        raise
    except Exception as exc:  # python-multipart raises several types for broken bodies
        raise InvalidRequest(f"Malformed multipart body: {exc}") from exc
    if not parts:
        raise InvalidRequest("Malformed multipart body: no parts.")
    return parts


def encode_multipart(parts: Iterable[Part]) -> tuple[bytes, str]:
    """A multipart/form-data body and its content type."""
    boundary = "tollgate-" + secrets.token_hex(16)
    chunks: list[bytes] = []
    for part in parts:
        disposition = f'form-data; name="{part.name}"'
        if part.filename is not None:
            disposition += f'; filename="{part.filename}"'
        head = f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
        if part.content_type:
            head += f"Content-Type: {part.content_type}\r\n"
        chunks += [head.encode(), b"\r\n", part.data, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


def image_dimensions(data: bytes, field: str) -> InputImage:
    """The pixel size of an uploaded image; InvalidRequest when it is not an image."""
    try:
        width, height = imagesize.get(io.BytesIO(data))
    except Exception:
        width = height = -1
    if width <= 0 or height <= 0:
        raise InvalidRequest(
            f"Invalid image file for '{field}': expected a PNG, JPEG or WebP image.", param=field
        )
    return InputImage(width, height)


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        fields = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"We could not parse the JSON body of your request: {exc}") from None
    if not isinstance(fields, dict):
        raise InvalidRequest("The JSON body of your request must be an object.")
    return fields


def _json_images(fields: Mapping[str, Any]) -> tuple[InputImage, ...]:
    refs = fields.get("images")
    if not isinstance(refs, list) or not refs:
        raise InvalidRequest("Missing required parameter: 'images'.", param="images")
    if len(refs) > 16:
        raise InvalidRequest("Too many images: at most 16.", param="images")
    return tuple(_json_image_ref(ref, f"images[{i}]") for i, ref in enumerate(refs))


def _json_image_ref(ref: Any, param: str) -> InputImage:
    if not isinstance(ref, dict) or len(ref.keys() & {"image_url", "file_id"}) != 1:
        raise InvalidRequest(
            f"'{param}' must hold exactly one of image_url or file_id.", param=param
        )
    url = ref.get("image_url")
    if isinstance(url, str) and url.startswith("data:"):
        # An uploaded data URL: its real size is known. Tollgate never fetches other URLs.
        _, _, payload = url.partition(",")
        probe = payload[: DATA_URL_PROBE_CHARS - DATA_URL_PROBE_CHARS % 4]
        try:
            head = base64.b64decode(probe)
        except (binascii.Error, ValueError):
            raise InvalidRequest(f"'{param}.image_url' is not valid base64.", param=param) from None
        return image_dimensions(head, param)
    return InputImage()


def _multipart_images(
    endpoint: Endpoint, parts: list[Part]
) -> tuple[tuple[InputImage, ...], InputImage | None]:
    plain = [p for p in parts if p.name == "image"]
    listed = [p for p in parts if p.name == "image[]"]
    if len(plain) > 1:
        raise InvalidRequest(
            "Duplicate parameter: 'image'. To send several images, use the array syntax "
            "'image[]=<value>'.",
            param="image",
        )
    files = plain + listed
    if not files:
        raise InvalidRequest("Missing required parameter: 'image'.", param="image")
    if endpoint == "variations" and len(files) > 1:
        raise InvalidRequest("Variations take exactly one image.", param="image")
    if len(files) > 16:
        raise InvalidRequest("Too many images: at most 16.", param="image")
    images = tuple(image_dimensions(p.data, p.name) for p in files)
    masks = [p for p in parts if p.name == "mask"]
    mask = image_dimensions(masks[0].data, "mask") if masks else None
    for markup in (p for p in parts if p.name == "markup"):
        image_dimensions(markup.data, "markup")
    return images, mask


def _typed_form(fields: dict[str, Any]) -> dict[str, Any]:
    """Multipart scalars are text: give the typed ones their JSON types back."""
    typed: dict[str, Any] = dict(fields)
    for name in ("n", "partial_images", "output_compression"):
        if name in typed:
            try:
                typed[name] = int(typed[name])
            except ValueError:
                raise InvalidRequest(
                    f"Invalid value for '{name}': expected an integer.", param=name
                ) from None
    if "stream" in typed:
        text = str(typed["stream"]).lower()
        if text not in ("true", "false"):
            raise InvalidRequest(
                "Invalid value for 'stream': expected true or false.", param="stream"
            )
        typed["stream"] = text == "true"
    return typed


def _image_request(
    endpoint: Endpoint,
    fields: Mapping[str, Any],
    images: tuple[InputImage, ...],
    mask: InputImage | None,
    default_model: str,
) -> ImageRequest:
    prompt = fields.get("prompt")
    if endpoint != "variations":
        if not isinstance(prompt, str) or not prompt:
            raise InvalidRequest("Missing required parameter: 'prompt'.", param="prompt")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise InvalidRequest(
                f"Invalid 'prompt': string too long. Expected a string with maximum length "
                f"{MAX_PROMPT_CHARS}, but got a string with length {len(prompt)} instead.",
                param="prompt",
            )
    model = _string(fields, "model") or ("dall-e-2" if endpoint == "variations" else default_model)
    n = _integer(fields, "n", 1)
    stream = fields.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequest("Invalid type for 'stream': expected a boolean.", param="stream")
    partial_images = _integer(fields, "partial_images", 0)
    if partial_images and not stream:
        raise InvalidRequest(
            "'partial_images' is only supported with 'stream': true.", param="partial_images"
        )
    if not 0 <= partial_images <= MAX_PARTIAL_IMAGES:
        raise InvalidRequest(
            f"Invalid value for 'partial_images': {partial_images}. Expected 0 to "
            f"{MAX_PARTIAL_IMAGES}.",
            param="partial_images",
        )
    user = _string(fields, "safety_identifier") or _string(fields, "user")
    params = tuple(
        (name, json.dumps(value) if not isinstance(value, str) else value)
        for name, value in fields.items()
        if name not in ("prompt", "images", "mask") and not isinstance(value, (dict, list))
    )
    return ImageRequest(
        endpoint=endpoint,
        model=model,
        prompt_bytes=len(prompt.encode()) if isinstance(prompt, str) else 0,
        n=n,
        quality=_string(fields, "quality") or "auto",
        size=_string(fields, "size") or "auto",
        stream=stream,
        partial_images=partial_images,
        input_fidelity=_string(fields, "input_fidelity"),
        images=images,
        mask=mask,
        user=user,
        params=params,
    )


def _string(fields: Mapping[str, Any], name: str) -> str | None:
    value = fields.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"Invalid type for '{name}': expected a string.", param=name)
    return value


def _integer(fields: Mapping[str, Any], name: str, default: int) -> int:
    value = fields.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"Invalid type for '{name}': expected an integer.", param=name)
    return value
