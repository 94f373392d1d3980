"""The Responses API through the official openai Node SDK (tests/node/responses_sdk.mjs)
and the Python SDK's higher-level helpers, as a team's existing code uses them: streams
read event by event and through the `stream()` helpers, background responses cancelled,
input items paged through, continuations, an aborted stream, a budget refusal, an
`Idempotency-Key` replay, and Tollgate's headers read through the raw and streaming
response wrappers.

Every cost is checked against the simulator's billing record of the response priced at
the price book's rates (`tests.responses_e2e`), not against Tollgate's meter.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from proxy.core.auth import key_hash
from tests.conftest import (
    DESIGN_KEY,
    Simulator,
    Tollgate,
    nanos,
    start_tollgate,
    wait_for,
    write_config,
)
from tests.responses_e2e import (
    NODE_PROJECT,
    TEAMS,
    arrivals,
    billed,
    calm,
    check_charge,
    node_sdk,
    record_cost,
    rows_of,
    settled_row,
    tool,
)

__all__ = ["calm"]  # the shared fixture

BROKE_KEY = "tg_test_broke_responses_node_key"
SDK_TEAMS = {
    **TEAMS,
    "broke": f"name: broke\nkeys:\n  - {{id: broke-key, sha256: {key_hash(BROKE_KEY)}}}\n"
    "budgets:\n  - {period: day, limit_usd: 0.001}\non_exhausted: reject\n",
}
ASK: dict[str, Any] = {
    "model": "gpt-5.5",
    "tools": [tool("gpt-image-2")],
    "max_output_tokens": 300,
    "max_tool_calls": 1,
}


@pytest.fixture(scope="module")
def proxy(simulator: Simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tollgate]:
    root = tmp_path_factory.mktemp("node-responses")
    write_config(root, f"{simulator.url}/v1", "timezone: UTC\n", teams=SDK_TEAMS)
    tollgate = start_tollgate(root)
    yield tollgate
    tollgate.stop()


def node(proxy: Tollgate, *cases: str) -> dict[str, Any]:
    """The results of `cases` of responses_sdk.mjs, run by node against `proxy`."""
    binary = node_sdk()
    ran = subprocess.run(
        [binary, str(NODE_PROJECT / "responses_sdk.mjs")],
        capture_output=True,
        text=True,
        timeout=180,
        env={
            **os.environ,
            "TOLLGATE_BASE_URL": f"{proxy.url}/v1",
            "TOLLGATE_KEYS": json.dumps({"design": DESIGN_KEY, "broke": BROKE_KEY}),
            "CASES": ",".join(cases),
        },
    )
    assert ran.returncode == 0, ran.stderr
    results: dict[str, Any] = json.loads(ran.stdout)
    return results


STREAM_EVENTS = {
    "response.created": 1,
    "response.image_generation_call.partial_image": 2,
    "response.image_generation_call.completed": 1,
    "response.completed": 1,
}


# -- 1. the Node SDK ------------------------------------------------------------------------


def test_node_streams_and_the_stream_helper_are_charged_what_was_billed(
    proxy: Tollgate, simulator: Simulator
) -> None:
    got = node(proxy, "stream", "helper")
    stream, helper = got["stream"], got["helper"]
    for result in (stream, helper):
        assert result["status"] == "completed"
        assert {k: result["events"].get(k) for k in STREAM_EVENTS} == STREAM_EVENTS
        row = check_charge(proxy, simulator, result["id"], "gpt-5.5", "gpt-image-2")
        assert (row["stream"], row["team"]) == (1, "design")
    assert helper["images"] == 1
    row = settled_row(proxy, stream["id"])
    assert row["id"] == stream["headers"]["x-tollgate-request-id"]
    assert nanos(stream["headers"]["x-tollgate-reserved-usd"]) == row["estimated_nanos"]
    assert "x-tollgate-cost-usd" not in stream["headers"]  # known at the stream's end
    main = billed(simulator, stream["id"])["mainline"]
    assert stream["usage"]["input_tokens"] == main["input"]
    assert stream["usage"]["output_tokens"] == main["output"]


def test_a_node_background_stream_left_and_resumed_after_its_last_event_is_charged_once(
    proxy: Tollgate, simulator: Simulator
) -> None:
    got = node(proxy, "resumed")["resumed"]
    assert got["before"] == [0, 1, 2]
    assert got["after"][0] == 3 and got["after"] == list(range(3, 3 + len(got["after"])))
    assert got["status"] == "completed"
    assert got["events"]["response.image_generation_call.partial_image"] == 2
    assert got["headers"]["x-tollgate-team"] == "design"
    assert got["foreign"] == {"name": "NotFoundError", "status": 404, "code": "not_found"}
    row = check_charge(proxy, simulator, got["id"], "gpt-5.5", "gpt-image-2")
    assert (row["stream"], row["held"]) == (1, 0)
    assert [r["id"] for r in rows_of(proxy, got["id"])] == [row["id"]]


def test_node_background_response_cancelled_is_charged_what_it_billed(
    proxy: Tollgate, simulator: Simulator
) -> None:
    simulator.configure(latency_ms=1000)  # still queued when the cancel arrives
    got = node(proxy, "cancel")["cancel"]
    assert (got["queued"], got["status"]) == ("queued", "cancelled")
    record = billed(simulator, got["id"])
    row = wait_for("the cancelled response settled", lambda: settled(proxy, got["id"]))
    assert row["cost_nanos"] == record_cost(record) > 0
    assert (row["outcome"], row["error_code"], row["held"], row["flagged"]) == (
        "upstream_error",
        "response_cancelled",
        0,
        0,
    )
    assert row["mainline_input_tokens"] == got["usage"]["input_tokens"]


def settled(proxy: Tollgate, response_id: str) -> dict[str, Any] | None:
    rows = rows_of(proxy, response_id)
    return rows[0] if rows and rows[0]["state"] == "settled" else None


def test_node_input_items_continuation_and_abort(proxy: Tollgate, simulator: Simulator) -> None:
    """Input items paged through one at a time; a continuation charged what it billed (the
    first's context included); a stream the client aborts charged in full, as the upstream
    billed it whole."""
    got = node(proxy, "input_items", "continued", "aborted")
    items, continued, aborted = got["input_items"], got["continued"], got["aborted"]
    assert items["items"] == ["A cat", "on a mat", "from Node"]
    check_charge(proxy, simulator, items["id"], "gpt-5.5", "gpt-image-2")
    first = check_charge(proxy, simulator, continued["first"], "gpt-5.5", "gpt-image-2")
    second = check_charge(proxy, simulator, continued["id"], "gpt-5.5", "gpt-image-2")
    assert second["mainline_input_tokens"] > first["mainline_input_tokens"]
    assert nanos(continued["headers"]["x-tollgate-cost-usd"]) == second["cost_nanos"]
    assert aborted["id"] is not None
    row = check_charge(proxy, simulator, aborted["id"], "gpt-5.5", "gpt-image-2")
    assert row["stream"] == 1


def test_node_budget_refusal_is_openais_429_shape_and_never_retried(
    proxy: Tollgate, simulator: Simulator
) -> None:
    before = len(arrivals(simulator))
    got = node(proxy, "refused")["refused"]
    assert got["refused"] is True
    assert (got["name"], got["status"], got["should_retry"], got["attempts"]) == (
        "RateLimitError",
        429,
        "false",
        1,
    )
    assert set(got["error"]) == {"message", "type", "param", "code"}
    assert (got["error"]["type"], got["error"]["code"]) == ("insufficient_quota", "budget_exceeded")
    assert len(arrivals(simulator)) == before
    row = proxy.row(got["headers"]["x-tollgate-request-id"])
    assert (row["outcome"], row["cost_nanos"], row["team"]) == ("rejected_budget", 0, "broke")


def test_node_idempotency_key_replays_the_stream_and_charges_it_once(
    proxy: Tollgate, simulator: Simulator
) -> None:
    first, again = node(proxy, "replayed")["replayed"]["attempts"]
    assert first["id"] == again["id"]
    assert first["sequence"] == again["sequence"] == list(range(first["events"]))
    assert again["headers"]["x-tollgate-replay-of"] == first["headers"]["x-tollgate-request-id"]
    assert again["headers"]["x-tollgate-cost-usd"] == "0"
    assert len([r for r in simulator.billing() if r["id"] == first["id"]]) == 1
    check_charge(proxy, simulator, first["id"], "gpt-5.5", "gpt-image-2")
    replay = proxy.row(again["headers"]["x-tollgate-request-id"])
    assert (replay["outcome"], replay["cost_nanos"]) == ("replayed", 0)


# -- 2. the Python SDK's helpers ------------------------------------------------------------


def test_python_stream_helper_context_manager_and_final_response(
    proxy: Tollgate, simulator: Simulator
) -> None:
    streamed = {**ASK, "tools": [tool("gpt-image-2", partial_images=1)]}
    kinds: list[str] = []
    with proxy.client().responses.stream(input="A meadow, from the helper", **streamed) as stream:
        for event in stream:
            kinds.append(event.type)
        final = stream.get_final_response()
    assert final.status == "completed"
    assert kinds.count("response.image_generation_call.partial_image") == 1
    assert kinds[-1] == "response.completed"
    row = check_charge(proxy, simulator, final.id, "gpt-5.5", "gpt-image-2")
    assert row["stream"] == 1


def test_python_create_stream_with_stream_options(proxy: Tollgate, simulator: Simulator) -> None:
    stream = proxy.client().responses.create(
        input="A glacier, streamed",
        stream=True,
        stream_options={"include_obfuscation": False},
        **ASK,
    )
    completed = [e for e in stream if e.type == "response.completed"]
    assert len(completed) == 1
    response_id = completed[0].response.id  # type: ignore[attr-defined]
    check_charge(proxy, simulator, response_id, "gpt-5.5", "gpt-image-2")


def test_python_raw_and_streaming_responses_read_tollgates_headers(
    proxy: Tollgate, simulator: Simulator
) -> None:
    responses = proxy.client().responses
    raw = responses.with_raw_response.create(input="A quay, raw", **ASK)
    plain = raw.parse()
    row = check_charge(proxy, simulator, plain.id, "gpt-5.5", "gpt-image-2")
    assert raw.headers["x-tollgate-request-id"] == row["id"]
    assert nanos(raw.headers["x-tollgate-cost-usd"]) == row["cost_nanos"]
    assert plain._request_id == raw.headers["x-request-id"]

    with responses.with_streaming_response.create(
        input="A quay, streamed", stream=True, **ASK
    ) as answer:
        headers = dict(answer.headers)
        lines = [line for line in answer.iter_lines() if line.startswith("data: ")]
    done = [json.loads(line[6:]) for line in lines if '"response.completed"' in line]
    response_id = done[0]["response"]["id"]
    row = check_charge(proxy, simulator, response_id, "gpt-5.5", "gpt-image-2")
    assert headers["x-tollgate-request-id"] == row["id"]
    assert nanos(headers["x-tollgate-reserved-usd"]) == row["estimated_nanos"]
    assert headers["x-tollgate-team"] == "design"
