"""The simulated Responses API request path, top to bottom.

create:   authenticate → read the body → validate (the items its input names by id read
          from the store) → play a fault → find the previous response → moderate → bill
          (a background response: when it ends) → store → answer
retrieve, cancel, delete, input_items: authenticate → bill what has ended → find → answer

`POST /v1/responses/input_tokens` counts, free of charge, the input tokens a response
with that body would bill (its previous response's included).

`GET /v1/responses/{id}?stream=true` replays a background stream's events (those after
`starting_after`, a sequence number), as OpenAI lets a client reconnect to one; another
response cannot be streamed again.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from proxy.simulator import connection
from proxy.simulator.billing import RECORDED_HEADERS, Entry
from proxy.simulator.faults import (
    GARBAGE_BODY,
    ResponseFault,
    fault_error,
    moderation_error,
    pick_response_fault,
)
from proxy.simulator.forms import parse_json
from proxy.simulator.refusals import ApiError, invalid, invalid_api_key
from proxy.simulator.response_answers import (
    FrameKind,
    Snapshot,
    Status,
    input_items_page,
    response_json,
    stream_frames,
)
from proxy.simulator.response_store import StoredResponse
from proxy.simulator.response_tokens import (
    ResponseTokens,
    failed_tokens,
    response_entry,
    tokens_of,
)
from proxy.simulator.responses import Resolver, ResponseOrder, read_order
from proxy.simulator.routes import (
    NO_ANSWER,
    SimulatorState,
    cut_short,
    error_response,
    json_response,
    no_answer,
    rate_limit_headers,
    sleep_ms,
)


@dataclass(frozen=True)
class _Arrival:
    """A create request as it arrived: what its record entry needs."""

    id: str
    time: float
    authorization: str | None
    headers: dict[str, str]

    @classmethod
    def of(cls, request: Request) -> _Arrival:
        headers = {n: request.headers[n] for n in RECORDED_HEADERS if n in request.headers}
        return cls(
            f"resp_{uuid.uuid4().hex}", time.time(), request.headers.get("authorization"), headers
        )

    def entry(
        self,
        fields: dict[str, Any],
        order: ResponseOrder | None,
        *,
        status: int,
        tokens: ResponseTokens | None = None,
    ) -> Entry:
        """The record entry; billed when `tokens` is given (OpenAI did the work)."""
        return response_entry(
            self.id,
            self.time,
            fields,
            order,
            tokens,
            status=status,
            stream=order.stream if order else False,
            authorization=self.authorization,
            headers=self.headers,
        )


def _final(tokens: ResponseTokens, fault: ResponseFault | None) -> Status:
    if fault == "failed":
        return "failed"
    return "incomplete" if tokens.incomplete else "completed"


async def create_response(state: SimulatorState, request: Request) -> Response:
    """Answer `POST /v1/responses` the way OpenAI would."""
    arrival = _Arrival.of(request)
    accepted = await _accept(state, request, arrival)
    if isinstance(accepted, Response):
        return accepted
    fields, order, fault, carried = accepted
    tokens = tokens_of(order, carried)
    if fault == "failed":
        tokens = failed_tokens(tokens)
    knobs = state.knobs
    # A background stream is answered as a stream: it ends (and bills) as it is sent.
    queued = order.background and not order.stream
    # OpenAI answers a background create `queued`, then runs it: for `background_ms` at
    # least, so that it is queued when answered even without latency.
    delay = max(knobs.latency_ms, knobs.background_ms) / 1000 if queued else 0.0
    stored = StoredResponse(
        arrival.id,
        order,
        tokens,
        arrival.time,
        arrival.time + delay,
        _final(tokens, fault),
        knobs.payload_bytes,
        project=request.headers.get("openai-project"),
    )
    entry = arrival.entry(fields, order, status=200, tokens=tokens)
    if queued:
        stored.pending = entry
    else:
        state.record.append(entry)
    if order.store:
        state.responses.put(stored)
    if queued:
        await sleep_ms(knobs.queue_ms)
        created = replace(stored.snapshot(arrival.time), status="queued")  # whatever its run
        return json_response(200, response_json(created), arrival.id, {})
    snap = replace(
        stored.snapshot(stored.ready_at),
        with_usage=fault != "nousage",
        tool_counted=fault != "zerotool",
        calls_skipped=1 if fault == "skipcall" else 0,
    )
    if order.stream:
        return _stream(snap, knobs.latency_ms, fault, request)
    await sleep_ms(knobs.latency_ms)
    if fault == "garbage":
        return Response(
            GARBAGE_BODY, headers={"x-request-id": arrival.id}, media_type="application/json"
        )
    if fault == "truncate":
        return cut_short(json.dumps(response_json(snap)).encode(), request, arrival.id)
    return json_response(200, response_json(snap), arrival.id, _limits(snap, knobs.latency_ms))


def _limits(snap: Snapshot, latency_ms: int) -> dict[str, str]:
    """The rate-limit headers of a response's answer: its mainline and image tokens."""
    mainline, image = snap.tokens.mainline, snap.tokens.image_gen
    used = mainline.input + mainline.output + image.text_input + image.image_input
    return rate_limit_headers(used + image.image_output, latency_ms)


