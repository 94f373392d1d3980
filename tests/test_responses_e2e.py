"""The Responses API door end to end: the official openai client → Tollgate → the simulator.

Every cost is checked against an oracle that does not use Tollgate's meter: the usage the
simulator billed (its record, and the raw JSON it answered) priced at the price book's
rates, the mainline model's `usage` and the image tool's `tool_usage.image_gen` apart.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai
import pytest

from proxy.config.prices import load_price_book
from proxy.core.auth import key_hash
from proxy.core.models import Usage
from tests.conftest import (
    DESIGN_KEY,
    RESEARCH_KEY,
    UPSTREAM_KEY,
    Simulator,
    Tollgate,
    start_tollgate,
    write_config,
)

BOOK = load_price_book()
KEYS = {name: f"tg_test_{name}_responses_key" for name in ("capped", "strict", "storm")}
PAIRS = [("gpt-5.5", "gpt-image-2"), ("gpt-4.1-mini", "gpt-image-1.5")]
"""(mainline model, image model): two of each, with different rates and token rules."""
DEADLINE_S = 60.0
T = TypeVar("T")


def team(name: str, body: str) -> str:
    return f"name: {name}\nkeys:\n  - {{id: {name}-key, sha256: {key_hash(KEYS[name])}}}\n" + body


TEAMS = {
    "design": f"name: design\nkeys:\n  - {{id: web-app, sha256: {key_hash(DESIGN_KEY)}}}\n",
    "research": f"name: research\nkeys:\n  - {{id: nb, sha256: {key_hash(RESEARCH_KEY)}}}\n",
    "capped": team("capped", "responses: {max_output_tokens: 600, max_tool_calls: 2}\n"),
    "strict": team("strict", "responses: {unbounded: refuse}\n"),
}


def tool(model: str | None = "gpt-image-2", **options: Any) -> dict[str, Any]:
    found: dict[str, Any] = {"type": "image_generation", "quality": "low", "size": "1024x1024"}
    if model is not None:
        found["model"] = model
    return {**found, **options}


# -- the oracle ----------------------------------------------------------------------


def priced(mainline: str, image_model: str | None, main: Usage, images: Usage) -> int:
    """Nano-dollars: `main` at the mainline model's rates plus `images` at the image
    model's, straight from the price book's rates."""
    mainline_prices = BOOK.find_mainline(mainline)
    assert mainline_prices is not None
    cost = mainline_prices.cost(main)
    if image_model is not None:
        model = BOOK.find(image_model)
        assert model is not None
        cost += model.cost(images)
    return cost


def record_cost(record: dict[str, Any]) -> int:
    """What the simulator's billing record of one response costs."""
    main, images = record["mainline"], record["usage"]
    return priced(
        record["mainline_model"],
        record["model"],
        Usage(
            mainline_input=main["input"] - main["cached_input"],
            mainline_cached_input=main["cached_input"],
            mainline_output=main["output"],
        ),
        Usage(
            text_input=images["text_input"],
            image_input=images["image_input"],
            image_output=images["image_output"],
            text_output=images["text_output"],
        ),
    )


def json_cost(body: dict[str, Any], image_model: str) -> int:
    """What a response object's raw `usage` and `tool_usage.image_gen` cost."""
    usage = body["usage"]
    cached = usage["input_tokens_details"]["cached_tokens"]
    gen = body["tool_usage"]["image_gen"]
    return priced(
        body["model"],
        image_model,
        Usage(
            mainline_input=usage["input_tokens"] - cached,
            mainline_cached_input=cached,
            mainline_output=usage["output_tokens"],
        ),
        Usage(
            text_input=gen["input_tokens_details"]["text_tokens"],
            image_input=gen["input_tokens_details"]["image_tokens"],
            image_output=gen["output_tokens_details"]["image_tokens"],
            text_output=gen["output_tokens_details"]["text_tokens"],
        ),
    )


