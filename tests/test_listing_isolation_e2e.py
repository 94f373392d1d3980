"""A team's listings (`GET /v1/files`, `GET /v1/batches`) through the official SDK's
auto-paginating iterator, among other teams' objects and objects made directly upstream:
every one of the team's objects once, in the upstream's order, no other team's id in any
page (not even as a cursor), and a bounded number of upstream pages read for each page.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from proxy.core.auth import key_hash
from tests.conftest import (
    DESIGN_KEY,
    RESEARCH_KEY,
    UPSTREAM_KEY,
    Simulator,
    Tollgate,
    run_tollgate,
    write_config,
)

GENERATIONS = "/v1/images/generations"
EMPTY_KEY = "tg_test_empty_key_0003"
TEAMS = {
    "design": f"name: design\nkeys:\n  - {{id: web-app, sha256: {key_hash(DESIGN_KEY)}}}\n",
    "research": f"name: research\nkeys:\n  - {{id: nb, sha256: {key_hash(RESEARCH_KEY)}}}\n",
    "empty": f"name: empty\nkeys:\n  - {{id: none, sha256: {key_hash(EMPTY_KEY)}}}\n",
}


@pytest.fixture(scope="module")
def proxy(upstream: Simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tollgate]:
    """In front of a simulator of this module's own: its files are exactly the ones made here."""
    root: Path = tmp_path_factory.mktemp("listings")
    write_config(root, f"{upstream.url}/v1", teams=TEAMS)
    yield from run_tollgate(root)


def through(client: openai.OpenAI, count: int) -> list[str]:
    return [
        client.files.create(file=(f"notes-{i}.txt", io.BytesIO(b"x")), purpose="user_data").id
        for i in range(count)
    ]


def direct(upstream: Simulator, count: int) -> list[str]:
    """Files uploaded with the company key straight to the upstream, never through Tollgate."""
    made = []
    for i in range(count):
        answer = httpx.post(
            f"{upstream.url}/v1/files",
            headers={"authorization": f"Bearer {UPSTREAM_KEY}"},
            files={"file": (f"direct-{i}.txt", b"x")},
            data={"purpose": "user_data"},
        )
        answer.raise_for_status()
        made.append(answer.json()["id"])
    return made


def listings(upstream: Simulator) -> int:
    """The listings (of files or batches) that reached the upstream so far."""
    found = httpx.get(f"{upstream.url}/_sim/arrivals").json()["requests"]
    lists = ("/v1/files", "/v1/batches")
    return sum(1 for a in found if a["method"] == "GET" and a["raw_path"] in lists)


@pytest.fixture(scope="module")
def files(proxy: Tollgate, upstream: Simulator) -> dict[str, list[str]]:
    """Each owner's files, oldest first, interleaved with runs of others' longer than a
    page of the listings below."""
    design, research = proxy.client(), proxy.client(RESEARCH_KEY)
    made: dict[str, list[str]] = {"design": [], "research": [], "direct": []}
    for owner, count in [
        ("design", 3), ("research", 60), ("design", 2), ("direct", 45), ("design", 1),
        ("research", 5), ("design", 2),
    ]:  # fmt: skip
        if owner == "direct":
            made[owner] += direct(upstream, count)
        else:
            made[owner] += through(design if owner == "design" else research, count)
    return made


@pytest.mark.parametrize("limit", [1, 2, 7, 100])
def test_auto_pagination_lists_every_own_file_once_and_no_other(
    proxy: Tollgate, upstream: Simulator, files: dict[str, list[str]], limit: int
) -> None:
    design = proxy.client()
    pages: list[dict[str, Any]] = []
    before = listings(upstream)
    page = design.files.list(limit=limit)
    while True:
        raw = page.model_dump()
        pages.append(raw)
        if not page.has_next_page():
            break
        page = page.get_next_page()
    listed = [f["id"] for p in pages for f in p["data"]]
    assert listed == list(reversed(files["design"]))  # newest first, each once
    assert all(len(p["data"]) <= limit for p in pages)
    # No page names another owner's object, not even as its cursor.
    others = set(files["research"]) | set(files["direct"])
    for p in pages:
        assert {p.get("first_id"), p.get("last_id")} <= {None, *files["design"]}
    assert not others & set(listed)
    # Each page read a bounded number of upstream pages.
    assert listings(upstream) - before <= 21 * len(pages)


