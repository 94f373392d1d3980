"""Answers whose usage cannot be believed are charged their bound, flagged, never $0; and
an answer that spells the company key with JSON escapes never gives it away.

An upstream (or anything between Tollgate and it) that answers 200 with a `usage` whose
counts are strings, negatives, floats, missing or absurd, a stream whose completed event
carries none, a Responses stream that ends twice: each is settled at its bound, or at what
the part that was read reported when that costs more, flagged for reconciliation. The
upstream here is a small scripted stand-in served from this process (the simulator answers
as OpenAI does, and OpenAI never answers so); Tollgate runs as a real process in front of it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.conftest import UPSTREAM_KEY, Tollgate, serving, start_tollgate, write_config
from tests.test_proxy_e2e import wait_settled

IMAGE = "iVBORw0KGgo="
USAGE = {
    "input_tokens": 10,
    "input_tokens_details": {"text_tokens": 10, "image_tokens": 0},
    "output_tokens": 196,
    "total_tokens": 206,
}
ANSWERS: dict[str, Any] = {
    "strings": {"input_tokens": "10", "output_tokens": "4160", "total_tokens": "4170"},
    "negative": {"input_tokens": -10, "output_tokens": -4160},
    "empty": {},
    "total-only": {"total_tokens": 4170},
    "floats": {"input_tokens": 10.0, "output_tokens": 4160.0},
    "absurd": {"input_tokens": 10, "output_tokens": 10**17},
}


def sse(kind: str, fields: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields})}\n\n".encode()


def escaped_key() -> str:
    """The key this upstream was sent, every other character a JSON `\\uXXXX` escape."""
    key = UPSTREAM_KEY
    return "".join(f"\\u{ord(c):04x}" if i % 2 else c for i, c in enumerate(key))


async def images(request: Request) -> Response:
    body = await request.json()
    mode = body["prompt"]
    if mode == "escaped-echo":
        echo = f'"echo": "Bearer {escaped_key()}"'
        if body.get("stream"):
            fields = f'"type": "image_generation.completed", "b64_json": "{IMAGE}"'
            event = f'{{{fields}, "usage": {json.dumps(USAGE)}, {echo}}}'
            data = f"event: image_generation.completed\ndata: {event}\n\n"
            return Response(data, media_type="text/event-stream")
        answer = f'{{"created": 1, "data": [{{"b64_json": "{IMAGE}"}}], {echo}, '
        return Response(answer + f'"usage": {json.dumps(USAGE)}}}', media_type="application/json")
    if not body.get("stream"):
        return JSONResponse({"created": 1, "data": [{"b64_json": IMAGE}], "usage": ANSWERS[mode]})

    async def events() -> AsyncIterator[bytes]:
        partial = {"b64_json": IMAGE, "partial_image_index": 0}
        if mode == "no-usage":
            yield sse("image_generation.completed", {"b64_json": IMAGE})
        elif mode == "error-after-partial":
            yield sse("image_generation.partial_image", partial)
            yield sse("error", {"error": {"message": "boom", "type": "server_error"}})
        else:
            yield sse("image_generation.completed", {"b64_json": IMAGE, "usage": ANSWERS[mode]})

    return StreamingResponse(events(), media_type="text/event-stream")


CALL_STATUSES = ("in_progress", "generating", "failed")
"""The statuses of an image call that has not completed."""


def response(image_output: int) -> dict[str, Any]:
    return {
        "id": "resp_twice",
        "object": "response",
        "created_at": 1,
        "status": "completed",
        "model": "gpt-5.5",
        "output": [
            {"type": "image_generation_call", "id": "ig_1", "status": "completed", "result": IMAGE}
        ],
        "usage": {"input_tokens": 20, "output_tokens": 10, "total_tokens": 30},
        "tool_usage": {"image_gen": {**USAGE, "output_tokens": image_output}},
    }


async def responses(request: Request) -> Response:
    mode = (await request.json())["input"]
    status, _, call_status = mode.partition(" with ")
    if call_status in CALL_STATUSES:
        # Ended with its image call under way (or failed): no tool_usage.
        call = {**response(0)["output"][0], "status": call_status, "result": None}
        ended = {**response(0), "status": status, "output": [call], "tool_usage": None}
        return JSONResponse(ended)

    async def events() -> AsyncIterator[bytes]:
        created = {**response(0), "status": "in_progress", "output": [], "usage": None}
        yield sse("response.created", {"response": created, "sequence_number": 0})
        if mode == "calls left out":
            # The image call streams done, then the completed response lists no output
            # and no tool_usage: as if no image had been made.
            call = {**response(0)["output"][0], "quality": "low", "size": "1024x1024"}
            yield sse("response.output_item.done", {"item": call, "output_index": 0})
            done = {**response(0), "output": [], "tool_usage": None}
            yield sse("response.completed", {"response": done, "sequence_number": 2})
            return
        if mode == "failed while drawing":
            # The image call begins, then the response fails, listing nothing, reporting
            # no usage.
            call = {**response(0)["output"][0], "status": "in_progress", "result": None}
            yield sse("response.output_item.added", {"item": call, "output_index": 0})
            drawing = {"item_id": "ig_1", "output_index": 0, "sequence_number": 2}
            yield sse("response.image_generation_call.generating", drawing)
            failed = {**response(0), "status": "failed", "output": [], "usage": None}
            yield sse("response.failed", {"response": {**failed, "tool_usage": None}})
            return
        # A stream that ends twice: the first end is the dearer one.
        yield sse("response.completed", {"response": response(50_000), "sequence_number": 1})
        yield sse("response.completed", {"response": response(1), "sequence_number": 2})

    return StreamingResponse(events(), media_type="text/event-stream")


APP = Starlette(
    routes=[
        Route("/v1/images/generations", images, methods=["POST"]),
        Route("/v1/responses", responses, methods=["POST"]),
    ]
)


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tollgate]:
    root: Path = tmp_path_factory.mktemp("policies")
    with serving(APP) as upstream:
        write_config(root, f"{upstream}/v1")
        tollgate = start_tollgate(root)
        yield tollgate
        tollgate.stop()


def assert_charged_at_least_the_bound_flagged(proxy: Tollgate, request_id: str) -> dict[str, Any]:
    row = wait_settled(proxy, request_id)
    assert row["flagged"] == 1
    assert row["cost_nanos"] >= row["estimated_nanos"] > 0
    assert row["reserved_nanos"] == 0
    return row


@pytest.mark.parametrize("mode", list(ANSWERS))
def test_an_answer_whose_usage_cannot_be_believed_is_charged_its_bound_flagged(
    proxy: Tollgate, mode: str
) -> None:
    raw = proxy.client().images.with_raw_response.generate(
        model="gpt-image-2", prompt=mode, quality="low", size="1024x1024"
    )
    assert raw.http_response.status_code == 200 and raw.parse().data
    row = assert_charged_at_least_the_bound_flagged(proxy, raw.headers["x-tollgate-request-id"])
    assert row["cost_nanos"] == row["estimated_nanos"] and row["outcome"] == "ok"


@pytest.mark.parametrize("mode", ["no-usage", "strings", "error-after-partial"])
def test_a_stream_whose_billing_is_unknown_is_charged_its_bound_flagged(
    proxy: Tollgate, mode: str
) -> None:
    with proxy.client().images.with_streaming_response.generate(
        model="gpt-image-2",
        prompt=mode,
        quality="low",
        size="1024x1024",
        stream=True,
        partial_images=1,
    ) as answer:
        request_id = answer.headers["x-tollgate-request-id"]
        assert list(answer.iter_lines())
    row = assert_charged_at_least_the_bound_flagged(proxy, request_id)
    assert row["cost_nanos"] == row["estimated_nanos"]


def test_a_responses_stream_that_ends_twice_is_charged_no_less_than_its_dearer_end(
    proxy: Tollgate,
) -> None:
    with proxy.client().responses.with_streaming_response.create(
        model="gpt-5.5",
        input="draw a lighthouse",
        tools=[{"type": "image_generation", "quality": "low", "size": "1024x1024"}],
        max_output_tokens=100,
        max_tool_calls=1,
        stream=True,
    ) as answer:
        request_id = answer.headers["x-tollgate-request-id"]
        assert list(answer.iter_lines())
    row = assert_charged_at_least_the_bound_flagged(proxy, request_id)
    # gpt-image-2's image output at $30 per million: the first end's 50,000 tokens alone.
    assert row["image_output_tokens"] >= 50_000
    assert row["cost_nanos"] >= 50_000 * 30_000
    assert row["error_code"] == "malformed_answer"


def test_a_responses_stream_whose_end_leaves_out_the_image_calls_it_streamed_is_charged_its_bound(
    proxy: Tollgate,
) -> None:
    """An image call the stream said was done is an image made, whatever its terminal event
    lists: with no `tool_usage` for it, the bound, flagged. It used to be settled from the
    terminal event alone, as a response that made no image (its image charged $0)."""
    with proxy.client().responses.with_streaming_response.create(
        model="gpt-5.5",
        input="calls left out",
        tools=[{"type": "image_generation", "quality": "low", "size": "1024x1024"}],
        max_output_tokens=100,
        max_tool_calls=1,
        stream=True,
    ) as answer:
        request_id = answer.headers["x-tollgate-request-id"]
        assert list(answer.iter_lines())
    row = assert_charged_at_least_the_bound_flagged(proxy, request_id)
    assert row["cost_nanos"] == row["estimated_nanos"]


def test_a_responses_stream_that_fails_while_its_image_call_runs_is_charged_its_bound(
    proxy: Tollgate,
) -> None:
    """The image call began (the stream said so) and may have rendered: a failure that
    reports no usage and lists no call is the bound, flagged, not the $0 of a response
    that failed before any work."""
    with proxy.client().responses.with_streaming_response.create(
        model="gpt-5.5",
        input="failed while drawing",
        tools=[{"type": "image_generation", "quality": "low", "size": "1024x1024"}],
        max_output_tokens=100,
        max_tool_calls=1,
        stream=True,
    ) as answer:
        request_id = answer.headers["x-tollgate-request-id"]
        assert list(answer.iter_lines())
    row = assert_charged_at_least_the_bound_flagged(proxy, request_id)
    assert row["cost_nanos"] == row["estimated_nanos"]


@pytest.mark.parametrize("call_status", CALL_STATUSES)
@pytest.mark.parametrize("status", ["incomplete", "failed"])
def test_a_response_with_an_image_call_but_no_tool_usage_is_charged_its_bound(
    proxy: Tollgate, status: str, call_status: str
) -> None:
    """An image call present, whatever its status, may have rendered (and billed) before
    the response stopped: without `tool_usage`, the bound, flagged (SPEC 11.1). Only
    completed calls used to count, and the response was charged its mainline usage alone."""
    raw = proxy.client().responses.with_raw_response.create(
        model="gpt-5.5",
        input=f"{status} with {call_status}",
        tools=[{"type": "image_generation", "quality": "low", "size": "1024x1024"}],
        max_output_tokens=100,
        max_tool_calls=1,
    )
    assert raw.parse().status == status
    row = assert_charged_at_least_the_bound_flagged(proxy, raw.headers["x-tollgate-request-id"])
    assert row["cost_nanos"] == row["estimated_nanos"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_the_company_key_spelled_with_json_escapes_never_reaches_a_team(
    proxy: Tollgate, stream: bool
) -> None:
    """Every JSON reader decodes `\\u002d` to `-`: echoed so, the key would reach the team
    whole; it is masked like the key itself."""
    assert UPSTREAM_KEY in json.loads(f'"{escaped_key()}"')
    with proxy.client().images.with_streaming_response.generate(
        model="gpt-image-2",
        prompt="escaped-echo",
        quality="low",
        size="1024x1024",
        **({"stream": True} if stream else {}),
    ) as answer:
        text = answer.read().decode()
    decoded = [
        json.loads(line.removeprefix("data: "))
        for line in (text.splitlines() if stream else [text])
        if line.startswith("data: ") or not stream
    ]
    assert decoded and all("[redacted]" in d["echo"] for d in decoded)
    assert all(UPSTREAM_KEY not in json.dumps(d, ensure_ascii=False) for d in decoded)