def nanos(header: str) -> int:
    return int(Decimal(header) * 10**9)


# -- waiting for conditions -----------------------------------------------------------


def wait_for(what: str, found: Callable[[], T | None], timeout: float = DEADLINE_S) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = found()
        if value is not None:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout} s")


def rows_of(proxy: Tollgate, response_id: str) -> list[dict[str, Any]]:
    return proxy.query(f"SELECT * FROM requests WHERE response_id = '{response_id}'")


def settled_row(proxy: Tollgate, response_id: str, timeout: float = DEADLINE_S) -> dict[str, Any]:
    def settled() -> dict[str, Any] | None:
        rows = rows_of(proxy, response_id)
        return rows[0] if rows and rows[0]["state"] == "settled" else None

    row = wait_for(f"the row of {response_id} settled", settled, timeout)
    assert len(rows_of(proxy, response_id)) == 1
    return row


def billed(simulator: Simulator, response_id: str) -> dict[str, Any]:
    """The simulator's billing record of `response_id`, once it has billed it."""

    def found() -> dict[str, Any] | None:
        return next((r for r in simulator.billing() if r["id"] == response_id), None)

    return wait_for(f"{response_id} billed", found)


def check_charge(
    proxy: Tollgate, simulator: Simulator, response_id: str, mainline: str, image_model: str
) -> dict[str, Any]:
    """The ledger row of `response_id` is the oracle's price of what the simulator billed,
    within its reservation."""
    record = billed(simulator, response_id)
    assert (record["mainline_model"], record["model"]) == (mainline, image_model)
    cost = record_cost(record)
    row = settled_row(proxy, response_id)
    assert row["cost_nanos"] == cost > 0
    assert row["estimated_nanos"] >= row["cost_nanos"]
    assert (row["endpoint"], row["model"], row["mainline_model"]) == (
        "responses",
        image_model,
        mainline,
    )
    assert (row["flagged"], row["outcome"], row["held"]) == (0, "ok", 0)
    assert row["image_output_tokens"] == record["usage"]["image_output"]
    main = record["mainline"]
    assert row["mainline_output_tokens"] == main["output"]
    assert row["mainline_input_tokens"] + row["mainline_cached_input_tokens"] == main["input"]
    assert row["mainline_cost_nanos"] == priced(
        mainline,
        None,
        Usage(
            mainline_input=main["input"] - main["cached_input"],
            mainline_cached_input=main["cached_input"],
            mainline_output=main["output"],
        ),
        Usage(),
    )
    return row


# -- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def proxy(simulator: Simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tollgate]:
    root = tmp_path_factory.mktemp("responses")
    write_config(root, f"{simulator.url}/v1", teams=TEAMS)
    tollgate = start_tollgate(root)
    yield tollgate
    tollgate.stop()


@pytest.fixture(autouse=True)
def calm(simulator: Simulator) -> Iterator[None]:
    """Each test starts and ends with a simulator without latency or faults."""
    simulator.configure(latency_ms=0, fault=None)
    yield
    simulator.configure(latency_ms=0, fault=None)


def arrivals(simulator: Simulator) -> list[dict[str, Any]]:
    """The requests that reached the simulated API (not its `/_sim/` pages)."""
    found = httpx.get(f"{simulator.url}/_sim/arrivals").json()["requests"]
    return [a for a in found if a["raw_path"].startswith("/v1/")]


# -- 1. exact cost, every way a response is asked for ------------------------------------


