"""jsonschema-rs's verdict on a configuration document against jsonschema's, generated.

The loader trusts jsonschema-rs when it finds a document valid and asks jsonschema only
otherwise (`proxy.config.fastcheck`), so the two must agree on every document: a document
jsonschema-rs wrongly passed would load with no message at all. Valid documents of each
kind the loader checks are mutated (wrong types, unknown keys, missing keys, numbers out
of range, bad enum values, duplicates, extra nesting) and both verdicts compared.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from proxy.config import fastcheck
from proxy.config.schema import JsonPath, schema_problems, validator

SHA = hashlib.sha256(b"tg_a").hexdigest()
TEAM: dict[str, Any] = {
    "name": "design",
    "cost_center": "CC-1042",
    "openai_project": "proj_abc123",
    "keys": [{"id": "web-app", "sha256": SHA}],
    "budgets": [
        {"period": "month", "limit_usd": 800, "alert_at": [0.5, 0.8, 0.95]},
        {"period": "month", "image_output_tokens": 20000000},
    ],
    "per_user": [{"period": "day", "limit_usd": 5}],
    "allow": {
        "models": ["gpt-image-2", "gpt-image-1-mini"],
        "endpoints": ["generations", "edits"],
        "max_quality": "high",
        "max_n": 4,
        "sizes": ["auto", "1024x1024"],
        "params": {"moderation": ["auto"], "n": [1, 2.5, True]},
    },
    "throttle": [{"above": 0.8, "max_quality": "medium"}],
    "on_exhausted": "downgrade",
    "downgrade": {"order": ["quality", "size"], "fallback_model": "gpt-image-1-mini"},
    "responses": {"max_output_tokens": 4096, "max_tool_calls": 2, "unbounded": "inject"},
    "rate_limits": [
        {"per": "minute", "share": 0.5, "model": "gpt-image-2"},
        {"per": "day", "images": 100},
    ],
}
SETTINGS: dict[str, Any] = {
    "upstream": {
        "base_url": "https://api.openai.com/v1",
        "api_key": None,
        "timeout_s": 300,
        "total_timeout_s": 600.5,
        "organization": "org-1",
        "project": None,
        "max_connections": 4096,
    },
    "ledger": "sqlite:///tollgate.db",
    "timezone": "UTC",
    "admin_token": "${TOLLGATE_ADMIN_TOKEN}",
    "prices": "builtin",
    "default_model": "gpt-image-2",
    "organization": {
        "budgets": [{"period": "total", "total_tokens": 5}],
        "rate_limits": [{"per": "minute", "requests": 60}],
    },
    "limits": {"generations_bytes": 1048576, "header_timeout_s": 10, "max_connections": 64},
    "passthrough": ["/v1/models", {"path": "/v1/files", "methods": ["GET", "POST"]}],
    "alerts": {"webhooks": ["https://hooks.example/x"], "timeout_s": 5},
    "retries": {"enabled": True, "window_s": 60, "store_bytes": 1000},
    "teams": [copy.deepcopy(TEAM)],
}
SEEDS = {"team": TEAM, "settings": SETTINGS}

# Strings near the schema's edges: its enum values, patterns and key names.
WORDS = [
    *("day", "week", "month", "total", "minute", "GET", "TRACE", "quality", "model"),
    *("inject", "refuse", "reject", "downgrade", "generations", "auto", "1024x1024"),
    *("0x5", "proj_x", "proj_", "${X}", "http://x", "ftp://x", "sqlite:///x", "/v1/x"),
    *("/v1/", "/v2/x", "", "a", "a b", SHA, SHA[:-1], SHA.upper(), "a" * 65, "é", "a\n"),
    *("limit_usd", "share", "images", "per", "path", "name", "keys", "methods"),
]
# Values near its bounds, and of each JSON type.
PLAUSIBLE = st.sampled_from(
    [
        *WORDS,
        *(0, 1, -1, 2, 10, 11, 15, 16, 2**63, 2**64, -(2**63) - 1, 10**30),
        *(0.0, -0.0, 0.5, 1.0, 1.5, 10.0, 16.0, 1e-300, 1e300),
        *(True, False, None, [], {}, [1, 1], [1, True], [0, False], [1, 1.0], ["a", "a"]),
    ]
)
TEXT = st.text(st.characters(codec="utf-8"), max_size=8)
KEYS = TEXT | st.sampled_from(WORDS)
SCALARS = st.one_of(
    PLAUSIBLE,
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    TEXT,
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
    max_leaves=6,
)
FUZZ = settings(
    max_examples=400,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def paths(value: Any, path: JsonPath = ()) -> Iterator[JsonPath]:
    """Every JSON path in `value`, the root's included."""
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from paths(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from paths(item, (*path, index))


def parent_of(doc: Any, path: JsonPath) -> Any:
    for part in path[:-1]:
        doc = doc[part]
    return doc


def mutate(draw: st.DrawFn, doc: Any) -> str:
    """One mutation of `doc` in place, at a path drawn from it; what it did."""
    path = draw(st.sampled_from(list(paths(doc))))
    kind = draw(
        st.sampled_from(["replace", "delete", "add", "duplicate", "empty", "nest"])
        if path
        else st.sampled_from(["add", "delete", "replace"])
    )
    if not path:
        if kind == "delete" and isinstance(doc, dict) and doc:
            del doc[draw(st.sampled_from(sorted(doc)))]
        elif kind == "add" and isinstance(doc, dict):
            doc[draw(KEYS)] = draw(VALUES)
        return kind
    parent, last = parent_of(doc, path), path[-1]
    value = parent[last]
    if kind == "replace":
        parent[last] = draw(VALUES)
    elif kind == "delete":
        del parent[last]
    elif kind == "add" and isinstance(value, dict):
        value[draw(KEYS)] = draw(VALUES)
    elif kind == "add" and isinstance(value, list):
        value.append(draw(VALUES))
    elif kind == "duplicate" and isinstance(value, list) and value:
        value.append(copy.deepcopy(value[0]))
    elif kind == "empty" and isinstance(value, list | dict):
        value.clear()
    elif kind == "nest":
        parent[last] = draw(st.sampled_from([[value], {"x": value}, {str(last): value}]))
    return kind


@st.composite
def documents(draw: st.DrawFn, kind: str) -> Any:
    """A valid document of `kind` mutated one to three times."""
    doc = copy.deepcopy(SEEDS[kind])
    for _ in range(draw(st.integers(1, 3))):
        event(mutate(draw, doc))
    return doc


def rust_verdict(kind: str, doc: Any) -> bool:
    fast = fastcheck.fast_validator(kind)
    assert fast is not None, "jsonschema-rs is a dependency"
    return fast.is_valid(doc)


@pytest.mark.parametrize("kind", sorted(SEEDS))
def test_the_seeds_are_valid(kind: str) -> None:
    assert validator(kind).is_valid(SEEDS[kind])
    assert rust_verdict(kind, SEEDS[kind])


@pytest.mark.parametrize("kind", sorted(SEEDS))
@FUZZ
@given(data=st.data())
def test_jsonschema_rs_agrees_with_jsonschema(kind: str, data: st.DataObject) -> None:
    doc = data.draw(documents(kind))
    valid = validator(kind).is_valid(doc)
    event("valid" if valid else "invalid")
    assert rust_verdict(kind, doc) == valid
    expected = list(schema_problems(validator(kind), doc))
    assert list(fastcheck.schema_problems(kind, doc)) == expected


def test_a_pattern_ending_in_dollar_ends_the_text_for_both() -> None:
    """Python's `re` lets `$` match before a final line feed; JSON Schema's (ECMA 262)
    does not, and the loader's jsonschema reads patterns as JSON Schema does."""
    doc = {**TEAM, "keys": [{"id": "k", "sha256": SHA + "\n"}]}
    assert not validator("team").is_valid(doc)
    assert not rust_verdict("team", doc)
    assert [path for path, _ in fastcheck.schema_problems("team", doc)] == [("keys", 0, "sha256")]


def test_a_value_json_lacks_goes_to_jsonschema() -> None:
    doc = {**TEAM, "cost_center": datetime.date(2026, 1, 1)}
    assert not fastcheck.surely_valid("team", doc)
    assert list(fastcheck.schema_problems("team", doc)) == [
        (("cost_center",), "must be a string, got 2026-01-01")
    ]


def test_without_jsonschema_rs_every_document_goes_to_jsonschema(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "jsonschema_rs", None)  # its import fails
    fastcheck.fast_validator.cache_clear()
    try:
        assert fastcheck.fast_validator("team") is None
        assert not fastcheck.surely_valid("team", TEAM)
        assert list(fastcheck.schema_problems("team", TEAM)) == []
        assert list(fastcheck.schema_problems("team", {**TEAM, "nmae": "x"})) == [
            (("nmae",), "unknown key (did you mean 'name'?)")
        ]
    finally:
        fastcheck.fast_validator.cache_clear()
