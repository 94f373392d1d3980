"""The simulated image request path, top to bottom.

authenticate → read the body → validate → play a fault → moderate → bill → answer
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from proxy.core.models import Endpoint
from proxy.simulator import connection
from proxy.simulator.answers import response_body, stream_events
from proxy.simulator.batches import BatchStore
from proxy.simulator.billing import RECORDED_HEADERS, BilledUsage, BillingRecord, Entry
from proxy.simulator.faults import (
    ECHO_HEADER,
    GARBAGE_BODY,
    TIMEOUT_SECONDS,
    Fault,
    echo,
    echoed,
    fault_error,
    moderation_error,
    pick_fault,
)
from proxy.simulator.files import FileStore
from proxy.simulator.forms import RawRequest, read_request, unparsed
from proxy.simulator.options import Knobs
from proxy.simulator.refusals import ApiError, invalid_api_key
from proxy.simulator.response_store import ResponseStore
from proxy.simulator.tokens import Tokens, played_tokens
from proxy.simulator.validation import ImageOrder, validate

JSON = "application/json"
NO_ANSWER = 0
"""The status recorded when the client got no HTTP answer (reset, timeout)."""


@dataclass
class SimulatorState:
    """What lives as long as one simulator app: its knobs, its billing record, its
    stored responses, files and batches."""

    knobs: Knobs
    api_key: str | None = None
    record: BillingRecord = field(default_factory=BillingRecord)
    responses: ResponseStore = field(default_factory=ResponseStore)
    files: FileStore = field(default_factory=FileStore)
    batches: BatchStore = field(default_factory=BatchStore)

    def settle(self, now: float) -> None:
        """Bill every background response and batch that has ended by `now`."""
        self.responses.settle(now, self.record)
        self.batches.settle(now, self.record, self.files)

    def __post_init__(self) -> None:
        self.record.data_residency = lambda: self.knobs.data_residency

    def clear(self) -> None:
        """Forget everything but the knobs (`POST /_sim/reset`)."""
        self.record.clear()
        self.responses.clear()
        self.files.clear()
        self.batches.clear()

    def admits(self, authorization: str | None) -> bool:
        """Whether an `Authorization` header carries the simulator's key (any, without one)."""
        return self.api_key is None or authorization == f"Bearer {self.api_key}"


@dataclass(frozen=True)
class _Arrival:
    """What the record needs to know of a request before its body is read."""

    id: str
    time: float
    endpoint: Endpoint
    authorization: str | None
    headers: Mapping[str, str]

    @classmethod
    def of(cls, endpoint: Endpoint, request: Request) -> _Arrival:
        headers = {
            name: request.headers[name] for name in RECORDED_HEADERS if name in request.headers
        }
        return cls(
            f"req_{uuid.uuid4().hex}",
            time.time(),
            endpoint,
            request.headers.get("authorization"),
            headers,
        )

    def entry(
        self,
        raw: RawRequest,
        order: ImageOrder | None,
        *,
        status: int,
        tokens: Tokens | None = None,
    ) -> Entry:
        """The record entry; billed when `tokens` is given (OpenAI did the work)."""
        model = raw.fields.get("model")
        billed = tokens is not None and order is not None
        return Entry(
            id=self.id,
            time=self.time,
            endpoint=self.endpoint,
            model=order.model.name if order else (model if isinstance(model, str) else None),
            quality=order.quality if order else None,
            size=order.size if order else None,
            n=order.n if order else None,
            stream=order.stream if order else False,
            status=status,
            billed=billed,
            usage=BilledUsage.of(tokens) if tokens and order and not order.model.is_dalle else None,
            images=order.n if billed and order else 0,
            authorization=self.authorization,
            headers=self.headers,
            params=raw.scalar_params(),
            image_count=len(order.images)
            if order
            else sum(p.field in ("image", "image[]") for p in raw.parts),
        )


RATE_LIMIT_REQUESTS = 500
RATE_LIMIT_TOKENS = 800_000


def rate_limit_headers(tokens: int, latency_ms: int) -> dict[str, str]:
    """The headers OpenAI sends with a model's answer: its rate limits (the rate-limits
    guide's `x-ratelimit-*`: this request's room, as if it were the minute's only one) and
    `openai-processing-ms`."""
    return {
        "x-ratelimit-limit-requests": str(RATE_LIMIT_REQUESTS),
        "x-ratelimit-limit-tokens": str(RATE_LIMIT_TOKENS),
        "x-ratelimit-remaining-requests": str(RATE_LIMIT_REQUESTS - 1),
        "x-ratelimit-remaining-tokens": str(max(RATE_LIMIT_TOKENS - tokens, 0)),
        "x-ratelimit-reset-requests": "120ms",
        "x-ratelimit-reset-tokens": f"{max(tokens * 60 // RATE_LIMIT_TOKENS, 1)}s",
        "openai-processing-ms": str(latency_ms),
    }


def json_response(status: int, body: object, request_id: str, extra: Mapping[str, str]) -> Response:
    headers = {"x-request-id": request_id, **extra}
    return Response(json.dumps(body), status, headers=headers, media_type=JSON)


def error_response(error: ApiError, request_id: str) -> Response:
    return json_response(error.status, error.body(), request_id, error.headers)


async def sleep_ms(ms: float) -> None:
    if ms > 0:
        await asyncio.sleep(ms / 1000)