@pytest.mark.parametrize(("mainline", "image_model"), PAIRS)
def test_a_plain_response_costs_its_usage_plus_its_tool_usage(
    proxy: Tollgate, simulator: Simulator, mainline: str, image_model: str
) -> None:
    raw = proxy.client().responses.with_raw_response.create(
        model=mainline,
        input="A lighthouse at dawn [[images:2]]",
        tools=[tool(image_model)],
        max_output_tokens=400,
        max_tool_calls=2,
    )
    body = json.loads(raw.content)
    assert len([o for o in body["output"] if o["type"] == "image_generation_call"]) == 2
    assert raw.headers["x-tollgate-team"] == "design"
    assert "x-tollgate-downgraded" not in raw.headers
    row = check_charge(proxy, simulator, body["id"], mainline, image_model)
    assert json_cost(body, image_model) == row["cost_nanos"]
    assert nanos(raw.headers["x-tollgate-cost-usd"]) == row["cost_nanos"]
    assert row["id"] == raw.headers["x-tollgate-request-id"]


@pytest.mark.parametrize(("mainline", "image_model"), PAIRS)
def test_a_stream_created_with_stream_true_is_settled_from_its_completed_event(
    proxy: Tollgate, simulator: Simulator, mainline: str, image_model: str
) -> None:
    raw = proxy.client().responses.with_raw_response.create(
        model=mainline,
        input="A harbour at night",
        tools=[tool(image_model, partial_images=2)],
        max_output_tokens=300,
        max_tool_calls=1,
        stream=True,
    )
    events = list(raw.parse())
    kinds = collections.Counter(e.type for e in events)
    assert kinds["response.image_generation_call.partial_image"] == 2
    completed = [e for e in events if e.type == "response.completed"]
    assert len(completed) == 1
    response = completed[0].response  # type: ignore[union-attr]
    row = check_charge(proxy, simulator, response.id, mainline, image_model)
    assert json_cost(response.model_dump(mode="json"), image_model) == row["cost_nanos"]
    assert nanos(raw.headers["x-tollgate-reserved-usd"]) == row["estimated_nanos"]
    assert billed(simulator, response.id)["usage"]["image_output"] >= 200  # the partials


@pytest.mark.parametrize(("mainline", "image_model"), PAIRS)
def test_a_stream_through_the_sdk_stream_helper_is_settled_exactly(
    proxy: Tollgate, simulator: Simulator, mainline: str, image_model: str
) -> None:
    with proxy.client().responses.stream(
        model=mainline,
        input="A kite over the dunes",
        tools=[tool(image_model, partial_images=1)],
        max_output_tokens=300,
        max_tool_calls=1,
    ) as stream:
        for _ in stream:
            pass
        final = stream.get_final_response()
    assert final.status == "completed"
    check_charge(proxy, simulator, final.id, mainline, image_model)


@pytest.mark.parametrize(("mainline", "image_model"), PAIRS)
def test_a_background_response_is_held_then_settled_when_it_ends(
    proxy: Tollgate, simulator: Simulator, mainline: str, image_model: str
) -> None:
    simulator.configure(latency_ms=1500)
    sdk = proxy.client()
    raw = sdk.responses.with_raw_response.create(
        model=mainline,
        input="A glacier at noon",
        tools=[tool(image_model)],
        max_output_tokens=300,
        max_tool_calls=1,
        background=True,
    )
    queued = raw.parse()
    assert queued.status in ("queued", "in_progress")
    [held] = rows_of(proxy, queued.id)
    assert (held["state"], held["held"]) == ("reserved", 1)
    assert nanos(raw.headers["x-tollgate-reserved-usd"]) == held["estimated_nanos"]

    def ended() -> Any:
        found = sdk.responses.retrieve(queued.id)
        return found if found.status not in ("queued", "in_progress") else None

    assert wait_for("the response ended", ended).status == "completed"
    check_charge(proxy, simulator, queued.id, mainline, image_model)


