"""The Responses API door end to end: what Tollgate cannot bound is refused, and what the
upstream may have billed but cannot be read back is charged its bound.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

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
    TEAMS,
    arrivals,
    billed,
    calm,
    check_charge,
    proxy,
    record_cost,
    settled_row,
    tool,
)

__all__ = ["calm", "proxy"]  # the shared fixtures


# -- 6. what Tollgate cannot bound is refused ---------------------------------------------


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"conversation": "conv_123"}, "conversation"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"reasoning": {"mode": "pro"}}, "reasoning.mode"),
        (
            {"previous_response_id": "resp_1", "reasoning": {"context": "all_turns"}},
            "reasoning.context",
        ),
        ({"tools": [tool()], "tool_choice": {"type": "web_search_preview"}}, "tool_choice.type"),
        ({"tool_choice": {"type": "programmatic_tool_calling"}}, "tool_choice.type"),
        (
            {
                "tools": [tool()],
                "tool_choice": {
                    "type": "allowed_tools",
                    "mode": "required",
                    "tools": [{"type": "image_generation", "quality": "high"}],
                },
            },
            "tool_choice.tools[0].quality",
        ),
    ],
    ids=[
        "conversation",
        "web_search",
        "pro_mode",
        "all_turns_continued",
        "tool_choice_web_search",
        "tool_choice_programmatic",
        "tool_choice_definition",
    ],
)
def test_what_cannot_be_bounded_is_refused_in_openais_shape(
    proxy: Tollgate, simulator: Simulator, options: dict[str, Any], param: str
) -> None:
    before = len(arrivals(simulator))
    with pytest.raises(openai.BadRequestError) as caught:
        proxy.client().responses.create(
            model="gpt-5.5", input="Search the web", max_output_tokens=300, **options
        )
    error = caught.value
    assert (error.status_code, error.type, error.code) == (
        400,
        "invalid_request_error",
        "invalid_request",
    )
    assert error.param == param  # type: ignore[attr-defined]
    assert len(arrivals(simulator)) == before


def test_a_model_the_deployments_book_says_reasons_over_all_turns_continues_current_turn_only(
    simulator: Simulator, tmp_path: Path
) -> None:
    """A deployment's price book says its model reasons over all turns when a request
    leaves `reasoning.context` to it (the gpt-5.6 family's default): a continued response
    that leaves it out, or sends `auto`, is refused before anything is sent, and one that
    asks for `current_turn` is forwarded and charged."""
    (tmp_path / "prices.yaml").write_text(
        "mainline:\n  gpt-5.5:\n    reasoning_context: all_turns\n"
    )
    write_config(tmp_path, f"{simulator.url}/v1", "prices: prices.yaml\n", TEAMS)
    tollgate = start_tollgate(tmp_path)
    try:
        with tollgate.client() as sdk:
            asked: dict[str, Any] = {
                "model": "gpt-5.5",
                "tools": [tool()],
                "max_output_tokens": 300,
            }
            first = sdk.responses.create(input="A red bicycle", **asked)
            before = len(arrivals(simulator))
            for reasoning in ({}, {"reasoning": {"context": "auto"}}):
                with pytest.raises(openai.BadRequestError) as caught:
                    sdk.responses.create(
                        input="Now make it blue",
                        previous_response_id=first.id,
                        **asked,
                        **reasoning,
                    )
                assert (caught.value.status_code, caught.value.code) == (400, "invalid_request")
                assert caught.value.param == "reasoning.context"  # type: ignore[attr-defined]
            assert len(arrivals(simulator)) == before
            second = sdk.responses.create(
                input="Now make it blue",
                previous_response_id=first.id,
                reasoning={"context": "current_turn"},
                **asked,
            )
            row = settled_row(tollgate, second.id)
            assert row["cost_nanos"] == record_cost(billed(simulator, second.id)) > 0
    finally:
        tollgate.stop()


@pytest.mark.parametrize("path", ["/v1/responses", "/v1/responses?beta=true"])
def test_a_websocket_upgrade_is_answered_400_at_once(
    proxy: Tollgate, simulator: Simulator, path: str
) -> None:
    host, port = proxy.url.removeprefix("http://").split(":")
    handshake = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {DESIGN_KEY}\r\n\r\n"
    ).encode()
    before = len(arrivals(simulator))
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        raw.sendall(handshake)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = raw.recv(65536)
            assert chunk, "the connection closed without an answer"
            answer += chunk
        head, _, rest = answer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        assert lines[0].split(" ")[1] == "400", lines[0]
        headers = dict(line.split(": ", 1) for line in lines[1:])
        length = int({k.lower(): v for k, v in headers.items()}["content-length"])
        while len(rest) < length:
            chunk = raw.recv(65536)
            assert chunk
            rest += chunk
    error = json.loads(rest)["error"]
    assert error["type"] == "invalid_request_error" and "WebSocket" in error["message"]
    assert len(arrivals(simulator)) == before


# -- 7. faults: what the upstream may have billed, and cannot be read back, is charged its bound


def bound_charged(proxy: Tollgate, response_id: str | None, request_id: str) -> dict[str, Any]:
    row = wait_for(
        "the row settled",
        lambda: next(
            (r for r in proxy.rows() if r["id"] == request_id and r["state"] == "settled"), None
        ),
    )
    assert row["cost_nanos"] == row["estimated_nanos"] > 0
    assert row["flagged"] == 1
    if response_id is not None:
        assert row["response_id"] in (None, response_id)
    return row


def last_request_id(proxy: Tollgate) -> str:
    return str(proxy.query("SELECT id FROM requests ORDER BY started_at DESC LIMIT 1")[0]["id"])


@dataclass(frozen=True)
class Answered:
    """One Responses call read raw: its answer's headers, its response's id, and its JSON
    body (None when streamed) or the type of its stream's last event (None when not)."""

    headers: Mapping[str, str]
    response_id: str
    body: Any
    last_event: str | None


def ask(
    proxy: Tollgate,
    prompt: str,
    stream: bool,
    *,
    model: str = "gpt-5.5",
    image: dict[str, Any] | None = None,
    calls: int = 1,
) -> Answered:
    """`prompt` asked of `model` with one image tool (`image`, else `tool()`) and up to
    `calls` calls, as a stream or not."""
    raw = proxy.client().responses.with_raw_response.create(
        model=model,
        input=prompt,
        tools=[image or tool()],
        max_output_tokens=300,
        max_tool_calls=calls,
        stream=stream,
    )
    if stream:
        last: Any = list(raw.parse())[-1]
        return Answered(raw.headers, last.response.id, None, last.type)
    body = json.loads(raw.content)
    return Answered(raw.headers, body["id"], body, None)


def read_stream(proxy: Tollgate, prompt: str, kinds: list[str]) -> None:
    """Stream `prompt` (one image tool call) to its end, the type of each event kept in
    `kinds`, up to where the SDK raises."""
    for event in proxy.client().responses.create(
        model="gpt-5.5",
        input=prompt,
        tools=[tool()],
        max_output_tokens=300,
        max_tool_calls=1,
        stream=True,
    ):
        kinds.append(event.type)


def test_a_stream_cut_short_is_followed_to_its_end_and_charged_exactly(
    proxy: Tollgate, simulator: Simulator
) -> None:
    """The stream named its response before it broke off: the response may still run (and
    bill) upstream, so Tollgate follows it to its end instead of charging its bound."""
    seen = {r["id"] for r in simulator.billing()}
    kinds: list[str] = []
    with contextlib.suppress(openai.APIError, httpx.HTTPError):  # cut: the SDK may notice
        read_stream(proxy, "A bridge [[fault:truncate]]", kinds)
    assert "response.image_generation_call.completed" in kinds
    assert "response.completed" not in kinds
    [record] = [r for r in simulator.billing() if r["id"] not in seen]
    check_charge(proxy, simulator, record["id"], "gpt-5.5", "gpt-image-2")


def test_a_stream_cut_short_fails_in_the_sdk_naming_its_response(
    proxy: Tollgate, simulator: Simulator
) -> None:
    """Read from OpenAI itself, a stream whose connection breaks fails in the SDK; through
    Tollgate it must too, not end as if it were whole."""
    seen = {r["id"] for r in simulator.billing()}
    kinds: list[str] = []
    with pytest.raises(openai.APIError) as caught:
        read_stream(proxy, "A pier [[fault:truncate]]", kinds)
    assert "response.completed" not in kinds
    [record] = [r for r in simulator.billing() if r["id"] not in seen]
    assert (caught.value.type, caught.value.code) == ("api_error", "upstream_unavailable")
    assert record["id"] in caught.value.message
    check_charge(proxy, simulator, record["id"], "gpt-5.5", "gpt-image-2")


def test_a_truncated_answer_is_charged_its_bound_flagged(
    proxy: Tollgate, simulator: Simulator
) -> None:
    seen = {r["id"] for r in simulator.billing()}
    with pytest.raises(openai.APIStatusError) as caught:
        proxy.client().responses.create(
            model="gpt-5.5",
            input="A bridge [[fault:truncate]]",
            tools=[tool()],
            max_output_tokens=300,
            max_tool_calls=1,
        )
    request_id = caught.value.response.headers["x-tollgate-request-id"]
    [record] = [r for r in simulator.billing() if r["id"] not in seen]
    row = bound_charged(proxy, None, request_id)
    assert nanos(caught.value.response.headers["x-tollgate-cost-usd"]) == row["cost_nanos"]
    assert record["billed"] and row["cost_nanos"] >= record_cost(record)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_an_answer_without_usage_is_charged_its_bound_flagged(
    proxy: Tollgate, simulator: Simulator, stream: bool
) -> None:
    answered = ask(
        proxy,
        "A bridge [[fault:nousage]]",
        stream,
        model="gpt-4.1-mini",
        image=tool("gpt-image-1.5"),
    )
    if not stream:
        assert answered.body["usage"] is None
    row = bound_charged(proxy, answered.response_id, answered.headers["x-tollgate-request-id"])
    if not stream:
        assert nanos(answered.headers["x-tollgate-cost-usd"]) == row["cost_nanos"]
    assert row["cost_nanos"] >= record_cost(billed(simulator, answered.response_id))


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_tool_usage_with_zero_counts_for_a_completed_image_is_charged_its_bound_flagged(
    proxy: Tollgate, simulator: Simulator, stream: bool
) -> None:
    # OpenAI's `tool_usage.image_gen` "may skip calls with missing or incomplete usage
    # records", and reports a family with no recorded usage as zero counts: an image that
    # completed with none of its tokens reported is not free, it is charged the bound.
    answered = ask(proxy, "A bridge [[fault:zerotool]]", stream)
    if not stream:
        response = answered.body
        assert response["tool_usage"]["image_gen"]["output_tokens"] == 0
        assert [i["status"] for i in response["output"] if i["type"] != "message"] == ["completed"]
    row = bound_charged(proxy, answered.response_id, answered.headers["x-tollgate-request-id"])
    record = billed(simulator, answered.response_id)
    assert record["images"] == 1 and row["cost_nanos"] >= record_cost(record)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_tool_usage_missing_one_call_of_several_is_charged_its_bound_flagged(
    proxy: Tollgate, simulator: Simulator, stream: bool
) -> None:
    # One call's usage record skipped: the other two are counted, so the sum is not zero
    # and has more output tokens than images, yet it is less than three completed low
    # 1024x1024 images bill. Charged as it reads, it would be an under-charge.
    answered = ask(proxy, "Three bridges [[images:3]] [[fault:skipcall]]", stream, calls=3)
    if not stream:
        response = answered.body
        calls = [i for i in response["output"] if i["type"] == "image_generation_call"]
        assert [(i["status"], i["quality"], i["size"]) for i in calls] == [
            ("completed", "low", "1024x1024")
        ] * 3
        assert response["tool_usage"]["image_gen"]["output_tokens"] > 0
    record = billed(simulator, answered.response_id)
    assert record["images"] == 3
    row = bound_charged(proxy, answered.response_id, answered.headers["x-tollgate-request-id"])
    assert row["cost_nanos"] >= record_cost(record)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_every_call_counted_is_charged_as_it_reads_whatever_its_quality_and_size(
    proxy: Tollgate, simulator: Simulator, stream: bool
) -> None:
    # The per-call floor never flags a whole answer: calls of `auto` quality and size
    # (answered at what they were made at), partial images, and gpt-image-1-mini, whose
    # images bill fewer tokens than its price book's per-image prices say.
    for options in (
        tool(quality="auto", size="auto"),
        tool(partial_images=2) if stream else tool(quality="medium", size="1536x1024"),
        tool("gpt-image-1-mini", quality="low", size="1024x1536"),
        tool("gpt-image-1.5", quality="high", size="1024x1024"),
    ):
        response_id = ask(
            proxy, "Two bridges [[images:2]]", stream, image=options, calls=2
        ).response_id
        check_charge(proxy, simulator, response_id, "gpt-5.5", options["model"])


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_failed_response_is_charged_the_usage_it_reports(
    proxy: Tollgate, simulator: Simulator, stream: bool
) -> None:
    answered = ask(proxy, "A bridge [[fault:failed]]", stream)
    if stream:
        assert answered.last_event == "response.failed"
    else:
        assert answered.body["status"] == "failed"
    response_id = answered.response_id
    record = billed(simulator, response_id)
    assert record["usage"]["image_output"] > 0  # its image was made, and billed
    row = settled_row(proxy, response_id)
    assert row["cost_nanos"] == record_cost(record) > 0
    assert row["estimated_nanos"] >= row["cost_nanos"]
    assert (row["flagged"], row["outcome"]) == (0, "upstream_error")


def test_an_incomplete_response_is_charged_the_usage_it_reports(
    proxy: Tollgate, simulator: Simulator
) -> None:
    response = proxy.client().responses.create(
        model="gpt-5.5",
        input="A very long story about a bridge",
        tools=[tool()],
        max_output_tokens=16,
        max_tool_calls=1,
    )
    assert response.status == "incomplete"
    row = check_charge(proxy, simulator, response.id, "gpt-5.5", "gpt-image-2")
    assert row["mainline_output_tokens"] == 16


def test_a_server_error_is_charged_nothing(proxy: Tollgate, simulator: Simulator) -> None:
    seen = {r["id"] for r in simulator.billing()}
    with pytest.raises(openai.InternalServerError) as caught:
        proxy.client().responses.create(
            model="gpt-5.5",
            input="A bridge [[fault:500]]",
            tools=[tool()],
            max_output_tokens=300,
            max_tool_calls=1,
        )
    headers = caught.value.response.headers
    assert headers["x-tollgate-cost-usd"] == "0"
    row = next(r for r in proxy.rows() if r["id"] == headers["x-tollgate-request-id"])
    assert (row["state"], row["cost_nanos"], row["outcome"]) == ("settled", 0, "upstream_error")
    [record] = [r for r in simulator.billing() if r["id"] not in seen]
    assert (record["status"], record["billed"]) == (500, False)


def test_a_response_that_ended_without_usage_cannot_be_continued(
    proxy: Tollgate, simulator: Simulator
) -> None:
    """A response that failed or was cancelled without reporting usage is settled at
    nothing, and its row keeps no token counts; OpenAI still stores its input and bills it
    again as the context of a response that continues it. Continuing it would be bounded
    without that context: refused, nothing sent."""
    sdk = proxy.client()
    first = sdk.responses.create(
        model="gpt-5.5",
        input="A harbour at dawn. " + "Every mast and rope drawn in detail. " * 500,
        tools=[tool()],
        max_output_tokens=300,
        max_tool_calls=1,
    )
    # Its row as a usage-less end leaves it (`settlement.metered`: nothing charged).
    proxy.query(
        "UPDATE requests SET mainline_input_tokens = 0, mainline_cached_input_tokens = 0, "
        "mainline_output_tokens = 0, images = 0, cost_nanos = 0, mainline_cost_nanos = 0, "
        "outcome = 'upstream_error', error_code = 'response_failed' "
        f"WHERE response_id = '{first.id}'"
    )
    before = len(arrivals(simulator))
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.responses.create(
            model="gpt-5.5",
            input="Now at dusk",
            previous_response_id=first.id,
            tools=[tool()],
            max_output_tokens=300,
            max_tool_calls=1,
        )
    assert caught.value.body["param"] == "previous_response_id"  # type: ignore[index]
    assert "without reporting its usage" in caught.value.message
    assert len(arrivals(simulator)) == before


def test_a_stream_whose_last_event_is_unreadable_is_followed_and_charged_exactly(
    proxy: Tollgate, simulator: Simulator
) -> None:
    """A stream that ends without a terminal event it could read (here its last event's
    data is not JSON) named its response: the response says what it billed once read
    back, so it is charged that, not its bound."""
    seen = {r["id"] for r in simulator.billing()}
    with contextlib.suppress(openai.APIError, ValueError):  # the SDK may choke on it
        read_stream(proxy, "A bridge [[fault:garbage]]", [])
    [record] = [r for r in simulator.billing() if r["id"] not in seen]
    check_charge(proxy, simulator, record["id"], "gpt-5.5", "gpt-image-2")