async def _accept(
    state: SimulatorState, request: Request, arrival: _Arrival
) -> tuple[dict[str, Any], ResponseOrder, ResponseFault | None, int] | Response:
    """The body read and validated, its fault and the tokens carried from the previous
    response; or, recorded, the answer that ends the request there."""
    fields: dict[str, Any] = {}
    order = None
    fault: ResponseFault | None = state.knobs.fault
    try:
        if not state.admits(arrival.authorization):
            raise invalid_api_key(arrival.authorization)
        fields = dict(parse_json("generations", await request.body()).fields)
        project = request.headers.get("openai-project")
        order = read_order(fields, _resolver(state, project))
        fault = pick_response_fault(order.prompt, state.knobs.fault)
        if fault == "timeout" or fault == "reset":
            state.record.append(arrival.entry(fields, order, status=NO_ANSWER))
            return await no_answer(fault, request, arrival.id)
        carried = 0
        if order.previous_response_id is not None:
            previous = state.responses.previous(order.previous_response_id, project)
            carried = previous.tokens.mainline.input + previous.tokens.mainline.output
        error = (fault_error(fault) if fault else None) or moderation_error(order.prompt)
        if error is not None:
            raise error
    except ApiError as error:
        state.record.append(arrival.entry(fields, order, status=error.status))
        await sleep_ms(state.knobs.latency_ms)
        return error_response(error, arrival.id)
    return fields, order, fault, carried


def _resolver(state: SimulatorState, project: str | None) -> Resolver:
    """Reads an input item's id in `project`'s store, as OpenAI does."""
    return lambda item_id, store: state.responses.item(item_id, project, store)


COUNT_PARAMS = frozenset(
    {
        "model", "input", "instructions", "tools", "tool_choice", "previous_response_id",
        "reasoning", "text", "truncation", "parallel_tool_calls", "conversation",
    }
)  # fmt: skip
"""The body parameters of `client.responses.input_tokens.count`."""


async def count_input_tokens(state: SimulatorState, request: Request) -> Response:
    """Answer `POST /v1/responses/input_tokens` the way OpenAI would: bills nothing."""
    request_id = f"req_{uuid.uuid4().hex}"
    try:
        if not state.admits(request.headers.get("authorization")):
            raise invalid_api_key(request.headers.get("authorization"))
        fields = dict(parse_json("generations", await request.body()).fields)
        for key in fields:
            if key not in COUNT_PARAMS:
                raise invalid(f"Unknown parameter: '{key}'.", param=key, code="unknown_parameter")
        project = request.headers.get("openai-project")
        order = read_order(fields, _resolver(state, project))
        carried = 0
        if order.previous_response_id is not None:
            previous = state.responses.previous(order.previous_response_id, project)
            carried = previous.tokens.mainline.input + previous.tokens.mainline.output
    except ApiError as error:
        return error_response(error, request_id)
    tokens = tokens_of(order, carried)
    body = {"object": "response.input_tokens", "input_tokens": tokens.mainline.input}
    return json_response(200, body, request_id, {})


