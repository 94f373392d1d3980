"""The scalar parameters of an image request: which each endpoint takes, and how each is
read (pure).

Every parameter is one OpenAI accepts on that endpoint and Tollgate either prices or
knows to be price-neutral; anything else is refused, as are integers outside a sane range
or written in other than ASCII digits, and strings holding NUL or lone surrogates. Empty
and null are absent. `proxy.core.parsing` reads JSON and multipart bodies with these rules.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from proxy.core.errors import InvalidRequest
from proxy.core.image_tokens import parse_size
from proxy.core.models import Endpoint

if TYPE_CHECKING:  # a type only: the configuration reads PARAMS without the body parser
    from proxy.core.multipart import Part, Scalar

MAX_INTEGER = 2**31 - 1
"""No integer parameter means anything near this; past it a value is refused before it is
priced or recorded (a 64-bit ledger column overflows at 2**63)."""
AUTO = "auto"
DIGITS = re.compile(r"[0-9]+", re.ASCII)
UNSAFE_CHARS = re.compile("[\x00\ud800-\udfff]")
USER_PARAMS = ("safety_identifier", "user")
"""Who a request is for, in the order the per-user budgets read them."""
MAX_USER_CHARS = 256
"""The longest end-user id: a hashed id needs 64 characters. The id names the user's budget
counters, a key of the ledger's index (PostgreSQL refuses an index row of more than 8 KiB:
a longer id could never be counted, and a batch line naming one could never be settled)."""

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
TOOL_CHOICES: Mapping[str, tuple[str, ...]] = {
    "action": ("generate", "edit", "auto"),
    "background": ("transparent", "opaque", "auto"),
    "input_fidelity": ("high", "low"),
    "moderation": ("auto", "low"),
    "output_format": ("png", "webp", "jpeg"),
}
"""The Responses image tool's options with few values: the Responses door checks them, and
a team's `allow.params` may name them as it names the Images API's."""
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
UNPRICED_FORMATS = frozenset({"gif", "svg"})
"""`output_format` values OpenAI accepts whose cost is not in the price book (a GIF's
frames, an SVG's authoring model): refused as unpriced, not as unknown values."""


def check_output_format(value: object, param: str) -> None:
    """Refuse an `output_format` OpenAI takes but Tollgate cannot price, saying so."""
    if isinstance(value, str) and value in UNPRICED_FORMATS:
        raise InvalidRequest(
            f"Tollgate cannot price output_format {value!r} (the price book has no rate for "
            "GIF frames or SVG authoring), so it does not forward it: use png, jpeg or webp.",
            param=param,
        )


def check_names(
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


def part_text(part: Part) -> str:
    try:
        text = bytes(part.data).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest(f"Field '{part.name}' is not UTF-8 text.", param=part.name) from None
    check_text(text, part.name)
    return text


def check_text(text: str, name: str) -> None:
    if "\x00" in text if text.isascii() else UNSAFE_CHARS.search(text):
        raise InvalidRequest(
            f"Invalid value for '{name}': NUL characters and lone surrogates are not text.",
            param=name,
        )


def check_user(value: str, name: str) -> None:
    """Refuse an end-user id (`user`, `safety_identifier`) longer than `MAX_USER_CHARS`."""
    if len(value) > MAX_USER_CHARS:
        raise InvalidRequest(
            f"Invalid '{name}': string too long. Expected a string with maximum length "
            f"{MAX_USER_CHARS}, but got a string with length {len(value)} instead.",
            param=name,
        )


def typed_fields(
    given: Mapping[str, Any], endpoint: Endpoint, *, multipart: bool
) -> dict[str, Scalar]:
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
            if name == "output_format":
                check_output_format(value, name)
            if param.choices and value not in param.choices:
                raise InvalidRequest(
                    f"Invalid value for '{name}': {value!r}. Supported values are: "
                    f"{', '.join(param.choices)}.",
                    param=name,
                )
            if name in USER_PARAMS:
                check_user(value, name)
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
