"""`tollgate schema` against `tollgate check`, generated: what an editor accepts by the
printed schema is what `check` accepts as to form, and `check` never fails but with
`file:line: message` problems.

Documents of each kind (a team file, `tollgate.yaml`) are the seeds of
tests/test_config_fastcheck.py mutated, their numbers and strings also replaced by values
at the edges (past a float, past a 64-bit column, text ending in a line feed). Each is
written as YAML and read by `load_config`; the printed schema is read as an editor reads
it, by jsonschema-rs (JSON Schema's own regular expressions).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from proxy.config import config_schema, load_config
from proxy.config.fastcheck import schema_problems
from proxy.config.source import parse_document
from proxy.core.errors import ConfigError
from tests.test_config_fastcheck import SETTINGS as SETTINGS_SEED
from tests.test_config_fastcheck import TEAM as TEAM_SEED
from tests.test_config_fastcheck import mutate, paths

# The seeds of tests/test_config_fastcheck.py, made to load: their meaning checked too.
TEAM = {
    **TEAM_SEED,
    "allow": {**TEAM_SEED["allow"], "params": {"moderation": ["auto"], "stream": [True]}},
}
SETTINGS_DOC = {
    **SETTINGS_SEED,
    "passthrough": ["/v1/models", {"path": "/v1/moderations", "methods": ["POST"]}],
    "organization": {
        **SETTINGS_SEED["organization"],
        "rate_limits": [
            {"per": "minute", "requests": 60},
            {"per": "minute", "images": 250, "model": "gpt-image-2"},
        ],
    },
    "teams": [TEAM],
}
SEEDS = {"team": TEAM, "settings": SETTINGS_DOC}

# A number is put at a numeric edge, a string at one of text.
NUMBER_EDGES = st.sampled_from(
    [
        *(0, 1, 16, 10**9, 10**9 + 1, 2**31 - 1, 2**31, 2**53 - 1, 2**53, 2**63),
        *(10**400, -(10**400)),
        *(0.5, 1e-9, 1e-10, 1.5e9, 1e300),
    ]
)
TEXT_EDGES = st.sampled_from(["proj_a\n", "design\n", "a" * 64, "${X}", "${X:-y}", "$${X}", "0100"])
FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
# The organization limits the seed team's shares take their part of.
SETTINGS = "organization:\n  rate_limits:\n    - {per: minute, images: 250, model: gpt-image-2}\n"


def published(kind: str) -> jsonschema_rs.Validator:
    """The schema `tollgate schema` prints, for one kind of file, as an editor reads it."""
    printed = json.loads(json.dumps(config_schema()))
    schema = {"$defs": printed["$defs"], "$ref": f"#/$defs/{kind}"}
    return jsonschema_rs.Draft202012Validator(schema, validate_formats=False)


@st.composite
def edged(draw: st.DrawFn, kind: str) -> Any:
    """A seed of `kind`, mutated, then some of its numbers and strings put at an edge."""
    doc = copy.deepcopy(SEEDS[kind])
    for _ in range(draw(st.sampled_from([0, 0, 1, 2]))):
        event(mutate(draw, doc))
    leaves = [p for p in paths(doc) if p and isinstance(_at(doc, p), int | float | str)]
    for path in draw(st.lists(st.sampled_from(leaves), min_size=1, max_size=3)) if leaves else ():
        parent = _at(doc, path[:-1])
        parent[path[-1]] = draw(TEXT_EDGES if isinstance(parent[path[-1]], str) else NUMBER_EDGES)
    return doc


def _at(doc: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        doc = doc[part]
    return doc


def verdict(root: Path, kind: str, doc: Any) -> list[str] | None:
    """`check`'s problems with the configuration holding `doc` (None: it loads)."""
    text = yaml.safe_dump(doc, allow_unicode=True)
    if kind == "team":
        (root / "tollgate.yaml").write_text(SETTINGS)
        (root / "teams" / "t.yaml").write_text(text)
    else:
        (root / "teams" / "t.yaml").unlink(missing_ok=True)
        (root / "tollgate.yaml").write_text(text)
    try:
        load_config(root, env={})
    except ConfigError as exc:
        return exc.problems
    return None


@pytest.mark.parametrize("kind", sorted(SEEDS))
def test_the_seeds_load(tmp_path: Path, kind: str) -> None:
    (tmp_path / "teams").mkdir()
    assert verdict(tmp_path, kind, SEEDS[kind]) is None


@pytest.mark.parametrize("kind", sorted(SEEDS))
@FUZZ
@given(data=st.data())
def test_check_refuses_what_the_schema_refuses_and_fails_only_with_problems(
    tmp_path: Path, kind: str, data: st.DataObject
) -> None:
    (tmp_path / "teams").mkdir(exist_ok=True)
    doc = data.draw(edged(kind))
    valid = published(kind).is_valid(doc)
    event("valid" if valid else "invalid")
    problems = verdict(tmp_path, kind, doc)  # raises anything but a ConfigError
    if not valid:
        assert problems, "the schema refuses it, check accepts it"
    # Read back from its YAML, the document passes check's schema step as it passes the
    # printed schema.
    read, unread = parse_document(yaml.safe_dump(doc, allow_unicode=True), "f.yaml", None)
    if read is not None and not unread:
        assert (not list(schema_problems(kind, read.data))) == valid
    file = str(tmp_path / ("teams/t.yaml" if kind == "team" else "tollgate.yaml"))
    for problem in problems or ():
        line = problem.removeprefix(file + ":").partition(":")[0]
        assert problem.startswith(file + ":") and line.isdigit(), problem