@pytest.mark.parametrize(("mainline", "image_model"), PAIRS)
def test_a_continued_response_pays_for_the_context_it_carries(
    proxy: Tollgate, simulator: Simulator, mainline: str, image_model: str
) -> None:
    sdk = proxy.client()
    first = sdk.responses.create(
        model=mainline,
        input="A red bicycle",
        tools=[tool(image_model)],
        max_output_tokens=300,
        max_tool_calls=1,
    )
    raw = sdk.responses.with_raw_response.create(
        model=mainline,
        input="Now make it blue",
        previous_response_id=first.id,
        tools=[tool(image_model)],
        max_output_tokens=300,
        max_tool_calls=1,
    )
    body = json.loads(raw.content)
    assert body["previous_response_id"] == first.id
    check_charge(proxy, simulator, first.id, mainline, image_model)
    row = check_charge(proxy, simulator, body["id"], mainline, image_model)
    assert json_cost(body, image_model) == row["cost_nanos"]
    assert nanos(raw.headers["x-tollgate-cost-usd"]) == row["cost_nanos"]
    # The first response's tokens are billed again as the second's input.
    assert first.usage is not None
    carried = first.usage.input_tokens + first.usage.output_tokens
    assert billed(simulator, body["id"])["mainline"]["input"] > carried


@pytest.mark.parametrize(("mainline", "image_model"), PAIRS)
def test_a_long_conversation_pays_its_cached_context_at_the_cached_rate(
    proxy: Tollgate, simulator: Simulator, mainline: str, image_model: str
) -> None:
    sdk = proxy.client()
    previous: str | None = None
    for turn in range(4):
        raw = sdk.responses.with_raw_response.create(
            model=mainline,
            input=f"Turn {turn}: " + "a long description of a harbour town. " * 120,
            tools=[tool(image_model)],
            max_output_tokens=300,
            max_tool_calls=1,
            **({"previous_response_id": previous} if previous else {}),
        )
        body = json.loads(raw.content)
        row = check_charge(proxy, simulator, body["id"], mainline, image_model)
        assert json_cost(body, image_model) == row["cost_nanos"]
        cached = body["usage"]["input_tokens_details"]["cached_tokens"]
        assert row["mainline_cached_input_tokens"] == cached
        assert (cached > 0) == (turn > 0)  # the carried context is cached from turn 1
        previous = body["id"]


