"""The configuration format as JSON Schema (draft 2020-12), and its errors in plain words.

The schema is the single description of which keys exist; `tollgate schema`
prints it for editors, and the loader validates every file with it before the
semantic checks of `proxy.config.loader`. `errorMessage` (understood by VS Code's
YAML and JSON language servers) holds the message for constraints that read badly
when spelled out.
"""

from __future__ import annotations

import copy
import difflib
import functools
import re
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from proxy.core.image_params import MAX_INTEGER
from proxy.core.models import ENDPOINTS, PERIODS
from proxy.core.settings import HTTP_METHODS, KNOBS, RATE_METRICS, RATE_PERS, TOKEN_METRICS

if TYPE_CHECKING:
    from jsonschema import Draft202012Validator, ValidationError

JsonPath = tuple[str | int, ...]

_FRACTION = {"type": "number", "exclusiveMinimum": 0, "maximum": 1}
# Every number has a ceiling: past it a value is no setting anyone means, and would
# break what holds it (a 64-bit ledger column, a float of seconds, a Prometheus gauge).
MAX_COUNT = 2**53 - 1
"""A count or a size in bytes (9 × 10¹⁵): within a 64-bit ledger column, and a number every
JSON reader holds exactly (an editor's, in JavaScript, reads 2**63 - 1 as 2**63)."""
MAX_SECONDS = 10**9
"""About 31 years."""
MAX_USD = 10**9
"""A budget of a billion dollars: its nano-dollars fit a 64-bit ledger column."""
_SECONDS = {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_SECONDS}
_COUNT = {"type": "integer", "minimum": 1, "maximum": MAX_COUNT}
_NAME = {"type": "string", "minLength": 1}
_OPTIONAL_TEXT = {"type": ["string", "null"]}


def _strict(properties: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "properties": properties, **extra}


