"""Reading an image request's body, JSON or multipart, into a `RawRequest`.

This is the simulator's only body reader. It checks nothing OpenAI would check:
`validation` does that, so that even a rejected request leaves a full record.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from PIL import Image, UnidentifiedImageError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request

from proxy.core.models import Endpoint
from proxy.simulator.refusals import invalid

FILE_FIELDS = frozenset({"image", "image[]", "mask", "markup"})
MAX_PARTS = 64
MAX_FIELD_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Part:
    """One uploaded file part: its field name and real size (None when Pillow cannot open it)."""

    field: str
    width: int | None = None
    height: int | None = None

    @property
    def decoded(self) -> bool:
        return self.width is not None


@dataclass(frozen=True)
class RawRequest:
    """A request body as received: scalar and nested fields, and the uploaded parts."""

    endpoint: Endpoint
    content: Literal["json", "multipart"]
    fields: Mapping[str, Any] = field(default_factory=dict)
    parts: tuple[Part, ...] = ()

    def scalar_params(self) -> dict[str, Any]:
        """The scalar fields as received, without the prompt, for the billing record."""
        params: dict[str, Any] = {
            name: value
            for name, value in self.fields.items()
            if name != "prompt" and (value is None or isinstance(value, str | int | float | bool))
        }
        prompt = self.fields.get("prompt")
        if isinstance(prompt, str):
            params["prompt_len"] = len(prompt)
            params["prompt_bytes"] = len(prompt.encode("utf-8"))
        return params


def image_size(data: bytes) -> tuple[int, int] | None:
    """An image's (width, height) as Pillow reads its header; None when it is no image."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except (UnidentifiedImageError, OSError, ValueError):
        return None


def parse_json(endpoint: Endpoint, body: bytes) -> RawRequest:
    """A JSON body as a RawRequest; raises ApiError when it is not a JSON object."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict):
        raise invalid(
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, "
            "but what was sent was not valid JSON.)",
            param=None,
            code=None,
        )
    return RawRequest(endpoint, "json", data)


async def parse_multipart(endpoint: Endpoint, request: Request) -> RawRequest:
    """A multipart body as a RawRequest; files are opened with Pillow to learn their size."""
    try:
        form = await request.form(
            max_files=MAX_PARTS, max_fields=MAX_PARTS, max_part_size=MAX_FIELD_BYTES
        )
    except HTTPException as exc:
        raise invalid(f"Could not parse multipart form: {exc.detail}", param=None) from exc
    fields: dict[str, Any] = {}
    parts: list[Part] = []
    try:
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                size = image_size(await value.read())
                parts.append(Part(name, *size) if size else Part(name))
            elif name in FILE_FIELDS:
                parts.append(Part(name))
            else:
                fields[name] = value
    finally:
        await form.close()
    return RawRequest(endpoint, "multipart", fields, tuple(parts))


async def read_request(endpoint: Endpoint, request: Request) -> RawRequest:
    """The body of an image request, by its content type."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        return await parse_multipart(endpoint, request)
    return parse_json(endpoint, await request.body())


def unparsed(endpoint: Endpoint) -> RawRequest:
    """A stand-in for a body that could not be read, for the billing record."""
    return RawRequest(endpoint, "json")