def test_the_beta_path_is_the_same_door(proxy: Tollgate, simulator: Simulator) -> None:
    answer = httpx.post(
        f"{proxy.url}/v1/responses?beta=true",
        headers={"authorization": f"Bearer {DESIGN_KEY}", "openai-beta": "responses=v1"},
        json={
            "model": "gpt-5.5",
            "input": "A lighthouse, in beta",
            "tools": [tool()],
            "max_output_tokens": 300,
            "max_tool_calls": 1,
        },
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    row = check_charge(proxy, simulator, answer.json()["id"], "gpt-5.5", "gpt-image-2")
    assert nanos(answer.headers["x-tollgate-cost-usd"]) == row["cost_nanos"]


# -- 2. the caps a request leaves open ---------------------------------------------------


def test_open_caps_are_injected_named_and_sent_upstream(
    proxy: Tollgate, simulator: Simulator
) -> None:
    for key, output, calls in ((DESIGN_KEY, 8192, 1), (KEYS["capped"], 600, 2)):
        raw = proxy.client(key).responses.with_raw_response.create(
            model="gpt-4.1-mini", input="A lantern", tools=[tool()]
        )
        assert raw.headers["x-tollgate-downgraded"] == (
            f"max_output_tokens=unset->{output}; max_tool_calls=unset->{calls}"
        )
        body = json.loads(raw.content)
        assert (body["max_output_tokens"], body["max_tool_calls"]) == (output, calls)
        params = billed(simulator, body["id"])["params"]
        assert (params["max_output_tokens"], params["max_tool_calls"]) == (output, calls)
        row = check_charge(proxy, simulator, body["id"], "gpt-4.1-mini", "gpt-image-2")
        assert row["n"] == calls


def test_a_team_that_refuses_unbounded_requests_gets_400_naming_the_bound(
    proxy: Tollgate, simulator: Simulator
) -> None:
    sdk = proxy.client(KEYS["strict"])
    before = len(arrivals(simulator))
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.responses.create(
            model="gpt-4.1-mini", input="A lantern", tools=[tool()], max_tool_calls=1
        )
    assert caught.value.code == "invalid_request"
    assert caught.value.param == "max_output_tokens"  # type: ignore[attr-defined]
    assert "max_output_tokens" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.responses.create(
            model="gpt-4.1-mini", input="A lantern", tools=[tool()], max_output_tokens=300
        )
    assert "max_tool_calls" in caught.value.message
    assert len(arrivals(simulator)) == before  # nothing was forwarded
    fine = sdk.responses.create(
        model="gpt-4.1-mini",
        input="A lantern",
        tools=[tool()],
        max_output_tokens=300,
        max_tool_calls=1,
    )
    check_charge(proxy, simulator, fine.id, "gpt-4.1-mini", "gpt-image-2")


def test_a_tool_without_a_model_gets_the_default_model(
    proxy: Tollgate, simulator: Simulator
) -> None:
    raw = proxy.client().responses.with_raw_response.create(
        model="gpt-5.5",
        input="A windmill",
        tools=[tool(None)],
        max_output_tokens=300,
        max_tool_calls=1,
    )
    assert raw.headers["x-tollgate-model"] == "gpt-image-2"  # the configured default_model
    response_id = json.loads(raw.content)["id"]
    assert billed(simulator, response_id)["model"] == "gpt-image-2"
    check_charge(proxy, simulator, response_id, "gpt-5.5", "gpt-image-2")


# -- 3. a response belongs to the team that created it -----------------------------------


def test_another_team_cannot_reach_a_response_and_its_creator_can(
    proxy: Tollgate, simulator: Simulator
) -> None:
    simulator.configure(latency_ms=30_000)  # the background response stays queued
    design = proxy.client()
    created = design.responses.create(
        model="gpt-5.5",
        input="A quiet street",
        tools=[tool()],
        max_output_tokens=300,
        max_tool_calls=1,
        background=True,
    )
    simulator.configure(latency_ms=0)
    research = proxy.client(RESEARCH_KEY)
    before = len(arrivals(simulator))
    attempts: list[Callable[[], Any]] = [
        lambda: research.responses.retrieve(created.id),
        lambda: research.responses.cancel(created.id),
        lambda: research.responses.delete(created.id),
        lambda: research.responses.input_items.list(created.id),
        lambda: research.responses.create(
            model="gpt-5.5",
            input="And again",
            previous_response_id=created.id,
            max_output_tokens=300,
        ),
    ]
    for attempt in attempts:
        with pytest.raises(openai.NotFoundError) as caught:
            attempt()
        assert created.id in caught.value.message
    assert len(arrivals(simulator)) == before  # nothing reached the upstream
    # The creating team can.
    assert design.responses.retrieve(created.id).status in ("queued", "in_progress")
    items = design.responses.input_items.list(created.id)
    assert [i.type for i in items.data] == ["message"]
    with pytest.raises(openai.BadRequestError) as refused:  # not ended: cancel it first
        design.responses.delete(created.id)
    assert "cancel it first" in refused.value.message
    cancelled = design.responses.cancel(created.id)
    assert cancelled.status == "cancelled"
    # Cancelled before it ended: settled from the usage it reports (its input, read).
    record = billed(simulator, created.id)
    assert record["usage"]["image_output"] == 0 and record["mainline"]["output"] == 0
    row = settled_row(proxy, created.id)
    assert row["cost_nanos"] == record_cost(record) > 0
    assert row["estimated_nanos"] >= row["cost_nanos"]
    assert (row["flagged"], row["held"]) == (0, 0)
    continued = design.responses.create(
        model="gpt-5.5",
        input="Start again",
        previous_response_id=created.id,
        tools=[tool()],
        max_output_tokens=300,
        max_tool_calls=1,
    )
    check_charge(proxy, simulator, continued.id, "gpt-5.5", "gpt-image-2")
    assert design.responses.delete(created.id) is None
    with pytest.raises(openai.NotFoundError):
        research.responses.retrieve(continued.id)


# -- 6. what Tollgate cannot bound is refused ---------------------------------------------


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"conversation": "conv_123"}, "conversation"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ],
    ids=["conversation", "web_search"],
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


