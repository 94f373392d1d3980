"""The Batch API and the Files API through the official openai Node SDK
(tests/node/batches.mjs), as a team points its client at Tollgate and changes nothing else:
what the SDK sends (its multipart order, its query strings, its headers), what it reads
back (the objects' shapes, Tollgate's headers, the output file), the refusals it raises as
its typed errors, and what the ledger charges for each line.

Every line's cost is checked against the simulator's billing record of that line priced
at the price book's batch rates (`tests.batches_e2e`), not against Tollgate's meter. One
Tollgate and one simulator for the module.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openai.types import Batch

from tests.batches_e2e import (
    DAY,
    EDITS,
    GENERATIONS,
    arrivals,
    batch_cost,
    billed_lines,
    check_settled,
    output_tokens,
    reserved_total,
    settled_rows,
)
from tests.conftest import DESIGN_KEY, RESEARCH_KEY, Simulator, Tollgate, run_tollgate, write_config
from tests.responses_e2e import NODE_PROJECT, node_sdk
from tests.test_batches_responses_e2e import check_lines
from tests.test_node_images_e2e import nanos
from tests.test_proxy_e2e import expected_cost, wait_settled

KEYS = {"design": DESIGN_KEY, "research": RESEARCH_KEY}
RESPONSES = "/v1/responses"


@pytest.fixture(scope="module")
def proxy(upstream: Simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tollgate]:
    root = tmp_path_factory.mktemp("node-batches")
    write_config(root, f"{upstream.url}/v1", "timezone: UTC\nlimits:\n  files_bytes: 1048576\n")
    yield from run_tollgate(root)


@pytest.fixture(autouse=True)
def calm(upstream: Simulator) -> Iterator[None]:
    """No latency or faults; a batch ends 400 ms after it is created."""
    knobs = {"latency_ms": 0, "fault": None, "batch_delay_ms": 400, "batch_window_ms": DAY * 1000}
    upstream.configure(**knobs)
    yield
    upstream.configure(**knobs)


def node(proxy: Tollgate, *cases: str) -> dict[str, Any]:
    """The results of `cases` of batches.mjs, run by node against `proxy`."""
    binary = node_sdk()
    ran = subprocess.run(
        [binary, str(Path(NODE_PROJECT) / "batches.mjs")],
        capture_output=True,
        text=True,
        timeout=180,
        env={
            **os.environ,
            "TOLLGATE_BASE_URL": f"{proxy.url}/v1",
            "TOLLGATE_KEYS": json.dumps(KEYS),
            "CASES": ",".join(cases),
        },
    )
    assert ran.returncode == 0, ran.stderr
    results: dict[str, Any] = json.loads(ran.stdout)
    return results


def bound_of(proxy: Tollgate, file_id: str) -> int:
    [stored] = proxy.query(f"SELECT * FROM stored_objects WHERE id = '{file_id}'")
    bound: int = stored["bound_nanos"]
    return bound


def fields(sent: dict[str, Any]) -> list[str]:
    return [name for name, _ in sent["fields"]]


def check_made(proxy: Tollgate, made: dict[str, Any]) -> None:
    """The upload and the create as the SDK got them: the objects' shapes, Tollgate's
    headers, the create's reservation the file's bound."""
    file, created = made["file"], made["created"]
    assert (file["status"], file["body"]["object"], file["body"]["purpose"]) == (
        200,
        "file",
        "batch",
    )
    assert file["body"]["filename"] == "lines.jsonl"
    assert file["headers"]["x-tollgate-team"] == "design"
    assert file["headers"]["x-tollgate-cost-usd"] == "0"  # an upload costs nothing
    assert file["headers"]["x-request-id"].startswith("req_")  # the upstream's own
    assert (created["status"], created["body"]["object"]) == (200, "batch")
    assert created["body"]["input_file_id"] == file["body"]["id"]
    headers = created["headers"]
    assert headers["x-tollgate-team"] == "design"
    assert headers["x-tollgate-request-id"].startswith("tg_req_")
    assert nanos(headers["x-tollgate-reserved-usd"]) == bound_of(proxy, file["body"]["id"]) > 0


# -- 1. a batch run to its end -----------------------------------------------------------


def test_a_node_batch_of_generations_is_read_back_and_settled_line_by_line(
    proxy: Tollgate, upstream: Simulator
) -> None:
    got = node(proxy, "generations")["generations"]
    check_made(proxy, got)
    batch = Batch.model_validate(got["ended"])
    assert (batch.status, batch.endpoint, batch.metadata) == (
        "completed",
        GENERATIONS,
        {"from": "node"},
    )
    assert batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (2, 1)
    # The SDK's multipart order: the file first, then the purpose (Python's is the other).
    [upload] = [s for s in got["sent"] if s["url"].endswith("/v1/files")]
    assert fields(upload) == ["file", "purpose"]
    # The output file, read with `files.content`, as the SDK asks for it.
    output = got["output"]
    assert output["status"] == 200
    assert output["headers"]["x-tollgate-team"] == "design"
    assert [(x["custom_id"], x["response"]["status_code"]) for x in output["lines"]] == [
        ("node-g1", 200),
        ("node-g2", 200),
    ]
    assert [len(x["response"]["body"]["data"]) for x in output["lines"]] == [1, 2]
    [content] = [s for s in got["sent"] if s["url"].endswith(f"{batch.output_file_id}/content")]
    assert content["accept"] == "application/binary"
    assert got["output_file"]["body"]["purpose"] == "batch_output"
    assert got["output_file"]["body"]["id"] == batch.output_file_id
    # The error file too: the line refused when it ran, billed nothing.
    [error] = got["errors"]["lines"]
    assert (error["custom_id"], error["response"]["status_code"]) == ("node-g3", 400)
    assert error["response"]["body"]["error"]["type"] == "image_generation_user_error"
    assert "node-g3" not in billed_lines(upstream, batch.id)
    # The input file as forwarded: the file priced, each line as the team wrote it.
    assert [x["custom_id"] for x in got["input"]["lines"]] == ["node-g1", "node-g2", "node-g3"]
    assert got["input"]["lines"][1]["body"]["n"] == 2
    # Each line charged what the simulator billed for it, at the batch rates, and the
    # output file read by the SDK prices the same.
    rows = check_settled(proxy, upstream, batch, "gpt-image-2")
    by_line = {x["custom_id"]: x["response"]["body"]["usage"] for x in output["lines"]}
    for row in rows:
        assert row["cost_nanos"] == batch_cost(
            "gpt-image-2", output_tokens(by_line[row["custom_id"]])
        )
    reserved = nanos(got["created"]["headers"]["x-tollgate-reserved-usd"])
    assert 0 < sum(r["cost_nanos"] for r in rows) <= reserved
    assert reserved_total(proxy) == 0  # the rest released
    # The SDK's own headers on every request: its retry count, never an Idempotency-Key.
    assert {(s["lang"], s["retry_count"], s["idempotency_key"]) for s in got["sent"]} == {
        ("js", "0", None)
    }


def test_a_node_batch_of_responses_lines_with_the_image_tool_is_settled_at_batch_rates(
    proxy: Tollgate, upstream: Simulator
) -> None:
    got = node(proxy, "responses")["responses"]
    check_made(proxy, got)
    batch = got["ended"]
    assert (batch["status"], batch["endpoint"]) == ("completed", RESPONSES)
    outputs = got["output"]["lines"]
    assert sorted(x["custom_id"] for x in outputs) == ["node-r1", "node-r2"]
    for line in outputs:
        body = line["response"]["body"]
        assert (body["object"], body["status"]) == ("response", "completed")
        assert any(item["type"] == "image_generation_call" for item in body["output"])
    forwarded = got["input"]["lines"][0]["body"]
    assert forwarded["service_tier"] == "default"  # written in, as the direct door does
    assert forwarded["tools"][0]["model"] == "gpt-image-2"
    rows = check_lines(proxy, upstream, batch["id"])
    assert len(rows) == 2
    assert sum(r["cost_nanos"] for r in rows) <= nanos(
        got["created"]["headers"]["x-tollgate-reserved-usd"]
    )


# -- 2. listing, cancelling, files ---------------------------------------------------------


def test_node_auto_pagination_lists_the_teams_batches_and_files_and_no_one_elses(
    proxy: Tollgate, upstream: Simulator
) -> None:
    got = node(proxy, "listed")["listed"]
    ids = got["ids"]
    assert got["batches"][:3] == ids[::-1]  # newest first
    assert len(set(got["batches"])) == len(got["batches"])
    assert got["batches"] == [b.id for b in proxy.client().batches.list(limit=100)]
    # A page of one at a time: the SDK asked for each next page after the last it read.
    pages = [s["url"] for s in got["sent"] if "/v1/batches?" in s["url"]]
    assert pages[0].endswith("/v1/batches?limit=1")
    for asked, before in zip(pages[1 : len(got["batches"])], got["batches"][:-1], strict=True):
        assert asked.endswith(f"?limit=1&after={before}"), asked
    assert got["first_page"] == {"ids": got["batches"][:2], "has_more": True}
    assert got["second_page"]["ids"] == got["batches"][2:4]
    # Files: oldest first, only batch files, the query the SDK sent as it sent it.
    files = got["files"]
    assert {f["purpose"] for f in files} == {"batch"} and len(files) >= 3
    python = [f.id for f in proxy.client().files.list(order="asc", purpose="batch", limit=100)]
    assert [f["id"] for f in files] == python
    listed = [s["url"] for s in got["sent"] if "/v1/files?" in s["url"]]
    assert listed[0].endswith("/v1/files?limit=2&order=asc&purpose=batch")
    assert listed[1].endswith(f"&after={files[1]['id']}")
    assert got["others"] == []  # the other team has none, and sees none of these


def test_a_node_batch_cancelled_while_it_runs_releases_its_reservation(
    proxy: Tollgate, upstream: Simulator
) -> None:
    upstream.configure(batch_delay_ms=60_000)  # still running when it is cancelled
    got = node(proxy, "cancelled")["cancelled"]
    check_made(proxy, got)
    cancelled = got["cancelled"]
    assert cancelled["status"] == 200
    assert cancelled["body"]["status"] in ("cancelling", "cancelled")
    assert cancelled["headers"]["x-tollgate-team"] == "design"
    assert got["ended"]["status"] == "cancelled"
    [row] = settled_rows(proxy, got["ended"]["id"])
    assert (row["cost_nanos"], row["reserved_nanos"], row["error_code"]) == (
        0,
        0,
        "batch_cancelled",
    )
    assert row["estimated_nanos"] == nanos(got["created"]["headers"]["x-tollgate-reserved-usd"])
    assert billed_lines(upstream, got["ended"]["id"]) == {}


def test_node_vision_user_data_and_expiring_files_are_kept_listed_read_and_deleted(
    proxy: Tollgate, upstream: Simulator
) -> None:
    got = node(proxy, "files")["files"]
    vision, user_data, expiring = got["vision"], got["user_data"], got["expiring"]
    assert (vision["body"]["purpose"], vision["body"]["filename"]) == ("vision", "ref.png")
    assert (user_data["body"]["purpose"], user_data["body"]["bytes"]) == ("user_data", 17)
    for answer in (vision, user_data, expiring):
        assert answer["headers"]["x-tollgate-team"] == "design"
        assert answer["headers"]["x-tollgate-cost-usd"] == "0"
    # `expires_after` as the SDK encodes it, a field per key in brackets.
    [sent] = [s for s in got["sent"] if s["fields"] and ["purpose", "batch"] in s["fields"]]
    assert fields(sent) == ["file", "purpose", "expires_after[anchor]", "expires_after[seconds]"]
    body = expiring["body"]
    assert body["expires_at"] - body["created_at"] == 3600
    assert got["retrieved"]["body"] == user_data["body"]
    assert vision["body"]["id"] in got["visions"]
    assert user_data["body"]["id"] not in got["visions"]  # `purpose` filters the listing
    assert (got["waited"], got["text"]) == ("processed", "notes, from Node\n")
    assert got["deleted"]["body"] == {
        "id": user_data["body"]["id"],
        "object": "file",
        "deleted": True,
    }
    for gone in (got["gone"], got["gone_again"]):
        assert (gone["error"], gone["status"], gone["type"]) == (
            "NotFoundError",
            404,
            "invalid_request_error",
        )
    rows = proxy.query("SELECT * FROM requests WHERE cost_nanos > 0 AND team = 'design'")
    assert not [r for r in rows if r["endpoint"] == "files"]  # nothing charged for files


def test_a_node_edit_of_an_uploaded_file_is_charged_and_another_teams_is_not_found(
    proxy: Tollgate, upstream: Simulator
) -> None:
    got = node(proxy, "edit_by_file_id")["edit_by_file_id"]
    direct = got["direct"]
    record = upstream.record(direct["headers"]["x-request-id"])
    row = wait_settled(proxy, direct["headers"]["x-tollgate-request-id"])
    assert (
        row["cost_nanos"]
        == nanos(direct["headers"]["x-tollgate-cost-usd"])
        == nanos(expected_cost(record))
    )
    assert (row["endpoint"], row["model"], row["outcome"]) == ("edits", "gpt-image-1.5", "ok")
    assert row["image_input_tokens"] == record["usage"]["image_input"] > 0
    foreign = got["foreign"]
    assert (foreign["error"], foreign["status"], foreign["code"]) == (
        "NotFoundError",
        404,
        "not_found",
    )
    assert got["reference"] in foreign["message"]
    refused = proxy.row(foreign["headers"]["x-tollgate-request-id"])
    assert (refused["upstream_request_id"], refused["cost_nanos"]) == (None, 0)  # not sent
    # The same edit as a batch line, and the other team's file refused in its file.
    check_made(proxy, got)
    batch = Batch.model_validate(got["ended"])
    assert (batch.status, batch.endpoint) == ("completed", EDITS)
    check_settled(proxy, upstream, batch, "gpt-image-1.5")
    line = got["foreign_line"]
    assert (line["error"], line["status"], line["param"]) == ("BadRequestError", 400, "file")
    assert "line 1: no such File object" in line["message"]


# -- 3. refusals as the SDK's typed errors ---------------------------------------------------


def test_node_sdk_raises_each_refusal_of_the_batch_and_file_doors_as_its_error_class(
    proxy: Tollgate, upstream: Simulator
) -> None:
    got = node(proxy, "refusals")["refusals"]
    invalid = "invalid_request_error"
    expected = {
        "unknown_batch": ("NotFoundError", 404, "not_found", None),
        "unknown_file": ("NotFoundError", 404, "not_found", None),
        "others_batch": ("NotFoundError", 404, "not_found", None),
        "others_cancel": ("NotFoundError", 404, "not_found", None),
        "others_content": ("NotFoundError", 404, "not_found", None),
        "others_delete": ("NotFoundError", 404, "not_found", None),
        "others_create": ("NotFoundError", 404, "not_found", None),
        "bad_line": ("BadRequestError", 400, "invalid_request", "file"),
        "fine_tune": ("BadRequestError", 400, "invalid_request", "purpose"),
        "no_purpose": ("BadRequestError", 400, "invalid_request", "purpose"),
        "no_file": ("BadRequestError", 400, "invalid_request", "file"),
        "wrong_endpoint": ("BadRequestError", 400, "invalid_request", "endpoint"),
        "wrong_window": ("BadRequestError", 400, "invalid_request", "completion_window"),
        "too_large": ("APIError", 413, "request_too_large", None),
        "list_limit": ("BadRequestError", 400, "invalid_request", "limit"),
        "list_order": ("BadRequestError", 400, "invalid_request", "order"),
    }
    for case, (error, status, code, param) in expected.items():
        found = got[case]
        assert (found["error"], found["status"], found["type"], found["code"]) == (
            error,
            status,
            invalid,
            code,
        ), case
        assert found["param"] == param, case
        assert set(found["body"]) == {"message", "type", "param", "code"}, case  # OpenAI's
        assert found["headers"]["x-tollgate-request-id"].startswith("tg_req_"), case
    assert "line 2: Invalid value for 'size': '7x7'" in got["bad_line"]["message"]
    assert "line 1" not in got["bad_line"]["message"]
    assert got["no_purpose"]["message"].endswith("Missing required parameter: 'purpose'.")
    assert got["no_file"]["message"].endswith("Missing required parameter: 'file'.")
    # Another team's objects are as unknown to it as they are upstream; none was forwarded.
    for case in ("others_batch", "others_cancel"):
        assert "No such Batch object" in got[case]["message"], case
    conflict = got["cancel_ended"]
    assert (conflict["error"], conflict["status"]) == ("ConflictError", 409)
    assert (conflict["type"], conflict["headers"]["x-tollgate-team"]) == (invalid, "design")
    # Each sent once: the client's retries are off, and none is a repeat.
    assert {s["retry_count"] for s in got["sent"]} == {"0"}


def test_a_node_batch_create_with_an_idempotency_key_is_one_batch_and_a_conflict_no_retry(
    proxy: Tollgate, upstream: Simulator
) -> None:
    got = node(proxy, "idempotency")["idempotency"]
    first, again = got["first"], got["again"]
    assert again["body"]["id"] == first["body"]["id"]  # the batch the first created
    assert again["headers"]["x-tollgate-replay-of"] == first["headers"]["x-tollgate-request-id"]
    assert again["headers"]["x-tollgate-cost-usd"] == "0"
    assert (
        again["headers"]["x-tollgate-reserved-usd"] == first["headers"]["x-tollgate-reserved-usd"]
    )
    replay = proxy.row(again["headers"]["x-tollgate-request-id"])
    assert (replay["outcome"], replay["cost_nanos"]) == ("replayed", 0)
    creates = [s for s in got["sent"] if s["url"].endswith("/v1/batches") and s["method"] == "POST"]
    # The SDK's `idempotencyKey` option sends nothing: that create is a batch of its own.
    assert [s["idempotency_key"] is not None for s in creates] == [True, True, False, True]
    assert got["option"]["body"]["id"] != first["body"]["id"]
    conflict = got["conflict"]
    assert (conflict["error"], conflict["status"], conflict["code"]) == (
        "ConflictError",
        409,
        "idempotency_conflict",
    )
    assert conflict["headers"]["x-should-retry"] == "false"
    assert [s["retry_count"] for s in creates] == ["0"] * 4  # the 409 not retried
    batches = [b for b in proxy.client().batches.list(limit=100) if b.input_file_id == got["file"]]
    assert len(batches) == 2  # the keyed creates made one batch, the unkeyed one another
    for made in (first, got["option"]):
        [row] = settled_rows(proxy, made["body"]["id"])
        assert row["cost_nanos"] > 0


def test_a_node_batch_create_that_timed_out_in_the_sdk_is_retried_into_the_same_batch(
    proxy: Tollgate, upstream: Simulator
) -> None:
    before = arrivals(upstream, "POST", "/v1/batches")
    upstream.configure(batch_answer_ms=2500)  # longer than the SDK's timeout of 1.5 s
    try:
        got = node(proxy, "timed_out")["timed_out"]
    finally:
        upstream.configure(batch_answer_ms=0)
    created = got["created"]
    creates = [s for s in got["sent"] if s["url"].endswith("/v1/batches") and s["method"] == "POST"]
    assert len(creates) >= 2  # the first ran out of time and was retried
    assert [s["retry_count"] for s in creates] == [str(i) for i in range(len(creates))]
    assert {s["timeout"] for s in creates} == {"1"}  # whole seconds
    assert created["headers"]["x-tollgate-replay-of"] is not None
    assert created["headers"]["x-tollgate-cost-usd"] == "0"
    assert got["batches"] == [created["body"]["id"]]  # one batch, not one per attempt
    assert arrivals(upstream, "POST", "/v1/batches") == before + 1  # the first alone
    [row] = settled_rows(proxy, created["body"]["id"])
    assert row["cost_nanos"] > 0
    first = proxy.row(created["headers"]["x-tollgate-replay-of"])
    assert first["response_id"] == created["body"]["id"]