async def handle_image_request(
    state: SimulatorState, endpoint: Endpoint, request: Request
) -> Response:
    """Answer one generations, edits or variations request the way OpenAI would."""
    arrival = _Arrival.of(endpoint, request)
    knobs = state.knobs
    accepted = await _accept(state, knobs, endpoint, request, arrival)
    if isinstance(accepted, Response):
        return accepted
    raw, order, fault = accepted
    tokens = played_tokens(order, fault)
    state.record.append(arrival.entry(raw, order, status=200, tokens=tokens))
    if order.stream:
        return _stream(order, tokens, knobs, fault, request, arrival)
    await sleep_ms(knobs.latency_ms)
    if fault == "garbage":
        return Response(GARBAGE_BODY, headers={"x-request-id": arrival.id}, media_type=JSON)
    body = response_body(
        order,
        tokens,
        created=int(arrival.time),
        padding=knobs.payload_bytes,
        request_id=arrival.id,
        with_usage=fault != "nousage",
    )
    if fault == "truncate":
        return cut_short(json.dumps(body).encode(), request, arrival.id)
    limits = rate_limit_headers(tokens.input_total + tokens.output_total, knobs.latency_ms)
    if fault == "echo":
        body["echo"] = echo(arrival.authorization)
        limits[ECHO_HEADER] = arrival.authorization or ""
    return json_response(200, body, arrival.id, limits)


async def _accept(
    state: SimulatorState, knobs: Knobs, endpoint: Endpoint, request: Request, arrival: _Arrival
) -> tuple[RawRequest, ImageOrder, Fault | None] | Response:
    """The request read and validated, with the fault it plays; or, recorded, the answer
    that ends it there (an error, or no answer at all)."""
    raw, order = unparsed(endpoint), None
    # Until the prompt is read, only the configured fault is known.
    fault = knobs.fault
    try:
        if not state.admits(arrival.authorization):
            raise invalid_api_key(arrival.authorization)
        raw = await read_request(endpoint, request)
        order = validate(raw)
        fault = pick_fault(order.prompt, knobs.fault)
        if fault in ("timeout", "reset"):
            state.record.append(arrival.entry(raw, order, status=NO_ANSWER))
            return await no_answer(fault, request, arrival.id)
        error = (fault_error(fault) if fault else None) or moderation_error(order.prompt)
        if error is not None:
            raise error
    except ApiError as error:
        state.record.append(arrival.entry(raw, order, status=error.status))
        await sleep_ms(knobs.latency_ms)
        if fault == "echo":
            error = echoed(error, arrival.authorization)
        return error_response(error, arrival.id)
    return raw, order, fault


def cut_short(body: bytes, request: Request, request_id: str) -> StreamingResponse:
    """A 200 whose body stops halfway: the connection closes mid-answer."""

    async def half() -> AsyncIterator[bytes]:
        yield body[: len(body) // 2]
        await connection.abort(request)

    return StreamingResponse(half(), headers={"x-request-id": request_id}, media_type=JSON)


async def no_answer(fault: Fault, request: Request, request_id: str) -> Response:
    """Play `timeout` or `reset`; the response returned is never seen by the client."""
    if fault == "reset":
        await connection.abort(request)
    elif not await connection.hang(request, TIMEOUT_SECONDS):
        gone = fault_error("500")
        assert gone is not None
        return error_response(gone, request_id)
    return Response(status_code=500)


def _garbled_last_completed(frames: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """The stream with its last completed event's data replaced by what is not JSON."""
    last = max(i for i, (kind, _) in enumerate(frames) if kind == "completed")
    event_line = frames[last][1].split(b"\n", 1)[0]
    return [
        *frames[:last],
        ("completed", event_line + b"\ndata: " + GARBAGE_BODY + b"\n\n"),
        *frames[last + 1 :],
    ]


def _stream(
    order: ImageOrder,
    tokens: Tokens,
    knobs: Knobs,
    fault: Fault | None,
    request: Request,
    arrival: _Arrival,
) -> StreamingResponse:
    headers = {
        "x-request-id": arrival.id,
        "cache-control": "no-cache",
        **rate_limit_headers(tokens.input_total + tokens.output_total, knobs.latency_ms),
    }
    echoes = fault == "echo"
    authorization = arrival.authorization or ""
    if echoes:
        headers[ECHO_HEADER] = authorization
    frames = stream_events(
        order,
        tokens,
        created=int(time.time()),
        padding=knobs.payload_bytes,
        extra={"echo": echo(authorization)} if echoes else None,
    )
    if fault == "garbage":
        frames = _garbled_last_completed(frames)
    if fault == "dropcompleted" and order.n > 1:
        frames = frames[:-1]  # the last image's completed event, billed all the same
    pause_ms = knobs.latency_ms / len(frames)

    async def events() -> AsyncIterator[bytes]:
        for kind, frame in frames:
            await sleep_ms(pause_ms)
            if kind == "completed" and fault == "truncate":
                await connection.abort(request)
                return
            # Echoed, in two writes split inside the echoed header: a reader may get
            # the key in two chunks.
            cut = frame.find(authorization.encode()) + len(authorization) // 2 if echoes else 0
            if cut > 0:
                yield frame[:cut]
                yield frame[cut:]
            else:
                yield frame

    return StreamingResponse(events(), headers=headers, media_type="text/event-stream")