def test_a_stream_cut_short_is_followed_to_its_end_and_charged_exactly(
    proxy: Tollgate, simulator: Simulator
) -> None:
    """The stream named its response before it broke off: the response may still run (and
    bill) upstream, so Tollgate follows it to its end instead of charging its bound."""
    seen = {r["id"] for r in simulator.billing()}
    kinds = []
    with contextlib.suppress(openai.APIError, httpx.HTTPError):  # cut: the SDK may notice
        for event in proxy.client().responses.create(
            model="gpt-5.5",
            input="A bridge [[fault:truncate]]",
            tools=[tool()],
            max_output_tokens=300,
            max_tool_calls=1,
            stream=True,
        ):
            kinds.append(event.type)
    assert "response.image_generation_call.completed" in kinds
    assert "response.completed" not in kinds
    [record] = [r for r in simulator.billing() if r["id"] not in seen]
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
    raw = proxy.client().responses.with_raw_response.create(
        model="gpt-4.1-mini",
        input="A bridge [[fault:nousage]]",
        tools=[tool("gpt-image-1.5")],
        max_output_tokens=300,
        max_tool_calls=1,
        stream=stream,
    )
    if stream:
        events = list(raw.parse())  # type: ignore[call-overload]
        response_id = events[-1].response.id
    else:
        response = json.loads(raw.content)
        assert response["usage"] is None
        response_id = response["id"]
    row = bound_charged(proxy, response_id, raw.headers["x-tollgate-request-id"])
    if not stream:
        assert nanos(raw.headers["x-tollgate-cost-usd"]) == row["cost_nanos"]
    assert row["cost_nanos"] >= record_cost(billed(simulator, response_id))


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_failed_response_is_charged_the_usage_it_reports(
    proxy: Tollgate, simulator: Simulator, stream: bool
) -> None:
    raw = proxy.client().responses.with_raw_response.create(
        model="gpt-5.5",
        input="A bridge [[fault:failed]]",
        tools=[tool()],
        max_output_tokens=300,
        max_tool_calls=1,
        stream=stream,
    )
    if stream:
        events = list(raw.parse())  # type: ignore[call-overload]
        assert events[-1].type == "response.failed"
        response_id = events[-1].response.id
    else:
        body = json.loads(raw.content)
        assert body["status"] == "failed"
        response_id = body["id"]
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


# -- 4. a storm against a budget that fits a few bounds ----------------------------------

ADMIN = "admin-secret-token"
STORM_BODY: dict[str, Any] = {
    "model": "gpt-4.1-mini",
    "input": "A storm at sea",
    "tools": [tool()],
    "max_output_tokens": 200,
    "max_tool_calls": 1,
}


async def storm(url: str, count: int, background: bool) -> list[Any]:
    """`count` Responses requests at once: each one's response, or the error it raised."""
    async with openai.AsyncOpenAI(
        base_url=f"{url}/v1", api_key=KEYS["storm"], max_retries=0, timeout=60
    ) as sdk:

        async def one() -> Any:
            try:
                return await sdk.responses.create(**STORM_BODY, background=background)
            except openai.APIError as exc:
                return exc

        return await asyncio.gather(*(one() for _ in range(count)))