def _list(items: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": "array", "items": items, **extra}


_LIMITS_ONE_OF = {
    "oneOf": [{"required": [key]} for key in ("limit_usd", *TOKEN_METRICS)],
    "errorMessage": "needs exactly one limit: limit_usd or one of " + ", ".join(TOKEN_METRICS),
}

_DEFS: dict[str, Any] = {
    "budget": _strict(
        {
            "period": {"enum": list(PERIODS), "description": "day, week (ISO), month or total"},
            "limit_usd": {
                "type": "number",
                "exclusiveMinimum": 0,
                "maximum": MAX_USD,
                "description": "US dollars, e.g. 800 or 0.25",
            },
            **{metric: _COUNT for metric in TOKEN_METRICS},
            "alert_at": _list(_FRACTION, uniqueItems=True),
        },
        required=["period"],
        allOf=[_LIMITS_ONE_OF],
    ),
    "budgets": _list({"$ref": "#/$defs/budget"}),
    "rate_limit": _strict(
        {
            "per": {"enum": list(RATE_PERS), "description": "minute or day"},
            **{metric: _COUNT for metric in RATE_METRICS},
            "model": _NAME,
        },
        required=["per"],
        oneOf=[{"required": [metric]} for metric in RATE_METRICS],
        errorMessage="needs exactly one limit: " + ", ".join(RATE_METRICS),
    ),
    "rate_limits": _list({"$ref": "#/$defs/rate_limit"}),
    "team_rate_limit": {
        # A limit of the team's own, or its share of the organization's limits.
        "if": {"type": "object", "required": ["share"]},
        "then": _strict(
            {
                "per": {"enum": list(RATE_PERS)},
                "share": {
                    "type": "number",
                    "exclusiveMinimum": 0,
                    "maximum": 1,
                    "description": "the fraction of each organization limit of the same "
                    "`per` kept for the team",
                },
                "model": _NAME,
            },
            required=["per", "share"],
        ),
        "else": {"$ref": "#/$defs/rate_limit"},
    },
    "key": _strict(
        {
            "id": _NAME,
            "sha256": {
                "type": "string",
                "pattern": "^[0-9a-fA-F]{64}$",
                "errorMessage": "must be the key's SHA-256 as 64 hexadecimal characters",
            },
        },
        required=["id", "sha256"],
    ),
    "allow": _strict(
        {
            "models": _list(_NAME, minItems=1, uniqueItems=True),
            "endpoints": _list({"enum": list(ENDPOINTS)}, minItems=1, uniqueItems=True),
            "max_quality": _NAME,
            "max_n": {"type": "integer", "minimum": 1, "maximum": 10},
            "sizes": _list(
                {
                    "type": "string",
                    "pattern": "^(auto|[1-9][0-9]*x[1-9][0-9]*)$",
                    "errorMessage": "must be 'auto' or WIDTHxHEIGHT, e.g. '1024x1024'",
                },
                minItems=1,
                uniqueItems=True,
            ),
            "params": {
                "type": "object",
                "description": "allowed values of any other request field",
                "additionalProperties": _list(
                    {"type": ["string", "number", "boolean"]}, minItems=1, uniqueItems=True
                ),
            },
        }
    ),
    "passthrough_prefix": {
        "type": "string",
        "pattern": "^/v1/.",
        "errorMessage": "must be a path prefix starting with '/v1/'",
    },
    "throttle_tier": _strict(
        {"above": _FRACTION, "max_quality": _NAME}, required=["above", "max_quality"]
    ),
    "downgrade": _strict(
        {
            "order": _list({"enum": list(KNOBS)}, minItems=1, uniqueItems=True),
            "fallback_model": _NAME,
        }
    ),
    "responses": _strict(
        {
            "max_output_tokens": {"type": "integer", "minimum": 16, "maximum": MAX_INTEGER},
            "max_tool_calls": {"type": "integer", "minimum": 1, "maximum": 10},
            "unbounded": {"enum": ["inject", "refuse"]},
        }
    ),
    "team": _strict(
        {
            "name": {
                "type": "string",
                "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
                "errorMessage": ("must be a name of at most 64 letters, digits, '-', '_' or '.'"),
            },
            "cost_center": _OPTIONAL_TEXT,
            "openai_project": {
                "type": "string",
                "pattern": "^(proj_[A-Za-z0-9_-]+|\\$\\{.*)$",
                "errorMessage": "must be an OpenAI project id, e.g. 'proj_abc123'",
                "description": "the OpenAI project the team's requests are sent under",
            },
            "keys": _list({"$ref": "#/$defs/key"}, minItems=1),
            "budgets": {"$ref": "#/$defs/budgets"},
            "per_user": {"$ref": "#/$defs/budgets"},
            "allow": {"$ref": "#/$defs/allow"},
            "throttle": _list({"$ref": "#/$defs/throttle_tier"}),
            "on_exhausted": {"enum": ["downgrade", "reject"]},
            "downgrade": {"$ref": "#/$defs/downgrade"},
            "responses": {"$ref": "#/$defs/responses"},
            "rate_limits": _list({"$ref": "#/$defs/team_rate_limit"}),
        },
        required=["name", "keys"],
        title="Tollgate team (policies/teams/*.yaml)",
    ),
    "settings": _strict(
        {
            "upstream": _strict(
                {
                    "base_url": {
                        "type": "string",
                        "pattern": "^(https?://|\\$\\{)",
                        "errorMessage": "must be an http:// or https:// URL",
                    },
                    "api_key": _OPTIONAL_TEXT,
                    "timeout_s": _SECONDS,
                    "total_timeout_s": _SECONDS,
                    "organization": _OPTIONAL_TEXT,
                    "project": _OPTIONAL_TEXT,
                    "max_connections": _COUNT,
                    "data_residency": {"type": "boolean"},
                }
            ),
            "ledger": {
                "type": "string",
                "pattern": "^(sqlite:///|postgres(ql)?://|\\$\\{)",
                "errorMessage": "must be a URL sqlite:///PATH or postgresql://…",
            },
            "timezone": {**_NAME, "description": "an IANA time zone, e.g. Europe/Paris"},
            "admin_token": _OPTIONAL_TEXT,
            "prices": {**_NAME, "description": "builtin, or the path of a price-book YAML"},
            "default_model": _NAME,
            "organization": _strict(
                {
                    "budgets": {"$ref": "#/$defs/budgets"},
                    "rate_limits": {"$ref": "#/$defs/rate_limits"},
                }
            ),
            "limits": _strict(
                {
                    "generations_bytes": _COUNT,
                    "edits_bytes": _COUNT,
                    "variations_bytes": _COUNT,
                    "files_bytes": _COUNT,
                    "inflight_bytes": {
                        **_COUNT,
                        "description": "request-body bytes held at once, each body counted 3x",
                    },
                    "header_timeout_s": _SECONDS,
                    "body_idle_timeout_s": _SECONDS,
                    "body_timeout_s": _SECONDS,
                    "max_connections": {
                        **_COUNT,
                        "description": "client connections per process (default: from ulimit -n)",
                    },
                }
            ),
            "passthrough": _list(
                {
                    # A plain prefix (GET and HEAD), or a prefix with the methods it forwards.
                    "if": {"type": "string"},
                    "then": {"$ref": "#/$defs/passthrough_prefix"},
                    "else": _strict(
                        {
                            "path": {"$ref": "#/$defs/passthrough_prefix"},
                            "methods": _list(
                                {"enum": list(HTTP_METHODS)}, minItems=1, uniqueItems=True
                            ),
                        },
                        required=["path"],
                    ),
                },
                uniqueItems=True,
            ),
            "alerts": _strict(
                {
                    "webhooks": _list(
                        {
                            "type": "string",
                            "pattern": "^(https?://|\\$\\{)",
                            "errorMessage": "must be an http:// or https:// URL",
                        }
                    ),
                    "timeout_s": _SECONDS,
                }
            ),
            "retries": _strict(
                {
                    "enabled": {"type": "boolean"},
                    "window_s": _SECONDS,
                    "store_bytes": _COUNT,
                }
            ),
            "teams": _list({"$ref": "#/$defs/team"}),
        },
        title="Tollgate settings (policies/tollgate.yaml, or a single file with `teams`)",
    ),
}


def config_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of both kinds of configuration file.

    One document: `$defs/settings` describes `tollgate.yaml` (or a single-file
    configuration with `teams: [...]`) and `$defs/team` a file of `teams/`; the
    top level accepts either (`anyOf`), so an editor can use it for every file:
    VS Code with the YAML extension, for instance, with
    `"yaml.schemas": {"tollgate.schema.json": ["policies/**/*.yaml"]}` or a first
    line `# yaml-language-server: $schema=tollgate.schema.json`.
    """
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://tollgate.dev/schema/config.json",
        "title": "Tollgate configuration",
        "anyOf": [{"$ref": "#/$defs/settings"}, {"$ref": "#/$defs/team"}],
        "$defs": copy.deepcopy(_DEFS),
    }


def kind_schema(kind: str) -> dict[str, Any]:
    """The schema of one kind of file: "settings" or "team"."""
    return {"$defs": _DEFS, "$ref": f"#/$defs/{kind}"}


@functools.cache
def validator(kind: str) -> Draft202012Validator:
    """A validator of one kind of file (built once: it resolves its references once, not
    once per team file). jsonschema is imported only for a file found invalid: 60 ms."""
    from jsonschema import Draft202012Validator
    from jsonschema.validators import extend

    strict = extend(Draft202012Validator, validators={"pattern": _whole_pattern})
    validator: Draft202012Validator = strict(kind_schema(kind))
    return validator


def _whole_pattern(
    validator: Draft202012Validator, pattern: str, instance: Any, schema: dict[str, Any]
) -> Iterator[ValidationError]:
    """`pattern` as JSON Schema means it (ECMA 262, as jsonschema-rs and editors read it):
    its final `$` ends the text, where Python's lets a line feed follow, so that a team
    `name: "design\\n"` or a project `"proj_abc\\n"` passed, to break every answer's or
    upstream request's headers."""
    from jsonschema import ValidationError

    if not validator.is_type(instance, "string"):
        return
    python = (
        pattern[:-1] + r"\Z" if pattern.endswith("$") and not pattern.endswith("\\$") else pattern
    )
    if re.search(python, instance) is None:
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def schema_problems(validator: Draft202012Validator, data: Any) -> Iterator[tuple[JsonPath, str]]:
    """Every violation of the schema as (path, message), in plain words."""
    for error in validator.iter_errors(data):
        path: JsonPath = tuple(error.absolute_path)
        yield from _explain(error, path)


def _explain(error: ValidationError, path: JsonPath) -> Iterator[tuple[JsonPath, str]]:
    schema = error.schema if isinstance(error.schema, dict) else {}
    keyword = error.validator
    if keyword == "additionalProperties" and isinstance(error.instance, dict):
        known = sorted(schema.get("properties", {}))
        for key in error.instance:
            if key not in known:
                yield (*path, key), "unknown key" + _suggestion(str(key), known)
    elif keyword == "required" and isinstance(error.validator_value, list):
        for key in error.validator_value:
            if isinstance(error.instance, dict) and key not in error.instance:
                yield path, f"missing required key '{key}'"
    elif keyword == "uniqueItems" and isinstance(error.instance, list):
        seen: list[Any] = []
        for index, item in enumerate(error.instance):
            if item in seen:
                yield (*path, index), f"duplicate entry {show(item)}"
            seen.append(item)
    elif keyword == "minItems":
        yield path, "must not be empty"
    elif keyword in ("oneOf", "anyOf") and "errorMessage" in schema:
        yield path, str(schema["errorMessage"])
    elif keyword in _VALUE_KEYWORDS:
        yield path, f"must be {describe(schema)}, got {show(error.instance)}"
    else:
        yield path, error.message


_VALUE_KEYWORDS = frozenset(
    {
        "type",
        "enum",
        "const",
        "pattern",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "minLength",
    }
)

_TYPE_NAMES = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "array": "a list",
    "object": "a mapping",
    "null": "null",
}


def describe(schema: dict[str, Any]) -> str:
    """What a value must be, in words: `a number > 0 and <= 1`."""
    if "errorMessage" in schema:
        return str(schema["errorMessage"]).removeprefix("must be ")
    if "enum" in schema:
        return "one of " + ", ".join(show(v) for v in schema["enum"])
    kinds = schema.get("type", [])
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    text = " or ".join(_TYPE_NAMES.get(k, k) for k in kinds if k != "null") or "valid"
    if schema.get("minLength") == 1:
        text = "a non-empty string"
    bounds = [
        f"{symbol} {schema[key]}"
        for key, symbol in (
            ("exclusiveMinimum", ">"),
            ("minimum", ">="),
            ("exclusiveMaximum", "<"),
            ("maximum", "<="),
        )
        if key in schema
    ]
    return " ".join([text, " and ".join(bounds)]) if bounds else text


def show(value: Any) -> str:
    """A value as the user wrote it, briefly: `'abc'`, `12`, `a list`."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _suggestion(key: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return f" (did you mean '{close[0]}'?)"
    return " (known keys: " + ", ".join(known) + ")" if known else ""
