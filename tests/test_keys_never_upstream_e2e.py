"""A team's Tollgate key never reaches OpenAI: not in the `Authorization` header (the
upstream key replaces it), nor written by the client into the query or another header of
a forwarded request (`?api-key=tg_...`, as some clients do for other gateways). The
simulated upstream records every request as it arrived; no part of one holds a team key.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote_plus

import httpx
import pytest

from tests.conftest import (
    DESIGN_KEY,
    RESEARCH_KEY,
    UPSTREAM_KEY,
    Simulator,
    Tollgate,
    output,
    run_tollgate,
    wait_for,
    write_config,
)

KEYS = (DESIGN_KEY, RESEARCH_KEY)


@pytest.fixture(scope="module")
def gate(upstream: Simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tollgate]:
    root: Path = tmp_path_factory.mktemp("keys")
    write_config(root, f"{upstream.url}/v1", settings="passthrough: [/v1/models]\n")
    yield from run_tollgate(root)


def arrivals(upstream: Simulator, since: int = 0) -> list[dict[str, Any]]:
    """The requests the upstream got (from the `since`-th), but the test's own."""
    found: list[dict[str, Any]] = httpx.get(f"{upstream.url}/_sim/arrivals").json()["requests"]
    return [a for a in found[since:] if not a["raw_path"].startswith("/_sim/")]


def count(upstream: Simulator) -> int:
    return len(httpx.get(f"{upstream.url}/_sim/arrivals").json()["requests"])


def leaked(arrival: dict[str, Any]) -> list[str]:
    """The parts of a request as the upstream got it that hold a team key."""
    parts = [arrival["raw_path"], arrival["query"], *(v for _, v in arrival["headers"])]
    return [p for p in parts for key in KEYS if key in p or key in unquote_plus(unquote_plus(p))]


LEAKS = {
    "api-key": DESIGN_KEY,
    "key": quote(DESIGN_KEY, safe=""),
    "auth": f"Bearer {DESIGN_KEY}",
    "other": RESEARCH_KEY,
}
HEADERS = {
    "api-key": DESIGN_KEY,
    "x-api-key": DESIGN_KEY,
    "x-stainless-leak": DESIGN_KEY,
    "x-client-request-id": f"run-{DESIGN_KEY}",
    "user-agent": f"app/1.0 ({DESIGN_KEY})",
}


def test_a_passthrough_request_reaches_the_upstream_without_the_key_it_carried(
    gate: Tollgate, upstream: Simulator
) -> None:
    since = count(upstream)
    listed = gate.client().models.list(extra_query={"limit": "5", **LEAKS}, extra_headers=HEADERS)
    assert listed is not None
    [arrival] = [a for a in arrivals(upstream, since) if a["raw_path"] == "/v1/models"]
    assert leaked(arrival) == []
    assert arrival["query"] == "limit=5"
    assert arrival["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert ("x-stainless-leak", DESIGN_KEY) not in [tuple(h) for h in arrival["headers"]]


def test_a_files_request_reaches_the_upstream_without_the_key_it_carried(
    gate: Tollgate, upstream: Simulator
) -> None:
    client = gate.client()
    uploaded = client.files.create(file=("a.txt", io.BytesIO(b"hello")), purpose="user_data")
    since = count(upstream)
    found = client.files.retrieve(uploaded.id, extra_query=LEAKS, extra_headers=HEADERS)
    assert found.id == uploaded.id
    client.files.content(uploaded.id, extra_query=LEAKS, extra_headers=HEADERS)
    reached = arrivals(upstream, since)
    assert {a["raw_path"] for a in reached} == {
        f"/v1/files/{uploaded.id}",
        f"/v1/files/{uploaded.id}/content",
    }
    assert [leaked(a) for a in reached] == [[], []]
    assert {a["query"] for a in reached} == {""}


@pytest.mark.parametrize(
    "path",
    [
        f"/v1/models/{DESIGN_KEY}",
        f"/v1/models/gpt-image-2;api-key={DESIGN_KEY}",
        f"/v1/models/{quote(DESIGN_KEY, safe='')}",
        f"/v1/models/{RESEARCH_KEY}",
    ],
    ids=["own", "matrix-parameter", "percent-encoded", "another-team's"],
)
def test_a_passthrough_path_that_carries_a_key_is_refused_not_forwarded(
    gate: Tollgate, upstream: Simulator, path: str
) -> None:
    """A path is forwarded whole or not at all: one holding a team key never leaves."""
    since = count(upstream)
    answer = httpx.get(
        f"{gate.url}{path}", headers={"authorization": f"Bearer {DESIGN_KEY}"}, timeout=30
    )
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["code"] == "invalid_request"
    assert DESIGN_KEY not in answer.text and RESEARCH_KEY not in answer.text
    assert arrivals(upstream, since) == []
    # Nor in the request's log line (once it is written), the caller's key or another team's.
    request_id = answer.headers["x-tollgate-request-id"]
    line = wait_for(
        "the request's log line",
        lambda: next((x for x in output(gate.process).splitlines() if request_id in x), None),
    )
    assert DESIGN_KEY not in line and RESEARCH_KEY not in line, line
    assert DESIGN_KEY not in output(gate.process)
    # The same path without the key is forwarded.
    httpx.get(
        f"{gate.url}/v1/models/gpt-image-2", headers={"authorization": f"Bearer {DESIGN_KEY}"}
    )
    assert [a["raw_path"] for a in arrivals(upstream, since)] == ["/v1/models/gpt-image-2"]