@pytest.mark.parametrize("background", [False, True], ids=["answered", "background"])
def test_a_storm_never_settles_past_the_limit(
    simulator: Simulator, tmp_path: Path, background: bool
) -> None:
    teams = {**TEAMS, "storm": team("storm", "budgets:\n  - {period: month, limit_usd: 100}\n")}
    write_config(tmp_path, f"{simulator.url}/v1", f"admin_token: {ADMIN}\n", teams)
    proxy = start_tollgate(tmp_path)
    try:
        probe = proxy.client().responses.create(**STORM_BODY)
        bound = settled_row(proxy, probe.id)["estimated_nanos"]
        limit = bound * 7 // 2  # three bounds and a half
        text = teams["storm"].replace("limit_usd: 100", f"limit_usd: {Decimal(limit) / 10**9}")
        (tmp_path / "teams" / "storm.yaml").write_text(text)
        reload = httpx.post(
            f"{proxy.url}/admin/reload", headers={"authorization": f"Bearer {ADMIN}"}
        )
        assert reload.status_code == 200
        simulator.configure(latency_ms=300)
        answers = asyncio.run(storm(proxy.url, 24, background))
        simulator.configure(latency_ms=0)
        done = [a for a in answers if not isinstance(a, Exception)]
        refused = [a for a in answers if isinstance(a, Exception)]
        assert len(done) >= 3, answers
        assert refused, "the budget fits only a few bounds"
        for error in refused:
            assert isinstance(error, openai.RateLimitError), error
            assert error.code == "budget_exceeded"
        for answer in done:  # a background response is settled when it ends
            settled_row(proxy, answer.id)
        rows = [r for r in proxy.rows() if r["team"] == "storm"]
        assert all(r["state"] == "settled" and r["flagged"] == 0 for r in rows)
        spent = sum(r["cost_nanos"] for r in rows)
        billed_total = sum(record_cost(billed(simulator, a.id)) for a in done)
        assert billed_total <= spent <= limit
        for row in rows:
            assert row["estimated_nanos"] >= row["cost_nanos"]
        [reserved] = proxy.query("SELECT SUM(reserved_nanos) AS v FROM budget_usage")[0].values()
        assert reserved == 0
    finally:
        proxy.stop()


# -- 5. a background response outlives the process that sent it --------------------------


@pytest.mark.parametrize("stop_with", [signal.SIGTERM, signal.SIGKILL], ids=["term", "kill"])
def test_a_restart_adopts_a_held_background_response_and_settles_it_once(
    simulator: Simulator, tmp_path: Path, stop_with: signal.Signals
) -> None:
    write_config(tmp_path, f"{simulator.url}/v1", teams=TEAMS)
    first = start_tollgate(tmp_path)
    simulator.configure(latency_ms=4000)  # queued while Tollgate restarts
    try:
        queued = first.client().responses.create(
            model="gpt-5.5",
            input="A comet",
            tools=[tool()],
            max_output_tokens=300,
            max_tool_calls=1,
            background=True,
        )
    finally:
        simulator.configure(latency_ms=0)
        first.process.send_signal(stop_with)
        first.process.wait(timeout=30)
    [held] = rows_of(first, queued.id)
    assert (held["state"], held["held"]) == ("reserved", 1)  # not ended: still held
    second = start_tollgate(tmp_path)
    try:
        assert second.client().responses.retrieve(queued.id).id == queued.id  # still its team's
        row = check_charge(second, simulator, queued.id, "gpt-5.5", "gpt-image-2")
        assert row["owner"] != held["owner"]  # adopted by the new process
        assert row["error_code"] is None
        counted = second.query(
            "SELECT spent_nanos, reserved_nanos FROM budget_usage "
            "WHERE scope = 'team' AND team = 'design'"
        )
        assert counted and all(
            (c["spent_nanos"], c["reserved_nanos"]) == (row["cost_nanos"], 0) for c in counted
        )
        assert [r["state"] for r in second.rows()] == ["settled"]
    finally:
        second.stop()


# -- 8. the official Node SDK ----------------------------------------------------------

NODE_PROJECT = Path(__file__).parent / "node"
IN_CI = os.environ.get("CI", "").lower() not in {"", "0", "false", "no"}