def test_the_sdk_iterator_gives_the_same_files(
    proxy: Tollgate, files: dict[str, list[str]]
) -> None:
    assert [f.id for f in proxy.client().files.list(limit=2)] == list(reversed(files["design"]))
    assert [f.id for f in proxy.client(RESEARCH_KEY).files.list(limit=3)] == list(
        reversed(files["research"])
    )
    ascending = [f.id for f in proxy.client().files.list(limit=2, order="asc")]
    assert ascending == files["design"]


def test_a_team_without_files_is_shown_none_and_no_cursor(
    proxy: Tollgate, upstream: Simulator, files: dict[str, list[str]]
) -> None:
    before = listings(upstream)
    raw = httpx.get(
        f"{proxy.url}/v1/files",
        params={"limit": 2},
        headers={"authorization": f"Bearer {EMPTY_KEY}"},
    )
    assert raw.status_code == 200
    page = raw.json()
    assert page["data"] == [] and page["first_id"] is None and page["last_id"] is None
    assert page["has_more"] is False
    assert list(proxy.client(EMPTY_KEY).files.list(limit=5)) == []
    assert list(proxy.client(EMPTY_KEY).batches.list(limit=5)) == []
    assert listings(upstream) == before  # nothing to look for: nothing read upstream


def get(proxy: Tollgate, query: str, key: str = DESIGN_KEY) -> httpx.Response:
    return httpx.get(
        f"{proxy.url}/v1/files?{query}", headers={"authorization": f"Bearer {key}"}, timeout=30
    )


@pytest.mark.parametrize("owner", ["research", "direct"])
def test_a_cursor_that_is_not_the_teams_is_answered_as_an_unknown_one_and_never_sent(
    proxy: Tollgate, upstream: Simulator, files: dict[str, list[str]], owner: str
) -> None:
    before = listings(upstream)
    page = get(proxy, f"after={files[owner][-1]}&limit=5")
    assert page.status_code == 200
    assert page.json() == {
        "object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False,
    }  # fmt: skip
    assert listings(upstream) == before
    # The team's own cursor is read on from.
    own = get(proxy, f"after={files['design'][-1]}&limit=1").json()
    assert [f["id"] for f in own["data"]] == [files["design"][-2]]


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("after=a&after=b", "after"),
        ("limit=1&limit=10000", "limit"),
        ("limit=0", "limit"),
        ("limit=10001", "limit"),
        ("limit=%EF%BC%91", "limit"),  # a full-width digit one
        ("order=random", "order"),
        ("project=proj_other", "project"),
        ("purpose=batch&purpose=vision", "purpose"),
    ],
)
def test_a_listing_query_is_read_and_refused_unless_openai_takes_it(
    proxy: Tollgate, upstream: Simulator, query: str, param: str
) -> None:
    before = listings(upstream)
    refused = get(proxy, query)
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == param
    assert listings(upstream) == before


def test_the_largest_limit_lists_every_own_file_in_one_page(
    proxy: Tollgate, files: dict[str, list[str]]
) -> None:
    page = get(proxy, "limit=10000&purpose=user_data").json()
    assert [f["id"] for f in page["data"]] == list(reversed(files["design"]))
    assert page["has_more"] is False


def test_a_listing_carries_the_upstreams_request_id(proxy: Tollgate) -> None:
    """As every proxied answer does: the SDK's `_request_id` is the last page read's."""
    with proxy.client() as design:
        page = design.files.with_raw_response.list(limit=2)
    assert page.headers["x-request-id"].startswith("req_")
    assert page.headers["x-tollgate-request-id"]


