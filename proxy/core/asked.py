"""What a request refused before its body was understood asked, for its ledger row (pure).

A request refused while its body is parsed (an unknown parameter, `partial_images`
without `stream`, a size that is no size) is still a request of some model, quality and
size, for some user, and reports by model count it there, as they count one refused later
(a budget, `n=0`). So its body is read again, leniently, for those fields alone: each one
recorded when it can be read, the default recorded when it is absent (as the parse would
have), None when it cannot be (a value of the wrong type, or too long).

Only what the ledger may hold is recorded: text of at most `MAX_ASKED_CHARS` characters
(an end-user id, `MAX_USER_CHARS`) without NUL or lone surrogates, integers from 0 to
`MAX_INTEGER`. Nothing read here decides anything: the request is refused as it was.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from proxy.core.errors import InvalidRequest
from proxy.core.image_params import (
    AUTO,
    DIGITS,
    MAX_INTEGER,
    MAX_USER_CHARS,
    UNSAFE_CHARS,
    USER_PARAMS,
    part_text,
)
from proxy.core.input_images import IMAGE_FIELDS
from proxy.core.models import MAX_ASKED_CHARS, Asked, Endpoint
from proxy.core.multipart import Part
from proxy.core.parsing import read_form


def images_asked(endpoint: Endpoint, content_type: str, body: bytes, default_model: str) -> Asked:
    """What an Images API request on `endpoint` asked (its model, quality, size, `n` and
    end user), read from its body when that is a JSON object or a form that parses."""
    try:
        form = read_form(endpoint, content_type, body)
    except InvalidRequest:
        return Asked()
    given = form if isinstance(form, dict) else form_fields(form)
    multipart = not isinstance(form, dict)
    return Asked(
        model=field(given, "model", "dall-e-2" if endpoint == "variations" else default_model),
        quality=field(given, "quality", AUTO),
        size=field(given, "size", AUTO),
        n=count(given.get("n", 1), multipart),
        user=end_user(given),
    )


UNREADABLE = object()
"""A form field given but not readable as one value: recorded as nothing, not as absent."""


def form_fields(parts: Sequence[Part]) -> dict[str, object]:
    """A form's text fields; `UNREADABLE` for one that is not UTF-8 text without NUL, or is
    given twice (it asks two things, and records neither)."""
    fields: dict[str, object] = {}
    for part in parts:
        if part.name in IMAGE_FIELDS:
            continue
        if part.name in fields:
            fields[part.name] = UNREADABLE
            continue
        try:
            fields[part.name] = part_text(part)
        except InvalidRequest:
            fields[part.name] = UNREADABLE
    return fields


def field(given: Mapping[str, Any], name: str, default: str | None) -> str | None:
    """`given[name]` as a label (`label`); `default` when it is absent, null or empty, as
    the parse reads it."""
    value = given.get(name)
    return default if value is None or value == "" else label(value)


def label(value: object, longest: int = MAX_ASKED_CHARS) -> str | None:
    """`value` when it is text the ledger may hold (at most `longest` characters, no NUL or
    lone surrogate); else None."""
    if not isinstance(value, str) or len(value) > longest or UNSAFE_CHARS.search(value):
        return None
    return value


def count(value: object, multipart: bool) -> int | None:
    """`value` as an integer from 0 to `MAX_INTEGER` (in a form, written in ASCII digits);
    else None."""
    if multipart and isinstance(value, str):
        if len(value) > 10 or DIGITS.fullmatch(value) is None:
            return None
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if 0 <= value <= MAX_INTEGER else None


def end_user(given: Mapping[str, Any]) -> str | None:
    """Whom the request is for: its `safety_identifier`, else its `user`, as the per-user
    budgets read them, when it is text of at most `MAX_USER_CHARS` characters."""
    for name in USER_PARAMS:
        value = given.get(name)
        if value is not None and value != "":
            return label(value, MAX_USER_CHARS)
    return None