def node_sdk() -> str:
    """The `node` binary, with tests/node's packages installed (`npm ci`, as tests/run
    does, when they are missing). Without node the test skips on a workstation and fails
    in CI ($CI)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        reason = "node and npm are not installed (tests/run installs them)"
        if IN_CI:
            pytest.fail(f"{reason}; CI is set: the Node SDK test must run", pytrace=False)
        pytest.skip(reason)
    if not (NODE_PROJECT / "node_modules" / "openai").is_dir():
        subprocess.run(
            [npm, "ci", "--prefix", str(NODE_PROJECT), "--no-audit", "--no-fund"],
            check=True,
            capture_output=True,
            timeout=300,
        )
    return node


def test_the_node_sdk_is_metered_exactly(proxy: Tollgate, simulator: Simulator) -> None:
    node = node_sdk()
    simulator.configure(latency_ms=500)  # the background response is queued at first
    ran = subprocess.run(
        [node, str(NODE_PROJECT / "responses.mjs")],
        capture_output=True,
        text=True,
        timeout=120,
        env={
            **os.environ,
            "TOLLGATE_BASE_URL": f"{proxy.url}/v1",
            "TOLLGATE_API_KEY": DESIGN_KEY,
            "MAINLINE_MODEL": "gpt-4.1-mini",
            "IMAGE_MODEL": "gpt-image-1.5",
        },
    )
    assert ran.returncode == 0, ran.stderr
    results = json.loads(ran.stdout)
    plain, streamed, background = results["plain"], results["stream"], results["background"]
    assert plain["status"] == streamed["status"] == background["status"] == "completed"
    assert background["queued"] in ("queued", "in_progress")
    for result in (plain, streamed, background):
        row = check_charge(proxy, simulator, result["id"], "gpt-4.1-mini", "gpt-image-1.5")
        assert row["team"] == "design"
    row = settled_row(proxy, plain["id"])
    assert row["id"] == plain["request_id"]
    assert nanos(plain["cost_usd"]) == row["cost_nanos"]


@pytest.mark.parametrize("meanwhile", ["cancelled", "deleted"])
def test_a_response_ended_elsewhere_while_tollgate_was_down_is_settled_on_restart(
    simulator: Simulator, tmp_path: Path, meanwhile: str
) -> None:
    """Cancelled upstream: settled from the usage it reports. Deleted upstream: its usage
    can no longer be read, so it is charged its bound, flagged."""
    write_config(tmp_path, f"{simulator.url}/v1", teams=TEAMS)
    first = start_tollgate(tmp_path)
    simulator.configure(latency_ms=30_000)
    try:
        queued = first.client().responses.create(
            model="gpt-4.1-mini",
            input="A nebula",
            tools=[tool()],
            max_output_tokens=300,
            max_tool_calls=1,
            background=True,
        )
    finally:
        simulator.configure(latency_ms=0)
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(timeout=30)
    upstream = {"authorization": f"Bearer {UPSTREAM_KEY}"}
    path = f"{simulator.url}/v1/responses/{queued.id}"
    if meanwhile == "cancelled":
        httpx.post(f"{path}/cancel", headers=upstream).raise_for_status()
    else:
        httpx.delete(path, headers=upstream).raise_for_status()
    second = start_tollgate(tmp_path)
    try:
        row = settled_row(second, queued.id)
        assert row["estimated_nanos"] >= row["cost_nanos"] > 0
        if meanwhile == "cancelled":
            assert row["cost_nanos"] == record_cost(billed(simulator, queued.id))
            assert row["flagged"] == 0
        else:
            assert row["cost_nanos"] == row["estimated_nanos"]
            assert (row["flagged"], row["error_code"]) == (1, "response_not_found")
        [[reserved]] = [
            r.values() for r in second.query("SELECT SUM(reserved_nanos) AS v FROM budget_usage")
        ]
        assert reserved == 0
    finally:
        second.stop()
