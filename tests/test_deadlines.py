"""Live requests keep their reservation; every exchange has a total deadline.

Tollgate runs in-process on an injected clock, in front of an upstream whose stream the
test writes event by event, so time moves only when the test says so: nothing here waits
for a timer to fire.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.config import load_config
from proxy.core.auth import key_hash
from proxy.core.settings import UpstreamSettings
from proxy.ledger import Owner, Row
from proxy.simulator import SimulatorSettings, create_simulator_app
from proxy.web import housekeeping
from proxy.web.app import create_app
from proxy.web.gateway import Gateway
from proxy.web.runtime import Overrides, Runtime
from tests.conftest import age_reservations, write_config

KEY = "tg_test_deadline_key"
TIMEOUT_S = 2.0
TOTAL_TIMEOUT_S = 600.0
START = 1_800_000_000.0
STREAM = {"model": "gpt-image-2", "prompt": "abcd", "quality": "low", "size": "1024x1024",
          "stream": True, "partial_images": 2}  # fmt: skip
PLAIN = {"model": "gpt-image-2", "prompt": "abcd", "quality": "low", "size": "1024x1024"}
WAIT_S = 10.0
"""The bound on waiting for a condition (it holds at once unless something is broken)."""


def simulated_body(request: dict[str, Any]) -> bytes:
    """The body the simulator answers `request` (a generation) with."""

    async def fetch() -> bytes:
        simulator = create_simulator_app(SimulatorSettings())
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=simulator), base_url="http://sim"
        ) as client:
            answer = await client.post("/v1/images/generations", json=request)
            return answer.content

    return asyncio.run(fetch())


def simulated_events() -> list[bytes]:
    """The SSE events the simulator streams for `STREAM`: partials, then completed."""
    body = simulated_body(STREAM)
    return [event + b"\n\n" for event in body.split(b"\n\n") if event.strip()]


EVENTS = simulated_events()


class LiveBody(httpx.AsyncByteStream):
    """An upstream answer's body that the test writes chunk by chunk."""

    def __init__(self) -> None:
        self.chunks: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.closed = asyncio.Event()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while (chunk := await self.chunks.get()) is not None:
            yield chunk

    async def aclose(self) -> None:
        self.closed.set()


@dataclass
class LiveUpstream(httpx.AsyncBaseTransport):
    """Answers each request with a stream the test controls (`bodies`, in arrival order)."""

    bodies: list[LiveBody] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        body = LiveBody()
        self.bodies.append(body)
        self.arrived.set()
        return httpx.Response(
            200,
            headers={"content-type": "text/event-stream", "x-request-id": "req_live"},
            stream=body,
        )


@dataclass
class Call:
    """One request to the in-process Tollgate, its answer read message by message."""

    task: asyncio.Task[None]
    messages: asyncio.Queue[dict[str, Any]]

    async def next(self) -> dict[str, Any]:
        return await asyncio.wait_for(self.messages.get(), WAIT_S)

    async def body_until_end(self) -> bytes:
        out = b""
        while True:
            message = await self.next()
            out += message.get("body", b"")
            if not message.get("more_body", False):
                return out


def call(app: Gateway, body: dict[str, Any]) -> Call:
    """POST /v1/images/generations straight to the ASGI app (a client that never hangs up)."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        await asyncio.Event().wait()  # the client stays
        raise AssertionError("unreachable")

    messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/images/generations",
        "raw_path": b"/v1/images/generations", "query_string": b"", "root_path": "",
        "headers": [(b"authorization", f"Bearer {KEY}".encode()),
                    (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8080),
    }  # fmt: skip
    task = asyncio.create_task(app(scope, receive, messages.put))  # type: ignore[arg-type]
    return Call(task, messages)


@dataclass
class Harness:
    app: Gateway
    upstream: LiveUpstream
    now: list[float]

    @property
    def services(self) -> Runtime:
        return self.app.current()

    async def settled(self) -> Row:
        """The one request's row once everything in flight is done."""
        if self.services.tasks.running:
            await asyncio.wait_for(asyncio.gather(*self.services.tasks.running), WAIT_S)
        [row] = await self.services.ledger.rows()
        return row

    async def reclaim_from_another_process(self) -> int:
        """What a live sibling's housekeeping would do now: this process has kept beating
        its heartbeat, so only the age limit can reclaim its reservations."""
        await self.services.ledger.heartbeat()
        sibling = Owner("sibling", "elsewhere", 1)
        after_s = housekeeping.reclaim_after_s(self.services.config.upstream)
        return await housekeeping.reclaim_once(self.services.ledger, sibling, self.now[0], after_s)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    write_config(
        tmp_path,
        "http://live/v1",
        teams={"live": f"name: live\nkeys:\n  - {{id: k, sha256: {key_hash(KEY)}}}\n"},
    )
    config = tmp_path / "tollgate.yaml"
    config.write_text(
        config.read_text().replace(
            "  timeout_s: 3\n",
            f"  timeout_s: {TIMEOUT_S}\n  total_timeout_s: {TOTAL_TIMEOUT_S}\n",
        )
    )
    assert load_config(tmp_path).upstream.deadline_s == TOTAL_TIMEOUT_S
    return tmp_path


