"""A fast first verdict on a document against the schema, from jsonschema-rs.

jsonschema (pure Python) takes about 0.5 ms a team file: most of loading 1,000 of them.
jsonschema-rs checks the same document against the same schema in Rust in 3 µs, but
words its errors its own way. So it is asked only whether a document is valid, the
common case; a document it does not find valid is checked again by jsonschema, whose
errors `proxy.config.schema` explains. The user reads the same messages either way; an
invalid file costs both checks.

The verdicts must agree (tests/test_config_fastcheck.py generates documents to hold
them to it): a `pattern` ending in `$`, which lets a final line feed through in Python's
`re`, ends the text for both, as in JSON Schema (`proxy.config.schema.validator`). Both
ignore `format` (an annotation in draft 2020-12 unless
asked) and unknown keywords (`errorMessage`, `description`).

Without a wheel of jsonschema-rs for the platform, every document goes to jsonschema.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from proxy.config import schema
from proxy.config.schema import JsonPath, kind_schema

if TYPE_CHECKING:
    from jsonschema_rs import Validator


def schema_problems(kind: str, data: Any) -> Iterator[tuple[JsonPath, str]]:
    """Every violation of the schema of `kind` by `data` as (path, message): none when
    jsonschema-rs finds it valid, else jsonschema's, in plain words."""
    if surely_valid(kind, data):
        return iter(())
    return schema.schema_problems(schema.validator(kind), data)


def surely_valid(kind: str, data: Any) -> bool:
    """Whether jsonschema-rs finds `data` a valid file of `kind` ("settings" or "team").
    False when it cannot say: not installed, or a value JSON lacks (a YAML date)."""
    fast = fast_validator(kind)
    if fast is None:
        return False
    try:
        return fast.is_valid(data)
    except (ValueError, TypeError, OverflowError, RecursionError):
        return False  # jsonschema, which sees any Python value, says why


@functools.cache
def fast_validator(kind: str) -> Validator | None:
    """jsonschema-rs's validator of one kind of file (built once), or None without it."""
    try:
        import jsonschema_rs
    except ImportError:
        return None
    return jsonschema_rs.Draft202012Validator(kind_schema(kind), validate_formats=False)