def test_batches_are_listed_for_their_team_only_across_pages(
    proxy: Tollgate, upstream: Simulator
) -> None:
    line = {"model": "gpt-image-2", "prompt": "a", "quality": "low", "size": "1024x1024"}
    body = b"".join(
        json.dumps({"custom_id": f"c{i}", "method": "POST", "url": GENERATIONS, "body": line})
        .encode() + b"\n"
        for i in range(2)
    )  # fmt: skip
    made: dict[str, list[str]] = {"design": [], "research": []}
    for owner, count in [("design", 2), ("research", 4), ("design", 1), ("research", 3)]:
        client = proxy.client(DESIGN_KEY if owner == "design" else RESEARCH_KEY)
        for _ in range(count):
            uploaded = client.files.create(file=("in.jsonl", body), purpose="batch")
            batch = client.batches.create(
                input_file_id=uploaded.id, endpoint=GENERATIONS, completion_window="24h"
            )
            made[owner].append(batch.id)
    for owner, key in (("design", DESIGN_KEY), ("research", RESEARCH_KEY)):
        listed = [b.id for b in proxy.client(key).batches.list(limit=1)]
        assert listed == list(reversed(made[owner]))


def test_objects_made_directly_upstream_are_no_teams(
    proxy: Tollgate, upstream: Simulator, files: dict[str, list[str]]
) -> None:
    company = {"authorization": f"Bearer {UPSTREAM_KEY}"}
    line = {"model": "gpt-image-2", "prompt": "a", "quality": "low", "size": "1024x1024"}
    jsonl = json.dumps({"custom_id": "c", "method": "POST", "url": GENERATIONS, "body": line})
    batch_file = httpx.post(
        f"{upstream.url}/v1/files", headers=company, files={"file": ("in.jsonl", jsonl)},
        data={"purpose": "batch"},
    ).json()["id"]  # fmt: skip
    batch = httpx.post(
        f"{upstream.url}/v1/batches", headers=company,
        json={"input_file_id": batch_file, "endpoint": GENERATIONS, "completion_window": "24h"},
    ).json()["id"]  # fmt: skip
    response = httpx.post(
        f"{upstream.url}/v1/responses", headers=company,
        json={"model": "gpt-5.5", "input": "hello", "max_output_tokens": 16},
    ).json()["id"]  # fmt: skip
    vision = files["direct"][0]
    design = proxy.client()
    attempts = [
        lambda: design.files.retrieve(vision),
        lambda: design.files.content(vision),
        lambda: design.files.delete(vision),
        lambda: design.batches.retrieve(batch),
        lambda: design.batches.cancel(batch),
        lambda: design.batches.create(
            input_file_id=batch_file, endpoint=GENERATIONS, completion_window="24h"
        ),
        lambda: design.responses.retrieve(response),
        lambda: design.responses.delete(response),
        lambda: design.responses.input_items.list(response),
        lambda: design.responses.create(
            model="gpt-5.5", input="again", max_output_tokens=16, previous_response_id=response
        ),
        lambda: design.post(
            "/images/edits", cast_to=httpx.Response,
            body={"model": "gpt-image-2", "prompt": "copy", "images": [{"file_id": vision}]},
        ),
    ]  # fmt: skip
    found = httpx.get(f"{upstream.url}/_sim/arrivals").json()["requests"]
    before = len(found)
    for attempt in attempts:
        with pytest.raises(openai.NotFoundError):
            attempt()
    found = httpx.get(f"{upstream.url}/_sim/arrivals").json()["requests"][before:]
    ids = (vision, batch, batch_file, response)
    # Nothing forwarded: no write at all, no read of those objects (the followers of other
    # tests' batches and responses poll meanwhile).
    forwarded = [
        a for a in found
        if a["raw_path"] != "/_sim/arrivals"
        and (a["method"] != "GET" or any(i in a["raw_path"] for i in ids))
    ]  # fmt: skip
    assert forwarded == []