@asynccontextmanager
async def harness(root: Path) -> AsyncIterator[Harness]:
    now = [START]
    upstream = LiveUpstream()
    app = create_app(load_config(root), Overrides(transport=upstream, clock=lambda: now[0]), root)
    starlette = app.app
    async with starlette.router.lifespan_context(starlette):  # type: ignore[attr-defined]
        yield Harness(app, upstream, now)


async def started_stream(h: Harness) -> tuple[Call, LiveBody]:
    """A streamed request, forwarded and answering: its first event relayed to the client."""
    client = call(h.app, STREAM)
    start = await client.next()
    assert start["type"] == "http.response.start" and start["status"] == 200
    [body] = h.upstream.bodies
    await body.chunks.put(EVENTS[0])
    assert (await client.next())["body"] == EVENTS[0]
    return client, body


async def test_a_stream_kept_alive_past_timeout_plus_a_minute_keeps_its_reservation(
    root: Path,
) -> None:
    async with harness(root) as h:
        client, body = await started_stream(h)
        [row] = await h.services.ledger.rows()
        assert row.settlement is None  # reserved

        # Each chunk came within timeout_s, but the request is now older than timeout_s + 60 s
        # (the age at which reservations used to be released).
        h.now[0] += TIMEOUT_S + 61
        await age_reservations(h.services.ledger, TIMEOUT_S + 61)  # the ledger's clock too
        assert await h.reclaim_from_another_process() == 0
        [row] = await h.services.ledger.rows()
        assert row.settlement is None

        for event in EVENTS[1:]:
            await body.chunks.put(event)
        await body.chunks.put(None)
        assert EVENTS[-1] in await client.body_until_end()
        row = await h.settled()
        assert row.settlement is not None
        assert (row.settlement.outcome, row.settlement.flagged) == ("ok", False)
        assert 0 < row.settlement.cost_nanos <= row.entry.estimated_nanos


async def test_a_stream_past_its_total_deadline_is_cut_and_charged_its_bound(root: Path) -> None:
    async with harness(root) as h:
        client, body = await started_stream(h)
        h.now[0] += TOTAL_TIMEOUT_S + 1
        await body.chunks.put(EVENTS[1])  # the upstream is still sending
        relayed = await client.body_until_end()
        assert EVENTS[1] not in relayed  # cut before it
        row = await h.settled()
        await asyncio.wait_for(body.closed.wait(), WAIT_S)  # the upstream connection is closed
        s = row.settlement
        assert s is not None
        assert (s.outcome, s.error_code, s.flagged) == ("upstream_error", "deadline_exceeded", True)
        assert s.cost_nanos == row.entry.estimated_nanos > 0
        assert s.usage.image_output > 0  # with the usage reserved with it


async def test_an_answer_still_arriving_at_the_deadline_is_a_504_charged_its_bound(
    root: Path,
) -> None:
    async with harness(root) as h:
        client = call(h.app, PLAIN)
        await asyncio.wait_for(h.upstream.arrived.wait(), WAIT_S)
        [body] = h.upstream.bodies
        await body.chunks.put(b'{"created": 1, "data": [')
        h.now[0] += TOTAL_TIMEOUT_S + 1
        await body.chunks.put(b'{"b64_json": "')  # still coming, too late
        start = await client.next()
        assert start["status"] == 504
        error = json.loads(await client.body_until_end())["error"]
        assert (error["code"], error["type"]) == ("upstream_timeout", "api_error")
        row = await h.settled()
        s = row.settlement
        assert s is not None
        assert (s.error_code, s.flagged, s.status) == ("deadline_exceeded", True, 504)
        assert s.cost_nanos == row.entry.estimated_nanos > 0
        charged = dict(start["headers"])[b"x-tollgate-cost-usd"].decode()
        assert Decimal(charged) * 10**9 == s.cost_nanos


async def test_a_request_whose_body_took_the_whole_deadline_is_not_sent(root: Path) -> None:
    class SlowClock:
        """Every reading of the clock is later than the last: time passes between reads."""

        def __init__(self, step: float) -> None:
            self.t, self.step = START, step

        def __call__(self) -> float:
            self.t += self.step
            return self.t

    upstream = LiveUpstream()
    clock = SlowClock(TOTAL_TIMEOUT_S)
    app = create_app(load_config(root), Overrides(transport=upstream, clock=clock), root)
    starlette = app.app
    async with starlette.router.lifespan_context(starlette):  # type: ignore[attr-defined]
        services = app.current()
        answer = call(
            app, {k: v for k, v in STREAM.items() if "stream" not in k and "partial" not in k}
        )
        start = await answer.next()
        assert start["status"] == 504
        headers = dict(start["headers"])
        assert headers[b"x-tollgate-cost-usd"] == b"0"
        assert json.loads(await answer.body_until_end())["error"]["code"] == "upstream_timeout"
        assert upstream.bodies == []  # never sent
        [row] = await services.ledger.rows()
        assert row.settlement is not None
        assert (row.settlement.cost_nanos, row.settlement.flagged) == (0, False)
        assert row.settlement.error_code == "deadline_exceeded"


def test_reservations_are_reclaimed_only_after_every_live_request_has_ended() -> None:
    for settings in (UpstreamSettings(), UpstreamSettings(timeout_s=5, total_timeout_s=900)):
        after = housekeeping.reclaim_after_s(settings)
        # A live request ends by its deadline and settles within timeout_s more.
        assert after > settings.deadline_s + settings.timeout_s
    assert UpstreamSettings(timeout_s=300).deadline_s == 600