def _garbled(frames: list[tuple[FrameKind, bytes]]) -> list[tuple[FrameKind, bytes]]:
    """The stream with its terminal event's data replaced by what is not JSON."""
    event_line = frames[-1][1].split(b"\n", 1)[0]
    return [*frames[:-1], ("terminal", event_line + b"\ndata: " + GARBAGE_BODY + b"\n\n")]


def _stream(
    snap: Snapshot, latency_ms: int, fault: ResponseFault | None, request: Request
) -> StreamingResponse:
    frames = stream_frames(snap)
    if fault == "garbage":
        frames = _garbled(frames)
    pause_ms = latency_ms / len(frames)

    async def events() -> AsyncIterator[bytes]:
        for kind, frame in frames:
            await sleep_ms(pause_ms)
            if kind == "terminal" and fault == "truncate":
                await connection.abort(request)
                return
            yield frame

    headers = {"x-request-id": snap.id, "cache-control": "no-cache", **_limits(snap, latency_ms)}
    return StreamingResponse(events(), headers=headers, media_type="text/event-stream")


async def _found(
    state: SimulatorState, request: Request
) -> tuple[StoredResponse, float] | Response:
    """The stored response the path names, with every ended background response billed."""
    authorization = request.headers.get("authorization")
    request_id = f"req_{uuid.uuid4().hex}"
    now = time.time()
    state.responses.settle(now, state.record)
    try:
        if not state.admits(authorization):
            raise invalid_api_key(authorization)
        project = request.headers.get("openai-project")
        return state.responses.get(request.path_params["response_id"], project), now
    except ApiError as error:
        return error_response(error, request_id)


async def retrieve_response(state: SimulatorState, request: Request) -> Response:
    found = await _found(state, request)
    if isinstance(found, Response):
        return found
    stored, now = found
    if request.query_params.get("stream") == "true":
        try:
            after = _starting_after(stored, request.query_params.get("starting_after"))
        except ApiError as error:
            return error_response(error, stored.id)
        return _replay(stored, after)
    return json_response(200, response_json(stored.snapshot(now)), stored.id, {})


def _starting_after(stored: StoredResponse, value: str | None) -> int:
    """The sequence number a streamed retrieve resumes after (-1: from the start)."""
    if not (stored.order.background and stored.order.stream):
        # Only a background stream can be reconnected to; OpenAI answers the others with
        # the 404 of an unknown response.
        raise ApiError(404, f"Response with id '{stored.id}' not found.", param=None, code=None)
    if value is None:
        return -1
    if not value.isascii() or not value.isdigit():
        raise invalid(
            f"Invalid 'starting_after': expected an integer, but got {value!r}.",
            param="starting_after",
        )
    return int(value)


def _replay(stored: StoredResponse, after: int) -> StreamingResponse:
    """The stream of a background response that has ended, from the event after `after`."""
    frames = stream_frames(stored.snapshot(stored.ready_at))

    async def events() -> AsyncIterator[bytes]:
        for _, frame in frames[after + 1 :]:
            yield frame

    headers = {"x-request-id": stored.id, "cache-control": "no-cache"}
    return StreamingResponse(events(), headers=headers, media_type="text/event-stream")


async def cancel_response(state: SimulatorState, request: Request) -> Response:
    found = await _found(state, request)
    if isinstance(found, Response):
        return found
    stored, now = found
    try:
        state.responses.cancel(stored, now, state.record)
    except ApiError as error:
        return error_response(error, stored.id)
    return json_response(200, response_json(stored.snapshot(now)), stored.id, {})


async def delete_response(state: SimulatorState, request: Request) -> Response:
    found = await _found(state, request)
    if isinstance(found, Response):
        return found
    stored, _ = found
    state.responses.delete(stored)
    body = {"id": stored.id, "object": "response.deleted", "deleted": True}
    return json_response(200, body, stored.id, {})


async def list_input_items(state: SimulatorState, request: Request) -> Response:
    found = await _found(state, request)
    if isinstance(found, Response):
        return found
    stored, _ = found
    ascending = request.query_params.get("order") == "asc"
    page = input_items_page(stored.order, stored.id, ascending=ascending)
    return json_response(200, page, stored.id, {})
