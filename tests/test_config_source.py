"""The configuration reader against PyYAML's own `safe_load`: the same values, whatever the
scalars look like (its resolver answers are kept, its string constructor skipped)."""

from __future__ import annotations

import math
from typing import Any

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config.source import _immutable, _plain_tag, parse_document

# Plain scalars YAML 1.1 reads as something other than text, and some it reads as text.
TRICKY = [
    "yes", "No", "on", "OFF", "y", "~", "null", "Null", "", "true", "False",
    "0o17", "017", "0x1F", "0b101", "1_000", "+12", "-0", "1e3", "1.5e+3", "6.8523015e+5",
    "685.230_15e+03", "190:20:30", "2001-12-14", "2001-12-14t21:59:43.10-05:00",
    ".5", "1.", "=", "<<", "12abc", "0.00000001", "100000000000000000000", "a: b", "- x",
    "#", "é", "${NAME}", "limit_usd", "period",
]  # fmt: skip

AMBIGUOUS = {"- 017", "- 190:20:30"}

scalars = st.one_of(
    st.sampled_from(TRICKY),
    st.text(max_size=12),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.none(),
)
documents = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(TRICKY), st.text(max_size=8)), inner, max_size=4),
    ),
    max_leaves=20,
)


def _finite(value: Any) -> Any:
    """`safe_load`'s value as the reader gives it: .inf and .nan stay text."""
    if isinstance(value, float) and not math.isfinite(value):
        return "<non-finite>"
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


@settings(max_examples=300, deadline=None)
@given(documents, st.sampled_from([None, True, False]))
def test_values_are_safe_loads(data: Any, flow: bool | None) -> None:
    text = yaml.safe_dump({"root": data}, default_flow_style=flow, allow_unicode=True)
    doc, problems = parse_document(text, "f.yaml", None)
    assert problems == []
    assert doc is not None
    assert _finite(doc.data) == _finite(yaml.safe_load(text))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(TRICKY), min_size=1, max_size=6))
def test_plain_scalars_are_read_as_yaml_reads_them(words: list[str]) -> None:
    """Written plain where YAML allows, so each goes through the resolver's answer."""
    lines = []
    for word in words:
        try:
            if yaml.safe_load(f"k: {word}") is None and word not in ("", "~", "null", "Null"):
                continue
        except yaml.YAMLError:
            continue
        lines.append(f"- {word}")
    text = "\n".join(lines) + "\n"
    try:
        expected = yaml.safe_load(text)
    except yaml.YAMLError:
        return
    doc, problems = parse_document(text, "f.yaml", None)
    # Read as YAML 1.1 reads them, but refused: YAML 1.2 reads them otherwise.
    ambiguous = [f"{line}" for line, word in enumerate(lines, 1) if word in AMBIGUOUS]
    assert [problem.split(":")[1] for problem in problems] == ambiguous
    assert doc is not None
    assert _finite(doc.data) == _finite(expected)
    _plain_tag.cache_clear()  # and again, each answer now computed afresh
    _immutable.cache_clear()
    again, _ = parse_document(text, "f.yaml", None)
    assert again is not None and _finite(again.data) == _finite(expected)


MERGES_AND_TAGS = """\
base: &base {period: month, limit_usd: 10, "=": eq}
list: &list [1, 2.5, yes, ~]
merged:
  <<: *base
  limit_usd: 20
many:
  <<: [*base, {n: 1}]
  = : value key
tagged: [!!int "12", !!float 1, !!bool "true", !!null "", !!str 12, 0x1F, !!int 0b11]
again: *list
"""


def test_merge_keys_value_keys_and_explicit_tags_are_read_as_safe_load_reads_them() -> None:
    """What the reader skips when a file has none (`<<`, `=`), and scalars tagged by hand
    (their values kept per tag and text), read as `safe_load` reads them."""
    for _ in range(2):  # the second time, numbers and booleans from the kept answers
        doc, problems = parse_document(MERGES_AND_TAGS, "f.yaml", None)
        assert problems == []
        assert doc is not None
        assert doc.data == yaml.safe_load(MERGES_AND_TAGS)
        assert doc.lines[("merged", "limit_usd")] == 5
        assert doc.lines[("many", "=")] == 8
