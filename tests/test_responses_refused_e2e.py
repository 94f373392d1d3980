"""A background response whose polls the upstream refuses (401, 403: the company key
revoked, or no longer allowed in its project) is held as a batch is: its reservation kept,
neither freed nor charged, logged now and then and counted, and settled as usual once the
upstream reads it again."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.conftest import Simulator, output, serving, start_tollgate, write_config
from tests.responses_e2e import TEAMS, check_charge, rows_of, tool, wait_for

GAUGE = "tollgate_background_responses_refused"


@dataclass
class Refusing:
    """A scripted upstream in front of the simulator that answers `status` to every poll of
    a response (`GET /v1/responses/{id}`) while `on` is set, and counts them."""

    status: int
    on: threading.Event = field(default_factory=threading.Event)
    polls: int = 0
    upstream: str = ""
    """The simulator's URL."""

    async def forward(self, request: Request) -> Response:
        if self.on.is_set() and request.method == "GET":
            self.polls += 1
            code = "invalid_api_key" if self.status == 401 else "insufficient_permissions"
            error = {"message": "refused", "type": "invalid_request_error", "code": code}
            return JSONResponse({"error": {**error, "param": None}}, status_code=self.status)
        sent = {k: v for k, v in request.headers.items() if k not in ("host", "content-length")}
        async with httpx.AsyncClient(timeout=30) as http:
            answer = await http.request(
                request.method,
                f"{self.upstream}{request.url.path}",
                params=request.query_params,
                headers=sent,
                content=await request.body(),
            )
        kept = {k: v for k, v in answer.headers.items() if k in ("content-type", "x-request-id")}
        return Response(answer.content, answer.status_code, headers=kept)


@contextmanager
def refusing_polls(simulator: Simulator, status: int) -> Iterator[tuple[str, Refusing]]:
    """`Refusing` in front of `simulator`, served on loopback: its `/v1` URL, and it."""
    refusing = Refusing(status, upstream=simulator.url)
    app = Starlette(routes=[Route("/v1/{path:path}", refusing.forward, methods=["GET", "POST"])])
    with serving(app) as url:
        yield f"{url}/v1", refusing


@pytest.mark.parametrize("status", [401, 403])
def test_a_background_response_whose_polls_are_refused_is_held_counted_then_settled(
    simulator: Simulator, tmp_path: Path, status: int
) -> None:
    """It used to be asked again every second without a word: nothing said that its spend
    could not be read, nor that the company key was at fault."""
    with refusing_polls(simulator, status) as (upstream, refusing):
        write_config(tmp_path, upstream, teams=TEAMS)
        gate = start_tollgate(tmp_path)
        try:
            refusing.on.set()
            simulator.configure(latency_ms=2000)  # queued when created, then polled
            queued = gate.client().responses.create(
                model="gpt-5.5",
                input="A lantern",
                tools=[tool()],
                max_output_tokens=300,
                max_tool_calls=1,
                background=True,
            )
            simulator.configure(latency_ms=0)
            assert queued.status in ("queued", "in_progress")
            wait_for("the gauge", lambda: gate.metric(GAUGE) == 1 or None)
            wait_for("three refused polls", lambda: refusing.polls >= 3 or None)
            [held] = rows_of(gate, queued.id)
            assert (held["state"], held["held"], held["cost_nanos"]) == ("reserved", 1, 0)
            reserved = gate.query(
                "SELECT reserved_nanos, spent_nanos FROM budget_usage "
                "WHERE scope = 'organization' AND period = 'day'"
            )
            assert reserved == [{"reserved_nanos": held["estimated_nanos"], "spent_nanos": 0}]
            logged = [
                line
                for line in output(gate.process).splitlines()
                if "refuses the company key" in line
            ]
            # Polled every second, logged once (then every 5 minutes).
            assert len(logged) == 1, logged
            assert queued.id in logged[0] and f"({status} " in logged[0]
            refusing.on.clear()
            row = check_charge(gate, simulator, queued.id, "gpt-5.5", "gpt-image-2")
            assert row["cost_nanos"] <= held["estimated_nanos"]
            assert gate.metric(GAUGE) == 0
            assert "reads it again after" in output(gate.process)
        finally:
            simulator.configure(latency_ms=0)
            gate.stop()
